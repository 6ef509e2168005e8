"""Exact q x q neighbourhood multi-head self-attention (paper eq. 7-9), at any image size.

Every pixel attends to the pixels of the q x q window centred on it. At the border the window is truncated:
keys outside the image do not exist (they are masked), so a corner pixel attends to a (r+1) x (r+1) window,
r = q // 2. When q >= 2 max(H, W) - 1 every window covers the whole image and attention is global.

`neighbourhood_attention` computes this exactly. On the CPU it runs a C++ kernel that visits only the keys of each
window (`nerd.models.attention_kernel`, compiled on first use); on CUDA it runs flex_attention's block-sparse kernel
(`nerd.models.attention_flex`); elsewhere, or where neither can run, it uses PyTorch's fused
`scaled_dot_product_attention` (the SDPA path):

* small images: one masked attention over all H*W tokens (or unmasked, when the window covers everything);
* large images: the queries are cut into b x b tiles; each tile attends to its (b + 2r)^2 halo with a mask
  that is exactly the q x q window of each query. Tiles with the same border situation (interior, first or last
  rows/columns) share one mask, so an image needs a handful of (b^2, (b + 2r)^2) masks, built once per image size
  and cached; each rectangle of such tiles is one SDPA call that broadcasts its mask. Tiles are processed a few
  rows at a time, so memory is bounded by the tile size and the chunk budget, never by (H W)^2. There are no
  seams: the result is the same as the reference for every pixel.

`reference_attention` is the plain O((HW)^2) formula, for tests.
"""

from __future__ import annotations

import functools
import math
import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import nerd.models.attention_flex as attention_flex
import nerd.models.attention_kernel as attention_kernel

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
    if attention_kernel.usable(q):
        return attention_kernel.attention(q, k, v, window)
    if q.is_cuda and _flex_usable():
        try:
            return attention_flex.attention(q, k, v, window)
        except Exception as err:  # a CUDA stack whose compiler cannot build the kernel: SDPA from then on
            _FLEX_FAILED.append(f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}")
            print(f"nerd: flex_attention failed ({_FLEX_FAILED[0]}); using the SDPA path", file=sys.stderr, flush=True)
    return sdpa_attention(q, k, v, window, block)


_FLEX_FAILED: list[str] = []  # the first failure of the CUDA flex_attention path in this process, if any


def _flex_usable() -> bool:
    """CUDA's flex_attention path: unless NERD_ATTENTION=sdpa, it failed once already, or torch lacks it."""
    return attention_kernel.enabled() and not _FLEX_FAILED and attention_flex.available()


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, window: int, block: int = 16) -> Tensor:
    """The SDPA path of `neighbourhood_attention` (same arguments): GPUs, autocast dtypes, tracing, no compiler."""
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


def _axis_classes(n_tiles: int, t: int, r: int, size: int) -> list[tuple[int, int, Tensor, Tensor]]:
    """Runs of consecutive tiles along one axis whose windows meet the border in the same way.

    Returns (first tile, end tile, key_valid (s,), query_pad (t,)) per run: which halo positions are inside the
    image, and which query positions are padding. Interior tiles form one run; only the tiles within r of a
    border differ (when r <= t: the first tile, and the last one or two, as the last partial tile may be thinner
    than r), so an axis has a handful of runs at any image size."""
    runs: list[tuple[int, int, Tensor, Tensor]] = []
    prev = None
    for i in range(n_tiles):
        y0 = i * t
        pattern = (
            tuple(0 <= y0 - r + j < size for j in range(t + 2 * r)),
            tuple(y0 + j >= size for j in range(t)),
        )
        if pattern == prev:
            runs[-1] = (runs[-1][0], i + 1, runs[-1][2], runs[-1][3])
        else:
            runs.append((i, i + 1, torch.tensor(pattern[0]), torch.tensor(pattern[1])))
        prev = pattern
    return runs


