"""`nerd experiment`: the verdict logic, the presets, and every experiment end to end at the smoke preset on a tiny
synthetic data root (Train400 / Set12 / Middlebury2006 folders of small PNGs in tmp_path)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nerd.checkpoint import load_checkpoint
from nerd.cli import main
from nerd.lab.experiments import EXPERIMENTS, Context, ExperimentError, markdown_summary, run_experiment
from nerd.lab.experiments.core import BUDGETS, base_config, train_run
from nerd.lab.experiments.verdict import (
    NOT_MEASURABLE,
    NOT_REPRODUCED,
    REPRODUCED,
    Expect,
    from_numbers,
    from_order,
    judge,
    ordering,
    overall,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the smoke runs are tiny, and two threads on a busy 2-core machine are much slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def synth(tmp_path: Path) -> Path:
    """A data root: Train400 (6 images, 2 held out), Set12 (2) and Middlebury2006 (2), smooth 8-bit PNGs."""
    from PIL import Image

    r = np.random.RandomState(0)
    for folder, n, (h, w) in (("Train400", 6, (40, 36)), ("Set12", 2, (32, 28)), ("Middlebury2006", 2, (30, 34))):
        (tmp_path / "data" / folder).mkdir(parents=True)
        yy, xx = np.mgrid[0:h, 0:w]
        for i in range(n):
            img = 0.5 + 0.3 * np.sin(xx / (3 + i)) * np.cos(yy / (4 + i)) + 0.05 * r.randn(h, w)
            Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8)).save(
                tmp_path / "data" / folder / f"im{i:02d}.png")
    return tmp_path / "data"


@pytest.fixture
def ctx(tmp_path: Path, synth: Path) -> Context:
    return Context(preset="smoke", out=tmp_path / "out", data=synth, progress=False, log=lambda _msg: None)


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    from nerd.models import create_model
    from nerd.weights import save_weights

    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    save_weights(create_model("tiny"), path, sigma255=25)
    return path


# --- verdicts ---------------------------------------------------------------------------------------------------


def test_from_numbers_orders_pairs_with_gaps():
    pairs = from_numbers({"h1": 30.79, "h4": 30.84, "h8": 30.78})
    got = {(e.a, e.b): round(e.gap, 2) for e in pairs}
    assert got == {("h4", "h1"): 0.05, ("h1", "h8"): 0.01, ("h4", "h8"): 0.06}
    lower = from_numbers({"a": 1.0, "b": 3.0}, higher_is_better=False)
    assert [(e.a, e.b) for e in lower] == [("a", "b")]


def test_judge_reproduced_not_reproduced_and_not_measurable():
    paper = {"noise": 30.84, "image": 30.40}
    exp = from_numbers(paper)
    assert judge("c", exp, {"noise": 29.0, "image": 28.5}, resolution=0.1).status == REPRODUCED
    assert judge("c", exp, {"noise": 28.5, "image": 29.0}, resolution=0.1).status == NOT_REPRODUCED
    tie = judge("c", exp, {"noise": 29.00, "image": 28.97}, resolution=0.1)  # within our resolution
    assert tie.status == NOT_MEASURABLE and "within" in tie.note
    smoke = judge("c", exp, {"noise": 29.0, "image": 28.0}, resolution=None)
    assert smoke.status == NOT_MEASURABLE and smoke.pairs[0]["outcome"] == "not judged"


def test_judge_skips_paper_gaps_below_resolution():
    paper = {"h1": 30.79, "h4": 30.84, "h8": 30.78}
    # Only h4 > h8 (0.06) is resolvable at 0.06; h1 vs h8 (0.01) and h4 vs h1 (0.05) are not.
    v = judge("heads", from_numbers(paper), {"h1": 27.0, "h4": 27.2, "h8": 27.1}, resolution=0.06)
    outcomes = {(p["a"], p["b"]): p["outcome"] for p in v.pairs}
    assert outcomes[("h4", "h8")] == "confirmed"
    assert outcomes[("h1", "h8")] == outcomes[("h4", "h1")] == "below resolution"
    assert v.status == REPRODUCED
    none = judge("heads", from_numbers(paper), {"h1": 27.0, "h4": 27.2, "h8": 27.1}, resolution=0.5)
    assert none.status == NOT_MEASURABLE and "below our resolution" in none.note


def test_judge_not_worse_relation_and_missing_variant():
    exp = [Expect("N32", "N17", ">=")]
    assert judge("c", exp, {"N17": 28.0, "N32": 27.95}, resolution=0.1).status == REPRODUCED
    assert judge("c", exp, {"N17": 28.0, "N32": 27.8}, resolution=0.1).status == NOT_REPRODUCED
    assert judge("c", exp, {"N17": 28.0}, resolution=0.1).status == NOT_MEASURABLE


def test_ordering_text_and_direction():
    assert ordering({"a": 1.0, "b": 3.0, "c": 2.0}) == "b > c > a"
    assert ordering({"a": 1.0, "b": 3.0}, higher_is_better=False) == "a < b"
    assert ordering({"a": 1.0, "b": 1.02, "c": 2.0}, resolution=0.05) == "c > b ≈ a"
    v = judge("c", from_order(["broyden", "plain"]), {"broyden": -4.0, "plain": -1.0}, resolution=0.3,
              higher_is_better=False)
    assert v.status == REPRODUCED and v.paper_order == "broyden < plain" and v.our_order == "broyden < plain"


def test_overall_uses_primary_claims():
    exp = from_numbers({"a": 2.0, "b": 1.0})
    good = judge("p", exp, {"a": 2.0, "b": 1.0}, resolution=0.1)
    bad = judge("s", exp, {"a": 1.0, "b": 2.0}, resolution=0.1, primary=False)
    tie = judge("t", exp, {"a": 1.0, "b": 1.0}, resolution=0.1)
    assert overall([good, bad]) == REPRODUCED
    assert overall([good, tie]) == NOT_MEASURABLE
    assert overall([good, judge("q", exp, {"a": 1.0, "b": 2.0}, resolution=0.1)]) == NOT_REPRODUCED


# --- presets and runs -------------------------------------------------------------------------------------------


def test_windows_scale_with_the_crop_and_stay_odd():
    assert BUDGETS["paper"].window(65) == 65 and BUDGETS["paper"].window(50) == 51
    assert [BUDGETS["quick"].window(q) for q in (50, 55, 60, 65, 70)] == [25, 27, 31, 33, 35]
    assert all(BUDGETS[p].window(q) % 2 == 1 for p in BUDGETS for q in range(40, 80))


def test_every_preset_model_takes_1_4_and_8_heads():
    from nerd.models.presets import preset_config

    for preset, budget in BUDGETS.items():
        channels = preset_config(budget.model).channels
        assert all(channels % h == 0 for h in (1, 4, 8)), preset


def test_config_mirrors_match_the_code(ctx, synth):
    from dataclasses import replace

    from nerd.config import load_config

    for preset in ("quick", "paper"):
        c = Context(preset=preset, out=ctx.out, data=synth, progress=False)
        code = base_config(c, "equilibrium", "noise-s25")
        mirror = load_config(REPO / "configs" / "experiments" / f"{preset}.toml")
        assert mirror.model == code.model and mirror.solver == code.solver and mirror.grad == code.grad
        keep = {"data": code.train.data, "val_every": code.train.val_every, "steps": code.train.steps}
        assert replace(mirror.train, **keep) == code.train, preset


def test_unfinished_run_resumes_and_finished_run_is_reused(ctx, monkeypatch):
    from nerd.train import train

    cfg = base_config(ctx, "equilibrium", "noise-s25")
    run_dir = ctx.out / "equilibrium" / "runs" / "smoke-noise-s25"
    train(cfg, out=run_dir, stop_after=1, progress=False)
    run = train_run(ctx, "equilibrium", "noise-s25", cfg)
    assert load_checkpoint(run.dir / "last.pt")["step"] == cfg.train.steps
    assert [int(r["step"]) for r in run.curve()] == [1, 2, 3]

    def no_training(*_a, **_k):
        raise AssertionError("a finished run must not be trained again")

    monkeypatch.setattr("nerd.train.train", no_training)
    assert train_run(ctx, "equilibrium", "noise-s25", cfg).dir == run_dir
    other = base_config(ctx, "equilibrium", "noise-s25", heads=1)
    with pytest.raises(ExperimentError, match="another config"):
        train_run(ctx, "equilibrium", "noise-s25", other)


def test_interrupted_training_raises_keyboard_interrupt(ctx, monkeypatch):
    from nerd import train as train_module

    real = train_module.train
    monkeypatch.setattr("nerd.train.train", lambda cfg, **kw: real(cfg, **{**kw, "stop_after": 1}))
    cfg = base_config(ctx, "blocks", "nl", blocks="nl")
    with pytest.raises(KeyboardInterrupt):
        train_run(ctx, "blocks", "nl", cfg)
    assert (ctx.out / "blocks" / "runs" / "smoke-nl" / "last.pt").exists()


def test_diverged_run_is_scored_with_its_best_weights_and_not_retrained(ctx, monkeypatch):
    calls = {"n": 0}
    real = torch.nn.functional.mse_loss

    def poisoned(a, b):
        calls["n"] += 1
        return real(a, b) * (float("nan") if calls["n"] == 3 else 1.0)

    monkeypatch.setattr("nerd.train.F.mse_loss", poisoned)
    cfg = base_config(ctx, "blocks", "nl", blocks="nl")
    run = train_run(ctx, "blocks", "nl", cfg)
    assert run.diverged and "loss is nan" in run.diverged and run.weights.exists()
    monkeypatch.setattr("nerd.train.train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    again = train_run(ctx, "blocks", "nl", cfg)
    assert again.diverged == run.diverged and again.summary()["diverged"] == run.diverged


def test_a_run_is_scored_with_its_best_weights_not_its_last(ctx, monkeypatch):
    # Smoke runs improve at every step, so there best = last; here validation is made to say that the first was best.
    from nerd import train as train_module
    from nerd.lab.experiments.core import evaluate_on, test_scores
    from nerd.models import create_model

    real = train_module.validate
    calls = {"n": 0}

    def worsening(*a, **k):
        calls["n"] += 1
        return {**real(*a, **k), "val_psnr": 50.0 - calls["n"]}

    monkeypatch.setattr("nerd.train.validate", worsening)
    cfg = base_config(ctx, "blocks", "nl", blocks="nl")
    run = train_run(ctx, "blocks", "nl", cfg)
    first = run.curve()[0]["step"]
    assert calls["n"] >= 2 and run.summary()["best_val"]["step"] == first
    last = load_checkpoint(run.dir / "last.pt")
    assert last["step"] > first
    model = create_model(cfg.model)
    model.load_state_dict(last["model"])
    sigma = cfg.train.sigma[0]
    scored = test_scores(ctx, run)["means"]["psnr"]
    assert scored == pytest.approx(evaluate_on(ctx, run.load(), sigma)["means"]["psnr"], abs=1e-9)
    assert abs(scored - evaluate_on(ctx, model, sigma)["means"]["psnr"]) > 1e-3  # the last weights score otherwise


# --- experiments end to end (smoke) -----------------------------------------------------------------------------


def _check_outputs(ctx: Context, name: str) -> dict:
    for suffix in (".json", ".md", ".png"):
        assert (ctx.out / f"{name}{suffix}").is_file(), suffix
    result = json.loads((ctx.out / f"{name}.json").read_text())
    assert result["name"] == name and result["preset"] == "smoke"
    assert result["verdict"] == NOT_MEASURABLE  # smoke measures nothing
    assert result["claims"] and all(c["status"] == NOT_MEASURABLE for c in result["claims"])
    md = (ctx.out / f"{name}.md").read_text()
    assert "**Verdict: not measurable at this scale**" in md and f"({result['paper']})" in md
    return result


def _check_runs(result: dict, n: int, ctx=None) -> None:
    runs = result["data"]["runs"]
    assert len(runs) == n
    for r in runs.values():
        assert r["curve"] and r["final_val"]["val_psnr"] > 0 and r["steps"] == 3
        assert r["test"]["images"] == 2 and r["test"]["means"]["psnr"] > 0
        assert r["config"]["train"]["seed"] == 0 and r["config"]["train"]["steps"] == 3
        if ctx is not None:  # the recorded test figure is the run's best weights scored again, not some other model
            from nerd.lab.experiments.core import evaluate_on
            from nerd.weights import load_weights

            model, info = load_weights(Path(r["run_dir"]) / "best.safetensors")
            again = evaluate_on(ctx, model, info["sigma"])
            assert again["means"]["psnr"] == pytest.approx(r["test"]["means"]["psnr"], abs=1e-6)


def test_equilibrium_end_to_end_and_rerun_is_cached(ctx, monkeypatch):
    result = run_experiment("equilibrium", ctx)
    _check_outputs(ctx, "equilibrium")
    _check_runs(result, 2, ctx)
    assert "30.84/0.8736" in (ctx.out / "equilibrium.md").read_text()  # the paper's Table IV next to ours
    monkeypatch.setattr("nerd.train.train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    monkeypatch.setattr("nerd.lab.experiments.core.evaluate_on",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-evaluated")))
    again = run_experiment("equilibrium", ctx)
    assert again["data"]["runs"]["noise-s25"]["test"] == result["data"]["runs"]["noise-s25"]["test"]


def test_convergence_end_to_end(ctx, weights):
    ctx.weights = str(weights)
    result = run_experiment("convergence", ctx)
    _check_outputs(ctx, "convergence")
    solvers = result["data"]["solvers"]
    assert set(solvers) == {"broyden", "plain"}
    assert all(len(s["trace"]) == BUDGETS["smoke"].trace_iters for s in solvers.values())


def test_features_end_to_end(ctx, weights):
    ctx.weights = str(weights)
    result = run_experiment("features", ctx)
    _check_outputs(ctx, "features")
    pngs = {p.name for p in (ctx.out / "features").glob("*.png")}
    assert {"decode_zstar.png", "decode_s.png", "clean.png", "noisy.png"} <= pngs
    assert {"attention_flat_head1.png", "attention_edge_head2.png"} <= pngs
    assert set(result["data"]["attention"]) == {"flat", "edge"}
    assert len(result["data"]["attention"]["flat"]["heads"]) == 2


def test_depth_end_to_end(ctx, weights):
    ctx.weights = str(weights)
    result = run_experiment("depth", ctx)
    _check_outputs(ctx, "depth")
    assert result["data"]["reports"]["25"]["images"] == 2


def test_missing_weights_is_an_experiment_error(ctx):
    ctx.weights = str(ctx.out / "nope.safetensors")
    with pytest.raises(ExperimentError, match="--weights"):
        run_experiment("convergence", ctx)


@pytest.mark.parametrize("name,n", [("postnorm", 2), ("heads", 3), ("blocks", 3), ("phantom", 2)])
def test_training_experiments_end_to_end(ctx, name, n):
    result = run_experiment(name, ctx)
    _check_outputs(ctx, name)
    _check_runs(result, n, ctx)


def test_postnorm_measures_zstar_and_noise_levels(ctx):
    result = run_experiment("postnorm", ctx)
    data = result["data"]
    assert len(data["noise_levels"]["post-norm"]) == BUDGETS["smoke"].solver_iters
    assert all(len(r["test"]["zstar_norm"]) == 2 for r in data["runs"].values())


def test_neighbourhood_trains_subset_and_sweeps_all(ctx):
    result = run_experiment("neighbourhood", ctx)
    _check_outputs(ctx, "neighbourhood")
    assert set(result["data"]["runs"]) == {"q50", "q65"}
    assert set(result["data"]["inference_sweep"]) == {"q50", "q55", "q60", "q65", "q70"}


def test_iterations_sweeps_both_models(ctx):
    result = run_experiment("iterations", ctx)
    _check_outputs(ctx, "iterations")
    sweep = result["data"]["sweep"]
    assert set(sweep) == {"nerd", "unrolled-K2"}
    assert set(sweep["nerd"]) == {"N1", "N2", "N4", "N8"}
    assert all(r["means"]["nfe"] == int(k[1:]) + 1 for k, r in sweep["nerd"].items())  # tol 0: N updates + check


def test_unrolled_at_runs_exactly_n_iterations():
    from nerd.config import GradConfig
    from nerd.deq import unrolled
    from nerd.lab.experiments.iterations import UnrolledAt
    from nerd.models import create_model

    torch.manual_seed(0)
    model = create_model("tiny", grad=GradConfig(mode="unrolled", steps=2, damping=0.8)).eval()
    y = torch.rand(1, 1, 12, 10)
    with torch.no_grad():
        s = model.inject(y)
        z = unrolled(lambda z: model.layer(z, s), torch.zeros_like(s), steps=5, damping=0.8)
        want = y + model.decode(z)
    torch.testing.assert_close(UnrolledAt(model, 5)(y, 0.1), want, rtol=1e-5, atol=1e-6)
    assert model.grad.steps == 2  # the original model is left alone


# --- summary and CLI --------------------------------------------------------------------------------------------


def test_markdown_summary(ctx, weights, tmp_path):
    assert "No experiment results" in markdown_summary(tmp_path / "empty")
    ctx.weights = str(weights)
    run_experiment("convergence", ctx)
    text = markdown_summary(ctx.out)
    assert "| convergence | Fig. 10 |" in text and "not measurable at this scale" in text
    assert "### convergence" in text and "convergence.png" in text
    from nerd.lab.experiments.report import link_prefix

    assert link_prefix(REPO / "results" / "experiments", REPO) == "results/experiments/"
    assert link_prefix(REPO / "results" / "experiments", REPO / "docs") == "../results/experiments/"  # docs' links
    assert link_prefix(ctx.out) == f"{ctx.out.as_posix()}/"
    assert str(REPO) not in markdown_summary(REPO / "results" / "nothing-here")


def test_cli_list_and_user_errors(synth, tmp_path, capsys):
    assert main(["experiment", "list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in EXPERIMENTS)
    assert main(["experiment", "heads", "--preset", "smoke", "--limit", "0", "--data", str(synth)]) == 2
    assert "--limit" in capsys.readouterr().err
    assert main(["experiment", "heads", "--preset", "smoke", "--data", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "Train400 folder not found" in capsys.readouterr().err
    assert main(["experiment", "depth", "--preset", "smoke", "--data", str(synth), "--out", str(tmp_path / "o"),
                 "--weights", "no-such-weights"]) == 2
    assert "unknown weights" in capsys.readouterr().err


def test_cli_runs_an_experiment(synth, tmp_path, weights, capsys):
    code = main(["experiment", "convergence", "--preset", "smoke", "--data", str(synth), "--out",
                 str(tmp_path / "cli"), "--weights", str(weights), "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "convergence (Fig. 10) [smoke]: not measurable at this scale" in out
    assert "paper broyden < plain" in out
    assert (tmp_path / "cli" / "convergence.json").is_file()
