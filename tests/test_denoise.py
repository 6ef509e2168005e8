"""`nerd denoise` and `nerd.denoise.denoise_image` with a tiny model: round trips, batches, every refusal."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nerd.weights
from nerd.cli import main
from nerd.denoise import DenoiseError, DenoiseSummary, denoise_image, describe
from nerd.io import read_image, to_pixels
from nerd.models import create_model
from nerd.weights import load_weights, save_weights

H, W = 37, 31


@pytest.fixture(scope="module")
def weights(tiny_weights: Path) -> Path:
    return tiny_weights


@pytest.fixture()
def noisy(tmp_path) -> Path:
    """An 8-bit 37x31 noisy PNG in tmp_path/in."""
    rng = np.random.RandomState(0)
    img = np.clip(128 + 40 * np.sin(np.arange(W) / 4)[None, :] + 25 * rng.randn(H, W), 0, 255).astype(
        np.uint8
    )
    (tmp_path / "in").mkdir()
    Image.fromarray(img).save(tmp_path / "in" / "a.png")
    return tmp_path / "in" / "a.png"


def cli(capsys, *argv: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_8bit_png_round_trip(capsys, tmp_path, noisy, weights):
    rc, out, err = cli(
        capsys,
        "denoise",
        noisy,
        "-o",
        tmp_path / "o.png",
        "--weights",
        weights,
        "--sigma",
        25,
        "--device",
        "cpu",
    )
    assert rc == 0, err
    with Image.open(tmp_path / "o.png") as im:
        assert im.mode == "L" and im.size == (W, H)
        pixels = np.asarray(im)
    model, _ = load_weights(weights)
    x_hat, _ = denoise_image(model, read_image(noisy)[0], 25, device="cpu")
    assert np.array_equal(pixels, to_pixels(x_hat, 8))
    line = out.strip()
    assert "a.png: 31x37" in line and "iterations" in line and "rel residual" in line and " s " in line


def test_no_progress_keeps_the_report_and_drops_the_bar(capsys, tmp_path, noisy, weights):
    argv = ["denoise", noisy, "-o", tmp_path / "o.png", "--weights", weights, "--iters", 2]
    rc, out, err = cli(capsys, *argv)
    assert rc == 0 and "f-eval" in err and "stops below" in err  # the bar, on stderr, with the residual
    rc, out, err = cli(capsys, *argv, "--no-progress")
    assert rc == 0 and "f-eval" not in err and "a.png: 31x37" in out
    rc, out, err = cli(capsys, *argv, "--quiet")
    assert rc == 0 and out == "" and "f-eval" not in err


def test_report_line_tells_a_residual_just_above_tolerance_from_it():
    summary = DenoiseSummary(converged=False, rel_residual=1.04e-3, abs_residual=0.1, tol=1e-3, width=31, height=37,
                             nfe=17, seconds=1.0, max_iter=17)
    # at the budget, near an equilibrium: what stopped it, with no alarm
    assert "stopped at the 17-iteration budget (rel residual 1.04e-03)" in describe(summary)
    assert "NOT converged" not in describe(summary) and not summary.alarm
    assert "converged (rel residual 9.90e-04 < tol 0.001)" in describe(replace(summary, converged=True,
                                                                             rel_residual=9.9e-4))
    # far from one: the alarm, with the threshold told apart from a residual just above it
    far = replace(summary, rel_residual=5.04e-2)
    assert far.alarm and "NOT converged (rel residual 5.04e-02 > 5e-02" in describe(far)
    tiled = replace(far, tiles=4, alarm_tiles=1, tile_shape=(20, 20), overlap=8)
    assert "NOT converged in 1 of 4 tiles (largest rel residual 5.04e-02" in describe(tiled)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_round_trip(capsys, tmp_path, weights, suffix):
    rng = np.random.RandomState(1)
    img = np.clip(30000 + 6425 * rng.randn(H, W), 0, 65535).astype(np.uint16)
    Image.fromarray(img).save(tmp_path / f"a{suffix}")
    rc, _, err = cli(
        capsys,
        "denoise",
        tmp_path / f"a{suffix}",
        "-o",
        tmp_path / f"o{suffix}",
        "--weights",
        weights,
        "--iters",
        3,
        "--device",
        "cpu",  # the Python API call below runs on the CPU: exact equality needs the same kernels
    )
    assert rc == 0, err
    with Image.open(tmp_path / f"o{suffix}") as im:
        assert im.mode.startswith("I;16") and im.size == (W, H)
        out = np.asarray(im)
    assert len(np.unique(out)) > 256  # really 16-bit values, not 8-bit scaled up
    # exactly what the Python API gives for the image read on the 16-bit scale at the weights' sigma
    model, _ = load_weights(weights)
    y, depth = read_image(tmp_path / f"a{suffix}")
    x_hat, _ = denoise_image(model, y, 25, solver=replace(model.solver, max_iter=3), device="cpu")
    assert depth == 16 and np.array_equal(out, to_pixels(x_hat, 16))


def test_folder_and_several_files(capsys, tmp_path, noisy, weights):
    Image.fromarray(np.full((20, 23), 90, np.uint8)).save(tmp_path / "in" / "b.tif")
    Image.fromarray(np.full((20, 23), 9000, np.uint16)).save(tmp_path / "in" / "c.png")
    rc, out, err = cli(
        capsys, "denoise", tmp_path / "in", "-o", tmp_path / "out", "--weights", weights, "--iters", 2
    )
    assert rc == 0, err
    assert files(tmp_path / "out") == ["a.png", "b.tif", "c.png"]
    assert out.count("iterations") == 3
    with Image.open(tmp_path / "out" / "c.png") as im:
        assert im.mode.startswith("I;16") and im.size == (23, 20)
    rc, _, err = cli(
        capsys,
        "denoise",
        noisy,
        tmp_path / "in" / "b.tif",
        "-o",
        tmp_path / "two",
        "--weights",
        weights,
        "--iters",
        2,
        "--quiet",
    )
    assert rc == 0, err
    assert files(tmp_path / "two") == ["a.png", "b.tif"]


def test_colour_needs_gray(capsys, tmp_path, weights):
    rgb = np.random.RandomState(2).randint(0, 256, (H, W, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    rc, _, err = cli(capsys, "denoise", tmp_path / "c.png", "-o", tmp_path / "o.png", "--weights", weights)
    assert rc == 2 and "--gray" in err and not (tmp_path / "o.png").exists()
    rc, _, err = cli(
        capsys,
        "denoise",
        tmp_path / "c.png",
        "-o",
        tmp_path / "o.png",
        "--weights",
        weights,
        "--gray",
        "--iters",
        3,
    )
    assert rc == 0, err
    with Image.open(tmp_path / "o.png") as im:
        assert im.mode == "L" and im.size == (W, H)


def test_iters_changes_reported_iterations(capsys, tmp_path, noisy, weights):
    for n in (2, 4):
        rc, out, err = cli(
            capsys,
            "denoise",
            noisy,
            "-o",
            tmp_path / "o.png",
            "--weights",
            weights,
            "--iters",
            n,
            "--tol",
            "1e-12",
        )
        assert rc == 0, err
        assert f"{n} iterations" in out and "NOT converged" in out


def test_output_ending_with_a_slash_is_a_new_folder(capsys, tmp_path, noisy, weights):
    rc, _, err = cli(capsys, "denoise", noisy, "-o", f"{tmp_path / 'new'}/", "--weights", weights, "--iters", 1)
    assert rc == 0, err
    assert (tmp_path / "new" / noisy.name).is_file()


def test_output_into_existing_folder_keeps_name(capsys, tmp_path, noisy, weights):
    (tmp_path / "out").mkdir()
    rc, _, err = cli(capsys, "denoise", noisy, "-o", tmp_path / "out", "--weights", weights, "--iters", 1)
    assert rc == 0, err
    assert files(tmp_path / "out") == ["a.png"]


def _bad_inputs(tmp: Path, noisy: Path, weights: Path) -> dict[str, tuple[list[object], str]]:
    """Name -> (argv after 'denoise', expected stderr fragment); files are made in tmp/bad."""
    bad = tmp / "bad"
    bad.mkdir(exist_ok=True)
    (bad / "empty.png").write_bytes(b"")
    (bad / "text.png").write_text("not an image\n")
    (bad / "cut.png").write_bytes(noisy.read_bytes()[:60])
    nan = np.full((H, W), 0.5, np.float32)
    nan[2, 3] = np.nan
    Image.fromarray(nan).save(bad / "nan.tif")
    inf = np.full((H, W), 0.5, np.float32)
    inf[0, 0] = np.inf
    Image.fromarray(inf).save(bad / "inf.tif")
    Image.fromarray(np.full((H, W), 9000, np.uint16)).save(bad / "deep.png")
    flipped = bytearray(weights.read_bytes())
    flipped[-40:-20] = bytes(b ^ 0xFF for b in flipped[-40:-20])
    (bad / "flipped.safetensors").write_bytes(bytes(flipped))
    header = bytearray(weights.read_bytes())
    header[10:30] = b"\xff" * 20
    (bad / "header.safetensors").write_bytes(bytes(header))
    (bad / "afile").write_text("x")
    (bad / "sub" / noisy.name).mkdir(parents=True)  # a folder where the output file would go
    Image.fromarray(np.full((30, 1), 128, np.uint8)).save(bad / "thin.png")
    for twin in ("d1", "d2"):  # two inputs with one name: one output folder cannot hold both
        (bad / twin).mkdir()
        (bad / twin / "a.png").write_bytes(noisy.read_bytes())
    (bad / "no-images").mkdir()
    (bad / "no-images" / "notes.txt").write_text("x")
    out = tmp / "out"
    w = ["--weights", weights]
    return {
        "missing": ([tmp / "nope.png", "-o", out / "o.png", *w], "no such file"),
        "not an image": ([bad / "text.png", "-o", out / "o.png", *w], "not an image"),
        "empty": ([bad / "empty.png", "-o", out / "o.png", *w], "empty file"),
        "truncated": ([bad / "cut.png", "-o", out / "o.png", *w], "truncated"),
        "nan pixels": ([bad / "nan.tif", "-o", out / "o.tif", *w], "NaN"),
        "inf pixels": ([bad / "inf.tif", "-o", out / "o.tif", *w], "infinite"),
        "sigma 0": ([noisy, "-o", out / "o.png", *w, "--sigma", 0], "--sigma"),
        "sigma negative": ([noisy, "-o", out / "o.png", *w, "--sigma", -5], "--sigma"),
        "sigma absurd": ([noisy, "-o", out / "o.png", *w, "--sigma", 300], "0-255"),
        "sigma nan": ([noisy, "-o", out / "o.png", *w, "--sigma", "nan"], "--sigma"),
        "sigma text": ([noisy, "-o", out / "o.png", *w, "--sigma", "lots"], "--sigma"),
        "no sigma no weights": ([noisy, "-o", out / "o.png"], "--sigma"),
        "unknown weights": ([noisy, "-o", out / "o.png", "--weights", "nerd-s999"], "unknown weights"),
        "missing weights file": (
            [noisy, "-o", out / "o.png", "--weights", tmp / "no.safetensors"],
            "not found",
        ),
        "corrupt weights": (
            [noisy, "-o", out / "o.png", "--weights", bad / "flipped.safetensors"],
            "checksum",
        ),
        "corrupt header": ([noisy, "-o", out / "o.png", "--weights", bad / "header.safetensors"], "weights"),
        "output folder missing": ([noisy, "-o", tmp / "nope" / "o.png", *w], "does not exist"),
        "output parent is a file": ([noisy, "-o", bad / "afile" / "o.png", *w], "not a folder"),
        "batch output is a file": ([noisy, bad / "deep.png", "-o", bad / "afile", *w], "output folder"),
        "batch folder parent missing": (
            [noisy, bad / "deep.png", "-o", tmp / "a" / "b", *w],
            "does not exist",
        ),
        "16-bit to jpeg": ([bad / "deep.png", "-o", out / "o.jpg", *w], "16-bit"),
        "unknown output suffix": ([noisy, "-o", out / "o.xyz", *w], "unsupported output suffix"),
        "overwrite input": ([noisy, "-o", noisy, *w], "overwrite"),
        "no output": ([noisy, *w], "-o"),
        "no input": (["-o", out / "o.png", *w], "NOISY"),
        "iters 0": ([noisy, "-o", out / "o.png", *w, "--iters", 0], "--iters"),
        "iters text": ([noisy, "-o", out / "o.png", *w, "--iters", "2.5"], "integer"),
        "tol negative": ([noisy, "-o", out / "o.png", *w, "--tol", "-1"], "--tol"),
        "bad device": ([noisy, "-o", out / "o.png", *w, "--device", "tpu"], "--device"),
        "batch with one bad image": ([noisy, bad / "cut.png", "-o", out, *w], "truncated"),
        "batch output named like a file": ([noisy, bad / "deep.png", "-o", tmp / "result.png", *w], "file name"),
        "output would replace a folder": ([noisy, "-o", bad / "sub", *w], "replace a folder"),
        "tile 0": ([noisy, "-o", out / "o.png", *w, "--tile", 0], "at least 64"),
        "bad cuda device": ([noisy, "-o", out / "o.png", *w, "--device", "cuda:x"], "cuda:N"),
        "ensemble 3": ([noisy, "-o", out / "o.png", *w, "--ensemble", 3], "--ensemble"),
        "sigma auto on a thin image": ([bad / "thin.png", "-o", out / "o.png", *w, "--sigma", "auto"], "too small"),
        "two inputs, one output name": ([bad / "d1", bad / "d2", "-o", out, *w], "would both be written"),
        "folder without images": ([bad / "no-images", "-o", out, *w], "no images"),
        "sample and an input": ([noisy, "--sample", "-o", out / "o.png", *w], "not both"),
    }


CASES = [
    "missing",
    "not an image",
    "empty",
    "truncated",
    "nan pixels",
    "inf pixels",
    "sigma 0",
    "sigma negative",
    "sigma absurd",
    "sigma nan",
    "sigma text",
    "no sigma no weights",
    "unknown weights",
    "missing weights file",
    "corrupt weights",
    "corrupt header",
    "output folder missing",
    "output parent is a file",
    "batch output is a file",
    "batch folder parent missing",
    "16-bit to jpeg",
    "unknown output suffix",
    "overwrite input",
    "no output",
    "no input",
    "iters 0",
    "iters text",
    "tol negative",
    "bad device",
    "batch with one bad image",
    "batch output named like a file",
    "output would replace a folder",
    "tile 0",
    "bad cuda device",
    "ensemble 3",
    "sigma auto on a thin image",
    "two inputs, one output name",
    "folder without images",
    "sample and an input",
]


def test_every_bad_input_case_is_parametrised(tmp_path, noisy, weights):
    # CASES names the parameters at collection time; a case added to _bad_inputs but not to CASES would never run.
    assert list(_bad_inputs(tmp_path, noisy, weights)) == CASES


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(capsys, tmp_path, noisy, weights, case):
    argv, fragment = _bad_inputs(tmp_path, noisy, weights)[case]
    (tmp_path / "out").mkdir()
    before = files(tmp_path)
    rc, out, err = cli(capsys, "denoise", *argv)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("nerd denoise: error: "), err
    assert fragment in err and "Traceback" not in err
    assert files(tmp_path) == before


def test_unwritable_output_folder_is_refused(capsys, tmp_path, noisy, weights, monkeypatch):
    # The tests run as root here, where chmod cannot take write access away; deny it where the CLI asks instead.
    import nerd.cli.denoise as cli_denoise

    locked = tmp_path / "locked"
    locked.mkdir()
    other = noisy.with_name("b.png")
    other.write_bytes(noisy.read_bytes())
    real_access = cli_denoise.os.access
    monkeypatch.setattr(cli_denoise.os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    for argv in ([noisy, "-o", locked / "o.png"], [noisy, other, "-o", locked], [noisy, other, "-o", locked / "new"]):
        rc, _, err = cli(capsys, "denoise", *argv, "--weights", weights)
        assert rc == 2 and "not writable" in err and err.count("\n") == 1, err
    assert files(locked) == []


def test_non_finite_output_is_an_error(capsys, tmp_path, noisy):
    model = create_model("tiny")
    with torch.no_grad():
        model.decode.body[-1].bias.fill_(float("nan"))
    save_weights(model, tmp_path / "nan.safetensors", sigma255=25)
    (tmp_path / "out").mkdir()
    nan_weights = tmp_path / "nan.safetensors"
    rc, _, err = cli(
        capsys, "denoise", noisy, "-o", tmp_path / "out" / "o.png", "--weights", nan_weights, "--iters", 2
    )
    assert rc == 2 and "NaN" in err and err.count("\n") == 1
    assert files(tmp_path / "out") == []
    with pytest.raises(DenoiseError):
        denoise_image(model, np.full((H, W), 0.5, np.float32), 25, solver=replace(model.solver, max_iter=2))


def test_denoise_image_library(weights):
    model, info = nerd.weights.load_weights(weights)
    y = np.random.RandomState(3).rand(H, W).astype(np.float32)
    x, summary = denoise_image(model, y, 25, solver=replace(model.solver, max_iter=3), device="cpu")
    assert summary.nfe == 3
    assert x.dtype == np.float32 and x.shape == (H, W) and 0 <= x.min() and x.max() <= 1
    assert isinstance(summary, DenoiseSummary) and summary.seconds > 0 and isinstance(summary.converged, bool)
    assert summary.height == H and summary.width == W
    assert not model.training
    for bad_sigma in (0, -1, 256, float("nan")):
        with pytest.raises(ValueError):
            denoise_image(model, y, bad_sigma, device="cpu")
    with pytest.raises(ValueError):
        denoise_image(model, y * np.nan, 25, device="cpu")


def test_sigma_auto_picks_nearest_shipped(capsys, tmp_path, noisy, monkeypatch):
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setattr(nerd.weights, "WEIGHTS_DIR", shipped)
    for sigma in ("auto", "25"):
        rc, _, err = cli(capsys, "denoise", noisy, "-o", tmp_path / "o.png", "--sigma", sigma)
        assert rc == 2 and "no shipped weights are installed" in err and not (tmp_path / "o.png").exists()
    for s in (5, 50):
        save_weights(create_model("tiny"), shipped / f"nerd-s{s}.safetensors", sigma255=s)
    rc, out, err = cli(capsys, "denoise", noisy, "-o", tmp_path / "o.png", "--sigma", "auto", "--iters", 1)
    assert rc == 0, err
    assert "estimated sigma" in out and "nerd-s" in out
    rc, out, err = cli(capsys, "denoise", noisy, "-o", tmp_path / "o.png", "--sigma", 50, "--iters", 1)
    assert rc == 0 and "note" not in err, err
    # a sigma with no weights of its own: the nearest, said in a note; a tie goes to the higher sigma
    for given, chosen in ((20, "nerd-s5"), (27.5, "nerd-s50"), (200, "nerd-s50")):
        rc, out, err = cli(capsys, "denoise", noisy, "-o", tmp_path / "o.png", "--sigma", given, "--iters", 1)
        assert rc == 0 and f"{chosen} (trained for sigma" in err and f"--sigma {given:g}" in err, err


def test_sample(capsys, tmp_path, weights):
    rc, out, err = cli(
        capsys,
        "denoise",
        "--sample",
        "-o",
        tmp_path / "s.png",
        "--sigma",
        25,
        "--weights",
        weights,
        "--iters",
        1,
    )
    assert rc == 0, err
    assert "PSNR" in out and "sample_clean.png" in out
    with Image.open(tmp_path / "s.png") as im:
        assert im.size == (256, 256) and im.mode == "L"


def test_self_ensemble_is_the_mean_of_the_turned_back_solves():
    """ensemble=8 equals the mean of 8 solves of the rotated/flipped image, each turned back (an odd-sized image,
    so a quarter turn changes its shape); ensemble=1 is the plain solve; the statistics are the worst solve's."""
    from nerd.data.patches import dihedral, undo_dihedral

    torch.manual_seed(0)
    model = create_model("tiny").eval()
    solver = replace(model.solver, max_iter=4, memory=4)
    y = np.random.RandomState(3).rand(H, W).astype(np.float32)
    y_t = torch.from_numpy(y)[None, None]
    with torch.inference_mode():
        eqs = [model.equilibrium(dihedral(y_t, k), 25 / 255, solver=solver) for k in range(8)]
    ref = torch.stack([undo_dihedral(eq.x_hat, k) for k, eq in enumerate(eqs)]).mean(0).clamp(0, 1)[0, 0].numpy()
    x8, s8 = denoise_image(model, y, 25, solver=solver, device="cpu", ensemble=8)
    np.testing.assert_allclose(x8, ref, atol=1e-6)
    assert s8.ensemble == 8 and s8.rel_residual == pytest.approx(max(float(eq.stats.rel_residual) for eq in eqs))
    assert "x 8 symmetries" in describe(s8) and "largest rel residual" in describe(s8)
    x1, s1 = denoise_image(model, y, 25, solver=solver, device="cpu")
    np.testing.assert_allclose(x1, eqs[0].x_hat.clamp(0, 1)[0, 0].numpy(), atol=1e-6)
    assert s1.ensemble == 1 and not np.allclose(x1, x8)
    with pytest.raises(ValueError, match="ensemble"):
        denoise_image(model, y, 25, device="cpu", ensemble=3)


