"""Overlapping tiles for images too large for memory, and the memory estimate that decides when to use them.

A whole-image NERD solve holds, per pixel, the f-evaluation's intermediates (about 28 feature maps of the model's
width: the 4x expansion of the transformation block, the attention's q, k, v and output, the GroupNorms) plus the
solver's history (Broyden keeps 2 state-sized vectors per secant pair, up to `memory` pairs). With the shipped
48-channel weights and 16 pairs that is about 12 KB a pixel: 8 GB for a 1024x644 Urban100 image, about 70 GB for a
12-megapixel photo even with the history capped (`fit_memory`). Tiles bound it: each tile is solved on its own and
the tiles are blended with linear ramps where they overlap. The price: GroupNorm's statistics and the attention see
one tile, not the whole image, so the result differs slightly from a whole-image solve (measured in docs/performance.md,
*Large images: tiles*).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

# Measured with nerd-s25 (48 channels) on this project's CPU, peak resident size above the idle process at
# 256^2 and 384^2 with 2 and 8 secant pairs (`nerd.allocator.tune()` on): 5.2 KB a pixel besides the history,
# 384 B a pixel per secant pair, 190 MiB whatever the size. In units of one float32 feature map:
MAPS_PER_PIXEL = 28.0  # f-evaluation intermediates and the solver's few current vectors
# Measured peaks per pixel run higher on large images and on tiles solved one after the other (the heap keeps
# some fragments from tile to tile): without this factor the estimate was 5 % above the peak of a whole 256x256
# image, 8 % below a whole 1024x644 one and 15 % below 363x338 tiles of it. docs/performance.md, *Large images: tiles*,
# sets each estimate beside the measured peak.
SAFETY = 1.25
FIXED_BYTES = 256 * 2**20
USABLE = 0.85  # of the memory available when the image starts
MIN_TILE = 128
TILE_STEP = 32
# Twice the shipped attention radius (q 33). The equilibrium's receptive field is wider than one window, so tiles
# still differ near their borders; the linear ramps blend that difference away across the overlap.
OVERLAP = 32


# Bytes allowed for the solver's history on large images (see `fit_memory`).
STATE_BUDGET = 4 * 2**30
# Whole-image float32 buffers of a tiled solve besides the tiles' own: the input, the blend's sum and weights,
# their quotient, the clamped output and its numpy copy.
IMAGE_BYTES_PER_PIXEL = 24


def history_maps(solver: Any, memory: int | None = None) -> int:
    """State-sized float32 vectors the history of `solver` (a SolverConfig) holds at its peak, with `memory` in
    place of `solver.memory` when given (each solver states its own: `nerd.deq.solvers.SOLVERS`)."""
    from nerd.deq.solvers import SOLVERS

    m = max(1, int(solver.memory if memory is None else memory))
    return SOLVERS[solver.name].history(solver, m)


def fit_memory(solver: Any, numel: int, budget: int = STATE_BUDGET) -> Any:
    """`solver` with its history shortened so that it holds at most `budget` bytes for a state of `numel` floats.

    On a 2000 x 2000 image with 64 channels one state is 1 GB, so the history, not the attention, is what bounds
    the image size first. Fixed-point keeps none.
    """
    if history_maps(solver, 1) == 0:
        return solver
    per_unit = history_maps(solver, 1) * 4 * max(1, numel)
    m = max(1, min(solver.memory, budget // per_unit))
    return replace(solver, memory=m) if m < solver.memory else solver


def peak_bytes(pixels: int, channels: int, maps: int) -> int:
    """Estimated peak memory of a solve over `pixels` pixels with `channels` features whose solver history holds
    `maps` state-sized vectors (`history_maps`)."""
    per_pixel = 4 * channels * (MAPS_PER_PIXEL + maps)
    return int(SAFETY * per_pixel * pixels) + FIXED_BYTES


def solve_bytes(pixels: int, channels: int, solver: Any, planes: int = 1) -> int:
    """`peak_bytes` of a solve as `nerd.denoise.denoise_image` runs it: `planes` planes of `pixels` pixels as one
    batch, the history shortened by `fit_memory` as for one plane (so a colour image's channels get the memory a
    grayscale image of their size gets, and the batch's answer is the per-channel one)."""
    return peak_bytes(planes * pixels, channels, history_maps(fit_memory(solver, channels * pixels)))


def _cgroup_free() -> int | None:
    """Memory this process's cgroup (a container's limit) still allows, not counting reclaimable file cache;
    None without a limit."""
    root = Path("/sys/fs/cgroup")
    for limit_file, usage_file, stat_file, cache_key in (
        ("memory.max", "memory.current", "memory.stat", "inactive_file"),  # cgroup v2
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat",
         "total_inactive_file"),  # cgroup v1
    ):
        try:
            limit_text = (root / limit_file).read_text().strip()
            if limit_text == "max" or int(limit_text) >= 2**60:
                return None  # no limit
            usage = int((root / usage_file).read_text())
            cache = 0
            for line in (root / stat_file).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == cache_key:
                    cache = int(value)
            return max(0, int(limit_text) - usage + cache)
        except (OSError, ValueError):
            continue
    return None


