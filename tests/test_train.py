"""Training: runs, validates, checkpoints; a killed run resumes and reproduces the uninterrupted one."""

from __future__ import annotations

import csv
from dataclasses import replace

import pytest
import torch

from nerd.checkpoint import load_checkpoint
from nerd.config import Config, GradConfig, SolverConfig, TrainConfig, load_config
from nerd.data.patches import PatchSampler, dihedral, undo_dihedral
from nerd.errors import TrainError
from nerd.models import preset_config
from nerd.train import NonFiniteLoss, lr_at, train
from nerd.weights import load_weights


def tiny_config(folder, steps=6, dropout=0.0) -> Config:
    return Config(
        model=preset_config("tiny", dropout=dropout),
        solver=SolverConfig(max_iter=4, tol=1e-3),
        grad=GradConfig(steps=2),
        train=TrainConfig(data=str(folder), sigma=(25.0,), crop=16, batch=2, steps=steps, lr=1e-3,
                          val_images=2, val_every=3, log_every=1, checkpoint_minutes=1e9, threads=2),
    )


def test_run_writes_logs_checkpoint_best_weights(image_folder, tmp_path):
    run = train(tiny_config(image_folder), out=tmp_path / "run", progress=False)
    for name in ("last.pt", "best.safetensors", "log.csv", "val.csv", "config.json"):
        assert (run / name).exists(), name
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(float(r["nfe"]) <= 4 for r in rows)
    val = list(csv.DictReader(open(run / "val.csv")))
    assert [int(r["step"]) for r in val] == [3, 6]
    model, info = load_weights(run / "best.safetensors")
    assert info["sigma"] == 25.0
    best = max(val, key=lambda r: float(r["val_psnr"]))  # best.safetensors is the best validated step's
    assert info["scores"]["val_psnr"] == pytest.approx(float(best["val_psnr"]), abs=1e-4)
    assert int(best["step"]) == 3  # not the last step: the exports below can tell best from last
    # nerd export: best.safetensors' tensors by default, last.pt's with --last
    from nerd.cli import main

    assert main(["export", str(run), "--out", str(tmp_path / "best.safetensors")]) == 0
    assert main(["export", str(run), "--last", "--out", str(tmp_path / "last.safetensors")]) == 0
    exported, exported_info = load_weights(tmp_path / "best.safetensors")
    last = load_weights(tmp_path / "last.safetensors")[0].state_dict()
    ckpt = load_checkpoint(run / "last.pt")["model"]
    assert exported_info["scores"] == info["scores"] and exported_info["sigma"] == 25
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in exported.state_dict().items())
    assert all(torch.equal(last[k], ckpt[k]) for k in ckpt)
    assert not all(torch.equal(last[k], v) for k, v in exported.state_dict().items())
    # a checkpoint file by another name (one taken from git history) is exported as it is, though a best exists
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "best.safetensors").write_bytes((run / "best.safetensors").read_bytes())
    (tmp_path / "old" / "step6.pt").write_bytes((run / "last.pt").read_bytes())
    assert main(["export", str(tmp_path / "old" / "step6.pt"), "--out", str(tmp_path / "named.safetensors")]) == 0
    named = load_weights(tmp_path / "named.safetensors")[0].state_dict()
    assert all(torch.equal(named[k], last[k]) for k in last)
    assert main(["export", str(tmp_path / "old" / "nope.pt"), "--out", str(tmp_path / "x.safetensors")]) == 2


