"""ONNX export (`nerd export WEIGHTS --format onnx`): the export-only forward equals the PyTorch solve, and ONNX
Runtime's output equals `nerd denoise --iters N` within 1/255, at two image sizes with one exported file.

The PyTorch-side tests run everywhere; those that export or run ONNX Runtime skip without `nerd[onnx]`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nerd.cli import main
from nerd.denoise import SAMPLE_NOISY
from nerd.io import load_gray
from nerd.models.attention import neighbourhood_attention, reference_attention
from nerd.onnx_export import INSTALL_HINT, ExportError, FixedBroyden, fold_weight_norm, require, tiled_attention
from nerd.weights import load_weights

from .conftest import write_png

ITERS = 3
SIZES = [(37, 53), (64, 45)]  # odd sizes, neither a multiple of the attention's tile


@pytest.fixture(scope="module")
def s25() -> torch.nn.Module:
    return load_weights("nerd-s25")[0].eval()


def crop(h: int, w: int) -> np.ndarray:
    """An (h, w) crop of the shipped sigma-25 noisy sample, float32 on [0, 1]."""
    return load_gray(SAMPLE_NOISY)[100 : 100 + h, 90 : 90 + w].astype(np.float32)


@pytest.mark.parametrize("h, w, window, tile", [(5, 7, 33, 8), (16, 16, 33, 8), (37, 53, 33, 8), (70, 41, 33, 16),
                                                (37, 53, 5, 4), (9, 30, 7, 8)])
def test_tiled_attention_is_the_exact_neighbourhood_attention(h, w, window, tile):
    g = torch.Generator().manual_seed(h * w)
    q, k, v = (torch.randn(2, 3, h, w, 8, generator=g) for _ in range(3))
    out = tiled_attention(q, k, v, window, tile)
    assert out.shape == q.shape
    torch.testing.assert_close(out, reference_attention(q, k, v, window), atol=2e-6, rtol=0)
    torch.testing.assert_close(out, neighbourhood_attention(q, k, v, window), atol=2e-6, rtol=0)


def test_folding_the_weight_norm_changes_no_output_and_leaves_the_model_alone(s25):
    plain = fold_weight_norm(s25).eval()
    assert not any("parametrizations" in k for k in plain.state_dict())
    y = torch.from_numpy(crop(*SIZES[0]))[None, None]
    solver = s25.solver.override(max_iter=2, tol=0.0)
    with torch.no_grad():
        torch.testing.assert_close(plain(y, solver=solver), s25(y, solver=solver), atol=1e-5, rtol=0)
    assert any("parametrizations" in k for k in s25.state_dict())  # the original keeps its weight norm


@pytest.mark.parametrize("iters, tol", [(5, 0.0), (5, None), (8, 1e-2)])
def test_fixed_broyden_equals_the_solver(s25, iters, tol):
    """The export-only forward returns the solver's answer (its lowest-residual iterate), per sample; at tol 1e-2
    the two samples stop at different iterations, which the graph replays by freezing them."""
    y = torch.stack([torch.from_numpy(crop(*SIZES[0])), torch.rand(*SIZES[0], generator=torch.Generator()
                                                                    .manual_seed(1))])[:, None]
    solver = s25.solver.override(max_iter=iters, tol=tol)
    with torch.no_grad():
        eq = s25.equilibrium(y, solver=solver)
        out = FixedBroyden(s25, iters, tol=tol, clamp=False)(y)
    if tol == 1e-2:
        assert eq.stats.nfe.tolist()[0] < iters and len(set(eq.stats.nfe.tolist())) == 2, eq.stats.nfe
    torch.testing.assert_close(out, eq.x_hat, atol=1e-4, rtol=0)


def test_fixed_broyden_keeps_a_ring_of_memory_updates(s25):
    """More steps than stored pairs: older secant pairs are overwritten as in broyden."""
    y = torch.from_numpy(crop(*SIZES[0]))[None, None]
    with torch.no_grad():
        ref = s25(y, solver=s25.solver.override(max_iter=6, tol=0.0, memory=2))
        out = FixedBroyden(s25, 6, tol=0.0, memory=2, clamp=False)(y)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_missing_onnx_is_one_line_with_the_install_hint(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    with pytest.raises(ExportError, match=r"pip install 'nerd\[onnx\]'"):
        require("onnx")
    assert main(["export", "nerd-s25", "--format", "onnx", "--iters", "2", "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and INSTALL_HINT in err
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("argv, message", [
    (["export", "{dir}", "--format", "onnx"], "not {dir}"),
    (["export", "{dir}/last.pt", "--format", "onnx"], "not {dir}/last.pt"),
    (["export", "nerd-s25", "--format", "onnx", "--last"], "--last"),
    (["export", "nerd-s25", "--format", "onnx", "--iters", "0"], "max_iter"),
    (["export", "nerd-nope", "--format", "onnx"], "unknown weights"),
    (["export", "{dir}", "--tol", "0"], "--tol applies to --format onnx only"),
])
def test_export_misuse_is_one_line(capsys, tmp_path, argv, message):
    pytest.importorskip("onnx")
    argv, message = [a.replace("{dir}", str(tmp_path)) for a in argv], message.replace("{dir}", str(tmp_path))
    out = tmp_path / ("x.safetensors" if "--format" not in argv else "x.onnx")
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """nerd-s25 exported once through the CLI with ITERS iterations (tol: the weights' own)."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("onnx") / "nerd-s25.onnx"
    assert main(["export", "nerd-s25", "--format", "onnx", "--iters", str(ITERS), "--out", str(out)]) == 0
    return out


def test_onnx_runtime_matches_nerd_denoise_at_two_sizes(exported, tmp_path, capsys, s25):
    """One exported file, two odd sizes: ORT within 1/255 of `nerd denoise --iters N`'s 8-bit output, and within
    1e-4 of the PyTorch solve before quantisation."""
    from nerd.denoise import denoise_image
    from nerd.onnx_export import onnx_session, read_onnx_metadata, run_onnx

    meta = read_onnx_metadata(exported)
    assert meta["iters"] == str(ITERS) and meta["weights"] == "nerd-s25" and float(meta["tol"]) == s25.solver.tol
    session = onnx_session(exported, threads=2)
    for h, w in SIZES:
        y = crop(h, w)
        ours = run_onnx(session, y)
        assert ours.shape == (h, w) and ours.dtype == np.float32
        noisy = write_png(tmp_path / f"noisy{h}x{w}.png", np.round(y * 255).astype(np.uint8))
        out = tmp_path / f"out{h}x{w}.png"
        assert main(["denoise", str(noisy), "-o", str(out), "--weights", "nerd-s25", "--iters", str(ITERS),
                     "--device", "cpu", "-q"]) == 0
        cli = load_gray(out)
        assert np.abs(ours - cli).max() <= 1 / 255 + 1e-6, (h, w, np.abs(ours - cli).max())
        torch_x, _ = denoise_image(s25, load_gray(noisy), 25.0, solver=s25.solver.override(max_iter=ITERS),
                                   device="cpu")
        assert np.abs(ours - torch_x).max() < 1e-4, (h, w, np.abs(ours - torch_x).max())
    batch = np.stack([crop(*SIZES[0]), crop(*SIZES[0])[::-1].copy()])[:, None]  # dynamic batch as well
    two = session.run(["denoised"], {"noisy": batch})[0]
    assert np.abs(two[0, 0] - run_onnx(session, batch[0, 0])).max() < 1e-5
    capsys.readouterr()


def test_the_dynamo_exporter_gives_the_same_graph(tmp_path, s25):
    """torch.export-based export (needs onnxscript; slower, so 1 iteration here) also matches the solve."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from nerd.onnx_export import export_onnx, onnx_session, run_onnx

    path = tmp_path / "dynamo.onnx"
    export_onnx(s25, path, iters=1, dynamo=True)
    session = onnx_session(path, threads=2)
    for h, w in SIZES:
        y = crop(h, w)
        with torch.no_grad():
            ref = s25(torch.from_numpy(y)[None, None], solver=s25.solver.override(max_iter=1)).clamp(0, 1)[0, 0]
        assert np.abs(run_onnx(session, y) - ref.numpy()).max() < 1e-4