def test_colour_is_each_channel_denoised_alone(capsys, tmp_path, weights):
    torch.manual_seed(0)
    model = create_model("tiny").eval()
    solver = replace(model.solver, max_iter=3, memory=3)
    y = np.random.RandomState(4).rand(H, W, 3).astype(np.float32)
    x, s = denoise_image(model, y, 25, solver=solver, device="cpu")
    assert x.shape == (H, W, 3) and s.channels == 3
    for c in range(3):
        # one batched solve of the three planes is the three grayscale solves (up to float32 summation order)
        np.testing.assert_allclose(x[..., c], denoise_image(model, y[..., c], 25, solver=solver, device="cpu")[0],
                                   atol=1e-4, rtol=0)  # far below one 8-bit level (3.9e-3)
    assert "x 3 channels" in describe(s)
    with pytest.raises(ValueError, match="channels-last"):  # a channels-first array is not 16 channels of 1 row
        denoise_image(model, y[None, ..., 0], 25, device="cpu")  # (1, H, W)
    img = (np.random.RandomState(5).rand(H, W, 3) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "c.png")
    base = ["denoise", tmp_path / "c.png", "--weights", weights, "--sigma", 25, "--iters", 2]
    rc, _, err = cli(capsys, *base, "-o", tmp_path / "no.png")
    assert rc == 2 and "--colour" in err and not (tmp_path / "no.png").exists()
    rc, out, err = cli(capsys, *base, "-o", tmp_path / "o.png", "--colour")
    assert rc == 0, err
    with Image.open(tmp_path / "o.png") as im:
        assert im.mode == "RGB" and im.size == (W, H)
    rc, _, err = cli(capsys, *base, "-o", tmp_path / "both.png", "--colour", "--gray")
    assert rc == 2 and "not both" in err