def test_resume_reproduces_uninterrupted_run(image_folder, tmp_path):
    cfg = tiny_config(image_folder, steps=6, dropout=0.2)  # dropout: the global RNG state must be restored too
    full = train(cfg, out=tmp_path / "full", progress=False)
    part = train(cfg, out=tmp_path / "part", stop_after=3, progress=False)
    assert load_checkpoint(part / "last.pt")["step"] == 3
    train(cfg, out=tmp_path / "part", resume=True, progress=False)
    a = load_checkpoint(full / "last.pt")
    b = load_checkpoint(part / "last.pt")
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
    rows = list(csv.DictReader(open(part / "log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert same_columns(full, part)
    assert a["best_val"] == b["best_val"]
    assert load_weights(full / "best.safetensors")[1]["sha256"] == load_weights(part / "best.safetensors")[1]["sha256"]


def same_columns(run_a, run_b, columns=("step", "lr", "loss", "nfe", "rel_residual")) -> bool:
    """log.csv and val.csv of two runs agree on everything but the clock."""
    for name, cols in (("log.csv", columns), ("val.csv", ("step", "val_psnr"))):
        rows_a = [[r[c] for c in cols] for r in csv.DictReader(open(run_a / name))]
        rows_b = [[r[c] for c in cols] for r in csv.DictReader(open(run_b / name))]
        if rows_a != rows_b:
            return False
    return True


def test_a_run_killed_between_checkpoints_resumes_without_duplicate_rows(image_folder, tmp_path):
    """Steps 4-5 are logged, then the process dies before its next checkpoint (simulated by putting the step-3
    last.pt back): the resumed run drops the orphaned rows, redoes steps 4-5 and ends as the uninterrupted run."""
    import shutil

    cfg = tiny_config(image_folder, steps=6, dropout=0.2)
    cfg = replace(cfg, train=replace(cfg.train, val_every=2))  # step 4's validation row is orphaned too
    full = train(cfg, out=tmp_path / "full", progress=False)
    part = train(cfg, out=tmp_path / "part", stop_after=3, progress=False)
    shutil.copy(part / "last.pt", tmp_path / "step3.pt")
    train(cfg, out=part, resume=True, stop_after=5, progress=False)
    assert [int(r["step"]) for r in csv.DictReader(open(part / "log.csv"))] == [1, 2, 3, 4, 5]
    assert [int(r["step"]) for r in csv.DictReader(open(part / "val.csv"))] == [2, 4]
    shutil.copy(tmp_path / "step3.pt", part / "last.pt")
    train(cfg, out=part, resume=True, progress=False)
    assert [int(r["step"]) for r in csv.DictReader(open(part / "log.csv"))] == [1, 2, 3, 4, 5, 6]
    assert [int(r["step"]) for r in csv.DictReader(open(part / "val.csv"))] == [2, 4, 6]
    assert same_columns(full, part)
    a = load_checkpoint(full / "last.pt")["model"]
    b = load_checkpoint(part / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_stage_started_from_a_checkpoint_carries_its_adam_moments(image_folder, tmp_path):
    first = train(tiny_config(image_folder, steps=3), out=tmp_path / "first", progress=False)
    old = load_checkpoint(first / "last.pt")
    cfg = tiny_config(image_folder, steps=1)
    cfg = replace(cfg, train=replace(cfg.train, init=str(first / "last.pt"), weight_decay=0.123, val_every=0))
    new = load_checkpoint(train(cfg, out=tmp_path / "second", progress=False) / "last.pt")
    assert new["step"] == 1  # a new stage: its own step count and schedule
    groups = new["optimizer"]["param_groups"]
    assert {g["weight_decay"] for g in groups} == {0.123, 0.0}  # this stage's hyper-parameters, not the first's
    beta2 = cfg.train.betas[1]
    for i, s in old["optimizer"]["state"].items():
        carried = new["optimizer"]["state"][i]
        assert int(carried["step"]) == int(s["step"]) + 1
        # v_t = beta2 v_(t-1) + (1 - beta2) g^2 >= beta2 v_(t-1): true only if v_(t-1) came along
        assert bool((carried["exp_avg_sq"] >= beta2 * s["exp_avg_sq"] * (1 - 1e-6)).all()), i
    torch.save({"model": old["model"]}, tmp_path / "weights-only.pt")  # no optimiser state: refused, clearly
    cfg = replace(cfg, train=replace(cfg.train, init=str(tmp_path / "weights-only.pt")))
    with pytest.raises(ValueError, match="not a training checkpoint"):
        train(cfg, out=tmp_path / "third", progress=False)


def test_moving_average_of_the_weights_is_kept_validated_exported_and_resumed(image_folder, tmp_path):
    """train.ema: the average follows e_1 = w_1, e_k = d e_(k-1) + (1 - d) w_k over the trained weights w_k (and
    BatchNorm's statistics) without changing the training itself; it is what best.safetensors, val.csv and
    `export --last` hold, and a resumed run continues it exactly."""
    d = 0.6
    plain = tiny_config(image_folder, steps=4)
    plain = replace(plain, train=replace(plain.train, val_every=0))
    averaged = replace(plain, train=replace(plain.train, ema=d, val_every=2))
    raw = []  # w_1 .. w_4 of the run without an average, one step at a time
    for k in range(1, 5):
        train(plain, out=tmp_path / "plain", resume=k > 1, stop_after=k, progress=False)
        raw.append(load_checkpoint(tmp_path / "plain" / "last.pt")["model"])
    train(averaged, out=tmp_path / "part", stop_after=2, progress=False)
    run = train(averaged, out=tmp_path / "part", resume=True, progress=False)
    ckpt = load_checkpoint(run / "last.pt")
    from nerd.checkpoint import kept_weights

    ema = kept_weights(ckpt)
    for name, w4 in raw[-1].items():
        assert torch.equal(ckpt["model"][name], w4), name  # the average leaves training alone
        if not w4.is_floating_point():
            continue
        e = raw[0][name].double()
        for w in raw[1:]:
            e = d * e + (1 - d) * w[name].double()
        torch.testing.assert_close(ema[name].double(), e, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(ema[k], v) for k, v in ckpt["model"].items() if v.is_floating_point())
    val = list(csv.DictReader(open(run / "val.csv")))
    assert [int(r["step"]) for r in val] == [2, 4] and all(r["val_psnr_raw"] for r in val)
    best = max(val, key=lambda r: float(r["val_psnr"]))
    model, info = load_weights(run / "best.safetensors")
    assert info["scores"]["val_psnr"] == pytest.approx(float(best["val_psnr"]), abs=1e-4)
    if int(best["step"]) == 4:
        assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
    from nerd.cli import main

    assert main(["export", str(run), "--last", "--out", str(tmp_path / "last.safetensors")]) == 0
    last = load_weights(tmp_path / "last.safetensors")[0].state_dict()
    assert all(torch.equal(last[k], ema[k]) for k in last)


def test_existing_run_needs_resume(image_folder, tmp_path):
    cfg = tiny_config(image_folder, steps=2)
    train(cfg, out=tmp_path / "r", progress=False)
    with pytest.raises(TrainError, match="already holds a run"):
        train(cfg, out=tmp_path / "r", progress=False)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(image_folder, tmp_path, monkeypatch):
    cfg = tiny_config(image_folder, steps=8)
    cfg = replace(cfg, train=replace(cfg.train, checkpoint_minutes=0.0))  # checkpoint after every step
    calls = {"n": 0}
    real = torch.nn.functional.mse_loss

    def poisoned(a, b):
        calls["n"] += 1
        return real(a, b) * (float("nan") if calls["n"] == 5 else 1.0)

    monkeypatch.setattr("nerd.train.F.mse_loss", poisoned)
    with pytest.raises(NonFiniteLoss):
        train(cfg, out=tmp_path / "nan", progress=False)
    ckpt = load_checkpoint(tmp_path / "nan" / "last.pt")
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_sampler_is_reproducible_and_augments(image_folder):
    from nerd.data.patches import load_folder

    images, _, _ = load_folder(image_folder, 1)
    a = PatchSampler(images, 16, (15.0, 50.0), torch.Generator().manual_seed(3)).sample(5)
    b = PatchSampler(images, 16, (15.0, 50.0), torch.Generator().manual_seed(3)).sample(5)
    for t, u in zip(a, b, strict=True):
        torch.testing.assert_close(t, u, rtol=0, atol=0)
    x, y, sigma = a
    assert x.shape == y.shape == (5, 1, 16, 16)
    assert set((sigma * 255).round().tolist()) <= {15.0, 50.0}
    assert 0 <= x.min() and x.max() <= 1


def test_dihedral_group_has_eight_distinct_invertible_elements():
    x = torch.arange(12.0).reshape(1, 3, 4)
    outs = [dihedral(x, k) for k in range(8)]
    assert len({tuple(o.flatten().tolist()) + tuple(o.shape) for o in outs}) == 8
    for k, o in enumerate(outs):
        assert torch.equal(undo_dihedral(o, k), x), k


def test_lr_schedule_warmup_then_cosine():
    cfg = Config(train=TrainConfig(lr=1e-3, lr_min=0.0, warmup=10))
    assert lr_at(0, 110, cfg) == pytest.approx(1e-4)
    assert lr_at(10, 110, cfg) == pytest.approx(1e-3)
    assert lr_at(60, 110, cfg) == pytest.approx(5e-4)
    assert lr_at(110, 110, cfg) == pytest.approx(0.0)


def test_lr_schedule_follows_a_time_budget():
    cfg = Config(train=TrainConfig(lr=1e-3, lr_min=0.0, warmup=0, minutes=10))
    # Step 10 of 10**6 is hardly on, but half the budget is spent: the schedule is half way down.
    assert lr_at(10, 10**6, cfg, elapsed_s=300) == pytest.approx(5e-4)
    assert lr_at(10, 10**6, cfg, elapsed_s=600) == pytest.approx(0.0)
    assert lr_at(10, 20, cfg, elapsed_s=0) == pytest.approx(5e-4)  # the step cap still counts


def test_run_with_a_time_budget_stops_decayed_and_validated(image_folder, tmp_path, monkeypatch, capsys):
    import time
    import types

    # A clock that advances 0.25 s a reading (two readings a step; 0.25 is exact in binary, so the sums are too):
    # the run does not depend on this CPU's speed.
    readings = iter(range(10**6))
    clock = types.SimpleNamespace(monotonic=lambda: 0.25 * next(readings), process_time=time.process_time)
    monkeypatch.setattr("nerd.train.time", clock)
    cfg = tiny_config(image_folder, steps=10**6)
    cfg = replace(cfg, train=replace(cfg.train, minutes=0.05, val_every=10**6, lr_min=0.0))
    run = train(cfg, out=tmp_path / "run", progress=True)
    bar = capsys.readouterr().err.split("\r")[-1]  # the progress bar's last state: the budget, in minutes, all spent
    assert "100%" in bar and "0.05/0.05 min" in bar, bar
    rows = list(csv.DictReader(open(run / "log.csv")))
    elapsed = [float(r["elapsed_s"]) for r in rows]
    assert elapsed == [round(0.25 + 0.5 * i, 1) for i in range(len(rows))]  # 0.5 s a step after the first (log.csv
    # keeps one decimal)
    assert 3.0 <= elapsed[-1] < 3.5  # it ran its whole budget (0.05 min = 3 s), and stopped there
    lrs = [float(r["lr"]) for r in rows]
    assert lrs == sorted(lrs, reverse=True)  # the cosine followed the clock down (no warm-up here) ...
    assert lrs[0] == pytest.approx(cfg.train.lr) and lrs[-1] < 0.05 * cfg.train.lr  # ... from its top to near 0
    val = list(csv.DictReader(open(run / "val.csv")))
    assert [int(r["step"]) for r in val] == [int(rows[-1]["step"])]
    # Resuming a run whose time is up changes nothing.
    train(cfg, out=run, resume=True, progress=False)
    assert len(list(csv.DictReader(open(run / "log.csv")))) == len(rows)


def test_cli_validate_reproduces_the_runs_own_validation(image_folder, tmp_path, capsys):
    import json

    from nerd.cli import main

    run = train(tiny_config(image_folder), out=tmp_path / "run", progress=False)
    best = load_weights(run / "best.safetensors")[1]["scores"]["val_psnr"]
    out = tmp_path / "val.json"
    assert main(["validate", str(run / "best.safetensors"), "--data", str(image_folder), "--val-images", "2",
                 "--val-crop", "0", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["val_psnr"] == pytest.approx(best, abs=1e-3)  # the same images, noise and solver as the run's
    assert "val PSNR" in capsys.readouterr().out


def test_shipped_configs_parse():
    from pathlib import Path

    configs = sorted(Path(__file__).resolve().parents[1].glob("configs/**/*.toml"))
    assert configs
    for path in configs:
        load_config(path)


def test_unknown_config_key_is_refused(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nbatchsize = 4\n")
    with pytest.raises(ValueError, match="batchsize"):
        load_config(path)


def test_config_values_are_checked(tmp_path):
    path = tmp_path / "one.toml"
    path.write_text("[train]\nsigma = 25\n")  # a single level without brackets is a one-level list
    assert load_config(path).train.sigma == (25.0,)
    for bad, match in [("[train]\nsigma = [0]\n", "sigma"), ("[train]\nbatch = 0\n", "batch"),
                       ("[grad]\ndamping = 0\n", "damping"), ("[solver]\ntol = -1\n", "tol"),
                       ("[solver]\nname = \"anderson\"\nridge = 0\n", "ridge")]:
        path.write_text(bad)
        with pytest.raises(ValueError, match=match):
            load_config(path)


def test_sigterm_checkpoints_and_stops(image_folder, tmp_path, monkeypatch):
    import os
    import signal

    cfg = tiny_config(image_folder, steps=50)
    calls = {"n": 0}
    real = torch.nn.functional.mse_loss

    def loss_then_signal(a, b):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(a, b)

    monkeypatch.setattr("nerd.train.F.mse_loss", loss_then_signal)
    run = train(cfg, out=tmp_path / "sig", progress=False)
    assert load_checkpoint(run / "last.pt")["step"] == 3


def test_train_kill_resume_export_then_denoise_with_the_weights(image_folder, tmp_path, capsys):
    """The pipeline end to end through the CLI: train, stop, resume, export, denoise with --weights."""
    from nerd.cli import main

    cfg = tmp_path / "tiny.toml"
    cfg.write_text(
        "[model]\npreset = 'tiny'\n[solver]\nmax_iter = 4\n[grad]\nsteps = 2\n"
        f"[train]\ndata = '{image_folder}'\ncrop = 16\nbatch = 2\nsteps = 4\nval_images = 2\nval_every = 2\n"
    )
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run), "--stop-after", "2", "--no-progress"]) == 0
    assert main(["train", "--config", str(cfg), "--out", str(run), "--no-progress"]) == 2  # exists: needs --resume
    assert main(["train", "--config", str(cfg), "--out", str(run), "--resume", "--no-progress"]) == 0
    assert load_checkpoint(run / "last.pt")["step"] == 4
    weights = tmp_path / "w.safetensors"
    assert main(["export", str(run), "--out", str(weights)]) == 0
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "x.safetensors")]) == 2
    (tmp_path / "empty-run").mkdir()
    assert main(["export", str(tmp_path / "empty-run"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert not (tmp_path / "x.safetensors").exists()
    noisy = sorted(image_folder.iterdir())[0]
    out = tmp_path / "den.png"
    assert main(["denoise", str(noisy), "-o", str(out), "--weights", str(weights), "--quiet"]) == 0
    from PIL import Image

    assert Image.open(out).size == Image.open(noisy).size
