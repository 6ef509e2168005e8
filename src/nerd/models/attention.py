"""Exact q x q neighbourhood multi-head self-attention (paper eq. 7-9), at any image size.

Every pixel attends to the pixels of the q x q window centred on it. At the border the window is truncated:
keys outside the image do not exist (they are masked), so a corner pixel attends to a (r+1) x (r+1) window,
r = q // 2. When q >= 2 max(H, W) - 1 every window covers the whole image and attention is global.

`neighbourhood_attention` computes this exactly with PyTorch's fused `scaled_dot_product_attention`:

* small images: one masked attention over all H*W tokens (or unmasked, when the window covers everything);
* large images: the queries are cut into b x b tiles; each tile attends to its (b + 2r)^2 halo with a boolean
  mask that is exactly the q x q window of each query. Tiles are processed a few rows at a time, so memory is
  bounded by the tile size and the chunk budget, never by (H W)^2. There are no seams: the result is the same
  as the reference for every pixel.

`reference_attention` is the plain O((HW)^2) formula, for tests.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Upper bound on the elements of the score matrices (B * tiles * heads * L * K) handled by one SDPA call.
_CHUNK_ELEMENTS = 1 << 27


def _window_mask(h: int, w: int, r: int, device: torch.device) -> Tensor:
    """(HW, HW) bool: key j lies in the (2r+1)^2 window centred on query i."""
    ys = torch.arange(h, device=device).repeat_interleave(w)
    xs = torch.arange(w, device=device).repeat(h)
    return ((ys[:, None] - ys[None, :]).abs() <= r) & ((xs[:, None] - xs[None, :]).abs() <= r)


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Bool mask -> additive float mask (0 where allowed, -inf elsewhere). SDPA converts a boolean mask to this
    form on every call, which cost 2-3x the attention itself on the CPU for tiled masks."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


@functools.lru_cache(maxsize=8)
def _window_bias(h: int, w: int, r: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Cached additive (HW, HW) window mask: a solve evaluates f many times on one image size.

    Built outside inference mode, so a mask cached by `torch.inference_mode()` denoising can still be saved for
    backward by a later training step."""
    with torch.inference_mode(False):
        return _additive(_window_mask(h, w, r, device), dtype)


def reference_attention(q: Tensor, k: Tensor, v: Tensor, window: int) -> Tensor:
    """Plain masked softmax attention over the q x q windows (the readable definition).

    Args:
        q, k, v: (B, heads, H, W, d).
        window: odd neighbourhood size q.

    Returns:
        (B, heads, H, W, d).
    """
    b, n, h, w, d = q.shape
    qf, kf, vf = (t.reshape(b, n, h * w, d) for t in (q, k, v))
    scores = qf @ kf.transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(~_window_mask(h, w, window // 2, q.device), float("-inf"))
    return (scores.softmax(-1) @ vf).reshape(b, n, h, w, d)


def _tile_side(h: int, w: int, r: int, block: int) -> int:
    """Query tile side: one tile for the whole image when that computes fewer scores than b x b tiles."""
    whole = (h * w) ** 2
    nh, nw = math.ceil(h / block), math.ceil(w / block)
    tiled = nh * nw * block**2 * min(block + 2 * r, h + 2 * r) * min(block + 2 * r, w + 2 * r)
    return max(h, w) if whole <= tiled else block


def neighbourhood_attention(q: Tensor, k: Tensor, v: Tensor, window: int, block: int = 16) -> Tensor:
    """Exact neighbourhood attention through fused SDPA (see the module docstring).

    Args:
        q, k, v: (B, heads, H, W, d), any float dtype (autocast-friendly).
        window: odd neighbourhood size q.
        block: query tile side for large images (speed and memory only; the result does not depend on it).

    Returns:
        (B, heads, H, W, d), contiguous.
    """
    b, n, h, w, d = q.shape
    r = window // 2
    if 2 * r + 1 >= 2 * max(h, w) - 1:  # every window covers the whole image
        flat = [t.reshape(b, n, h * w, d) for t in (q, k, v)]
        return F.scaled_dot_product_attention(*flat).reshape(b, n, h, w, d)
    t = _tile_side(h, w, r, block)
    if t >= max(h, w):  # one tile: all tokens, masked to the windows
        flat = [t_.reshape(b, n, h * w, d) for t_ in (q, k, v)]
        bias = _window_bias(h, w, r, q.device, q.dtype)
        return F.scaled_dot_product_attention(*flat, attn_mask=bias).reshape(b, n, h, w, d)
    return _tiled(q, k, v, r, t)


def _tiled(q: Tensor, k: Tensor, v: Tensor, r: int, t: int) -> Tensor:
    b, n, h, w, d = q.shape
    nh, nw = math.ceil(h / t), math.ceil(w / t)
    hp, wp = nh * t, nw * t
    s = t + 2 * r  # side of a tile's key halo
    # Pad queries to whole tiles; pad keys/values by the halo r (plus the same tile padding).
    q = F.pad(q, (0, 0, 0, wp - w, 0, hp - h))
    k = F.pad(k, (0, 0, r, r + wp - w, r, r + hp - h))
    v = F.pad(v, (0, 0, r, r + wp - w, r, r + hp - h))
    valid = torch.zeros(hp + 2 * r, wp + 2 * r, dtype=torch.bool, device=q.device)
    valid[r : r + h, r : r + w] = True
    # Query (i, j) of a tile sits at (i + r, j + r) of its halo; key (ky, kx) is in its window iff
    # i <= ky <= i + 2r and j <= kx <= j + 2r.
    iy = torch.arange(t, device=q.device)
    ky = torch.arange(s, device=q.device)
    band = (ky[None, :] >= iy[:, None]) & (ky[None, :] <= iy[:, None] + 2 * r)  # (t, s)
    rel = (band[:, None, :, None] & band[None, :, None, :]).reshape(t * t, s * s)  # (L, K)
    # A padded query (outside the image) may see only padded keys: let it see its whole window (it is cropped).
    q_pad = torch.ones(hp, wp, dtype=torch.bool, device=q.device)
    q_pad[:h, :w] = False

    out = q.new_empty(b, n, hp, wp, d)
    rows = max(1, _CHUNK_ELEMENTS // max(1, b * nw * n * t * t * s * s))
    for i0 in range(0, nh, rows):
        i1 = min(nh, i0 + rows)
        c = i1 - i0
        y0, y1 = i0 * t, i1 * t
        # (B, heads, c*t, wp, d) -> (B * c * nw, heads, t*t, d)
        qt = q[:, :, y0:y1].reshape(b, n, c, t, nw, t, d).permute(0, 2, 4, 1, 3, 5, 6).reshape(b * c * nw, n, t * t, d)

        vt = valid[y0 : y1 + 2 * r].unfold(0, s, t).unfold(1, s, t).reshape(c * nw, 1, s * s)
        qp = q_pad[y0:y1].reshape(c, t, nw, t).permute(0, 2, 1, 3).reshape(c * nw, t * t, 1)
        mask = _additive(rel[None] & (vt | qp), q.dtype)  # (c*nw, L, K)
        mask = mask[None].expand(b, -1, -1, -1).reshape(b * c * nw, 1, t * t, s * s)  # a copy only when b > 1
        ot = F.scaled_dot_product_attention(qt, _halo(k, y0, y1, r, t), _halo(v, y0, y1, r, t), attn_mask=mask)
        out[:, :, y0:y1] = ot.reshape(b, c, nw, n, t, t, d).permute(0, 3, 1, 4, 2, 5, 6).reshape(b, n, c * t, wp, d)
    return out[:, :, :h, :w]


def _halo(x: Tensor, y0: int, y1: int, r: int, t: int) -> Tensor:
    """Key/value halos of the tile rows [y0, y1): (B, heads, Hp+2r, Wp+2r, d) -> (B * rows * nw, heads, s*s, d)."""
    b, n, _, _, d = x.shape
    s = t + 2 * r
    x = x[:, :, y0 : y1 + 2 * r].unfold(2, s, t).unfold(3, s, t)  # (B, n, rows, nw, d, s, s)
    return x.permute(0, 2, 3, 1, 5, 6, 4).reshape(-1, n, s * s, d)


class NeighbourhoodMSA(nn.Module):
    """Multi-head self-attention over q x q neighbourhoods (eq. 8), on (B, C, H, W) feature maps.

    Projections are linear maps on the channel dimension: W_theta, W_psi, W_g in one `qkv` layer (C -> 3C, the
    heads split the 3C outputs) and W_O in `proj` (C -> C). Tokens are made contiguous before SDPA: strided q/k/v
    make the fused kernel several times slower on the CPU.
    """

    def __init__(self, channels: int, heads: int, window: int, block: int = 16, fused: bool = True) -> None:
        super().__init__()
        self.heads, self.window, self.block, self.fused = heads, window, block, fused
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, u: Tensor) -> Tensor:
        """u: (B, C, H, W) -> (B, C, H, W)."""
        b, c, h, w = u.shape
        n = self.heads
        tokens = u.permute(0, 2, 3, 1)  # (B, H, W, C)
        qkv = self.qkv(tokens).reshape(b, h, w, 3, n, c // n).permute(3, 0, 4, 1, 2, 5)  # (3, B, n, H, W, d)
        q, k, v = (t.contiguous() for t in qkv)
        if self.fused:
            out = neighbourhood_attention(q, k, v, self.window, self.block)
        else:
            out = reference_attention(q, k, v, self.window)
        out = out.permute(0, 2, 3, 1, 4).reshape(b, h, w, c)  # (B, H, W, C)
        return self.proj(out).permute(0, 3, 1, 2)

    def attention_map(self, u: Tensor, y: int, x: int) -> Tensor:
        """Attention weights of pixel (y, x) over the image, per head: (B, heads, H, W). For figures (Fig. 9)."""
        b, c, h, w = u.shape
        n = self.heads
        tokens = u.permute(0, 2, 3, 1)
        qkv = self.qkv(tokens).reshape(b, h, w, 3, n, c // n).permute(3, 0, 4, 1, 2, 5)
        q, k = qkv[0], qkv[1]
        d = q.shape[-1]
        scores = torch.einsum("bnd,bnhwd->bnhw", q[:, :, y, x], k) / math.sqrt(d)
        r = self.window // 2
        ys = torch.arange(h, device=u.device)[:, None]
        xs = torch.arange(w, device=u.device)[None, :]
        inside = ((ys - y).abs() <= r) & ((xs - x).abs() <= r)
        scores = scores.masked_fill(~inside, float("-inf"))
        return scores.reshape(b, n, h * w).softmax(-1).reshape(b, n, h, w)

