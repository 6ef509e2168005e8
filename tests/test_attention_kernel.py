"""The CPU attention kernel equals the plain formula (output and gradients), agrees with the SDPA path, and is
what the CPU model runs; NERD_ATTENTION=sdpa and a kernel that cannot be built fall back to SDPA."""

from __future__ import annotations

import pytest
import torch

from nerd.models import attention_kernel
from nerd.models.attention import neighbourhood_attention, reference_attention, sdpa_attention

pytestmark = pytest.mark.skipif(attention_kernel.load() is None, reason="no C++ compiler: the kernel cannot be built")


def qkv(shape, dtype, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad) for _ in range(3)]


# odd sizes; head dims that are (16, 32) and are not (5, 12) a multiple of the vector width; windows larger than
# the image; q = 1 (each pixel attends to itself)
CASES = [((2, 3, 13, 11, 16), 7), ((1, 2, 9, 17, 5), 5), ((1, 1, 6, 5, 32), 33), ((1, 2, 23, 19, 12), 9),
         ((1, 1, 7, 9, 16), 1), ((2, 1, 40, 37, 16), 33)]


@pytest.mark.parametrize("shape,window", CASES)
def test_kernel_equals_the_plain_formula_with_gradients(shape, window):
    q, k, v = qkv(shape, torch.float64, grad=True)
    weight = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    outs, grads = [], []
    for fn in (attention_kernel.attention, reference_attention):
        out = fn(q, k, v, window)
        outs.append(out)
        grads.append(torch.autograd.grad((out * weight).sum(), (q, k, v)))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-12)
    for got, ref in zip(*grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


def test_float32_kernel_agrees_with_the_sdpa_path():
    """float32 uses a fast vectorised exp (relative error ~1e-6): the two paths agree to float32 rounding."""
    q, k, v = qkv((1, 3, 45, 38, 16), torch.float32, seed=2)
    torch.testing.assert_close(attention_kernel.attention(q, k, v, 33), sdpa_attention(q, k, v, 33),
                               rtol=1e-5, atol=2e-6)


def test_float32_gradients_agree_with_the_sdpa_path():
    q, k, v = qkv((2, 2, 21, 26, 16), torch.float32, seed=3, grad=True)
    weight = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))
    grads = [torch.autograd.grad((fn(q, k, v, 9) * weight).sum(), (q, k, v))
             for fn in (attention_kernel.attention, sdpa_attention)]
    for got, ref in zip(*grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_cpu_dispatch_runs_the_kernel_unless_told_otherwise(monkeypatch):
    calls = []
    real = attention_kernel.attention
    monkeypatch.setattr(attention_kernel, "attention", lambda *a: calls.append(1) or real(*a))
    q, k, v = qkv((1, 2, 11, 12, 8), torch.float32)
    out = neighbourhood_attention(q, k, v, 5)
    assert calls == [1]
    monkeypatch.setenv("NERD_ATTENTION", "sdpa")
    torch.testing.assert_close(neighbourhood_attention(q, k, v, 5), out, rtol=1e-5, atol=2e-6)
    assert calls == [1]


def test_no_kernel_falls_back_to_sdpa(monkeypatch):
    """A machine without a C++ compiler gets the SDPA path, not an error."""
    monkeypatch.setattr(attention_kernel, "load", lambda: None)
    q, k, v = qkv((1, 2, 11, 12, 8), torch.float64)
    assert not attention_kernel.usable(q)
    torch.testing.assert_close(neighbourhood_attention(q, k, v, 5), reference_attention(q, k, v, 5),
                               rtol=0, atol=1e-12)


def test_other_dtypes_use_sdpa():
    q = torch.zeros(1, 1, 4, 4, 8, dtype=torch.bfloat16)
    assert not attention_kernel.usable(q)


# --- the CUDA path: flex_attention over tile-ordered tokens (its forward is checked here on the CPU, unfused)

FLEX_CASES = [((2, 3, 13, 11, 16), 7), ((1, 2, 9, 17, 5), 5), ((1, 1, 6, 5, 8), 33), ((1, 2, 23, 37, 12), 9)]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("shape,window", FLEX_CASES)
def test_flex_path_equals_the_plain_formula(shape, window):
    from nerd.models import attention_flex

    q, k, v = qkv(shape, torch.float64, seed=7)
    torch.testing.assert_close(attention_flex.attention(q, k, v, window), reference_attention(q, k, v, window),
                               rtol=0, atol=1e-12)


def test_flex_block_mask_skips_the_blocks_outside_every_window():
    """On a 128² image at q 33, each 8x16 query block meets far fewer than all 128 key blocks."""
    from nerd.models import attention_flex

    mask = attention_flex._block_mask(128, 128, 16, "cpu")
    assert mask.sparsity() > 60  # percent of (query block, key block) pairs skipped


@pytest.mark.gpu
def test_flex_path_on_cuda_matches_the_plain_formula_with_gradients():
    from nerd.models import attention_flex

    q, k, v = (t.cuda().requires_grad_() for t in qkv((2, 2, 37, 45, 16), torch.float32, seed=8))
    weight = torch.randn(q.shape, device="cuda")
    outs, grads = [], []
    for fn in (attention_flex.attention, reference_attention):
        out = fn(q, k, v, 9)
        outs.append(out)
        grads.append(torch.autograd.grad((out * weight).sum(), (q, k, v)))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
    for got, ref in zip(*grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
