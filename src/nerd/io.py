"""Image files in and out: grayscale 8/16-bit PNG/TIFF, JPEG, BMP, as float arrays on the [0, 1] scale."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files directly inside `folder`, sorted by name (the protocol's order)."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_gray(path: str | os.PathLike[str]) -> np.ndarray:
    """A grayscale image as float32 (H, W) in [0, 1] (8-bit: pixel / 255; 16-bit: pixel / 65535)."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float64) / 65535.0
        elif im.mode == "L":
            arr = np.asarray(im, dtype=np.float64) / 255.0
        else:
            raise ValueError(f"{path}: not a grayscale image (mode {im.mode})")
    return arr.astype(np.float32)
