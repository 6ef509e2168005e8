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
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nerd.config import check_ensemble
from nerd.errors import DenoiseError, ImageError
from nerd.sigma import check_sigma255, to_unit

ASSETS = Path(__file__).resolve().parent / "assets"
SAMPLE_NOISY = ASSETS / "sample_noisy.png"
SAMPLE_CLEAN = ASSETS / "sample_clean.png"
SAMPLE_SIGMA = 25.0
# A relative residual above this at the end of a solve is reported as an alarm: the state still changes by 5 % a
# step. The shipped weights end their solves at 0.3-1 % (17 iterations) or 1-3 % (8) on held-out images.
ALARM_RESIDUAL = 0.05
MIN_ESTIMATE_SIDE = 8  # the wavelet estimate of sigma needs a few detail coefficients along both axes
MAX_CHANNELS = 4  # (H, W, C) is channels-last colour; a channels-first (1, H, W) array must not pass as W channels


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


@dataclass(frozen=True)
class DenoiseSummary:
    """What a `denoise_image` call did; the solver figures are the worst of its solves (tiles, channels,
    symmetries).

    Attributes:
        height, width: the image's size in pixels.
        nfe: f-evaluations (= iterations) of the longest solve.
        rel_residual, abs_residual: the largest final residuals of any solve.
        converged: every solve reached `tol`.
        channels: 1 for a grayscale image, else the colour channels (denoised as grayscale planes, one batch).
        tiles: 1 for a whole-image solve.
        tile: the tile side asked for (None: whole image, also when the tile covers the image).
        tile_shape: (h, w) of the tiles, or None.
        overlap: pixels shared by neighbouring tiles, or None.
        unconverged_tiles: tiles with a solve that did not reach `tol`, counted in every channel.
        alarm_tiles: tiles with a solve that ended above ALARM_RESIDUAL, counted in every channel.
        ensemble: symmetries averaged per tile (1: none).
        tol, memory: the solver's tolerance and stored updates as run.
        seconds: wall time of the solves.
        device: where they ran.
    """

    height: int
    width: int
    nfe: int
    rel_residual: float
    abs_residual: float
    converged: bool
    channels: int = 1
    tiles: int = 1
    tile: int | None = None
    tile_shape: tuple[int, int] | None = None
    overlap: int | None = None
    unconverged_tiles: int = 0
    alarm_tiles: int = 0
    ensemble: int = 1
    tol: float = 0.0
    memory: int = 0
    seconds: float = 0.0
    device: str = "cpu"
    max_iter: int = 0

    @property
    def alarm(self) -> bool:
        """Whether a solve ended far from an equilibrium: not at `tol`, and its state still moving by more than
        ALARM_RESIDUAL a step. A solve that used its iteration budget and ended below that is what the budget
        asked for (on the shipped weights the tolerance is rarely met, and needs not be: scripts/choose_budget.py)."""
        return not self.converged and self.rel_residual > ALARM_RESIDUAL

    @property
    def several(self) -> bool:
        """Whether the statistics are the worst of several solves (tiles, channels or symmetries)."""
        return self.tiles > 1 or self.channels > 1 or self.ensemble > 1


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
    colour_weights: Any = None,
) -> tuple[np.ndarray, DenoiseSummary]:
    """Denoise one grayscale image with a DEQDenoiser, whole or in overlapping tiles, optionally self-ensembled; a
    colour image's channels as one batch of grayscale planes.

    Args:
        model: a `nerd.models.DEQDenoiser` (moved to `device`; run in eval mode, its mode restored after).
        y: float (H, W) noisy image on [0, 1] (finite), or (H, W, C): each channel denoised on its own with the
            grayscale model (AWGN of the same sigma in each channel assumed), the C channels solved as one batch.
        sigma255: noise std on the 0-255 scale (also for 16-bit images), 0 < sigma255 <= 255.
        solver: a `SolverConfig` overriding the model's solver (`model.solver.override(...)`).
        device: "cpu", "cuda", ...; default: CUDA when available.
        tile: None (default) solves the whole image at once; a side length solves tiles of at most that size
            (the smallest that cover the image with the overlap), blended where they overlap, to bound memory
            (the CLI's `--tile auto` picks one from the memory available with `nerd.tiling.choose_tile`; here it
            is only what is asked). A tile that covers the image is the whole-image solve.
        overlap: pixels shared by neighbouring tiles (default `nerd.tiling.OVERLAP`); tile must be >= 2 x overlap.
        ensemble: 1 (default), 2, 4 or 8: the mean of that many solves of each tile (or of the whole image), each
            on one of the square's symmetries (`nerd.models.ensemble`); n times the time, the memory of one solve.
        progress: a progress bar over the solves' f-evaluations (stderr).
        colour_weights: for an RGB (H, W, 3) image, a `nerd.colour.ColourWeights` (the gray weights to choose from, e.g.
            `ColourWeights.shipped()`): the image goes through `nerd.colour`'s shipped transform (opponent planes,
            each with the weights for its own noise level; `model` is then unused), one batched solve per weights
            file. None: R, G, B with `model`, one batch.

    Returns:
        (x_hat, summary): x_hat float32 (H, W) (or (H, W, C)) clipped to [0, 1]; a `DenoiseSummary`.

    Raises:
        ImageError: y is not a finite (H, W) or (H, W, C <= 4) array.
        ConfigError: sigma255 is out of range, tile < 2 x overlap, or ensemble is not one of 1, 2, 4, 8.
        DenoiseError: the output has non-finite values.
    """
    y = np.ascontiguousarray(y, dtype=np.float32)
    colour = y.ndim == 3 and y.size and y.shape[2] <= MAX_CHANNELS
    if not colour and (y.ndim != 2 or y.size == 0):
        raise ImageError(f"expected a non-empty (H, W) or channels-last (H, W, C <= {MAX_CHANNELS}) image, got "
                         f"shape {y.shape}")
    if not np.isfinite(y).all():
        raise ImageError("image has NaN or infinite pixels")
    sigma255, ensemble = check_sigma255(sigma255), check_ensemble(ensemble)
    if colour and y.shape[2] == 3 and colour_weights is not None:  # nerd.colour: transform, planes, inverse
        from nerd.colour import denoise_with

        return denoise_with(colour_weights, y, sigma255, lambda m, planes: _denoise_planes(
            m, planes, sigma255, solver=solver, device=device, tile=tile, overlap=overlap, ensemble=ensemble,
            progress=progress, clip=False))
    planes = np.ascontiguousarray(np.moveaxis(y, -1, 0)) if colour else y[None]  # (C, H, W)
    x_hat, summary = _denoise_planes(model, planes, sigma255, solver=solver, device=device,
                                     tile=tile, overlap=overlap, ensemble=ensemble, progress=progress)
    return (np.ascontiguousarray(np.moveaxis(x_hat, 0, -1)) if colour else x_hat[0]), summary


