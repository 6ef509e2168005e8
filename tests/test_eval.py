"""`nerd eval` and its parts: the noise protocol, the metrics, DnCNN, the harness and the CLI.

Fast tests use tiny synthetic images in tmp_path; the slow ones read ../shared (skipped when it is absent).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nerd import allocator
from nerd.cli import main
from nerd.data.noise import add_noise, protocol_noisy
from nerd.errors import WeightsError
from nerd.metrics import psnr, ssim

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"


def _data_root() -> Path:
    return Path(os.environ.get("NERD_DATA") or SHARED / "data")


def _anchors() -> Path:
    return Path(os.environ.get("NERD_ANCHORS") or SHARED / "anchors")


def _write_set(folder: Path, n: int = 2, size: tuple[int, int] = (23, 19)) -> list[Path]:
    """n smooth 8-bit grayscale PNGs of odd size."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    h, w = size
    for i in range(n):
        base = np.add.outer(np.linspace(0, 1, h), np.linspace(0, 1, w)) / 2
        img = np.clip(base + 0.1 * rng.standard_normal((h, w)), 0, 1)
        path = folder / f"{i:02d}.png"
        Image.fromarray((img * 255).round().astype(np.uint8), mode="L").save(path)
        paths.append(path)
    return paths


# --- noise protocol


@pytest.mark.parametrize("shape", [(23, 19), (1, 1, 8, 5)])
def test_protocol_noisy_matches_global_seed_recipe(shape: tuple[int, ...]) -> None:
    x = np.random.default_rng(1).random(shape).astype(np.float32)
    state = np.random.get_state()
    y = protocol_noisy(x, 25)
    assert all(np.array_equal(a, b) for a, b in zip(state, np.random.get_state(), strict=True))
    np.random.seed(0)
    expected = x + 25 / 255 * np.random.randn(*x.shape)
    assert y.dtype == np.float64 and y.shape == x.shape
    assert np.array_equal(y, expected)
    assert y.min() < 0 or y.max() > 1  # not clipped


def test_add_noise_per_sample_sigma() -> None:
    x = torch.zeros(3, 1, 64, 64)
    sigma = torch.tensor([0.0, 0.1, 0.5])
    y = add_noise(x, sigma, torch.Generator().manual_seed(0))
    assert y[0].abs().max() == 0
    assert y[1].std().item() == pytest.approx(0.1, rel=0.1)
    assert y[2].std().item() == pytest.approx(0.5, rel=0.1)
    again = add_noise(x, sigma, torch.Generator().manual_seed(0))
    assert torch.equal(y, again)
    assert add_noise(x, 0.2).shape == x.shape


# --- metrics


def test_psnr_known_values() -> None:
    x = np.full((10, 10), 0.5)
    assert psnr(x + 0.01, x) == pytest.approx(40.0)  # MSE 1e-4
    assert psnr(x, x) == math.inf
    # The estimate is clipped first: 1.2 against 1 scores like 1 against 1.
    ones = np.ones((4, 4))
    assert psnr(ones * 1.2, ones) == math.inf
    assert psnr(np.full((4, 4), -0.3), np.full((4, 4), 0.1)) == pytest.approx(20.0)


