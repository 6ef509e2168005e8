"""Denoise one grayscale image with a NERD model: numpy in, numpy out, with the solver's statistics.

Scales: images are float on [0, 1] (8-bit pixel / 255, 16-bit pixel / 65535); sigma is always given on the
0-255 scale, whatever the file's bit depth (sigma 25 means a standard deviation of 25/255 on [0, 1]).
By default the whole image goes through the model at once: the neighbourhood attention is exact and blocked, so its
memory does not grow with (H W)^2, but the f-evaluation's feature maps and the solver's history grow linearly with
H W (about 12 KB a pixel with the shipped weights). Images too large for memory go in overlapping tiles
(`tile=`, chosen by `nerd.tiling.choose_tile` in the CLI).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ASSETS = Path(__file__).resolve().parent / "assets"
SAMPLE_NOISY = ASSETS / "sample_noisy.png"
SAMPLE_CLEAN = ASSETS / "sample_clean.png"
SAMPLE_SIGMA = 25.0
MAX_SIGMA = 255.0
MIN_ESTIMATE_SIDE = 8  # the wavelet estimate of sigma needs a few detail coefficients along both axes
ENSEMBLES = (1, 2, 4, 8)  # self-ensemble sizes: the first n of the square's 8 symmetries (nerd.data.patches.dihedral)
MAX_CHANNELS = 4  # (H, W, C) is channels-last colour; a channels-first (1, H, W) array must not pass as W channels


class DenoiseError(RuntimeError):
    """The model produced an unusable result (non-finite values)."""


def check_sigma(sigma255: float) -> float:
    """sigma255 as a float, or ValueError unless 0 < sigma255 <= 255 (the 0-255 scale)."""
    sigma = float(sigma255)
    if not math.isfinite(sigma) or sigma <= 0 or sigma > MAX_SIGMA:
        raise ValueError(f"sigma must be in (0, {MAX_SIGMA:g}] on the 0-255 scale, got {sigma255!r}")
    return sigma


def default_device() -> str:
    """'cuda' when a GPU is available, else 'cpu'."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def estimate_sigma255(y: np.ndarray) -> float:
    """Noise std of y: float (H, W) (or (H, W, C): the mean over channels) on [0, 1], estimated by wavelet MAD
    (skimage), on the 0-255 scale."""
    from skimage.restoration import estimate_sigma

    y = np.asarray(y, dtype=np.float64)
    if min(y.shape[:2]) < MIN_ESTIMATE_SIDE:
        raise ValueError(f"a {y.shape[1]}x{y.shape[0]} image is too small to estimate its noise level "
                         f"(needs {MIN_ESTIMATE_SIDE} pixels a side); give sigma")
    channel_axis = -1 if y.ndim == 3 else None
    return float(estimate_sigma(y, channel_axis=channel_axis, average_sigmas=True)) * 255.0


