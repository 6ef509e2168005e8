"""Exact neighbourhood attention on CUDA through `flex_attention`'s block-sparse kernel.

Tokens are reordered into tiles of 8 x 16 pixels (128 tokens, one kernel block), so each query block is a compact
patch and the block mask keeps only the key blocks that meet its windows: on a large image each query block visits
a few dozen key blocks instead of all of them. The mask is exact per token (window truncated at the border, padded
tokens never attended), so the result equals the plain formula; the masks are built once per image size and
attention window and cached. On CUDA the attention is compiled (`torch.compile(flex_attention)`, once per shape);
elsewhere flex_attention runs its unfused reference form, which is how the CPU tests check the reordering and the
mask against `reference_attention`.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

TILE = (8, 16)  # (rows, columns) of the pixel tiles that make one 128-token kernel block


def available() -> bool:
    """flex_attention imports (PyTorch >= 2.5)."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _geometry(h: int, w: int) -> tuple[int, int, int]:
    """(padded height, padded width, tiles per padded row) for an h x w image."""
    th, tw = TILE
    hp, wp = math.ceil(h / th) * th, math.ceil(w / tw) * tw
    return hp, wp, wp // tw


@functools.lru_cache(maxsize=8)
def _block_mask(h: int, w: int, r: int, device: str):  # noqa: ANN202 -- a flex_attention BlockMask
    from torch.nn.attention.flex_attention import create_block_mask

    th, tw = TILE
    hp, wp, cols = _geometry(h, w)

    def yx(idx: Tensor) -> tuple[Tensor, Tensor]:
        tile, within = idx // (th * tw), idx % (th * tw)
        return (tile // cols) * th + within // tw, (tile % cols) * tw + within % tw

    def mask_mod(b: Tensor, head: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        qy, qx = yx(q_idx)
        ky, kx = yx(kv_idx)
        # keys inside the image and inside the query's window (padded queries see their window's real keys)
        return ((qy - ky).abs() <= r) & ((qx - kx).abs() <= r) & (ky < h) & (kx < w)

    n = hp * wp
    return create_block_mask(mask_mod, None, None, n, n, device=device)


def _tiles(x: Tensor, h: int, w: int) -> Tensor:
    """(B, heads, H, W, d) -> (B, heads, Hp * Wp, d): padded, tokens ordered tile after tile."""
    b, n, _, _, d = x.shape
    th, tw = TILE
    hp, wp, cols = _geometry(h, w)
    x = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))
    x = x.reshape(b, n, hp // th, th, cols, tw, d).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, n, hp * wp, d)


def _untiles(x: Tensor, h: int, w: int) -> Tensor:
    """Inverse of `_tiles`, cropped: (B, heads, Hp * Wp, d) -> (B, heads, H, W, d)."""
    b, n, _, d = x.shape
    th, tw = TILE
    hp, wp, cols = _geometry(h, w)
    x = x.reshape(b, n, hp // th, cols, th, tw, d).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, n, hp, wp, d)[:, :, :h, :w]


@functools.cache
def _compiled():  # noqa: ANN202 -- the compiled flex_attention
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def attention(q: Tensor, k: Tensor, v: Tensor, window: int) -> Tensor:
    """Exact neighbourhood attention: q, k, v (B, heads, H, W, d) -> (B, heads, H, W, d)."""
    from torch.nn.attention.flex_attention import flex_attention

    _, _, h, w, _ = q.shape
    mask = _block_mask(h, w, window // 2, str(q.device))
    fn = _compiled() if q.is_cuda else flex_attention
    out = fn(*(_tiles(t, h, w) for t in (q, k, v)), block_mask=mask)
    return _untiles(out, h, w)