def _denoise_planes(
    model: Any, planes: np.ndarray, sigma255: float, *, solver: Any, device: str | None, tile: int | None,
    overlap: int | None, ensemble: int, progress: bool, clip: bool = True,
) -> tuple[np.ndarray, DenoiseSummary]:
    """`denoise_image` of a checked float32 (C, H, W) stack of planes: the grayscale model solves the C planes of
    each tile as one batch (every sample of a solve is its own problem: the result is the per-plane one). `clip`
    False leaves the estimates unclipped (colour-transform planes, clipped in RGB after the inverse)."""
    import torch

    from nerd import allocator
    from nerd.errors import ConfigError
    from nerd.models.ensemble import ensemble_solve
    from nerd.tiling import OVERLAP, fit_memory, tiles

    c, h, w = planes.shape
    overlap = OVERLAP if overlap is None else int(overlap)
    if tile is not None and max(h, w) <= tile:
        tile = None  # one tile covers the image: the whole-image solve
    if tile is not None and (tile < 2 * overlap or tile < 2 or overlap < 0):
        raise ConfigError(f"tile must be at least twice the overlap ({overlap}, >= 0), got tile {tile}")
    pieces = tiles(h, w, tile, overlap) if tile is not None else [(slice(None), slice(None), None)]
    per_plane = pieces[0][2].numel() if tile is not None else h * w  # all tiles have one shape
    # the history a plane alone would get: the batch's answer is the per-plane one (the tile planner counts the batch)
    solver = fit_memory(solver or model.solver, model.cfg.channels * per_plane)
    dev = torch.device(device or default_device())
    was_training = model.training
    model.to(dev).eval()
    stats = []  # one entry per tile: the statistics of its solves (one per symmetry), each over the C planes
    try:
        start = time.perf_counter()
        with torch.inference_mode():
            y_t = torch.from_numpy(planes).to(dev)
            acc = torch.zeros_like(y_t) if tile is not None else None
            norm = torch.zeros_like(y_t[0]) if tile is not None else None
            solves = len(pieces) * ensemble
            with _bar(solves * solver.max_iter, progress) as bar, _ticks(model, bar, progress, solver.tol):
                done = [0]  # solves finished

                def next_solve() -> None:
                    done[0] += 1
                    bar.update(done[0] * solver.max_iter - bar.n)  # a solve that stopped early: on to the next one
                    if len(pieces) > 1:
                        bar.set_description(f"tile {min(done[0] // ensemble + 1, len(pieces))}/{len(pieces)}")
                    if solves > 1:
                        allocator.release()  # else each solve fragments the heap further (peak +20 % tiled)

                for rows, cols, weight in pieces:
                    x, tile_stats = ensemble_solve(model, y_t[:, rows, cols][:, None], to_unit(sigma255), ensemble,
                                                   solver=solver, after_each=next_solve)
                    stats.append(tile_stats)
                    x = x[:, 0]
                    if acc is None:
                        acc = x
                    else:
                        wt = weight.to(dev)
                        acc[:, rows, cols] += wt * x
                        norm[rows, cols] += wt
                        del x
            x = acc if norm is None else acc / norm
            finite = bool(torch.isfinite(x).all())
            x_hat = (x.clamp(0.0, 1.0) if clip else x).cpu().numpy()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - start
    finally:
        model.train(was_training)
    every = [s for tile_stats in stats for s in tile_stats]  # every solve's statistics, (C,) each
    # per (tile, plane): whether all its symmetries converged, and whether any ended far from an equilibrium
    converged = [bool(torch.stack([s.converged for s in tile_stats]).all(0)[p]) for tile_stats in stats
                 for p in range(c)]
    alarms = [bool((torch.stack([s.rel_residual for s in tile_stats]) > ALARM_RESIDUAL).any(0)[p])
              for tile_stats in stats for p in range(c)]
    summary = DenoiseSummary(
        height=h, width=w, nfe=max(int(s.nfe.max()) for s in every),
        rel_residual=max(float(s.rel_residual.max()) for s in every),
        abs_residual=max(float(s.abs_residual.max()) for s in every), converged=all(converged), channels=c,
        tiles=len(pieces), tile=tile, tile_shape=tuple(pieces[0][2].shape) if tile is not None else None,
        overlap=overlap if tile is not None else None, unconverged_tiles=converged.count(False),
        alarm_tiles=sum(alarms), ensemble=ensemble, tol=float(solver.tol), memory=int(solver.memory),
        seconds=seconds, device=str(dev), max_iter=int(solver.max_iter),
    )
    if not finite:
        raise DenoiseError(
            f"the model produced NaN/inf pixels (solver: {summary.nfe} iterations, "
            f"rel residual {summary.rel_residual:.1e}); no output written"
        )
    if not all(s.all_finite for s in every):  # the solver stepped back to a finite iterate: not an equilibrium
        raise DenoiseError(f"the solver met NaN/inf values in the model's state after up to {summary.nfe} "
                           "iterations (damaged weights?); no output written")
    return x_hat.astype(np.float32, copy=False), summary


