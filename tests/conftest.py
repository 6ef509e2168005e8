"""Shared fixtures: tiny inputs with odd sizes, a synthetic image folder, the shared data root."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(2)

SHARED = Path(os.environ.get("NERD_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture
def odd_image(rng: torch.Generator) -> torch.Tensor:
    """(2, 1, 37, 31) noisy-looking image in ~[0, 1]."""
    return torch.rand(2, 1, 37, 31, generator=rng)


def write_png(path: Path, array: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Six smooth-ish 8-bit grayscale PNGs of 48 x 40 pixels."""
    folder = tmp_path / "images"
    folder.mkdir()
    r = np.random.RandomState(0)
    yy, xx = np.mgrid[0:48, 0:40]
    for i in range(6):
        img = 0.5 + 0.3 * np.sin(xx / (3 + i)) * np.cos(yy / (4 + i)) + 0.05 * r.randn(48, 40)
        write_png(folder / f"im{i:02d}.png", (np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    return folder


@pytest.fixture
def data_root() -> Path:
    if not (SHARED / "Set12").is_dir():
        pytest.skip("../shared/data is not available")
    return SHARED
