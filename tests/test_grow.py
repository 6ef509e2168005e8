"""Widening a trained model's hidden layer (nerd.models.grow) keeps its function, and a stage can start from it."""

import csv
from dataclasses import replace

import pytest
import torch

from nerd.checkpoint import load_checkpoint
from nerd.config import SolverConfig
from nerd.models import DEQDenoiser
from nerd.models.grow import hidden_index, widen_hidden
from nerd.models.presets import preset_config
from nerd.train import train

from .test_train import tiny_config


def _trained_looking(cfg, seed=0) -> DEQDenoiser:
    """A model with non-default norms and BatchNorm statistics, so that widening mistakes cannot hide."""
    torch.manual_seed(seed)
    model = DEQDenoiser(cfg, solver=SolverConfig(max_iter=6, tol=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "original0" in name:
                p.add_(0.3 * torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("weight_norm", [True, False])
def test_widening_without_noise_keeps_the_function(weight_norm):
    narrow_cfg = replace(preset_config("tiny"), weight_norm=weight_norm)
    narrow = _trained_looking(narrow_cfg)
    wide_cfg = replace(narrow_cfg, expansion=narrow_cfg.expansion * 3)
    wide = DEQDenoiser(wide_cfg, solver=narrow.solver).eval()
    wide.load_state_dict(widen_hidden(narrow.state_dict(), narrow_cfg.groups, 3))
    y = torch.rand(2, 1, 13, 10)  # odd sizes
    with torch.no_grad():
        s = narrow.inject(y)
        z = torch.randn_like(s)
        torch.testing.assert_close(wide.layer(z, s), narrow.layer(z, s), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(wide(y), narrow(y), rtol=1e-4, atol=1e-5)


def test_noise_makes_the_copies_distinct_and_changes_the_function_only_slightly():
    cfg = preset_config("tiny")
    narrow = _trained_looking(cfg)
    state = widen_hidden(narrow.state_dict(), cfg.groups, 2, noise=1e-2, generator=torch.Generator().manual_seed(1))
    key = "layer.conv1.parametrizations.weight.original1"
    hidden = narrow.state_dict()[key].shape[0]
    idx = hidden_index(hidden, cfg.groups, 2)
    n = hidden // cfg.groups
    v = state[key]
    torch.testing.assert_close(v[:n], narrow.state_dict()[key][:n])  # the originals are untouched
    assert not torch.equal(v[n : 2 * n], v[:n]) and torch.equal(idx[n : 2 * n], idx[:n])  # their copies differ
    wide = DEQDenoiser(replace(cfg, expansion=cfg.expansion * 2), solver=narrow.solver).eval()
    wide.load_state_dict(state)
    y = torch.rand(1, 1, 12, 12)
    with torch.no_grad():
        gap = (wide(y) - narrow(y)).abs().max() / (narrow(y) - y).abs().max()
    assert 0 < gap < 0.05


@pytest.mark.parametrize("weight_norm", [True, False])
def test_widened_moments_follow_the_wide_models_gradients(weight_norm):
    """Carried AdamW moments must be what the wide model's own gradients would have made of them: the narrow
    gradient (and its square), widened as a moment, equals the wide gradient (and its square)."""
    cfg = replace(preset_config("tiny"), weight_norm=weight_norm)
    narrow = _trained_looking(cfg).train()
    wide = DEQDenoiser(replace(cfg, expansion=cfg.expansion * 2), solver=narrow.solver).train()
    wide.load_state_dict(widen_hidden(narrow.state_dict(), cfg.groups, 2))
    torch.manual_seed(3)
    x = torch.rand(2, 1, 11, 9)
    y = x + 0.1 * torch.randn_like(x)
    grads = {}
    for name, model in (("narrow", narrow), ("wide", wide)):
        torch.nn.functional.mse_loss(model(y), x).backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for power in (1, 2):
        carried = widen_hidden({n: g**power for n, g in grads["narrow"].items()}, cfg.groups, 2, moment=power)
        for n, g in grads["wide"].items():  # float32 round-off through the solve: ~1e-5 relative
            assert (carried[n] - g**power).norm() <= 1e-4 * (g**power).norm(), n


def test_a_stage_can_start_wider_than_its_checkpoint(image_folder, tmp_path):
    first = train(tiny_config(image_folder, steps=3), out=tmp_path / "first", progress=False)
    cfg = tiny_config(image_folder, steps=1)
    cfg = replace(cfg, model=replace(cfg.model, expansion=cfg.model.expansion * 2),
                  train=replace(cfg.train, init=str(first / "last.pt"), val_every=1))
    wide = train(cfg, out=tmp_path / "wide", progress=False)
    new = load_checkpoint(wide / "last.pt")
    start, end = (float(r["val_psnr"]) for r in csv.DictReader(open(wide / "val.csv")))  # steps 0 and 1
    narrow_end = float(list(csv.DictReader(open(first / "val.csv")))[-1]["val_psnr"])
    assert abs(start - narrow_end) < 0.02  # a stage validates its init first; widening kept the function
    old = load_checkpoint(first / "last.pt")
    assert new["model"]["layer.conv1.bias"].shape[0] == 2 * old["model"]["layer.conv1.bias"].shape[0]
    beta2 = cfg.train.betas[1]
    old_sq = {_name(old, i): s["exp_avg_sq"] for i, s in old["optimizer"]["state"].items()}
    before = widen_hidden(old_sq, cfg.model.groups, 2, moment=2)  # the old second moments, widened as moments
    for i, s in old["optimizer"]["state"].items():  # the moments came along, widened like their parameters
        carried, name = new["optimizer"]["state"][i], _name(new, i)
        assert int(carried["step"]) == int(s["step"]) + 1
        assert carried["exp_avg_sq"].shape == new["model"][name].shape
        assert bool((carried["exp_avg_sq"] >= beta2 * before[name] * (1 - 1e-6)).all()), name  # v_t >= beta2 v_t-1
    bad = replace(cfg, model=replace(cfg.model, channels=cfg.model.channels * 2))
    with pytest.raises(ValueError, match="differs from this run's in channels"):
        train(bad, out=tmp_path / "bad", progress=False)
    heads = 1 if cfg.model.heads != 1 else 2  # same tensor shapes, another function: refused too
    bad = replace(cfg, model=replace(cfg.model, heads=heads))
    with pytest.raises(ValueError, match="differs from this run's in heads"):
        train(bad, out=tmp_path / "bad-heads", progress=False)


def _name(ckpt, i: int) -> str:
    from nerd.config import config_from_dict
    from nerd.train import _param_groups

    names = [n for g in _param_groups(DEQDenoiser(config_from_dict(ckpt["config"]).model)) for n in g]
    return names[i]


def test_a_widened_stage_resumes_without_widening_or_validating_its_init_again(image_folder, tmp_path):
    first = train(tiny_config(image_folder, steps=2), out=tmp_path / "first", progress=False)
    cfg = tiny_config(image_folder, steps=3)
    cfg = replace(cfg, model=replace(cfg.model, expansion=cfg.model.expansion * 2),
                  train=replace(cfg.train, init=str(first / "last.pt"), val_every=1))
    train(cfg, out=tmp_path / "wide", progress=False, stop_after=1)
    train(cfg, out=tmp_path / "wide", progress=False, resume=True)
    steps = [int(r["step"]) for r in csv.DictReader(open(tmp_path / "wide" / "val.csv"))]
    assert steps == [0, 1, 2, 3]
    wide = load_checkpoint(tmp_path / "wide" / "last.pt")
    assert wide["model"]["layer.conv1.bias"].shape[0] == cfg.model.channels * cfg.model.expansion  # widened once