@functools.lru_cache(maxsize=3)  # a training run uses two sizes (crops, validation); BSD68 two (orientations)
def _tile_plan(
    h: int, w: int, r: int, t: int, device: torch.device, dtype: torch.dtype
) -> list[tuple[int, int, int, int, Tensor]]:
    """Rectangles of tiles that share one additive mask: (tile rows [i0, i1), tile columns [j0, j1), mask (L, K)).

    Every tile of a rectangle has the same mask, so SDPA broadcasts one (L, K) mask over them and no mask is
    built during a solve (building them on every call took more time than the attention itself). Cached per
    image size: a solve evaluates f many times on one size. Built outside inference mode (see `_window_bias`)."""
    s = t + 2 * r
    iy = torch.arange(t)
    ky = torch.arange(s)
    # Query i of a tile sits at i + r of its halo; key position k is in its window iff i <= k <= i + 2r.
    band = (ky[None, :] >= iy[:, None]) & (ky[None, :] <= iy[:, None] + 2 * r)  # (t, s)
    window = band[:, None, :, None] & band[None, :, None, :]  # (t, t, s, s): the same for every tile
    rows = _axis_classes(math.ceil(h / t), t, r, h)
    cols = _axis_classes(math.ceil(w / t), t, r, w)
    plan = []
    with torch.inference_mode(False):
        for i0, i1, vy, qy in rows:
            for j0, j1, vx, qx in cols:
                inside = vy[:, None] & vx[None, :]  # (s, s) keys inside the image
                # A padded query (outside the image; cropped later) may see only padded keys: let it see its
                # whole window, so that no softmax row is empty.
                pad = qy[:, None] | qx[None, :]  # (t, t)
                allowed = window & (inside[None, None] | pad[:, :, None, None])
                mask = _additive(allowed.reshape(t * t, s * s), dtype).to(device)
                plan.append((i0, i1, j0, j1, mask))
    return plan


def _cached_plan(
    h: int, w: int, r: int, t: int, device: torch.device, dtype: torch.dtype
) -> list[tuple[int, int, int, int, Tensor]]:
    """`_tile_plan` seen from torch.compile: a cache lookup it does not trace (it would trace, and so rebuild,
    the masks on every call); the masks enter the compiled graph as inputs."""
    return _untraced_plan()(h, w, r, t, device, dtype)


@functools.cache
def _untraced_plan():  # noqa: ANN202 -- `_tile_plan` wrapped by torch.compiler.disable
    """Wrapped on first use: `torch.compiler.disable` imports torch._dynamo (over a second), which a process that
    never takes the SDPA path should not pay for."""
    return torch.compiler.disable(_tile_plan)


def _tiled(q: Tensor, k: Tensor, v: Tensor, r: int, t: int) -> Tensor:
    b, n, h, w, d = q.shape
    nh, nw = math.ceil(h / t), math.ceil(w / t)
    hp, wp = nh * t, nw * t
    s = t + 2 * r  # side of a tile's key halo
    # Pad queries to whole tiles; pad keys/values by the halo r (plus the same tile padding).
    q = F.pad(q, (0, 0, 0, wp - w, 0, hp - h))
    k = F.pad(k, (0, 0, r, r + wp - w, r, r + hp - h))
    v = F.pad(v, (0, 0, r, r + wp - w, r, r + hp - h))

    out = q.new_empty(b, n, hp, wp, d)
    for i0, i1, j0, j1, mask in _cached_plan(h, w, r, t, q.device, q.dtype):
        m = j1 - j0  # tiles per row of this rectangle
        x0, x1 = j0 * t, j1 * t
        step = max(1, _CHUNK_ELEMENTS // max(1, b * m * n * t * t * s * s))
        for a0 in range(i0, i1, step):
            a1 = min(i1, a0 + step)
            c = a1 - a0
            y0, y1 = a0 * t, a1 * t
            # (B, heads, c*t, m*t, d) -> (B * c * m, heads, t*t, d)
            qt = q[:, :, y0:y1, x0:x1].reshape(b, n, c, t, m, t, d).permute(0, 2, 4, 1, 3, 5, 6)
            qt = qt.reshape(b * c * m, n, t * t, d)
            kt, vt = (_halo(x, y0, y1, x0, x1, r, t) for x in (k, v))
            ot = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
            ot = ot.reshape(b, c, m, n, t, t, d).permute(0, 3, 1, 4, 2, 5, 6)
            out[:, :, y0:y1, x0:x1] = ot.reshape(b, n, c * t, m * t, d)
    return out[:, :, :h, :w]


def _halo(x: Tensor, y0: int, y1: int, x0: int, x1: int, r: int, t: int) -> Tensor:
    """Key/value halos of the tiles in rows [y0, y1) and columns [x0, x1) (pixels of the padded query grid):
    (B, heads, Hp+2r, Wp+2r, d) -> (B * rows * cols, heads, s*s, d)."""
    b, n, _, _, d = x.shape
    s = t + 2 * r
    x = x[:, :, y0 : y1 + 2 * r, x0 : x1 + 2 * r].unfold(2, s, t).unfold(3, s, t)  # (B, n, rows, cols, d, s, s)
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

