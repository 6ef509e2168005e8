"""The blocked neighbourhood attention equals the plain definition at odd sizes and every q."""

from __future__ import annotations

import pytest
import torch

from nerd.models.attention import (
    NeighbourhoodMSA,
    _tile_plan,
    _tiled,
    neighbourhood_attention,
    reference_attention,
)


def qkv(h, w, heads=2, d=4, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, heads, h, w, d, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize(
    "h,w,q,block",
    [(37, 31, 7, 8), (37, 31, 5, 16), (13, 9, 31, 4), (20, 23, 9, 4), (5, 7, 1, 2), (33, 17, 11, 5), (16, 16, 65, 4)],
)
def test_blocked_equals_reference(h, w, q, block):
    q_, k, v = qkv(h, w)
    ref = reference_attention(q_, k, v, q)
    torch.testing.assert_close(neighbourhood_attention(q_, k, v, q, block), ref, rtol=0, atol=1e-12)
    # force the tiled path too, whatever the planner would choose
    torch.testing.assert_close(_tiled(q_, k, v, q // 2, block), ref, rtol=0, atol=1e-12)


def test_window_larger_than_image_is_global_attention():
    q_, k, v = qkv(6, 5)
    out = neighbourhood_attention(q_, k, v, 65)
    full = torch.softmax(q_.reshape(2, 2, 30, 4) @ k.reshape(2, 2, 30, 4).transpose(-1, -2) / 2.0, -1)
    torch.testing.assert_close(out.reshape(2, 2, 30, 4), full @ v.reshape(2, 2, 30, 4), rtol=0, atol=1e-12)


def test_result_does_not_depend_on_block_size():
    q_, k, v = qkv(29, 41, seed=3)
    outs = [_tiled(q_, k, v, 4, b) for b in (3, 8, 13)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=0, atol=1e-12)


def test_border_window_is_truncated():
    """A corner pixel attends only to keys within r of it: moving a far key changes nothing."""
    q_, k, v = qkv(12, 12, b=1)
    out = neighbourhood_attention(q_, k, v, 5)
    k2, v2 = k.clone(), v.clone()
    k2[..., 11, 11, :] += 5.0
    v2[..., 11, 11, :] += 5.0
    out2 = neighbourhood_attention(q_, k2, v2, 5)
    torch.testing.assert_close(out2[..., 0, 0, :], out[..., 0, 0, :], rtol=0, atol=0)
    assert not torch.allclose(out2[..., 11, 11, :], out[..., 11, 11, :])


def test_module_fused_equals_reference_path():
    torch.manual_seed(0)
    msa = NeighbourhoodMSA(8, 2, 9, block=4).double()
    u = torch.randn(2, 8, 19, 23, dtype=torch.float64)
    fused = msa(u)
    msa.fused = False
    torch.testing.assert_close(fused, msa(u), rtol=0, atol=1e-12)


def test_attention_map_is_a_distribution_over_the_window():
    torch.manual_seed(0)
    msa = NeighbourhoodMSA(8, 2, 5)
    maps = msa.attention_map(torch.randn(1, 8, 11, 13), 5, 6)
    assert maps.shape == (1, 2, 11, 13)
    torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(1, 2))
    assert maps[..., :3, :].sum() == 0 and maps[..., 8:, :].sum() == 0


def test_tiled_gradients_equal_the_reference():
    """Training differentiates through the shared tile masks: q, k and v gradients match the plain formula."""
    q_, k, v = (t.requires_grad_() for t in qkv(21, 19, seed=5))
    weight = torch.randn(q_.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    grads = []
    for fn in (lambda: _tiled(q_, k, v, 3, 4), lambda: reference_attention(q_, k, v, 7)):
        grads.append(torch.autograd.grad((fn() * weight).sum(), (q_, k, v)))
    for got, ref in zip(*grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


def test_tile_masks_are_built_once_per_size_and_shared_by_border_class():
    """A solve calls the attention many times on one size: the masks come from the cache, and an image of any size
    needs only one mask per border class, not one per tile: 3 x 3 classes here; 4 per axis where the last partial
    tile is thinner than r (its neighbour's window crosses the border too)."""
    _tile_plan.cache_clear()
    q_, k, v = qkv(70, 53, b=1)
    _tiled(q_, k, v, 4, 8)
    _tiled(q_, k, v, 4, 8)
    info = _tile_plan.cache_info()
    assert (info.misses, info.hits) == (1, 1)
    plan = _tile_plan(70, 53, 4, 8, q_.device, q_.dtype)
    assert len(plan) == 9  # first / interior / last tile row x the same for columns
    assert sum((i1 - i0) * (j1 - j0) for i0, i1, j0, j1, _ in plan) == 9 * 7  # every tile exactly once
    assert len(_tile_plan(67, 53, 4, 8, q_.device, q_.dtype)) == 12  # 67 = 8 * 8 + 3: the last tile is 3 < r thin
