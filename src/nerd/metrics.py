"""The protocol's metrics: PSNR and SSIM on the [0, 1] scale, in float64, the estimate clipped first."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike


def _pair(x_hat: ArrayLike, x: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Both images as float64 arrays of one shape, x_hat clipped to [0, 1]."""
    x_hat = np.clip(np.asarray(x_hat, dtype=np.float64), 0.0, 1.0)
    x = np.asarray(x, dtype=np.float64)
    if x_hat.shape != x.shape:
        raise ValueError(f"shape mismatch: x_hat {x_hat.shape} vs x {x.shape}")
    return x_hat, x


def psnr(x_hat: ArrayLike, x: ArrayLike) -> float:
    """PSNR in dB = 10 log10(1 / MSE) over the whole image; inf when identical.

    Args:
        x_hat: the estimate, any shape, on the [0, 1] scale (clipped here).
        x: the clean image, same shape, on the [0, 1] scale.
    """
    x_hat, x = _pair(x_hat, x)
    mse = float(np.mean((x_hat - x) ** 2))
    return math.inf if mse == 0.0 else psnr_from_mse(mse)


def psnr_from_mse(mse: float, floor: float = 1e-20) -> float:
    """10 log10(1 / MSE) in dB for images on [0, 1], the MSE floored at `floor` (so a perfect crop stays finite)."""
    return 10.0 * math.log10(1.0 / max(float(mse), floor))


def ssim(x_hat: ArrayLike, x: ArrayLike) -> float:
    """SSIM with Wang et al.'s 11x11 Gaussian window (sigma 1.5, population covariance), data range 1.

    Args:
        x_hat: (H, W) estimate on the [0, 1] scale (clipped here).
        x: (H, W) clean image on the [0, 1] scale.
    """
    from skimage.metrics import structural_similarity

    x_hat, x = _pair(x_hat, x)
    return float(
        structural_similarity(
            x, x_hat, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
    )
