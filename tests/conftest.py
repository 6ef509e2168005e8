"""Shared fixtures: tiny inputs with odd sizes, a synthetic image folder, the shared data root; the rules for the
`gpu` and `slow` markers.

`gpu` tests skip, saying why, where `torch.cuda.is_available()` is false, and run where it is true.
`slow` tests need ../shared (data/Set12 and anchors/, or $NERD_DATA and $NERD_ANCHORS). On a developer's machine
without it they skip; under CI (the environment variable CI set, as CI services and `.ci/run` do) they fail: the
quality floors must not go quiet because the data went missing.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(2)

SHARED_ROOT = Path(__file__).resolve().parents[1] / ".." / "shared"
SHARED = Path(os.environ.get("NERD_DATA") or SHARED_ROOT / "data")
ANCHORS = Path(os.environ.get("NERD_ANCHORS") or SHARED_ROOT / "anchors")
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing_shared() -> list[str]:
    """What the slow tests read that is absent: Set12 under the data root, the anchors folder (DnCNN's weights in
    whichever format `nerd.models.dncnn.find_dncnn_file` accepts; a folder without them fails the DnCNN test)."""
    return [str(p) for p in (SHARED / "Set12", ANCHORS) if not p.is_dir()]


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("gpu test: no CUDA device here (torch.cuda.is_available() is False)")
    if IN_CI and item.get_closest_marker("slow"):
        missing = missing_shared()
        if missing:
            pytest.fail(f"CI: the slow tests need ../shared, missing {', '.join(missing)} (set NERD_DATA / "
                        "NERD_ANCHORS, or place shared/ beside the clone)", pytrace=False)


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
    return make_image_folder(folder)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights file of the untrained tiny preset (seed 0) for sigma 25, shared by a module's tests."""
    from nerd.models import create_model
    from nerd.weights import save_weights

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "w.safetensors"
    save_weights(create_model("tiny"), path, sigma255=25)
    return path


def make_image_folder(folder: Path) -> Path:
    """Write the six 48 x 40 PNGs of `image_folder` into the existing `folder`."""
    r = np.random.RandomState(0)
    yy, xx = np.mgrid[0:48, 0:40]
    for i in range(6):
        img = 0.5 + 0.3 * np.sin(xx / (3 + i)) * np.cos(yy / (4 + i)) + 0.05 * r.randn(48, 40)
        write_png(folder / f"im{i:02d}.png", (np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    return folder


@pytest.fixture
def data_root() -> Path:
    if not (SHARED / "Set12").is_dir():
        if IN_CI:
            pytest.fail(f"CI: {SHARED / 'Set12'} is missing", pytrace=False)
        pytest.skip("../shared/data is not available")
    return SHARED
