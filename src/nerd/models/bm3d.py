"""BM3D (the `bm3d` package, v4, default "np" profile) as a `Denoiser`; one thread, deterministic."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from nerd.models.base import Denoiser


class BM3D(Denoiser):
    """`forward(y, sigma) -> x_hat`: BM3D on each image of y (B, 1, H, W), [0, 1] scale; sigma on that scale.

    Runs on the CPU in float64 and returns x_hat in y's dtype and device. Has no parameters.

    Args:
        num_threads: BM3D's worker threads (1 gives deterministic results; see ../shared/anchors/README.md).
    """

    def __init__(self, num_threads: int = 1) -> None:
        super().__init__()
        self.num_threads = num_threads

    def forward(self, y: Tensor, sigma: float | Tensor) -> Tensor:
        import bm3d

        if y.dim() != 4 or y.shape[1] != 1:
            raise ValueError(f"BM3D takes grayscale (B, 1, H, W) images, got shape {tuple(y.shape)}")
        b = y.shape[0]
        if isinstance(sigma, Tensor):
            sigmas = sigma.detach().cpu().double().reshape(-1).expand(b).tolist()
        else:
            sigmas = [float(sigma)] * b
        profile = bm3d.BM3DProfile()
        profile.num_threads = self.num_threads
        out = []
        for y_b, sigma_b in zip(y.detach().cpu().double().numpy(), sigmas, strict=True):
            x_hat = bm3d.bm3d(y_b[0], sigma_psd=float(sigma_b), profile=profile)
            out.append(np.asarray(x_hat, dtype=np.float64)[None])
        return torch.from_numpy(np.stack(out)).to(device=y.device, dtype=y.dtype)