def test_progress_bar_counts_f_evaluations_and_changes_nothing(monkeypatch):
    import contextlib

    import nerd.denoise

    class Bar(contextlib.nullcontext):  # records what the real bar would show
        def __init__(self) -> None:
            super().__init__()
            self.n, self.ticks, self.postfix = 0, 0, ""

        def __enter__(self) -> Bar:
            return self

        def update(self, k: int | None = None) -> None:  # no argument: one f-evaluation (the hook)
            self.ticks += k is None
            self.n += 1 if k is None else k

        def set_postfix_str(self, text: str, refresh: bool = True) -> None:
            self.postfix = text

    bars: list[tuple[int, Bar]] = []
    monkeypatch.setattr(nerd.denoise, "_bar", lambda total, show: bars.append((total, Bar())) or bars[-1][1])
    torch.manual_seed(0)
    model = create_model("tiny").eval()
    y = np.random.RandomState(6).rand(H, W).astype(np.float32)
    for tol in (0.0, 0.9):  # every step taken; a loose tolerance: solves stop early and the bar jumps ahead
        solver = replace(model.solver, max_iter=5, memory=5, tol=tol)
        shown, s = denoise_image(model, y, 25, solver=solver, device="cpu", progress=True, ensemble=2)
        total, bar = bars[-1]
        assert total == 10 and bar.n == 10  # 2 solves x 5 f-evaluations at most
        assert bar.ticks == 10 if tol == 0 else 2 <= bar.ticks < 10, bar.ticks
        # with a tolerance, the last evaluation's residual beside it (tol 0 stops nothing: no postfix)
        assert (bar.postfix.startswith("residual ") and bar.postfix.endswith("stops below 0.9")) if tol else \
            not bar.postfix
    assert not model.layer._forward_hooks  # the hook is gone afterwards
    again, _ = denoise_image(model, y, 25, solver=solver, device="cpu", ensemble=2)
    np.testing.assert_array_equal(shown, again)


def test_cli_ensemble(capsys, tmp_path, noisy, weights):
    rc, out, err = cli(capsys, "denoise", noisy, "-o", tmp_path / "o.png", "--weights", weights, "--sigma", 25,
                       "--device", "cpu", "--iters", 2, "--ensemble", 2)
    assert rc == 0, err
    assert "x 2 symmetries" in out
    for bad in ("3", "0", "x"):
        rc, _, err = cli(capsys, "denoise", noisy, "-o", tmp_path / "b.png", "--weights", weights, "--ensemble", bad)
        assert rc == 2 and "--ensemble" in err and not (tmp_path / "b.png").exists()
