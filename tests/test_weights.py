"""Weights files: every shipped file loads with a valid checksum; a save/load round trip keeps the whole config;
editing what the checksum covers is refused, editing what it does not (scores) is not."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nerd.config import SolverConfig
from nerd.models import create_model
from nerd.weights import WeightsError, load_weights, save_weights, shipped, tensors_sha256


def rewrite(src, dst, **changes: str) -> None:
    """Copy a weights file with some metadata entries replaced, keeping its recorded sha256."""
    with safe_open(str(src), framework="pt") as fh:
        meta = dict(fh.metadata())
    save_file(load_file(str(src)), str(dst), metadata={**meta, **changes})


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    model = create_model("tiny", window=9, dropout=0.1, solver=SolverConfig(name="anderson", max_iter=5, tol=2e-3))
    path = tmp_path / "w.safetensors"
    save_weights(model, path, sigma255=15, scores={"val_psnr": 1.5}, train={"steps": 3})
    return model, path


@pytest.mark.parametrize("name", sorted(shipped()))
def test_every_shipped_file_loads_and_matches_its_name(name):
    model, info = load_weights(name)
    assert name == f"nerd-s{info['sigma']:g}"
    assert info["scores"]["val_psnr"] > 20 and info["train"]  # measured and described, as the model card says
    assert not model.training and model.cfg.equilibrium == "noise"


def test_round_trip_keeps_config_solver_and_outputs(saved):
    model, path = saved
    loaded, info = load_weights(path)
    assert loaded.cfg == model.cfg and loaded.solver == model.solver  # fields without parameters too
    assert loaded.cfg.window == 9 and loaded.solver.name == "anderson"
    assert info["sigma"] == 15 and info["scores"] == {"val_psnr": 1.5} and info["train"] == {"steps": 3}
    y = torch.rand(1, 1, 13, 11)
    with torch.no_grad():
        assert torch.equal(loaded.eval().equilibrium(y, 0.06).x_hat, model.eval().equilibrium(y, 0.06).x_hat)


@pytest.mark.parametrize("key", ["sigma", "model", "solver"])
def test_editing_checksummed_metadata_is_refused(saved, tmp_path, key):
    _, path = saved
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    edited = {"sigma": "50.0", "model": meta["model"].replace('"window": 9', '"window": 11'),
              "solver": meta["solver"].replace('"max_iter": 5', '"max_iter": 6')}[key]
    assert edited != meta[key]
    rewrite(path, tmp_path / "edited.safetensors", **{key: edited})
    with pytest.raises(WeightsError, match="checksum mismatch"):
        load_weights(tmp_path / "edited.safetensors")


def test_scores_are_not_checksummed_and_old_or_foreign_files(saved, tmp_path):
    _, path = saved
    rewrite(path, tmp_path / "rescored.safetensors", scores=json.dumps({"val_psnr": 2.0}))
    assert load_weights(tmp_path / "rescored.safetensors")[1]["scores"] == {"val_psnr": 2.0}
    # nerd-1: the checksum covers the tensors only
    rewrite(path, tmp_path / "v1.safetensors", format="nerd-1", sha256=tensors_sha256(load_file(str(path))))
    load_weights(tmp_path / "v1.safetensors")
    rewrite(path, tmp_path / "v1-bad.safetensors", format="nerd-1")  # a nerd-2 checksum does not fit nerd-1
    with pytest.raises(WeightsError, match="checksum mismatch"):
        load_weights(tmp_path / "v1-bad.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="not a nerd weights file"):
        load_weights(tmp_path / "other.safetensors")