def denoise_image(
    model: Any,
    y: np.ndarray,
    sigma255: float,
    *,
    solver: Any = None,
    device: str | None = None,
    tile: int | None = None,
    overlap: int | None = None,
    ensemble: int = 1,
    progress: bool = False,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Denoise one grayscale image with a DEQDenoiser, whole or in overlapping tiles, optionally self-ensembled; a
    colour image channel by channel.

    Args:
        model: a `nerd.models.DEQDenoiser` (moved to `device`; run in eval mode, its mode restored after).
        y: float (H, W) noisy image on [0, 1] (finite), or (H, W, C): each channel denoised on its own with the
            grayscale model (AWGN of the same sigma in each channel assumed), C times the time.
        sigma255: noise std on the 0-255 scale (also for 16-bit images), 0 < sigma255 <= 255.
        solver: a `SolverConfig` overriding the model's solver (`dataclasses.replace(model.solver, ...)`).
        device: "cpu", "cuda", ...; default: CUDA when available.
        tile: None (default) solves the whole image at once; a side length solves tiles of at most that size
            (the smallest that cover the image with the overlap), blended where they overlap, to bound memory
            (the CLI's `--tile auto` picks one from the memory available with `nerd.tiling.choose_tile`; here it
            is only what is asked). A tile that covers the image is the whole-image solve.
        overlap: pixels shared by neighbouring tiles (default `nerd.tiling.OVERLAP`); tile must be >= 2 x overlap.
        ensemble: 1 (default), 2, 4 or 8: the mean of that many solves of each tile (or of the whole image), each
            on one of the square's symmetries (`dihedral(., k)` for k < ensemble: quarter turns, then flips) and
            turned back; n times the time, the memory of one solve.
        progress: a progress bar over the solves' f-evaluations (stderr).

    Returns:
        (x_hat, summary): x_hat float32 (H, W) (or (H, W, C)) clipped to [0, 1]; summary dict with height, width, nfe
        (f-evaluations = iterations; the most of any tile), rel_residual and abs_residual (the largest of any tile),
        converged (every solve), channels (1 for a grayscale image), tiles (1 for a whole-image solve), tile (the
        side asked for; None for a whole-image solve, also when the tile asked for covers the image), tile_shape
        ((h, w) of the tiles, or None), overlap, unconverged_tiles (tiles with a solve that did not converge,
        counted in every channel), ensemble, tol, memory, seconds, device.

    Raises:
        ValueError: y is not a finite (H, W) or (H, W, C <= 4) array, sigma255 is out of range, tile < 2 x
            overlap, or ensemble is not one of 1, 2, 4, 8.
        DenoiseError: the output has non-finite values.
    """
    import torch

    from nerd import allocator
    from nerd.data.patches import dihedral, undo_dihedral
    from nerd.tiling import OVERLAP, fit_memory, tiles

    y = np.ascontiguousarray(y, dtype=np.float32)
    if y.ndim == 3 and y.size and y.shape[2] <= MAX_CHANNELS:  # colour: the grayscale model on each channel
        kwargs = dict(solver=solver, device=device, tile=tile, overlap=overlap, ensemble=ensemble, progress=progress)
        parts = [denoise_image(model, y[..., c], sigma255, **kwargs) for c in range(y.shape[2])]
        summary = dict(parts[0][1])
        summary.update(
            channels=len(parts), nfe=max(p[1]["nfe"] for p in parts),
            rel_residual=max(p[1]["rel_residual"] for p in parts),
            abs_residual=max(p[1]["abs_residual"] for p in parts),
            converged=all(p[1]["converged"] for p in parts), seconds=sum(p[1]["seconds"] for p in parts),
            unconverged_tiles=sum(p[1]["unconverged_tiles"] for p in parts),
        )
        return np.stack([p[0] for p in parts], axis=-1), summary
    if y.ndim != 2 or y.size == 0:
        raise ValueError(f"expected a non-empty (H, W) or channels-last (H, W, C <= {MAX_CHANNELS}) image, got "
                         f"shape {y.shape}")
    if not np.isfinite(y).all():
        raise ValueError("image has NaN or infinite pixels")
    sigma = check_sigma(sigma255)
    if ensemble not in ENSEMBLES:
        raise ValueError(f"ensemble must be one of {', '.join(map(str, ENSEMBLES))}, got {ensemble!r}")
    overlap = OVERLAP if overlap is None else int(overlap)
    if tile is not None and max(y.shape) <= tile:
        tile = None  # one tile covers the image: the whole-image solve
    if tile is not None and (tile < 2 * overlap or tile < 2 or overlap < 0):
        raise ValueError(f"tile must be at least twice the overlap ({overlap}, >= 0), got tile {tile}")
    pieces = tiles(*y.shape, tile, overlap) if tile is not None else [(slice(None), slice(None), None)]
    per_solve = pieces[0][2].numel() if tile is not None else y.size  # all tiles have one shape
    solver = fit_memory(solver or model.solver, model.cfg.channels * per_solve)
    dev = torch.device(device or default_device())
    was_training = model.training
    model.to(dev).eval()
    stats = []  # one entry per tile: the statistics of its solves (one per symmetry)
    try:
        start = time.perf_counter()
        with torch.inference_mode():
            y_t = torch.from_numpy(y).to(dev)
            acc = torch.zeros_like(y_t) if tile is not None else None
            norm = torch.zeros_like(y_t) if tile is not None else None
            solves = len(pieces) * ensemble
            with _bar(solves * solver.max_iter, progress) as bar, _ticks(model, bar, progress):
                for rows, cols, weight in pieces:
                    part, x = y_t[rows, cols][None, None], None
                    stats.append([])
                    for k in range(ensemble):  # a rotated tile has the same pixels: the same memory
                        eq = model.equilibrium(dihedral(part, k), sigma / 255.0, solver=solver)
                        x_k = undo_dihedral(eq.x_hat, k)[0, 0].float()
                        x = x_k if x is None else x + x_k
                        stats[-1].append(eq.stats)
                        del eq, x_k
                        if solves > 1:
                            allocator.release()  # else each solve fragments the heap further (peak +20 % tiled)
                        done = sum(map(len, stats)) * solver.max_iter
                        bar.update(done - bar.n)  # a solve that stopped early: on to the next one's start
                    x = x / ensemble
                    if acc is None:
                        acc = x
                    else:
                        w = weight.to(dev)
                        acc[rows, cols] += w * x
                        norm[rows, cols] += w
                        del x
            x = acc if norm is None else acc / norm
            finite = bool(torch.isfinite(x).all())
            x_hat = x.clamp(0.0, 1.0).cpu().numpy()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - start
    finally:
        model.train(was_training)
    converged = [all(bool(s.converged[0]) for s in tile_stats) for tile_stats in stats]
    every = [s for tile_stats in stats for s in tile_stats]  # every solve's statistics
    summary: dict[str, Any] = {
        "height": int(y.shape[0]),
        "width": int(y.shape[1]),
        "nfe": max(int(s.nfe[0]) for s in every),
        "rel_residual": max(float(s.rel_residual[0]) for s in every),
        "abs_residual": max(float(s.abs_residual[0]) for s in every),
        "converged": all(converged),
        "channels": 1,
        "tiles": len(pieces),
        "tile": tile,
        "tile_shape": tuple(pieces[0][2].shape) if tile is not None else None,
        "overlap": overlap if tile is not None else None,
        "unconverged_tiles": converged.count(False),
        "ensemble": ensemble,
        "tol": float(solver.tol),
        "memory": int(solver.memory),
        "seconds": seconds,
        "device": str(dev),
    }
    if not finite:
        raise DenoiseError(
            f"the model produced NaN/inf pixels (solver: {summary['nfe']} iterations, "
            f"rel residual {summary['rel_residual']:.1e}); no output written"
        )
    return x_hat.astype(np.float32, copy=False), summary


def _bar(total: int, show: bool) -> Any:
    """A tqdm bar over the f-evaluations that the solves may take (tiles x symmetries x max_iter) on stderr, gone
    when done; silent when not asked."""
    import sys

    from tqdm import tqdm

    return tqdm(total=total, unit="f-eval", leave=False, file=sys.stderr, disable=not show)


@contextlib.contextmanager
def _ticks(model: Any, bar: Any, show: bool) -> Iterator[None]:
    """Advance `bar` at every f-evaluation: a forward hook on the model's implicit layer (the solver engine knows
    nothing of progress bars, and a whole-image solve can take minutes)."""
    def tick(*_: Any) -> None:  # returns None: a forward hook's return value would replace the layer's output
        bar.update()

    layer = getattr(model, "layer", None)
    handle = layer.register_forward_hook(tick) if show and layer is not None else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def _several(summary: dict[str, Any]) -> bool:
    """Whether the statistics are the worst of several solves (tiles, channels or symmetries)."""
    return summary.get("tiles", 1) > 1 or summary.get("channels", 1) > 1 or summary.get("ensemble", 1) > 1


def convergence(summary: dict[str, Any]) -> str:
    """'converged (rel residual 8.12e-04)', or 'NOT converged [in k of n tiles/channels] (... > tol 1e-03)'."""
    tiled, channels = summary.get("tiles", 1) > 1, summary.get("channels", 1)
    if summary["converged"]:
        state = "converged"
    elif tiled or channels > 1:
        unit = "tiles x channels" if tiled and channels > 1 else "tiles" if tiled else "channels"
        state = f"NOT converged in {summary['unconverged_tiles']} of {summary.get('tiles', 1) * channels} {unit}"
    else:
        state = "NOT converged"
    # two decimals: one would print a residual just above the tolerance as equal to it ("1.0e-03 > tol 1e-03")
    detail = f"{'largest ' if _several(summary) else ''}rel residual {summary['rel_residual']:.2e}"
    if not summary["converged"]:
        detail += f" > tol {summary['tol']:.0e}"
    return f"{state} ({detail})"


def describe(summary: dict[str, Any]) -> str:
    """One line: '256x256, 12 iterations, converged (rel residual 8.12e-04), 1.23 s'; for a tiled solve
    '4000x3000 in 48 tiles of 518x596 (overlap 32), up to 17 iterations, NOT converged in 3 of 48 tiles (...)';
    a colour image adds 'x 3 channels', a self-ensemble 'x 8 symmetries' after the size."""
    size = f"{summary['width']}x{summary['height']}"
    if summary.get("tiles", 1) > 1:
        th, tw = summary["tile_shape"]
        size += f" in {summary['tiles']} tiles of {tw}x{th} (overlap {summary['overlap']})"
    if summary.get("channels", 1) > 1:
        size += f" x {summary['channels']} channels"
    if summary.get("ensemble", 1) > 1:
        size += f" x {summary['ensemble']} symmetries"
    iterations = f"{'up to ' if _several(summary) else ''}{summary['nfe']} iterations"
    return f"{size}, {iterations}, {convergence(summary)}, {summary['seconds']:.2f} s"
