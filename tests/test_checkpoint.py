"""Checkpoints run no code and fail in one line: hostile, damaged or foreign `.pt` files given to `nerd export`,
`nerd train --resume` and `init = "FILE.pt"` are refused (exit 2, one line on stderr, no traceback, no marker);
a start that fails leaves no run folder; a stopped run claims only files it wrote."""

from __future__ import annotations

import os
import pathlib
import pickle
import random
import shutil
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from nerd.checkpoint import kept_weights, load_checkpoint, save_checkpoint
from nerd.cli import main
from nerd.config import Config, config_from_dict
from nerd.errors import WeightsError
from nerd.models import DEQDenoiser
from nerd.train import train

from .conftest import make_image_folder
from .test_train import tiny_config

REPO = Path(__file__).resolve().parents[1]


class _Marker:
    """Unpickling this runs code (it creates the file `path`): a loader that builds arbitrary objects would."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six 48 x 40 grayscale PNGs (as conftest's image_folder, shared by this module's tests)."""
    return make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def trained(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-step run with a moving average of its weights (so last.pt holds `ema` too)."""
    cfg = tiny_config(folder, steps=2)
    cfg = replace(cfg, train=replace(cfg.train, ema=0.5))
    return train(cfg, out=tmp_path_factory.mktemp("runs") / "run", progress=False)


def _toml(path: Path, folder: Path, **train: object) -> Path:
    """A tiny recipe (as tiny_config) training on `folder`, with [train] settings overridden by `train`."""
    settings = {"data": str(folder), "crop": 16, "batch": 2, "steps": 2, "val_images": 2, "val_every": 3, **train}
    path.write_text("[model]\npreset = 'tiny'\n[solver]\nmax_iter = 4\n[grad]\nsteps = 2\n[train]\n"
                    + "".join(f"{k} = {v!r}\n" for k, v in settings.items()))
    return path


def _hostile(src: Path, dst: Path, marker: Path, raw: bool = False) -> Path:
    """`src`'s checkpoint plus an object whose unpickling creates `marker`: as a torch zip, or a bare pickle."""
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    payload = {"note": _Marker(marker), **ckpt}
    dst.parent.mkdir(parents=True, exist_ok=True)
    if raw:
        with open(dst, "wb") as fh:
            pickle.dump(payload, fh, protocol=2)
    else:
        torch.save(payload, dst)
    return dst


def _one_line(capsys: pytest.CaptureFixture[str], *words: str) -> str:
    """The only stderr line of a failed command: `nerd CMD: error: ...`, naming `words`, no traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nerd ") and "error:" in lines[0], err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.mark.parametrize("raw", [False, True], ids=["torch-zip", "bare-pickle"])
def test_export_refuses_a_checkpoint_that_would_run_code(trained, tmp_path, capsys, raw):
    marker = tmp_path / "marker"
    evil = _hostile(trained / "last.pt", tmp_path / "old" / "evil.pt", marker, raw=raw)
    out = tmp_path / "w.safetensors"
    assert main(["export", str(evil), "--out", str(out)]) == 2
    assert not marker.exists() and not out.exists()
    _one_line(capsys, str(evil), "refused")


def test_resume_refuses_a_last_pt_that_would_run_code(trained, folder, tmp_path, capsys):
    run, marker = tmp_path / "run", tmp_path / "marker"
    shutil.copytree(trained, run)
    _hostile(trained / "last.pt", run / "last.pt", marker)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    cfg = _toml(tmp_path / "tiny.toml", folder)
    assert main(["train", "--config", str(cfg), "--out", str(run), "--resume", "--no-progress"]) == 2
    assert not marker.exists()
    _one_line(capsys, str(run / "last.pt"), "refused")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # nothing touched


def test_init_refuses_a_checkpoint_that_would_run_code(trained, folder, tmp_path, capsys):
    marker = tmp_path / "marker"
    evil = _hostile(trained / "last.pt", tmp_path / "evil.pt", marker)
    cfg = _toml(tmp_path / "stage.toml", folder, init=str(evil))
    out = tmp_path / "stage"
    assert main(["train", "--config", str(cfg), "--out", str(out), "--no-progress"]) == 2
    assert not marker.exists()
    _one_line(capsys, str(evil), "refused")
    assert not out.exists()  # a start that fails leaves no run folder


def _damage(kind: str, good: Path, path: Path) -> None:
    """Write a damaged or foreign checkpoint of kind `kind` at `path` (from the good one)."""
    data = good.read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        path.write_bytes(random.Random(0).randbytes(4096))
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "list":
        torch.save([1, 2, 3], path)
    elif kind == "weights-only":  # a state dict alone: no optimiser, config, step ...
        torch.save(torch.load(good, weights_only=True)["model"], path)
    elif kind == "wrong-types":
        torch.save({**torch.load(good, weights_only=True), "step": "six"}, path)
    elif kind == "bad-config":
        ckpt = torch.load(good, weights_only=True)
        torch.save({**ckpt, "config": {**ckpt["config"], "model": {"channels": -1}}}, path)
    elif kind == "wrong-shapes":  # well formed, but weights (and their average) of another model
        ckpt = torch.load(good, weights_only=True)
        for key in ("model", "ema"):
            ckpt[key] = {k: torch.zeros(3, *v.shape) for k, v in ckpt[key].items()}
        torch.save(ckpt, path)
    elif kind == "wrong-moments":  # weights fine, AdamW's moments of another shape (fails only at the next step)
        ckpt = torch.load(good, weights_only=True)
        for moments in ckpt["optimizer"]["state"].values():
            moments["exp_avg"] = torch.zeros(2, 2)
        torch.save(ckpt, path)
    else:
        raise AssertionError(kind)


DAMAGE = ["empty", "truncated", "garbage", "text", "list", "weights-only", "wrong-types", "bad-config", "wrong-shapes",
          "wrong-moments"]


@pytest.mark.parametrize("kind", [k for k in DAMAGE if k != "wrong-moments"])  # export reads no optimiser state
def test_export_of_a_damaged_checkpoint_fails_in_one_line(trained, tmp_path, capsys, kind):
    run = tmp_path / "run"
    run.mkdir()
    _damage(kind, trained / "last.pt", run / "last.pt")
    out = tmp_path / "w.safetensors"
    assert main(["export", str(run), "--last", "--out", str(out)]) == 2
    _one_line(capsys, str(run / "last.pt"))
    assert not out.exists()


@pytest.mark.parametrize("kind", DAMAGE)
def test_resume_from_a_damaged_checkpoint_fails_in_one_line(trained, folder, tmp_path, capsys, kind):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    _damage(kind, trained / "last.pt", run / "last.pt")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    cfg = _toml(tmp_path / "tiny.toml", folder)
    assert main(["train", "--config", str(cfg), "--out", str(run), "--resume", "--no-progress"]) == 2
    _one_line(capsys, str(run / "last.pt"))
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # nothing touched


def test_load_checkpoint_names_the_file_for_what_cannot_be_read(tmp_path):
    with pytest.raises(WeightsError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "dir.pt").mkdir()
    with pytest.raises(WeightsError, match="dir.pt"):
        load_checkpoint(tmp_path / "dir.pt")


def test_a_failed_start_leaves_no_run_folder(folder, trained, tmp_path, capsys):
    few = tmp_path / "few"
    few.mkdir()
    shutil.copy(next(folder.iterdir()), few)  # one image, two held out
    wide = tmp_path / "wide.toml"  # a model that differs from the init's in channels
    wide.write_text(_toml(tmp_path / "x.toml", folder, init=str(trained / "last.pt")).read_text()
                    .replace("preset = 'tiny'\n", "preset = 'tiny'\nchannels = 32\n"))
    cases = {
        "no-data": (_toml(tmp_path / "a.toml", tmp_path / "missing"), "training folder not found"),
        "few-images": (_toml(tmp_path / "b.toml", few), "images"),
        "no-init": (_toml(tmp_path / "c.toml", folder, init=str(tmp_path / "gone.pt")), "not found"),
        "bad-init": (wide, "differs from this run's in channels"),
        "crop": (_toml(tmp_path / "d.toml", folder, crop=64), "crop 64"),
    }
    for name, (cfg, words) in cases.items():
        out = tmp_path / "runs" / name
        assert main(["train", "--config", str(cfg), "--out", str(out), "--no-progress"]) == 2, name
        _one_line(capsys, words)
        assert not out.exists(), name
        assert not (tmp_path / "runs").exists(), name  # not even the parent it would have made


def test_a_run_stopped_by_sigterm_claims_only_the_files_it_wrote(folder, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real = torch.nn.functional.mse_loss

    def signal_first(a, b):
        calls["n"] += 1
        if calls["n"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(a, b)

    monkeypatch.setattr("nerd.train.F.mse_loss", signal_first)
    cfg = _toml(tmp_path / "long.toml", folder, steps=50, val_every=10, log_every=10)
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "stopped by signal" in captured.err and "step 1" in captured.err
    line = next(ln for ln in captured.out.splitlines() if ln.startswith("run folder:"))
    for name in ("last.pt", "best.safetensors", "log.csv", "val.csv", "curve.png"):
        assert (name in line) == (run / name).exists(), (name, line)  # named exactly when written
    assert "last.pt" in line and "best.safetensors" not in line  # step 1: checkpointed, never validated
    assert load_checkpoint(run / "last.pt")["step"] == 1


def test_a_run_that_diverges_before_any_checkpoint_says_so(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("nerd.train.F.mse_loss", lambda a, b: torch.full((), float("nan")))
    run = tmp_path / "run"
    assert main(["train", "--config", str(_toml(tmp_path / "t.toml", folder)), "--out", str(run),
                 "--no-progress"]) == 2
    line = _one_line(capsys, "loss is nan at step 0")
    assert "no checkpoint was written" in line and not (run / "last.pt").exists()  # no claim of a step-0 file


def test_checkpoints_hold_only_plain_values(trained, tmp_path):
    ckpt = torch.load(trained / "last.pt", weights_only=True)  # the restricted unpickler reads all of it
    assert isinstance(ckpt["config"], dict) and ckpt["ema"] is not None
    cfg = config_from_dict(ckpt["config"])
    model = DEQDenoiser(cfg.model, solver=cfg.solver, grad=cfg.grad)
    model.load_state_dict(kept_weights(load_checkpoint(trained / "last.pt")))
    with pytest.raises(TypeError, match="Config"):  # a dataclass would need the full unpickler to come back
        save_checkpoint({**ckpt, "config": Config()}, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_committed_checkpoints_load_safely():
    paths = sorted(REPO.glob("runs/*/last.pt"))
    if not paths:
        pytest.skip("no committed runs/*/last.pt")
    for path in paths:
        ckpt = load_checkpoint(path)
        cfg = config_from_dict(ckpt["config"])
        DEQDenoiser(cfg.model, solver=cfg.solver, grad=cfg.grad).load_state_dict(kept_weights(ckpt))


def test_export_refuses_a_folder_as_out_and_scores_that_are_not_an_object(trained, tmp_path, capsys):
    """Tracebacks once: --out naming a folder, --scores holding a JSON list."""
    (tmp_path / "folder.safetensors").mkdir()
    assert main(["export", str(trained), "--out", str(tmp_path / "folder.safetensors")]) == 2
    assert "is a folder" in capsys.readouterr().err
    scores = tmp_path / "scores.json"
    scores.write_text("[1, 2]")
    assert main(["export", str(trained), "--out", str(tmp_path / "w.safetensors"), "--scores", str(scores)]) == 2
    err = capsys.readouterr().err
    assert "JSON object" in err and err.count("\n") == 1
    assert not (tmp_path / "w.safetensors").exists()
