"""DnCNN-S (Zhang et al., TIP 2017), the 17-layer baseline, with the authors' weights from ../shared/anchors.

    body   = Conv(64->1)(ReLU(Conv(64->64)) x 15 (ReLU(Conv(1->64)(y))))   3x3 convs, zero padding 1, bias
    x_hat  = y - body(y)                                                   body predicts the noise

BatchNorm of the original is folded into the conv biases, so the state dict is only ``convs.0..16``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from nerd.errors import WeightsError
from nerd.models.base import Denoiser

SIGMAS = (15, 25, 50)


class DnCNN(Denoiser):
    """DnCNN-S: `forward(y, sigma) -> x_hat`, (B, 1, H, W) on the [0, 1] scale; sigma unused (one per level).

    Args:
        depth: number of convolutions (17 for DnCNN-S).
        channels: feature width (64).
        in_channels: image channels (1: grayscale).
    """

    def __init__(self, depth: int = 17, channels: int = 64, in_channels: int = 1) -> None:
        super().__init__()
        widths = [in_channels] + [channels] * (depth - 1) + [in_channels]
        self.convs = nn.ModuleList(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=True)
            for c_in, c_out in zip(widths[:-1], widths[1:], strict=True)
        )

    def forward(self, y: Tensor, sigma: float | Tensor | None = None) -> Tensor:
        h = y
        for k, conv in enumerate(self.convs):
            h = conv(h)
            if k < len(self.convs) - 1:
                h = F.relu(h)
        return y - h


def anchors_dir(anchors: str | os.PathLike[str] | None = None) -> Path:
    """The anchors folder: `anchors`, else $NERD_ANCHORS, else ../shared/anchors (`nerd.paths.anchors_root`)."""
    from nerd.paths import anchors_root

    return anchors_root(anchors)


def load_dncnn(sigma255: float, anchors: str | os.PathLike[str] | None = None) -> DnCNN:
    """The authors' DnCNN-S for `sigma255` (15, 25 or 50) from ``dncnn_sigma<S>.safetensors``, in eval mode.

    Raises:
        WeightsError: the weights file is missing, or `sigma255` has no pretrained model.
    """
    from safetensors.torch import load_file

    if round(float(sigma255)) not in SIGMAS or float(sigma255) != round(float(sigma255)):
        have = ", ".join(map(str, SIGMAS))
        raise WeightsError(f"DnCNN-S has pretrained weights only for sigma {have}, got {sigma255:g}")
    path = anchors_dir(anchors) / f"dncnn_sigma{round(float(sigma255))}.safetensors"
    if not path.is_file():
        from nerd.paths import ANCHORS_HELP

        raise WeightsError(f"DnCNN weights not found: {path} ({ANCHORS_HELP})")
    model = DnCNN()
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()