def test_ssim_matches_skimage_and_clips() -> None:
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    x = rng.random((32, 29))
    x_hat = x + 0.1 * rng.standard_normal(x.shape)
    expected = structural_similarity(
        x, np.clip(x_hat, 0, 1), data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert ssim(x_hat, x) == pytest.approx(expected, abs=1e-12)
    assert ssim(x, x) == pytest.approx(1.0)


# --- DnCNN


def test_dncnn_loads_a_synthetic_state_dict_strictly(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from nerd.models.dncnn import DnCNN, load_dncnn

    shapes = {k: (64 if k < 16 else 1, 1 if k == 0 else 64) for k in range(17)}  # (out, in) channels
    sd = {f"convs.{k}.weight": torch.randn(*shapes[k], 3, 3) * 0.01 for k in range(17)}
    sd.update({f"convs.{k}.bias": torch.zeros(64 if k < 16 else 1) for k in range(17)})
    assert set(DnCNN().state_dict()) == set(sd)
    save_file(sd, str(tmp_path / "dncnn_sigma25.safetensors"))
    model = load_dncnn(25, tmp_path)
    y = torch.rand(2, 1, 13, 11)
    x_hat = model(y, 25 / 255)
    assert x_hat.shape == y.shape and torch.isfinite(x_hat).all()
    with pytest.raises(WeightsError, match="dncnn_sigma15"):
        load_dncnn(15, tmp_path)
    with pytest.raises(ValueError, match="only for sigma"):
        load_dncnn(30, tmp_path)


# --- harness and CLI


def test_evaluate_noisy_report(tmp_path: Path) -> None:
    from nerd.evaluate import Noisy, evaluate

    images = _write_set(tmp_path / "S", n=3)
    report = evaluate(Noisy(), images[::-1], 25, set_name="S", progress=False, method_name="noisy", limit=2)
    assert [r.name for r in report.rows] == ["00.png", "01.png"]
    assert 18 < report.means["psnr"] < 25  # sigma 25 noise, partly clipped: about 20-21 dB
    assert report.means["nfe"] is None
    data = json.loads(report.to_json())
    assert data["limit"] == 2 and len(data["rows"]) == 2
    assert "| **mean** |" in report.to_markdown()


def test_interrupted_eval_continues_from_its_partial_file(tmp_path: Path) -> None:
    from nerd.evaluate import evaluate

    images = _write_set(tmp_path / "S", n=3)
    part = tmp_path / "out" / "run.partial.json"
    calls: list[int] = []

    def shrink(y: torch.Tensor, sigma: float) -> torch.Tensor:
        calls.append(1)
        if fail and len(calls) == 2:
            raise KeyboardInterrupt  # the run is stopped during the second image
        return 0.5 * y + 0.25

    fail = True
    with pytest.raises(KeyboardInterrupt):
        evaluate(shrink, images, 25, set_name="S", progress=False, method_name="m", partial=part,
                 meta={"data": "/work/shared/data"})
    assert [r["name"] for r in json.loads(part.read_text())["rows"]] == ["00.png"]

    fail, calls[:] = False, []
    # finished on another machine, which keeps its copy of the set elsewhere (a lent GPU's device_eval/)
    resumed = evaluate(shrink, images, 25, set_name="S", progress=False, method_name="m", partial=part,
                       meta={"data": "device_eval"})
    assert len(calls) == 2 and resumed.meta["resumed_rows"] == 1  # only the two unfinished images ran
    calls[:] = []
    whole = evaluate(shrink, images, 25, set_name="S", progress=False, method_name="m")
    assert len(calls) == 3 and "resumed_rows" not in whole.meta
    assert [(r.name, r.psnr, r.ssim) for r in resumed.rows] == [(r.name, r.psnr, r.ssim) for r in whole.rows]

    # rows of another run (here another sigma) are never mixed in
    calls[:] = []
    other = evaluate(shrink, images, 15, set_name="S", progress=False, method_name="m", partial=part)
    assert len(calls) == 3 and other.meta["resumed_rows"] == 0


def test_evaluate_ensemble_is_the_mean_of_the_turned_back_solves(tmp_path: Path) -> None:
    """ensemble N scores mean_k undo_dihedral(f(dihedral(y, k)), k); an equivariant method gains nothing from it."""
    from nerd.data.patches import dihedral, undo_dihedral
    from nerd.evaluate import Noisy, evaluate

    images = _write_set(tmp_path / "S", n=1)  # 23 x 19: the quarter turns change the shape

    def tilted(y: torch.Tensor, sigma: float) -> torch.Tensor:  # not rotation-equivariant: weights by column
        return y * torch.linspace(0.6, 1.0, y.shape[-1])

    report = evaluate(tilted, images, 25, set_name="S", progress=False, method_name="m", ensemble=4)
    x = np.asarray(Image.open(images[0]), dtype=np.float64) / 255
    y = torch.from_numpy(protocol_noisy(x, 25)).float()[None, None]
    by_hand = sum(undo_dihedral(tilted(dihedral(y, k), 0.1), k) for k in range(4)) / 4
    expected = psnr(np.clip(by_hand[0, 0].double().numpy(), 0, 1), x)
    assert report.rows[0].psnr == pytest.approx(expected, abs=1e-5)  # float32 sums in another order
    single = evaluate(tilted, images, 25, set_name="S", progress=False, method_name="m")
    assert report.rows[0].psnr != pytest.approx(single.rows[0].psnr, abs=1e-3)
    assert report.meta["ensemble"] == 4 and "ensemble" not in single.meta  # a single-solve key stays as it was
    same = evaluate(Noisy(), images, 25, set_name="S", progress=False, method_name="noisy", ensemble=8)
    assert same.rows[0].psnr == pytest.approx(
        evaluate(Noisy(), images, 25, set_name="S", progress=False, method_name="noisy").rows[0].psnr, abs=1e-5)


def test_cli_eval_summary_gathers_earlier_sets_of_the_same_weights(tmp_path: Path) -> None:
    """A second `nerd eval` on another set adds to the tag's summary; a report of replaced weights is left out."""
    import torch

    from nerd.models import create_model
    from nerd.weights import save_weights

    for name in ("SetA", "SetB", "SetC"):
        _write_set(tmp_path / "data" / name, n=1)
    out = tmp_path / "out"
    common = ["--data", str(tmp_path / "data"), "--out", str(out), "--no-progress", "--sigma", "25"]
    assert main(["eval", "--method", "noisy", "--sets", "SetA", *common]) == 0
    assert main(["eval", "--method", "noisy", "--sets", "SetB", *common]) == 0
    summary = (out / "eval-noisy.md").read_text()
    assert "| noisy | SetA |" in summary and "| noisy | SetB |" in summary

    weights = tmp_path / "tiny.safetensors"
    argv = ["eval", "--method", "nerd", "--weights", str(weights), "--iters", "2", *common]
    torch.manual_seed(0)
    save_weights(create_model("tiny"), weights, sigma255=25)
    assert main([*argv, "--sets", "SetA"]) == 0
    torch.manual_seed(1)
    save_weights(create_model("tiny"), weights, sigma255=25)  # the same name, other weights
    assert main([*argv, "--sets", "SetB"]) == 0
    assert main([*argv, "--sets", "SetC"]) == 0
    summary = (out / "eval-nerd-tiny-it2.md").read_text()
    assert "| nerd | SetB |" in summary and "| nerd | SetC |" in summary
    assert "SetA" not in summary  # measured on the replaced weights
    assert (out / "eval-nerd-tiny-it2-SetA-s25.json").is_file()  # ...whose report stays


def test_cli_eval_noisy_and_nerd(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from nerd.models import create_model
    from nerd.weights import save_weights

    _write_set(tmp_path / "data" / "Tiny")
    out = tmp_path / "out"
    common = ["--sets", "Tiny", "--data", str(tmp_path / "data"), "--out", str(out), "--no-progress"]
    assert main(["eval", "--method", "noisy", "--sigma", "15", "25", *common]) == 0
    for s in (15, 25):
        data = json.loads((out / f"eval-noisy-Tiny-s{s}.json").read_text())
        assert data["method"] == "noisy" and data["sigma"] == s and len(data["rows"]) == 2
        assert data["rows"][0]["nfe"] is None
    assert (out / "eval-noisy.md").is_file()
    assert not list(out.glob("*.partial*"))  # the per-image progress file goes once the report is written

    weights = tmp_path / "tiny.safetensors"
    save_weights(create_model("tiny"), weights, sigma255=25)
    argv = ["eval", "--method", "nerd", "--weights", str(weights), "--sigma", "25", "--iters", "3", *common]
    monkeypatch.setattr(allocator, "status", "default")  # as in a fresh process: only the command changes it
    assert main(argv) == 0
    data = json.loads((out / "eval-nerd-tiny-it3-Tiny-s25.json").read_text())
    assert len(data["rows"]) == 2 and data["meta"]["solver"]["max_iter"] == 3
    assert data["meta"]["malloc"] == allocator.status != "default"  # the command tuned malloc (or said why not)
    for row in data["rows"]:
        assert 1 <= row["nfe"] <= 3 and isinstance(row["converged"], bool) and row["residual"] >= 0
        assert math.isfinite(row["psnr"]) and 0 <= row["ssim"] <= 1
    printed = capsys.readouterr().out
    assert "Tiny" in printed and "PSNR" in printed

    # --ensemble: the mean of two solves, in a file of its own; each row has the most iterations of its solves
    assert main([*argv, "--ensemble", "2"]) == 0
    pair = json.loads((out / "eval-nerd-tiny-it3-x2-Tiny-s25.json").read_text())
    assert pair["meta"]["ensemble"] == 2 and "ensemble" not in data["meta"]
    for one, two in zip(data["rows"], pair["rows"], strict=True):
        assert 1 <= two["nfe"] <= 3 and two["nfe"] >= one["nfe"] and two["psnr"] != one["psnr"]

    # --compile: the same solve through a torch.compile'd layer; the scores agree to fp32 rounding
    assert main([*argv, "--compile"]) == 0
    compiled = json.loads((out / "eval-nerd-tiny-it3-Tiny-s25.json").read_text())
    assert compiled["meta"]["compiled"] is True and data["meta"]["compiled"] is False
    for a, b in zip(data["rows"], compiled["rows"], strict=True):
        assert a["nfe"] == b["nfe"] and a["psnr"] == pytest.approx(b["psnr"], abs=1e-3)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sets", "Nope"], "not found"),
        (["--sets", "Empty"], "no images"),
        (["--sigma", "0"], "sigma must be in (0, 255]"),
        (["--sigma", "-5"], "sigma must be in (0, 255]"),
        (["--sigma", "inf"], "sigma must be in (0, 255]"),
        (["--limit", "0"], "--limit"),
        (["--ensemble", "3"], "--ensemble must be one of 1, 2, 4, 8"),
        (["--weights", "x.safetensors"], "only apply to --method nerd"),
        (["--sets", "Small"], "smaller than SSIM's 11x11 window"),
        (["--sets", "Colour"], "Colour"),
    ],
)
def test_cli_eval_user_errors_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    _write_set(tmp_path / "Tiny", n=1)
    (tmp_path / "Empty").mkdir()
    _write_set(tmp_path / "Small", n=1, size=(9, 30))
    (tmp_path / "Colour").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
        tmp_path / "Colour" / "rgb.png"
    )
    argv = ["eval", "--method", "noisy", "--data", str(tmp_path), "--out", str(tmp_path / "out")]
    argv += ["--sets", "Tiny"]
    assert main(argv + extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a GPU this machine lacks")


@pytest.mark.parametrize("argv, message", [
    pytest.param(["validate", "nerd-s25", "--device", "cuda"], "no CUDA GPU", marks=NO_GPU),
    (["validate", "nerd-s25", "--device", "tpu"], "cpu, cuda or cuda:N"),
    (["validate", "nerd-s25", "--sigma", "-3"], "sigma must be in (0, 255]"),
    pytest.param(["eval", "--method", "noisy", "--device", "cuda"], "no CUDA GPU", marks=NO_GPU),
    pytest.param(["train", "--config", "configs/quick-tiny.toml", "--device", "cuda:1"], "no CUDA GPU", marks=NO_GPU),
])
def test_cli_device_and_sigma_refusals_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                               message: str) -> None:
    _write_set(tmp_path / "Train400", n=9)
    argv = [str(Path(__file__).resolve().parents[1] / a) if a.startswith("configs/") else a for a in argv]
    extra = ["--data", str(tmp_path / "Train400")] if argv[0] != "eval" else ["--data", str(tmp_path)]
    assert main(argv + extra) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_eval_missing_weights_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_set(tmp_path / "Tiny", n=1)
    argv = ["eval", "--method", "nerd", "--weights", str(tmp_path / "none.safetensors")]
    argv += ["--data", str(tmp_path), "--sets", "Tiny", "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "not found" in capsys.readouterr().err


# --- slow: ../shared


def _needs(path: Path) -> Path:
    if not path.is_dir():
        pytest.skip(f"{path} not available")
    return path


@pytest.mark.slow
def test_dncnn_set12_sigma25_matches_published() -> None:
    from nerd.evaluate import evaluate, resolve_sets
    from nerd.models.dncnn import load_dncnn

    images = resolve_sets(_needs(_data_root()), ["Set12"])["Set12"]
    model = load_dncnn(25, _needs(_anchors()))
    report = evaluate(model, images, 25, set_name="Set12", progress=False)
    assert len(report.rows) == 12
    assert report.means["psnr"] == pytest.approx(30.438, abs=0.01)
    assert report.means["ssim"] == pytest.approx(0.8622, abs=0.001)


@pytest.mark.slow
def test_bm3d_runs_on_two_set12_images() -> None:
    pytest.importorskip("bm3d")
    from nerd.evaluate import evaluate, resolve_sets
    from nerd.models.bm3d import BM3D

    images = resolve_sets(_needs(_data_root()), ["Set12"])["Set12"]
    report = evaluate(BM3D(), images, 25, set_name="Set12", progress=False, limit=2)
    assert len(report.rows) == 2
    noisy = 20 * math.log10(255 / 25)  # ~20.2 dB before clipping
    for row in report.rows:
        assert noisy + 6 < row.psnr < 40 and 0.6 < row.ssim < 1


def test_scores_are_ieee_float32_on_any_device_and_settings_are_restored():
    from nerd.evaluate import ieee_fp32

    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default for cuDNN convolutions
    try:
        with pytest.raises(RuntimeError), ieee_fp32():
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
            raise RuntimeError("an image failed")
        assert torch.backends.cudnn.allow_tf32  # restored, also after an error
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