def available_bytes(device: torch.device) -> int | None:
    """Memory free for a new solve: on the CPU, MemAvailable (Linux), or less when a container's cgroup limit leaves
    less; on CUDA the GPU's free memory plus what PyTorch caches. None when unknown (then nothing is tiled unless
    asked)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    found = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    if found is None:
        try:
            found = int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    limit = _cgroup_free()
    return found if limit is None else min(found, limit)


@dataclass(frozen=True)
class TilePlan:
    """What `choose_tile` decided for one image: `tile` (None: the whole image), the estimated peak of the whole
    solve and of the tiled one, and the budget they were held against (bytes; None when memory is unknown)."""

    tile: int | None
    whole_bytes: int
    tile_bytes: int | None
    budget: int | None

    @property
    def fits(self) -> bool:
        """Whether the chosen solve's estimate is within the budget (True when the budget is unknown)."""
        need = self.whole_bytes if self.tile is None else self.tile_bytes
        return self.budget is None or need <= self.budget  # type: ignore[operator]


def choose_tile(height: int, width: int, channels: int, solver: Any, available: int | None,
                planes: int = 1) -> TilePlan:
    """Tiles for a height x width image of `planes` planes solved as one batch (3: a colour image), or the whole
    image when it fits in USABLE x `available` bytes.

    The tile side is the largest multiple of TILE_STEP (at least MIN_TILE) whose tiles fit beside the image's own
    buffers; MIN_TILE when none does (the plan then does not `fit`), and the whole image when such a tile would
    cover it anyway.
    """
    whole = solve_bytes(height * width, channels, solver, planes)
    if available is None:
        return TilePlan(None, whole, None, None)
    budget = int(USABLE * available)
    if whole <= budget:
        return TilePlan(None, whole, None, budget)

    def need(side: int) -> int:  # a tile's solve (tiles are at most side x side) and the image's buffers
        tile_pixels = min(height, side) * min(width, side)
        return solve_bytes(tile_pixels, channels, solver, planes) + planes * IMAGE_BYTES_PER_PIXEL * height * width

    side = MIN_TILE
    while side + TILE_STEP < max(height, width) and need(side + TILE_STEP) <= budget:
        side += TILE_STEP
    if side >= max(height, width):
        return TilePlan(None, whole, None, budget)
    return TilePlan(side, whole, need(side), budget)


def tile_starts(n: int, tile: int, overlap: int) -> tuple[list[int], int]:
    """(starts, length): the fewest windows of one length <= `tile` that cover 0..n-1, neighbours sharing at least
    `overlap` pixels; the length is the smallest that does it, so no more pixels are solved twice than needed.

    The windows are spread evenly, the first at 0 and the last ending at n.
    """
    if tile <= overlap:
        raise ValueError(f"tile ({tile}) must be larger than the overlap ({overlap})")
    if n <= tile:
        return [0], n
    count = math.ceil((n - overlap) / (tile - overlap))
    length = math.ceil((n + (count - 1) * overlap) / count)
    return [round(i * (n - length) / (count - 1)) for i in range(count)], length


def ramp(length: int, overlap: int, left: bool, right: bool) -> torch.Tensor:
    """(length,) blending weights: rising linearly over `overlap` pixels on a side that has a neighbour, else 1."""
    i = torch.arange(length, dtype=torch.float32)
    w = torch.ones(length)
    if left:
        w = torch.minimum(w, (i + 1) / (overlap + 1))
    if right:
        w = torch.minimum(w, (length - i) / (overlap + 1))
    return w


def tiles(height: int, width: int, tile: int, overlap: int) -> list[tuple[slice, slice, torch.Tensor]]:
    """(rows, cols, weight) of every tile of a height x width image; all tiles have one shape (at most tile x tile),
    weight has that shape and is positive everywhere."""
    (rows, th), (cols, tw) = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    out = []
    for a, i in enumerate(rows):
        wr = ramp(th, overlap, a > 0, a < len(rows) - 1)
        for b, j in enumerate(cols):
            wc = ramp(tw, overlap, b > 0, b < len(cols) - 1)
            out.append((slice(i, i + th), slice(j, j + tw), wr[:, None] * wc[None, :]))
    return out


def forecast_seconds(model: Any, pixels: int, solves: int, solver: Any, device: str | torch.device,
                     probe: int = 96) -> float:
    """Predicted seconds of `solves` solves of `pixels` pixels each, at most `solver.max_iter` f-evaluations: one
    f-evaluation of the model's implicit layer timed on a probe x probe crop (after one warm-up), scaled by pixels.

    The f-evaluation's cost is linear in the pixels (the attention window is fixed), so a small crop predicts a large
    image to within its fixed overheads; a forecast, not a measurement.
    """
    import time

    dev = torch.device(device)
    c = model.cfg.channels
    with torch.inference_mode():
        z = torch.zeros(1, c, probe, probe, device=dev)
        s = torch.randn(1, c, probe, probe, device=dev)
        model.layer(z, s)  # warm-up: first-call allocations and kernel choices
        start = time.perf_counter()
        model.layer(z, s)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        per_pixel = (time.perf_counter() - start) / (probe * probe)
    return per_pixel * pixels * solver.max_iter * solves