def _bar(total: int, show: bool) -> Any:
    """A tqdm bar over the f-evaluations that the solves may take (tiles x symmetries x max_iter) on stderr, gone
    when done; silent when not asked."""
    import sys

    from tqdm import tqdm

    return tqdm(total=total, unit="f-eval", leave=False, file=sys.stderr, disable=not show)


@contextlib.contextmanager
def _ticks(model: Any, bar: Any, show: bool, tol: float | None = None) -> Iterator[None]:
    """Advance `bar` at every f-evaluation: a forward hook on the model's implicit layer (the solver engine knows
    nothing of progress bars, and a whole-image solve can take minutes). With `tol`, the bar also shows the
    largest relative residual ||f(z) - z|| / ||f(z)|| of the batch's planes at that evaluation beside the tolerance
    that stops a solve: the bar's total is the cap, and a solve that converges ends well before it."""
    def tick(_module: Any, args: Any, out: Any) -> None:  # None: a forward hook's return would replace the output
        bar.update()
        if tol:
            diff = (out - args[0]).flatten(1).norm(dim=1) / out.flatten(1).norm(dim=1).clamp_min(1e-12)
            bar.set_postfix_str(f"residual {float(diff.max()):.1e}, stops below {tol:g}", refresh=False)

    layer = getattr(model, "layer", None)
    handle = layer.register_forward_hook(tick) if show and layer is not None else None
    if handle is not None and tol:
        bar.set_postfix_str(f"stops below {tol:g}")
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def convergence(summary: DenoiseSummary) -> str:
    """What stopped the solve(s): 'converged (rel residual 2.12e-02 < tol 0.025)'; 'stopped at the 17-iteration
    budget (rel residual 4.90e-03)' when the cap ended it near an equilibrium; 'NOT converged [in k of n
    tiles/channels] (rel residual 2.1e-01 > 5e-02)' only when a solve ended far from one (`DenoiseSummary.alarm`)."""
    largest = "largest " if summary.several else ""
    # two decimals: one would print a residual just above a threshold as equal to it ("1.0e-03 > tol 1e-03")
    residual = f"{largest}rel residual {summary.rel_residual:.2e}"
    if summary.converged:
        return f"converged ({residual} < tol {summary.tol:g})"
    if not summary.alarm:
        budget = f"the {summary.max_iter}-iteration budget" if summary.max_iter else "the iteration budget"
        return f"stopped at {budget} ({residual})"
    tiled, channels = summary.tiles > 1, summary.channels
    if tiled or channels > 1:
        unit = "tiles x channels" if tiled and channels > 1 else "tiles" if tiled else "channels"
        state = f"NOT converged in {summary.alarm_tiles} of {summary.tiles * channels} {unit}"
    else:
        state = "NOT converged"
    return f"{state} ({residual} > {ALARM_RESIDUAL:.0e}: far from an equilibrium; more --iters?)"


def describe(summary: DenoiseSummary) -> str:
    """One line: '256x256, 12 iterations, converged (rel residual 8.12e-04), 1.23 s'; for a tiled solve
    '4000x3000 in 48 tiles of 518x596 (overlap 32), up to 17 iterations, NOT converged in 3 of 48 tiles (...)';
    a colour image adds 'x 3 channels', a self-ensemble 'x 8 symmetries' after the size."""
    size = f"{summary.width}x{summary.height}"
    if summary.tiles > 1:
        th, tw = summary.tile_shape  # type: ignore[misc]
        size += f" in {summary.tiles} tiles of {tw}x{th} (overlap {summary.overlap})"
    if summary.channels > 1:
        size += f" x {summary.channels} channels"
    if summary.ensemble > 1:
        size += f" x {summary.ensemble} symmetries"
    iterations = f"{'up to ' if summary.several else ''}{summary.nfe} iteration{'s' * (summary.nfe != 1)}"
    return f"{size}, {iterations}, {convergence(summary)}, {summary.seconds:.2f} s"
