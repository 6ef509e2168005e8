"""Overlapping tiles for images too large for memory, and the memory estimate that decides when to use them.

A whole-image NERD solve holds, per pixel, the f-evaluation's intermediates (about 28 feature maps of the model's
width: the 4x expansion of the transformation block, the attention's q, k, v and output, the GroupNorms) plus the
solver's history (Broyden keeps 2 state-sized vectors per secant pair, up to `memory` pairs). With the shipped
48-channel weights and 16 pairs that is about 12 KB a pixel: 8 GB for a 1024x644 Urban100 image, over 100 GB
for a 12-megapixel photo. Tiles bound it: each tile is solved on its own and the tiles are blended with linear ramps
where they overlap. The price: GroupNorm's statistics and the attention see one tile, not the whole image, so the
result differs slightly from a whole-image solve (measured in the README, *Large images: tiles*).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

# Measured with nerd-s25 (48 channels) on this project's CPU, peak resident size above the idle process at
# 256^2 and 384^2 with 2 and 8 secant pairs (`nerd.allocator.tune()` on): 5.2 KB a pixel besides the history,
# 384 B a pixel per secant pair, 190 MiB whatever the size. In units of one float32 feature map:
MAPS_PER_PIXEL = 28.0  # f-evaluation intermediates and the solver's few current vectors
# Measured peaks per pixel run higher on large images and on tiles solved one after the other (the heap keeps
# some fragments from tile to tile): without this factor the estimate was 5 % above the peak of a whole 256x256
# image, 8 % below a whole 1024x644 one and 15 % below 363x338 tiles of it. The README's *Large images: tiles*
# sets each estimate beside the measured peak.
SAFETY = 1.25
FIXED_BYTES = 256 * 2**20
USABLE = 0.85  # of the memory available when the image starts
MIN_TILE = 128
TILE_STEP = 32
OVERLAP = 32  # twice the shipped attention radius (q 33): a pixel near a seam sees its whole window in one tile


def peak_bytes(pixels: int, channels: int, pairs: int) -> int:
    """Estimated peak memory of a solve over `pixels` pixels with `channels` features and `pairs` secant pairs."""
    per_pixel = 4 * channels * (MAPS_PER_PIXEL + 2 * pairs)
    return int(SAFETY * per_pixel * pixels) + FIXED_BYTES


def available_bytes(device: torch.device) -> int | None:
    """Memory free for a new solve: MemAvailable on Linux, the GPU's free plus cached memory on CUDA; None when
    unknown (then nothing is tiled unless asked)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def history_pairs(solver: object) -> int:
    """Secant pairs (Broyden) or past iterates (Anderson) a solve of `solver` (a SolverConfig) holds at most."""
    name, memory = getattr(solver, "name", ""), max(1, int(solver.memory))  # type: ignore[attr-defined]
    if name == "fixed_point":
        return 0
    if name == "anderson":  # a ring of `memory` past iterates and their f-values
        return memory
    return min(memory, max(1, int(solver.max_iter) - 1))  # type: ignore[attr-defined]


def choose_tile(height: int, width: int, channels: int, pairs: int, available: int | None) -> int | None:
    """Side of the square tiles to use, or None for the whole image (it fits in USABLE x `available`).

    The largest multiple of TILE_STEP (at least MIN_TILE) whose tile fits; MIN_TILE when none does.
    """
    if available is None:
        return None
    budget = USABLE * available
    if peak_bytes(height * width, channels, pairs) <= budget:
        return None
    side = MIN_TILE
    while side + TILE_STEP < max(height, width) and peak_bytes((side + TILE_STEP) ** 2, channels, pairs) <= budget:
        side += TILE_STEP
    return side


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
