"""Colour: the transforms and their per-plane noise, the batched colour solve, the colour eval harness, colour
training from gray weights. Tiny untrained models and tiny synthetic images only (fast)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nerd.weights
from nerd import colour
from nerd.cli import main
from nerd.config import Config, GradConfig, SolverConfig, TrainConfig
from nerd.denoise import denoise_image
from nerd.models import DEQDenoiser, create_model, preset_config
from nerd.weights import load_weights, save_weights

TRANSFORMS = [colour.RGB, colour.OPPONENT, colour.OPPONENT_NO_OFFSET, colour.OPPONENT_ORTHONORMAL, colour.YCBCR]


@pytest.fixture(scope="module")
def tiny_shipped(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Untrained tiny weights for sigma 15, 25, 50 (each its own seed), standing in for the shipped files."""
    folder = tmp_path_factory.mktemp("shipped")
    files = {}
    for i, s in enumerate((15, 25, 50)):
        torch.manual_seed(i)
        files[f"nerd-s{s}"] = folder / f"nerd-s{s}.safetensors"
        save_weights(create_model("tiny"), files[f"nerd-s{s}"], sigma255=s)
    return files


@pytest.fixture
def shipped(tiny_shipped: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    monkeypatch.setattr(nerd.weights, "shipped", lambda: dict(tiny_shipped))
    return tiny_shipped


def _rgb(h: int = 21, w: int = 18, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.stack([np.add.outer(np.linspace(0, 1, h), np.linspace(0, c / 3, w)) / 2 for c in range(1, 4)], -1)
    return np.clip(base + 0.1 * rng.standard_normal((h, w, 3)), 0, 1)


# --- transforms


@pytest.mark.parametrize("t", TRANSFORMS, ids=lambda t: t.name)
def test_transforms_invert_exactly(t: colour.ColourTransform) -> None:
    x = _rgb()
    planes = t.forward(x)
    assert planes.shape == (3, *x.shape[:2]) and planes.dtype == np.float32
    np.testing.assert_allclose(t.inverse(planes), x, atol=1e-6)  # float32 planes: exact to float32 rounding
    np.testing.assert_allclose(t.inverse(t.forward(t.inverse(planes))), x, atol=1e-6)


@pytest.mark.parametrize("t", TRANSFORMS, ids=lambda t: t.name)
def test_each_planes_noise_is_the_stated_sigma(t: colour.ColourTransform) -> None:
    """Empirically: i.i.d. noise of std sigma in R, G, B has std plane_sigmas(sigma) in each plane."""
    sigma = 25.0
    n = np.random.default_rng(1).standard_normal((200, 200, 3)) * sigma / 255
    x = _rgb(200, 200)
    noise = t.forward(x + n).astype(np.float64) - t.forward(x)
    measured = noise.reshape(3, -1).std(axis=1) * 255
    np.testing.assert_allclose(measured, t.plane_sigmas(sigma), rtol=0.01)
    corr = np.corrcoef(noise.reshape(3, -1))
    np.testing.assert_allclose(corr, t.noise_correlation(), atol=0.01)


def test_opponent_planes_keep_range_and_independent_noise() -> None:
    assert colour.OPPONENT.plane_sigmas(25) == pytest.approx((25 / 3**0.5, 25 / 2**0.5, 25 * 6**0.5 / 4))
    np.testing.assert_allclose(colour.OPPONENT.noise_correlation(), np.eye(3), atol=1e-12)  # orthogonal rows
    corners = np.array(np.meshgrid([0, 1], [0, 1], [0, 1])).reshape(3, -1).T[None].astype(float)  # (1, 8, 3)
    planes = colour.OPPONENT.forward(corners)
    assert planes.min() >= -1e-6 and planes.max() <= 1 + 1e-6  # every RGB colour lands in [0, 1]


def test_plan_picks_weights_per_plane_and_groups_solves() -> None:
    trained = {"nerd-s15": 15.0, "nerd-s25": 25.0, "nerd-s50": 50.0}
    p = colour.plan(25, trained, "rgb")
    assert [c.weights for c in p.planes] == ["nerd-s25"] * 3 and p.solves == {"nerd-s25": [0, 1, 2]}
    p = colour.plan(25, trained, "opp")
    assert [c.weights for c in p.planes] == ["nerd-s15"] * 3 and len(p.solves) == 1
    p = colour.plan(25, trained, "opp-k3")
    assert p.solves == {"nerd-s15": [0], "nerd-s50": [1, 2]}  # two files: two batched solves
    p = colour.plan(25, trained, colour.SHIPPED)
    assert len(p.solves) == 1  # the shipped method is one batched solve
    assert "batched solve" in p.describe()
    assert colour.plan(25, {"mine": 25.0}, "opp").solves == {"mine": [0, 1, 2]}


def test_guided_filter_smooths_flat_regions_and_keeps_a_constant() -> None:
    guide = np.zeros((30, 30))
    src = np.full((30, 30), 0.4)
    np.testing.assert_allclose(colour.guided_filter(guide, src, 3, 1e-3), 0.4)
    noisy = src + 0.05 * np.random.default_rng(0).standard_normal(src.shape)
    assert colour.guided_filter(guide, noisy, 3, 1e-3).std() < noisy.std() / 3
    x = np.random.default_rng(1).random((9, 7))
    brute = np.array([[x[max(i - 2, 0):i + 3, max(j - 2, 0):j + 3].mean() for j in range(7)] for i in range(9)])
    np.testing.assert_allclose(colour.box_mean(x, 2), brute)


# --- the colour solve


@pytest.mark.parametrize("name", ["opp", "opp-k3", colour.SHIPPED])
def test_batched_colour_solve_equals_per_plane_solves(shipped: dict[str, Path], name: str) -> None:
    y = _rgb(19, 17).astype(np.float32)
    weights = colour.ColourWeights.shipped(method=name)
    x_hat, summary = denoise_image(None, y, 25, colour_weights=weights)
    assert x_hat.shape == y.shape and summary.channels == 3 and 0 <= x_hat.min() and x_hat.max() <= 1

    m = colour.method(name)
    planes = m.transform.forward(y)
    p = weights.plan(25)
    for k in m.solved:  # each plane alone through its own weights
        model = weights.model(p.planes[k].weights)
        with torch.no_grad():
            planes[k] = model(torch.from_numpy(planes[k])[None, None])[0, 0].numpy()
    if m.chroma == "guided":
        for k in (1, 2):
            planes[k] = colour.guided_filter(planes[0], m.transform.forward(y)[k], m.radius, m.eps * (25 / 255) ** 2)
    np.testing.assert_allclose(x_hat, np.clip(m.transform.inverse(planes), 0, 1), atol=2e-4)


def test_without_colour_weights_an_rgb_image_is_three_gray_planes(shipped: dict[str, Path]) -> None:
    model, _ = load_weights(shipped["nerd-s25"])
    y = _rgb(16, 15).astype(np.float32)
    x_hat, _ = denoise_image(model, y, 25)
    rgb, _ = denoise_image(None, y, 25, colour_weights=colour.ColourWeights(
        {"nerd-s25": 25.0}, lambda _: model, "rgb"))
    np.testing.assert_allclose(x_hat, rgb, atol=1e-5)


def test_cli_colour_uses_the_shipped_method(shipped: dict[str, Path], tmp_path: Path, capsys) -> None:
    src = tmp_path / "in.png"
    Image.fromarray((_rgb(20, 18) * 255).round().astype(np.uint8), mode="RGB").save(src)
    assert main(["denoise", str(src), "-o", str(tmp_path / "out.png"), "--sigma", "25", "--colour",
                 "--iters", "2"]) == 0
    err = capsys.readouterr()
    assert f"colour {colour.SHIPPED}:" in err.out + err.err
    with Image.open(tmp_path / "out.png") as im:
        assert im.mode == "RGB" and im.size == (18, 20)


# --- evaluation


def _colour_set(folder: Path, n: int = 2) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray((_rgb(24, 22, seed=i) * 255).round().astype(np.uint8), mode="RGB").save(folder / f"{i}.png")
    return folder


def test_colour_eval_nerd_and_cbm3d_on_a_fake_set(shipped: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("bm3d")
    data = tmp_path / "data"
    _colour_set(data / "Kodak24")
    out = tmp_path / "out"
    base = ["eval", "--sets", "Kodak24", "--sigma", "25", "--data", str(data), "--out", str(out), "--no-progress"]
    assert main([*base, "--method", "nerd", "--iters", "2"]) == 0
    assert main([*base, "--method", "nerd", "--iters", "2", "--colour-method", "rgb"]) == 0
    assert main([*base, "--method", "cbm3d"]) == 0
    ours = json.loads((out / f"eval-nerd-{colour.SHIPPED}-it2-Kodak24-s25.json").read_text())
    rgb = json.loads((out / "eval-nerd-rgb-it2-Kodak24-s25.json").read_text())
    cb = json.loads((out / "eval-cbm3d-Kodak24-s25.json").read_text())
    for report in (ours, rgb, cb):
        assert report["images"] == 2 and "RandomState(0).randn(H, W, 3)" in report["protocol"]
        assert all(0 < r["psnr"] < 100 for r in report["rows"])
    assert ours["meta"]["colour_method"] == colour.SHIPPED and ours["meta"]["solver"]["max_iter"] == 2
    assert ours["rows"][0]["nfe"] is not None and cb["rows"][0]["nfe"] is None
    assert cb["means"]["psnr"] > 20.5  # CBM3D really denoised (the noisy input is ~20.2 dB)
    # the protocol: the same noise as numpy.random.seed(0); randn(H, W, 3)
    from nerd.evaluate import load_rgb
    from nerd.metrics import psnr

    x = load_rgb(data / "Kodak24" / "0.png")
    np.random.seed(0)
    y = x + 25 / 255 * np.random.randn(*x.shape)
    noisy = json.loads((lambda: (main([*base, "--method", "noisy"]), (out / "eval-noisy-Kodak24-s25.json")
                                 .read_text())[1])())
    assert noisy["rows"][0]["psnr"] == pytest.approx(psnr(np.clip(y, 0, 1), x))


def test_colour_eval_refuses_gray_methods_on_colour_sets(tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    _colour_set(data / "CBSD68")
    assert main(["eval", "--method", "bm3d", "--sets", "CBSD68", "--data", str(data), "--out", str(tmp_path)]) == 2
    assert "cbm3d" in capsys.readouterr().err


# --- colour training from gray weights


def test_colour_state_from_gray_starts_as_the_gray_model_in_every_channel() -> None:
    torch.manual_seed(0)
    gray = create_model("tiny").eval()
    rgb = DEQDenoiser(replace(gray.cfg, in_channels=3), solver=gray.solver).eval()
    rgb.load_state_dict(colour.colour_state_from_gray(gray.state_dict()), strict=True)
    g = torch.rand(2, 1, 13, 11)
    with torch.no_grad():
        # the same solve up to float32 summation order (an untrained model's solver amplifies it a little)
        np.testing.assert_allclose(rgb(g.repeat(1, 3, 1, 1)).numpy(), gray(g).repeat(1, 3, 1, 1).numpy(),
                                   atol=2e-4)


def test_colour_preset_and_gpu_config() -> None:
    from nerd.config import PRESETS, load_config

    assert PRESETS["s-colour"] == replace(PRESETS["s"], in_channels=3)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "gpu" / "nerd-c25-gpu.toml")
    assert cfg.model.in_channels == 3 and cfg.train.init == "nerd-s25"


def test_colour_training_runs_a_few_steps_from_gray_weights(tmp_path: Path) -> None:
    from nerd.train import train

    folder = _colour_set(tmp_path / "colour-train", n=5)
    torch.manual_seed(0)
    init = tmp_path / "gray.safetensors"
    save_weights(create_model("tiny"), init, sigma255=25)
    cfg = Config(
        model=preset_config("tiny", in_channels=3),
        solver=SolverConfig(max_iter=3, tol=1e-3),
        grad=GradConfig(steps=2),
        train=TrainConfig(data=str(folder), sigma=(25.0,), crop=16, batch=2, steps=3, lr=1e-3, val_images=2,
                          val_every=3, log_every=1, checkpoint_minutes=1e9, threads=1, init=str(init)),
    )
    run = train(cfg, out=tmp_path / "run", progress=False)
    model, info = load_weights(run / "best.safetensors")
    assert model.cfg.in_channels == 3
    with torch.no_grad():
        assert model(torch.rand(1, 3, 16, 16)).shape == (1, 3, 16, 16)


def test_nerd_module_colour_path_equals_denoise_image(shipped: dict[str, Path]) -> None:
    from nerd.models.pretrained import NERD

    y = _rgb(18, 16)
    x = torch.from_numpy(y).permute(2, 0, 1)[None].float().repeat(2, 1, 1, 1)
    with torch.no_grad():
        out = NERD(colour=True)(x, torch.tensor([25 / 255, 50 / 255]))
    for i, s in enumerate((25, 50)):
        ref, _ = denoise_image(None, y.astype(np.float32), s, colour_weights=colour.ColourWeights.shipped())
        np.testing.assert_allclose(out[i].permute(1, 2, 0).clamp(0, 1).numpy(), ref, atol=2e-4)
    t = torch.rand(2, 1, 12, 10, dtype=torch.float64)
    np.testing.assert_allclose(colour.guided_filter_torch(t[:1], t[1:], 2, 1e-3)[0, 0].numpy(),
                               colour.guided_filter(t[0, 0].numpy(), t[1, 0].numpy(), 2, 1e-3), atol=1e-10)
