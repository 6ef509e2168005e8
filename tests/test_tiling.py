"""Tiled denoising of large images: the tile layout, the blend, the memory estimate and the CLI's --tile."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nerd.tiling
from nerd.cli import main
from nerd.config import SolverConfig
from nerd.denoise import denoise_image
from nerd.deq.solvers import SolverStats
from nerd.models import create_model
from nerd.models.nerd import Equilibrium
from nerd.tiling import OVERLAP, choose_tile, fit_memory, history_maps, peak_bytes, solve_bytes, tile_starts, tiles
from nerd.weights import save_weights


@pytest.mark.parametrize("n, tile, overlap", [(100, 48, 16), (131, 48, 16), (49, 48, 16), (1000, 256, 32), (7, 48, 4)])
def test_tiles_cover_the_axis_with_the_overlap(n, tile, overlap):
    starts, length = tile_starts(n, tile, overlap)
    assert length <= tile and starts[0] == 0 and starts[-1] + length == n
    steps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert all(0 < step <= length - overlap for step in steps)  # neighbours share at least `overlap` pixels
    k = len(starts)
    if k > 1:  # the fewest windows, each as short as k windows allow
        assert (k - 1) * tile - (k - 2) * overlap < n
        assert k * (length - 1) - (k - 1) * overlap < n
    with pytest.raises(ValueError):
        tile_starts(n, overlap, overlap)


def test_blend_weights_are_positive_and_full_inside():
    covered = torch.zeros(97, 131)
    for rows, cols, w in tiles(97, 131, 48, 16):
        assert w.shape == covered[rows, cols].shape and w.min() > 0 and w.max() == 1
        covered[rows, cols] += w
    assert covered.min() >= 1 - 1e-6  # the blend's denominator is never small


class Pointwise(torch.nn.Module):
    """A stand-in denoiser that acts on each pixel alone: a tiled solve must give exactly the whole-image result.
    Its tiles alternate between converged and not, 3 and 5 iterations."""

    def __init__(self) -> None:
        super().__init__()
        self.cfg = create_model("tiny").cfg
        self.solver = SolverConfig()
        self.calls = 0

    def equilibrium(self, y, sigma, *, solver=None):  # noqa: ANN001, ANN201
        self.calls += 1
        odd = self.calls % 2 == 1
        b = y.shape[0]
        stats = SolverStats(
            nfe=torch.full((b,), 3 if odd else 5),
            abs_residual=torch.full((b,), 0.1 * self.calls),
            rel_residual=torch.full((b,), 1e-4 if odd else 1e-2),
            trace=torch.zeros(b, 1),
            converged=torch.full((b,), odd),
        )
        return Equilibrium(x_hat=0.5 * y + 0.1 * torch.sin(9 * y), z_star=y, s=y, stats=stats)


def test_tiled_blend_of_a_pointwise_denoiser_is_the_whole_image():
    y = np.random.RandomState(1).rand(97, 131).astype(np.float32)
    whole, s1 = denoise_image(Pointwise(), y, 25, device="cpu")
    model = Pointwise()
    tiled, s = denoise_image(model, y, 25, device="cpu", tile=48, overlap=16)
    assert model.calls == s.tiles == len(tiles(97, 131, 48, 16)) == 12
    np.testing.assert_allclose(tiled, whole, atol=1e-6)
    assert s1.tiles == 1 and s1.tile is None
    assert s.tile == 48 and s.tile_shape == (43, 45) and s.overlap == 16
    assert s.nfe == 5 and s.rel_residual == pytest.approx(1e-2)
    assert not s.converged and s.unconverged_tiles == 6
    assert s.abs_residual == pytest.approx(1.2)


def test_self_ensemble_with_tiles_of_a_pointwise_denoiser_is_exact():
    """A pointwise stand-in commutes with every symmetry: 4 symmetries x 12 tiles give the whole-image result, and a
    tile counts as converged only when all its solves did."""
    y = np.random.RandomState(1).rand(97, 131).astype(np.float32)
    whole, _ = denoise_image(Pointwise(), y, 25, device="cpu")
    model = Pointwise()
    x, s = denoise_image(model, y, 25, device="cpu", tile=48, overlap=16, ensemble=4)
    assert model.calls == 48 and s.tiles == 12 and s.ensemble == 4
    np.testing.assert_allclose(x, whole, atol=1e-6)
    assert s.unconverged_tiles == 12  # every tile had a solve (an even call) that did not converge


def test_a_tile_that_covers_the_image_is_the_whole_image_solve():
    torch.manual_seed(0)
    model = create_model("tiny")
    solver = replace(model.solver, max_iter=3)
    y = np.random.RandomState(2).rand(37, 31).astype(np.float32)
    whole, _ = denoise_image(model, y, 25, solver=solver, device="cpu")
    same, s = denoise_image(model, y, 25, solver=solver, device="cpu", tile=37)
    assert np.array_equal(same, whole) and s.tiles == 1
    tiled, s = denoise_image(model, y, 25, solver=solver, device="cpu", tile=24, overlap=8)
    assert s.tiles == 4 and tiled.shape == y.shape and np.isfinite(tiled).all()
    assert not np.array_equal(tiled, whole)  # the tiles' statistics differ: a real, small difference
    # ... small beside what the model changes (measured 0.17 of it; a tile pasted at a wrong offset gives > 1)
    assert np.abs(tiled - whole).mean() < 0.3 * np.abs(whole - y).mean()
    with pytest.raises(ValueError, match="overlap"):
        denoise_image(model, y, 25, device="cpu", tile=8, overlap=8)


@pytest.mark.slow
def test_shipped_weights_tiled_within_a_tenth_of_a_db(data_root):
    """nerd-s25 on a 128x160 crop of Set12 image 05, tiles of at most 80 (6): PSNR within 0.1 dB of the whole solve."""
    from nerd.io import read_image
    from nerd.metrics import psnr
    from nerd.weights import load_weights

    model, _ = load_weights("nerd-s25")
    x, _ = read_image(data_root / "Set12" / "05.png")
    x = x[64:192, 48:208]
    y = x + np.random.RandomState(0).randn(*x.shape).astype(np.float32) * 25 / 255
    solver = replace(model.solver, max_iter=8)
    whole, _ = denoise_image(model, y, 25, solver=solver, device="cpu")
    tiled, s = denoise_image(model, y, 25, solver=solver, device="cpu", tile=80, overlap=OVERLAP)
    assert s.tiles == 6
    assert abs(psnr(tiled, x) - psnr(whole, x)) < 0.1
    assert psnr(tiled, x) > psnr(y, x) + 6


def test_choose_tile_fits_the_budget():
    gib, step = 2**30, nerd.tiling.TILE_STEP
    solver = SolverConfig(name="broyden", memory=30, max_iter=17)
    assert choose_tile(256, 256, 48, solver, 16 * gib).tile is None  # fits: whole image
    plan = choose_tile(4000, 3000, 48, solver, None)
    assert plan.tile is None and plan.fits  # memory unknown: whole image
    plan = choose_tile(4000, 3000, 48, solver, 8 * gib)
    image = nerd.tiling.IMAGE_BYTES_PER_PIXEL * 4000 * 3000  # the whole image's buffers come on top of a tile's
    assert plan.tile % step == 0 and plan.fits and plan.budget == int(nerd.tiling.USABLE * 8 * gib)
    assert solve_bytes(plan.tile**2, 48, solver) + image <= plan.budget
    assert solve_bytes((plan.tile + step) ** 2, 48, solver) + image > plan.budget
    plan = choose_tile(4000, 3000, 48, solver, gib // 4)  # nothing fits: the smallest tile, and it says so
    assert plan.tile == nerd.tiling.MIN_TILE and not plan.fits
    plan = choose_tile(100, 120, 48, solver, 2**20)  # no larger than the smallest tile: whole, and it says so
    assert plan.tile is None and not plan.fits
    # A long thin image is costed by its tiles' real area (40 x side), not side^2: tiles of about the same area fit.
    square, thin = choose_tile(4000, 3000, 48, solver, 8 * gib).tile, choose_tile(40, 200_000, 48, solver, 8 * gib).tile
    assert 40 * thin > 0.9 * square**2


def test_history_and_its_cap():
    broyden = SolverConfig(name="broyden", memory=30, max_iter=17)
    assert history_maps(broyden) == 32  # 16 secant pairs: no more than max_iter - 1
    assert history_maps(SolverConfig(name="anderson", memory=5, max_iter=17)) == 25
    assert history_maps(SolverConfig(name="fixed_point", memory=30, max_iter=17)) == 0
    numel = 64 * 2000 * 2000  # one state is 1 GB: the 4 GiB budget holds 2 pairs
    assert fit_memory(broyden, numel).memory == 2
    assert history_maps(fit_memory(broyden, numel)) * 4 * numel <= nerd.tiling.STATE_BUDGET
    assert fit_memory(broyden, 1000) is broyden
    # A 12-megapixel photo: the cap keeps its estimate near 70 GB rather than 160.
    assert 60 * 10**9 < solve_bytes(4000 * 3000, 48, broyden) < peak_bytes(4000 * 3000, 48, 32)


PROBE = """
import json, sys, numpy as np, torch
from dataclasses import replace
from pathlib import Path
from nerd import allocator
from nerd.denoise import denoise_image
from nerd.models import create_model
from nerd.tiling import solve_bytes
allocator.tune()
torch.set_num_threads(2)
torch.manual_seed(0)
model = create_model("xs")
solver = replace(model.solver, name=sys.argv[1], max_iter=4, memory=5)
rng = np.random.RandomState(0)
denoise_image(model, rng.rand(48, 48).astype(np.float32), 25, solver=solver, device="cpu")
allocator.release()
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
Path("/proc/self/clear_refs").write_text("5")
base = status("VmRSS")
denoise_image(model, rng.rand(512, 384).astype(np.float32), 25, solver=solver, device="cpu")
print(json.dumps({"peak": status("VmHWM") - base, "estimate": solve_bytes(512 * 384, 32, solver)}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure the peak")
@pytest.mark.parametrize("solver", ["broyden", "anderson"])
def test_memory_estimate_bounds_the_measured_peak(solver):
    """The estimate that decides tiling is above the measured peak of a whole-image solve, and not wildly above."""
    out = subprocess.run([sys.executable, "-c", PROBE, solver], capture_output=True, text=True, check=True,
                         timeout=300)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["peak"] <= got["estimate"] <= 3 * got["peak"], got


@pytest.fixture()
def weights(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "w.safetensors"
    save_weights(create_model("tiny"), path, sigma255=25)
    return path


def test_cli_tiles_when_the_image_does_not_fit(capsys, tmp_path, weights, monkeypatch):
    img = (np.random.RandomState(0).rand(150, 170) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "big.png")
    args = ["denoise", str(tmp_path / "big.png"), "-o", str(tmp_path / "o.png"), "--weights", str(weights),
            "--iters", "2"]
    image = nerd.tiling.IMAGE_BYTES_PER_PIXEL * 150 * 170
    fits_128 = (solve_bytes(128 * 128, 8, SolverConfig(max_iter=2)) + image) / nerd.tiling.USABLE  # and no more
    monkeypatch.setattr(nerd.tiling, "available_bytes", lambda device: fits_128)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "solving it in tiles of at most 128x128" in out and "in 4 tiles of 101x91 (overlap 32)" in out
    assert Image.open(tmp_path / "o.png").size == (170, 150)
    assert main([*args, "--tile", "off"]) == 0
    out = capsys.readouterr().out
    assert "tiles of" not in out and "170x150, 2 iterations" in out
    assert main([*args, "--tile", "100"]) == 0
    assert "in 6 tiles of 78x91" in capsys.readouterr().out
    for bad in ("32", "abc", "0"):
        assert main([*args, "--tile", bad]) == 2
        assert "--tile" in capsys.readouterr().err
