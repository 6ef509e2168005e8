"""Weights files made to hurt: a checksum proves integrity, not intent (anyone can recompute it), so every value in
a file is checked like a user's input. Each case ends in one line and exit 2, with no traceback and no output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nerd.cli import main
from nerd.weights import _header, tensors_sha256


def forge(src: Path, dst: Path, tensors: dict | None = None, **meta_changes: str | None) -> Path:
    """A copy of weights file `src` with tensors and metadata entries replaced (None: removed) and the checksum
    recomputed, as an attacker (or a buggy tool) would write it."""
    with safe_open(str(src), framework="pt") as fh:
        meta = dict(fh.metadata())
    tensors = tensors if tensors is not None else load_file(str(src))
    for key, value in meta_changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    if all(k in meta for k in ("format", "model", "solver", "sigma")):
        meta["sha256"] = tensors_sha256(tensors, _header(meta))
    save_file(tensors, str(dst), metadata=meta)
    return dst


@pytest.fixture(scope="module")
def good(tiny_weights: Path) -> Path:
    return tiny_weights


@pytest.fixture
def noisy(tmp_path) -> Path:
    from PIL import Image

    path = tmp_path / "noisy.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (21, 19), dtype=np.uint8)).save(path)
    return path


def _model_json(good: Path, **changes: object) -> str:
    with safe_open(str(good), framework="pt") as fh:
        model = json.loads(fh.metadata()["model"])
    return json.dumps({**model, **changes})


def _solver_json(good: Path, **changes: object) -> str:
    with safe_open(str(good), framework="pt") as fh:
        solver = json.loads(fh.metadata()["solver"])
    return json.dumps({**solver, **changes})


def _tensors(good: Path, key_filter=None, change=None) -> dict:
    tensors = load_file(str(good))
    key = sorted(k for k in tensors if tensors[k].is_floating_point() and tensors[k].numel() > 1)[0]
    if change is not None:
        tensors[key] = change(tensors[key])
    if key_filter is not None:
        tensors = {k: v for k, v in tensors.items() if key_filter(k)}
    return tensors


CASES = {
    "sigma NaN": lambda g: dict(sigma="nan"),
    "sigma negative": lambda g: dict(sigma="-25"),
    "sigma not a number": lambda g: dict(sigma="twenty-five"),
    "model JSON broken": lambda g: dict(model="{not json"),
    "model JSON a list": lambda g: dict(model="[1, 2]"),
    "model unknown key": lambda g: dict(model=_model_json(g, surprise=1)),
    "model absurd channels": lambda g: dict(model=_model_json(g, channels=10**9, heads=1, groups=1)),
    "model channels a string": lambda g: dict(model=_model_json(g, channels="8")),
    "model window huge": lambda g: dict(model=_model_json(g, window=10**6 + 1)),
    # within the ranges, but far larger than the file's tensors: refused on shapes, before anything is allocated
    "model large, tensors tiny": lambda g: dict(model=_model_json(g, channels=1024, expansion=8, window=255)),
    "solver tol < 0": lambda g: dict(solver=_solver_json(g, tol=-1.0)),
    "solver tol NaN": lambda g: dict(solver=_solver_json(g, tol=float("nan"))),
    "solver max_iter absurd": lambda g: dict(solver=_solver_json(g, max_iter=10**12)),
    "solver unknown key": lambda g: dict(solver=_solver_json(g, turbo=True)),
    "unknown metadata key": lambda g: dict(extra="1"),
    "missing solver": lambda g: dict(solver=None),
    "scores not an object": lambda g: dict(scores="[1]"),
    "tensor of the wrong shape": lambda g: dict(tensors=_tensors(g, change=lambda t: torch.zeros(t.numel() + 1))),
    "missing tensor": lambda g: dict(tensors=_tensors(g, key_filter=lambda k: not k.startswith("decode"))),
    "one NaN weight": lambda g: dict(tensors=_tensors(g, change=lambda t: t.flatten().index_fill(0, torch.tensor([0]),
                                                                                               float("nan")).view_as(t))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_forged_weights_end_in_one_line_and_exit_2(case, good, noisy, tmp_path, capsys):
    bad = forge(good, tmp_path / "bad.safetensors", **CASES[case](good))
    out = tmp_path / "out.png"
    rc = main(["denoise", str(noisy), "-o", str(out), "--weights", str(bad), "--sigma", "25"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert not out.exists()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("nerd denoise: error:") and "Traceback" not in err, err


def test_the_forger_makes_a_file_that_loads_when_nothing_is_changed(good, noisy, tmp_path, capsys):
    same = forge(good, tmp_path / "same.safetensors")
    assert main(["denoise", str(noisy), "-o", str(tmp_path / "o.png"), "--weights", str(same), "--sigma", "25"]) == 0


def test_a_state_that_turns_nan_during_the_solve_is_an_error_not_an_output(good, noisy, tmp_path, capsys,
                                                                           monkeypatch):
    from nerd.models.nerd import ImplicitLayer

    real = ImplicitLayer.forward
    calls = {"n": 0}

    def flaky(self, z, s, mask=None):  # finite at first, NaN from the third evaluation on
        calls["n"] += 1
        out = real(self, z, s, mask)
        return out * float("nan") if calls["n"] >= 3 else out

    monkeypatch.setattr(ImplicitLayer, "forward", flaky)
    out = tmp_path / "out.png"
    rc = main(["denoise", str(noisy), "-o", str(out), "--weights", str(good), "--sigma", "25"])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists() and "NaN" in err and "Traceback" not in err, err
