"""Widening a trained NERD without changing what it computes (Net2Net's "wider" step, Chen et al. 2016).

The transformation block's hidden layer (C -> expansion*C -> C, the bulk of the parameters) is widened by an integer
`factor`: every hidden channel is copied `factor` times and the second conv reads each copy with 1/factor of the
original weight, so the sum is unchanged. GroupNorm keeps the function too: each group of the wide layer holds its
old channels and their copies, whose mean and variance are the old group's. A small noise on the copies' input
weights breaks their symmetry (identical copies would receive identical gradients for ever; splitting the outgoing
weight unevenly would not help under Adam, whose steps ignore a gradient's scale).

Why: a trained small model that has stopped improving keeps what it learnt and gains capacity, instead of a wider
model starting from scratch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_PREFIX = "layer."
# Entries indexed by the hidden channel on dim 0 (with or without weight norm).
_HIDDEN_ROWS = ("conv1.bias", "conv1.weight", "conv1.parametrizations.weight.original0",
                "conv1.parametrizations.weight.original1", "norm2.weight", "norm2.bias")
_CONV1_DIRECTION = ("conv1.parametrizations.weight.original1", "conv1.weight")


def hidden_index(hidden: int, groups: int, factor: int) -> Tensor:
    """Old hidden channel of each wide channel: group k's channels, `factor` times over, stay in group k."""
    n = hidden // groups
    return torch.cat([torch.arange(k * n, (k + 1) * n).repeat(factor) for k in range(groups)])


def widen_hidden(
    state: dict[str, Tensor],
    groups: int,
    factor: int,
    *,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
    moment: int = 0,
) -> dict[str, Tensor]:
    """The state dict of a NERD whose transformation-block hidden width is `factor` times that of `state`.

    Args:
        state: a `DEQDenoiser` state dict (weight-normalised or not) with a transformation block, or (`moment` > 0)
            per-parameter optimiser moments by parameter name.
        groups: the model's GroupNorm groups (unchanged by widening).
        factor: integer widening factor (>= 1).
        noise: relative std of the noise added to the copies' conv1 weights (0: the function is unchanged exactly).
        generator: the noise's only source of randomness.
        moment: 0 for weights; 1 or 2 for AdamW's exp_avg / exp_avg_sq, which are rescaled like the gradient's
            first / second power in the wide model: a copy's gradient is 1/factor of its original's in the hidden
            layer and in conv2's direction v, sqrt(factor) times in conv2's magnitude g (tested), so the carried
            moments give the wide model the steps the narrow one would have taken.

    Returns:
        a new dict; entries outside the hidden layer are the same tensors.
    """
    if factor < 1:
        raise ValueError(f"widening factor must be >= 1, got {factor}")
    if _PREFIX + "conv1.bias" not in state:
        raise ValueError("this model has no transformation block to widen")
    out = dict(state)
    hidden = state[_PREFIX + "conv1.bias"].shape[0]
    idx = hidden_index(hidden, groups, factor)
    n = hidden // groups
    copies = (torch.arange(len(idx)) % (n * factor)) >= n  # the first n of each wide group are the originals
    row_scale = (1 / factor) ** moment  # weights (moment 0) are copied as they are
    for name in _HIDDEN_ROWS:
        key = _PREFIX + name
        if key in state:
            out[key] = state[key][idx] * row_scale
            if moment == 0 and noise > 0 and name in _CONV1_DIRECTION:
                w = out[key]
                shape = (-1, *([1] * (w.ndim - 1)))
                rms = w.flatten(1).pow(2).mean(1).sqrt().view(shape)
                eps = torch.randn(w.shape, generator=generator, dtype=w.dtype)
                out[key] = torch.where(copies.view(shape), w + noise * rms * eps, w)
    v_key = _PREFIX + "conv2.parametrizations.weight.original1"
    g_key = _PREFIX + "conv2.parametrizations.weight.original0"
    w_key = _PREFIX + "conv2.weight"
    if v_key in state:
        # w = g v / ||v|| per output channel: copying v's columns multiplies ||v|| by sqrt(factor), so g / sqrt(factor)
        # gives each copy exactly 1/factor of the old weight.
        out[v_key] = state[v_key][:, idx] * row_scale
        if g_key in state:
            out[g_key] = state[g_key] * (factor ** (0.5 * moment) if moment else 1 / math.sqrt(factor))
    elif w_key in state:
        out[w_key] = state[w_key][:, idx] / (factor if moment == 0 else 1)  # its gradient keeps its scale
    return out
