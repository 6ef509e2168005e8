"""Noise: the one evaluation protocol (`protocol_noisy`) and AWGN for training (`add_noise`).

The evaluation recipe is the one of ``../shared/data/README.md`` and lives here and nowhere else.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from nerd.sigma import to_unit


def protocol_noisy(x: np.ndarray, sigma255: float) -> np.ndarray:
    """The protocol's noisy image: y = x + sigma255 / 255 * n, n = RandomState(0).randn(*x.shape).

    The same numbers as ``numpy.random.seed(0); numpy.random.randn(*x.shape)``, drawn from a private generator
    so the global numpy state is left alone. Re-seeding per image is the protocol: images of one size share
    one noise field.

    Args:
        x: clean image, any shape (usually (H, W)), on the [0, 1] scale.
        sigma255: noise standard deviation on the 0-255 scale.

    Returns:
        y: float64 array of x's shape, not clipped.
    """
    n = np.random.RandomState(0).randn(*x.shape)
    return np.asarray(x, dtype=np.float64) + to_unit(sigma255) * n


def add_noise(x: Tensor, sigma: float | Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Additive white Gaussian noise for training: y = x + sigma * n, n ~ N(0, 1), not clipped.

    Args:
        x: (B, C, H, W) clean images on the [0, 1] scale.
        sigma: noise std on the [0, 1] scale, a float or a (B,) tensor (one level per image).
        generator: the source of randomness (on x's device); None uses PyTorch's global generator.

    Returns:
        y: (B, C, H, W), x's dtype and device.
    """
    n = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if isinstance(sigma, Tensor):
        sigma = sigma.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return x + sigma * n
