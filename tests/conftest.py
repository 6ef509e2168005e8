"""Shared fixtures: tiny inputs with odd sizes, a synthetic image folder, the shared data root; the rules for the
`gpu`, `slow` and `browser` markers.

`gpu` tests skip, saying why, where `torch.cuda.is_available()` is false, and run where it is true.
`slow` tests need ../shared (data/Set12 and anchors/, or $NERD_DATA and $NERD_ANCHORS). On a developer's machine
without it they skip; under CI (the environment variable CI set, as CI services and `.ci/run` do) they fail: the
quality floors must not go quiet because the data went missing.
`browser` tests (the web page of `nerd serve` in a headless chromium) follow the same rule for chromium, its
chromedriver and the gradio and selenium packages.
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


BROWSER_HINT = ("sudo apt-get install chromium chromium-driver (Debian; Ubuntu: chromium-browser), "
                "pip install -e '.[test]' (gradio, selenium)")


def find_chromium() -> tuple[str | None, str | None]:
    """Paths of a chromium binary and its chromedriver ($CHROMIUM / $CHROMEDRIVER first), None where absent."""
    import shutil

    binary = os.environ.get("CHROMIUM") or next(
        filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    return binary, driver


def missing_browser() -> list[str]:
    """What the `browser` tests need that is absent: chromium, chromedriver, the gradio and selenium packages."""
    import importlib.util

    binary, driver = find_chromium()
    missing = [name for name, found in (("chromium", binary), ("chromedriver", driver)) if not found]
    return missing + [m for m in ("gradio", "selenium") if importlib.util.find_spec(m) is None]


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("gpu test: no CUDA device here (torch.cuda.is_available() is False)")
    if item.get_closest_marker("browser"):
        missing = missing_browser()
        if missing and IN_CI:
            pytest.fail(f"CI: the browser test needs {', '.join(missing)}: {BROWSER_HINT}", pytrace=False)
        if missing:
            pytest.skip(f"browser test: no {', '.join(missing)} here ({BROWSER_HINT})")
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
