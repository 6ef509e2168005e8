"""Regenerate sample_clean.png and sample_noisy.png (run: python src/nerd/assets/make_sample.py).

Source: scikit-image's bundled `skimage.data.coins()` (Greek coins from Pompeii, Brooklyn Museum Collection,
no known copyright restrictions), which is in none of the test sets Set12, BSD68 or Urban100. Its centred
256 x 256 crop; noisy = clip(clean + 25 * N(0, 1)) with np.random.RandomState(1), on the 0-255 scale,
rounded to 8 bits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

HERE = Path(__file__).resolve().parent
SIGMA = 25.0


def make(folder: Path = HERE) -> tuple[np.ndarray, np.ndarray]:
    """Write the pair into `folder`; returns (clean, noisy) uint8 (256, 256)."""
    coins = data.coins()  # (303, 384) uint8
    top, left = (coins.shape[0] - 256) // 2, (coins.shape[1] - 256) // 2
    clean = coins[top : top + 256, left : left + 256]
    noise = np.random.RandomState(1).randn(*clean.shape) * SIGMA
    noisy = np.rint(np.clip(clean.astype(np.float64) + noise, 0, 255)).astype(np.uint8)
    Image.fromarray(clean).save(folder / "sample_clean.png", optimize=True)
    Image.fromarray(noisy).save(folder / "sample_noisy.png", optimize=True)
    return clean, noisy


if __name__ == "__main__":
    clean, noisy = make()
    mse = np.mean((clean.astype(np.float64) - noisy) ** 2)
    print(
        f"wrote {HERE}/sample_clean.png and sample_noisy.png, noisy PSNR {10 * np.log10(255**2 / mse):.2f} dB"
    )
