"""The one contract every denoiser honours."""

from __future__ import annotations

from torch import Tensor, nn


class Denoiser(nn.Module):
    """A Gaussian denoiser: `forward(y, sigma) -> x_hat`.

    y: (B, C, H, W) noisy image on the [0, 1] scale, not clipped. sigma: noise std on the same scale (sigma255 / 255),
    a float or a (B,) tensor. Returns x_hat: (B, C, H, W), not clipped (the evaluation clips).
    """

    def forward(self, y: Tensor, sigma: float | Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError
