"""A write that fails after the solve (a full disk, a folder that takes no files) ends in one line and exit 2, and
leaves nothing behind."""

from __future__ import annotations

import errno

import numpy as np
import pytest
import torch
from PIL import Image

from nerd.cli import main
from nerd.models import create_model
from nerd.weights import save_weights


@pytest.fixture
def setup(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    save_weights(create_model("tiny"), weights, sigma255=25)
    noisy = tmp_path / "noisy.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (17, 23), dtype=np.uint8)).save(noisy)
    out = tmp_path / "out"
    out.mkdir()
    return weights, noisy, out


def _one_line_error(err: str) -> bool:
    lines = [line for line in err.splitlines() if line.strip()]
    return len(lines) == 1 and lines[0].startswith("nerd denoise: error:") and "Traceback" not in err


def test_a_full_disk_after_the_solve_is_one_line_and_leaves_nothing(setup, monkeypatch, capsys):
    weights, noisy, out = setup

    def full(self, fp, *args, **kwargs):
        fp.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    rc = main(["denoise", str(noisy), "-o", str(out / "x.png"), "--weights", str(weights), "--sigma", "25",
               "--iters", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "No space left" in err and _one_line_error(err), err
    assert list(out.iterdir()) == []  # neither the image nor a temporary file


@pytest.mark.skipif(not __import__("os").path.isdir("/sys/kernel"), reason="needs Linux sysfs")
def test_a_folder_that_takes_no_files_is_one_line(setup, capsys):
    weights, noisy, _ = setup
    rc = main(["denoise", str(noisy), "-o", "/sys/x.png", "--weights", str(weights), "--sigma", "25",
               "--iters", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and _one_line_error(err), err
