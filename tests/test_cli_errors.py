"""The CLI's promises on bad input and interruption, for `nerd validate`, `nerd info` and `nerd train --max-minutes`:
a user's mistake is exit status 2 and one line on stderr naming it, never a traceback; Ctrl-C is exit 130 and one
line; a time budget stops a training run with a checkpoint.

(`nerd export` and `nerd train --resume` on damaged checkpoints: tests/test_checkpoint.py.)
"""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nerd.weights
from nerd.cli import main
from nerd.models import create_model
from nerd.weights import save_weights


def write_images(folder: Path, n: int, size: int = 40) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    for i in range(n):
        Image.fromarray((rng.rand(size, size) * 255).astype(np.uint8)).save(folder / f"{i:02d}.png")
    return folder


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """A 10-image training folder, a 3-image one, an empty one, a tiny weights file and a damaged one."""
    torch.manual_seed(0)
    save_weights(create_model("tiny"), tmp_path / "tiny.safetensors", sigma255=25)
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file" * 4)
    good = (tmp_path / "tiny.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (tmp_path / "empty").mkdir()
    return {"ten": write_images(tmp_path / "ten", 10), "three": write_images(tmp_path / "three", 3),
            "empty": tmp_path / "empty", "tiny": tmp_path / "tiny.safetensors", "root": tmp_path}


def main_interrupted(argv: list[str]) -> int:
    """`main(argv)` where something inside raises KeyboardInterrupt: its exit status; a KeyboardInterrupt that
    escapes `main` fails the test (rather than stopping pytest, which takes it for the user's Ctrl-C)."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        pytest.fail(f"KeyboardInterrupt escaped nerd.cli.main({argv})", pytrace=False)


def one_line_error(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"nerd {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


# --- nerd validate


VALIDATE_ERRORS = {
    # case: (weights, folder, extra options, words the message must hold)
    "unknown shipped name": ("nerd-s99", "ten", [], "unknown weights 'nerd-s99'"),
    "missing weights file": ("root/none.safetensors", "ten", [], "not found"),
    "garbage weights file": ("root/garbage.safetensors", "ten", [], "cannot read weights"),
    "truncated weights file": ("root/truncated.safetensors", "ten", [], "truncated.safetensors"),
    "missing folder": ("tiny", "root/nowhere", [], "training folder not found"),
    "empty folder": ("tiny", "empty", [], "0 images"),
    "fewer images than held out": ("tiny", "three", [], "3 images, need more than the 8"),
    "bad sigma": ("tiny", "ten", ["--sigma", "0"], "sigma"),
    "bad device": ("tiny", "ten", ["--device", "gpu"], "cpu, cuda or cuda:N"),
}


def _argv(files: dict[str, Path], weights: str, folder: str, extra: list[str]) -> list[str]:
    def path(name: str) -> str:
        if name.startswith("root/"):
            return str(files["root"] / name[5:])
        return str(files[name]) if name in files else name

    return ["validate", path(weights), "--data", path(folder), "--val-images", "8", "--val-crop", "16", *extra]


@pytest.mark.parametrize("case", list(VALIDATE_ERRORS))
def test_validate_refuses_bad_input_in_one_line(case, files, capsys):
    weights, folder, extra, words = VALIDATE_ERRORS[case]
    assert main(_argv(files, weights, folder, extra)) == 2
    out, err = capsys.readouterr()
    assert words in one_line_error(err, "validate"), err
    assert "val PSNR" not in out


def test_validate_scores_a_good_file(files, capsys):
    """The same command line with good input works: the refusals above are about the input."""
    assert main(_argv(files, "tiny", "ten", ["--json", str(files["root"] / "v.json")])) == 0
    out, err = capsys.readouterr()
    assert "val PSNR" in out and (files["root"] / "v.json").is_file()


# Found by these tests: out-of-range numbers used to reach PyTorch or a division and end in a traceback (exit 1).
VALIDATE_BAD_NUMBERS = {
    "no images held out": (["--val-images", "0"], "--val-images must be >= 1"),
    "negative held-out count": (["--val-images", "-1"], "--val-images must be >= 1"),
    "negative crop": (["--val-crop", "-5"], "--val-crop must be >= 0"),
    "negative threads": (["--threads", "-1"], "--threads must be >= 0"),
}


@pytest.mark.parametrize("case", sorted(VALIDATE_BAD_NUMBERS))
def test_validate_refuses_out_of_range_numbers(case, files, capsys):
    extra, words = VALIDATE_BAD_NUMBERS[case]
    argv = _argv(files, "tiny", "ten", [])
    argv = argv[:4] + [a for a in argv[4:] if a not in ("--val-images", "8", "--val-crop", "16")]
    assert main(argv + extra) == 2
    assert words in one_line_error(capsys.readouterr().err, "validate")


def test_validate_error_from_the_installed_command_has_no_traceback(files):
    """End to end, through `python -m nerd` (the entry point's own process): exit 2, exactly one stderr line."""
    r = subprocess.run([sys.executable, "-m", "nerd", *_argv(files, "nerd-s99", "ten", [])], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    one_line_error(r.stderr, "validate")
    assert r.stdout == ""


def test_validate_interrupted_exits_130(files, capsys, monkeypatch):
    """Ctrl-C while scoring: exit 130, one line, and no half-written --json."""
    import nerd.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(nerd.train, "validate", interrupted)
    assert main_interrupted(_argv(files, "tiny", "ten", ["--json", str(files["root"] / "v.json")])) == 130
    assert capsys.readouterr().err == "nerd validate: interrupted\n"
    assert not (files["root"] / "v.json").exists()


# --- nerd info


@pytest.mark.parametrize("argv", [["info", "extra"], ["info", "--bogus"]])
def test_info_refuses_arguments(argv, capsys):
    """argparse's refusal: exit 2, its usage line and one error line, no traceback."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"nerd: error: unrecognized arguments: {argv[1]}"
    assert "Traceback" not in err


def test_info_lists_a_damaged_shipped_file_as_unreadable(tmp_path, capsys, monkeypatch):
    """A damaged file among the shipped weights does not stop `nerd info`: that one line says so, the rest list."""
    monkeypatch.setattr(nerd.weights, "WEIGHTS_DIR", tmp_path)
    torch.manual_seed(0)
    save_weights(create_model("tiny"), tmp_path / "nerd-s25.safetensors", sigma255=25)
    (tmp_path / "nerd-s50.safetensors").write_bytes(b"\x00" * 64)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "nerd-s25: sigma 25, 8 channels" in out
    assert "nerd-s50: unreadable (cannot read weights" in out


def test_info_interrupted_exits_130(capsys, monkeypatch):
    import nerd.cli.info

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(nerd.cli.info, "run", interrupted)
    assert main_interrupted(["info"]) == 130
    out, err = capsys.readouterr()
    assert err == "nerd info: interrupted\n" and out == ""


# --- nerd train --max-minutes


RECIPE = """
[model]
preset = "tiny"
[solver]
max_iter = 3
[grad]
steps = 2
[train]
sigma = [25]
crop = 16
batch = 2
steps = {steps}
val_images = 2
val_every = 100
val_crop = 16
log_every = 1
checkpoint_minutes = 1e9
threads = 2
"""


def test_train_max_minutes_stops_the_run_with_a_checkpoint(tmp_path, capsys):
    """A 300-step run given 0.1 s stops after its first step or so: exit 0, a resumable checkpoint of the step it
    reached, and a validation figure for it (a budgeted run ends with one). Unbounded, the run takes 300 steps."""
    steps = 300
    (tmp_path / "r.toml").write_text(RECIPE.format(steps=steps))
    folder = write_images(tmp_path / "images", 6, size=24)
    started = time.monotonic()
    rc = main(["train", "--config", str(tmp_path / "r.toml"), "--data", str(folder), "--out", str(tmp_path / "run"),
               "--max-minutes", str(0.1 / 60), "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "last.pt" in out
    run = tmp_path / "run"
    logged = [int(r["step"]) for r in csv.DictReader(open(run / "log.csv"))]
    assert 1 <= logged[-1] < 20 < steps, logged
    validated = [int(r["step"]) for r in csv.DictReader(open(run / "val.csv"))]
    assert validated == [logged[-1]]
    assert (run / "last.pt").is_file() and (run / "best.safetensors").is_file()
    assert time.monotonic() - started < 120


def test_validate_json_into_a_missing_folder(files, capsys):
    """The path is refused in one line (exit 2) before the scoring, never a traceback after it."""
    rc = main(_argv(files, "tiny", "ten", ["--json", str(files["root"] / "nowhere" / "v.json")]))
    out, err = capsys.readouterr()
    assert rc == 2 and "its folder does not exist" in one_line_error(err, "validate")
    assert "val PSNR" not in out  # refused before any weights were scored
