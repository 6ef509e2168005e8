"""Training data: random crops of a folder of images with the 8 dihedral augmentations, reproducibly drawn.

The paper (Sec. VII-A) crops 64 x 64 patches (128 per image per epoch), flips them horizontally/vertically and
rotates them. All randomness comes from a `torch.Generator` passed in, so a run that saves the generator's state
in its checkpoint draws exactly the same crops after a resume.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from nerd.errors import DataError
from nerd.io import list_images, load_gray
from nerd.sigma import to_unit


def dihedral(x: Tensor, k: int) -> Tensor:
    """The k-th of the 8 symmetries of the square (k in 0..7) on the last two dims: k % 4 quarter turns, then a
    horizontal flip if k >= 4."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if k >= 4 else x


def undo_dihedral(x: Tensor, k: int) -> Tensor:
    """The inverse of `dihedral(., k)`: undo the flip, then the quarter turns."""
    x = torch.flip(x, dims=(-1,)) if k >= 4 else x
    return torch.rot90(x, -(k % 4), dims=(-2, -1))


def load_folder(folder: str | os.PathLike[str], holdout: int, channels: int = 1
                ) -> tuple[list[Tensor], list[Tensor], list[Path]]:
    """Read every image of `folder` (sorted by name) as (channels, H, W) float32 tensors in [0, 1]: gray (1), or RGB
    (3: a colour model's training images; a gray file is replicated).

    Returns:
        (train images, validation images, validation paths): the last `holdout` images are held out for
        validation, so validation never uses a test set.

    Raises:
        DataError (a NerdError): the folder is missing, or holds no more images than `holdout`; ImageError: an
            image cannot be read.
    """
    if not Path(folder).is_dir():
        raise DataError(f"training folder not found: {folder} (give --data DIR or set NERD_DATA; see "
                        "docs/evaluation.md, 'Data sets')")
    paths = list_images(folder)
    if len(paths) <= holdout:
        raise DataError(f"{folder}: {len(paths)} images, need more than the {holdout} held out for validation")
    if channels == 3:
        from PIL import Image

        def rgb(path: Path) -> Tensor:
            with Image.open(path) as im:
                a = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
            return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))

        images = [rgb(p) for p in paths]
    elif channels == 1:
        images = [torch.from_numpy(load_gray(p))[None] for p in paths]
    else:
        raise DataError(f"training images with {channels} channels: only 1 (gray) or 3 (RGB)")
    cut = len(images) - holdout
    return images[:cut], images[cut:], paths[cut:]


class PatchSampler:
    """Draws batches of (x, y, sigma) crops: x clean (B, 1, crop, crop), y = x + sigma n, sigma (B,) in [0, 1] units.

    Args:
        images: (1, H, W) tensors in [0, 1], each at least `crop` on both sides.
        crop: patch side.
        sigmas255: noise levels on the 0-255 scale; each crop draws one uniformly.
        generator: the only source of randomness.
    """

    def __init__(self, images: list[Tensor], crop: int, sigmas255: tuple[float, ...], generator: torch.Generator):
        small = [tuple(im.shape[-2:]) for im in images if min(im.shape[-2:]) < crop]
        if small:
            raise ValueError(f"crop {crop} is larger than some training images, e.g. {small[0]}")
        self.images, self.crop, self.generator = images, crop, generator
        self.sigmas = torch.tensor([to_unit(s) for s in sigmas255], dtype=torch.float32)

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.generator))

    def sample(self, batch: int) -> tuple[Tensor, Tensor, Tensor]:
        c = self.crop
        xs = []
        for _ in range(batch):
            im = self.images[self._randint(len(self.images))]
            h, w = im.shape[-2:]
            top, left = self._randint(h - c + 1), self._randint(w - c + 1)
            xs.append(dihedral(im[:, top : top + c, left : left + c], self._randint(8)))
        x = torch.stack(xs)
        sigma = self.sigmas[torch.randint(len(self.sigmas), (batch,), generator=self.generator)]
        n = torch.randn(x.shape, generator=self.generator)
        return x, x + sigma[:, None, None, None] * n, sigma


def validation_pairs(images: list[Tensor], sigma255: float, crop: int = 0) -> list[tuple[Tensor, Tensor]]:
    """Fixed noisy copies of the validation images: (x, y) pairs of (1, 1, H, W) tensors.

    The noise of image i is `RandomState(i).randn`, fixed for the whole run, so validation figures are comparable
    across steps and runs. `crop` > 0 centre-crops to keep validation cheap.
    """
    pairs = []
    for i, im in enumerate(images):
        x = im
        if crop:
            h, w = x.shape[-2:]
            top, left = max(0, (h - crop) // 2), max(0, (w - crop) // 2)
            x = x[:, top : top + crop, left : left + crop]
        n = np.random.RandomState(i).randn(*x.shape).astype(np.float32)
        pairs.append((x[None], x[None] + to_unit(sigma255) * torch.from_numpy(n)[None]))
    return pairs
