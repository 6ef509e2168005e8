"""What every experiment shares: the presets' budgets, the context of one invocation, resumable training runs,
cached measurements and the test-set evaluation.

A training run of experiment E, variant V lives in ``<out>/E/runs/<preset>-V/`` (the folder `nerd.train.train`
writes). Re-running an experiment skips finished runs, resumes unfinished ones from ``last.pt`` and refuses a folder
whose config differs from the requested one. Measurements made on a run (test scores, sweeps) are cached in its
``measurements.json``, stamped with the checksum of the weights they were made with.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from nerd.config import Config, GradConfig, ModelConfig, SolverConfig, TrainConfig, config_to_dict
from nerd.errors import ExperimentError
from nerd.models.presets import preset_config

PRESETS = ("smoke", "quick", "paper")
PAPER_CROP = 64  # the paper's training crop: neighbourhood sizes are scaled by crop / 64 at smaller presets
FIGURE_IMAGE = "05.png"  # Monarch, the Set12 image of the paper's Fig. 1, 6 and 8


@dataclass(frozen=True)
class Budget:
    """How big one preset's runs are. `steps` 0 means the paper's epochs; `resolution` None: measures nothing.

    Attributes:
        model: model preset; `heads` / `window` override it (the window is the paper's q = 65 scaled to the crop).
        steps: optimiser steps of every run (`steps_for` overrides per experiment; every variant of one
            comparison gets the same steps and seed).
        val_points: validations per run (the learning curve's points).
        solver_iters: Broyden iterations for validation and test (and training unless `train_iters`).
        infer_iters: solver iterations for the weight-based experiments (None: the weights' own solver).
        test_limit: Set12 images scored (None: all 12). quick: the seven 256 x 256 ones, since the five 512 x 512
            ones would take 70% of the test time; comparisons are paired (same images, same noise).
        figure_crop: centre crop of the figure image for the weight-based figures (0: whole image).
        resolution: the smallest PSNR difference (dB) we treat as measured; None at the smoke scale.
        unroll: K, the iterations of the unrolled (explicit) baseline of `iterations`.
        sweep: inference iteration counts of `iterations`; `trace_iters`: f-evaluations of `convergence`.
    """

    model: str
    heads: int
    crop: int
    batch: int
    steps: int
    val_images: int
    val_points: int
    val_crop: int
    solver_iters: int
    train_iters: int
    phantom: tuple[int, float]
    resolution: float | None
    unroll: int
    sweep: tuple[int, ...]
    trace_iters: int
    test_limit: int | None = None
    figure_crop: int = 0
    infer_iters: int | None = None
    steps_for: dict[str, int] = field(default_factory=dict)
    sigmas_for: dict[str, tuple[float, ...]] = field(default_factory=dict)
    lr: float = 1e-3

    def window(self, q_paper: int = 65) -> int:
        """The paper's neighbourhood size q scaled to this crop, as an odd number: 2 floor(q s / 2) + 1."""
        return 2 * math.floor(q_paper * self.crop / PAPER_CROP / 2) + 1


BUDGETS: dict[str, Budget] = {
    "smoke": Budget(model="tiny", heads=2, crop=16, batch=2, steps=3, val_images=2, val_points=2, val_crop=32,
                    solver_iters=4, train_iters=0, phantom=(2, 0.8), resolution=None, unroll=2, sweep=(1, 2, 4, 8),
                    trace_iters=8, test_limit=2, figure_crop=64, infer_iters=4,
                    sigmas_for={"equilibrium": (25.0,), "depth": (25.0,)}),
    "quick": Budget(model="xs", heads=4, crop=32, batch=4, steps=500, val_images=8, val_points=10, val_crop=64,
                    solver_iters=17, train_iters=0, phantom=(8, 0.8), resolution=0.1, unroll=4,
                    sweep=(1, 2, 4, 8, 17, 32), trace_iters=30, test_limit=7,
                    steps_for={"equilibrium": 500, "postnorm": 1000, "heads": 800, "blocks": 800,
                               "neighbourhood": 500, "phantom": 400, "iterations": 800},
                    sigmas_for={"equilibrium": (25.0, 50.0), "depth": (15.0, 25.0, 50.0)}),
    "paper": Budget(model="paper", heads=4, crop=64, batch=4, steps=0, val_images=8, val_points=100, val_crop=0,
                    solver_iters=17, train_iters=0, phantom=(8, 0.8), resolution=0.02, unroll=12,
                    sweep=(1, 2, 4, 8, 12, 17, 24, 32, 48), trace_iters=40,
                    sigmas_for={"equilibrium": (15.0, 25.0, 50.0), "depth": (15.0, 25.0, 50.0)}),
}


@dataclass
class Context:
    """One invocation: preset, output folder, data folders and overrides.

    Attributes:
        data: the data root holding Train400, Set12 and Middlebury2006; the *_dir fields override its folders.
        limit: test images scored (None: the preset's default).
        weights: weights (shipped name or .safetensors path) of convergence / features / depth.
        steps: optimiser steps of every training run (None: the preset's).
        resolution: overrides the preset's resolution (dB).
    """

    preset: str
    out: Path
    data: Path
    train_dir: Path | None = None
    test_dir: Path | None = None
    depth_dir: Path | None = None
    limit: int | None = None
    weights: str | None = None
    steps: int | None = None
    device: str | None = None
    seed: int = 0
    resolution: float | None = None
    progress: bool = True
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr, flush=True))

    def __post_init__(self) -> None:
        if self.preset not in BUDGETS:
            raise ExperimentError(f"unknown preset {self.preset!r}; choose {', '.join(PRESETS)}")
        self.out = Path(self.out)
        self.data = Path(self.data)

    @property
    def dev(self) -> str:
        """Where models run: the --device, else cuda when available."""
        if self.device:
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def budget(self) -> Budget:
        return BUDGETS[self.preset]

    @property
    def res(self) -> float | None:
        """The resolution of PSNR comparisons (dB), None at the smoke scale unless overridden."""
        return self.resolution if self.resolution is not None else self.budget.resolution

    def folder(self, which: str) -> Path:
        """The Train400 / Set12 / Middlebury2006 folder, checked to exist."""
        explicit = {"Train400": self.train_dir, "Set12": self.test_dir, "Middlebury2006": self.depth_dir}[which]
        path = Path(explicit) if explicit else self.data / which
        if not path.is_dir():
            raise ExperimentError(f"{which} folder not found: {path} (set --data or NERD_DATA)")
        return path.resolve()

    def test_images(self) -> list[Path]:
        from nerd.io import list_images

        images = list_images(self.folder("Set12"))
        if not images:
            raise ExperimentError(f"no images in {self.folder('Set12')}")
        return images

    def test_limit(self) -> int | None:
        return self.limit if self.limit is not None else self.budget.test_limit

    def figure_image(self) -> Path:
        """Monarch (05.png) when the test folder has it, else its first image."""
        images = self.test_images()
        return next((p for p in images if p.name == FIGURE_IMAGE), images[0])

    def steps_for(self, exp: str) -> int:
        return self.steps if self.steps is not None else self.budget.steps_for.get(exp, self.budget.steps)

    def sigmas_for(self, exp: str) -> tuple[float, ...]:
        return self.budget.sigmas_for.get(exp, (25.0,))

    def settings(self) -> dict[str, Any]:
        """The invocation's settings, for the results JSON."""
        return {"preset": self.preset, "out": str(self.out), "data": str(self.data),
                "train_dir": str(self.train_dir or ""), "test_dir": str(self.test_dir or ""),
                "depth_dir": str(self.depth_dir or ""), "limit": self.limit, "weights": self.weights,
                "steps": self.steps, "device": self.device, "seed": self.seed, "resolution": self.res,
                "budget": asdict(self.budget)}


def base_config(ctx: Context, exp: str, variant: str, *, sigma255: float = 25.0, grad: GradConfig | None = None,
                solver: SolverConfig | None = None, **model: Any) -> Config:
    """The preset's recipe for one variant: its model preset (paper's 4 heads, q scaled to the crop), Broyden,
    phantom gradient (T, lambda), AdamW lr 1e-3 with cosine decay, the experiment's steps and the context's seed;
    `model` overrides fields of the ModelConfig."""
    from nerd.io import list_images

    b = ctx.budget
    try:
        mcfg: ModelConfig = preset_config(b.model, **{"heads": b.heads, "window": b.window(), **model})
    except (KeyError, ValueError) as err:
        raise ExperimentError(f"{exp}/{variant}: {err}") from None
    train_dir = ctx.folder("Train400")
    steps = ctx.steps_for(exp)
    n_train = max(1, len(list_images(train_dir)) - b.val_images)
    t = TrainConfig(data=str(train_dir), sigma=(float(sigma255),), crop=b.crop, batch=b.batch, steps=steps, lr=b.lr,
                    val_images=b.val_images, val_crop=b.val_crop, val_every=1, seed=ctx.seed,
                    train_iters=b.train_iters, log_every=max(1, min(10, steps or 10)), checkpoint_minutes=2.0)
    t = replace(t, val_every=max(1, t.total_steps(n_train) // b.val_points))
    return Config(model=mcfg, solver=solver or SolverConfig(name="broyden", max_iter=b.solver_iters, tol=1e-3),
                  grad=grad or GradConfig(mode="phantom", steps=b.phantom[0], damping=b.phantom[1]), train=t,
                  name=f"{exp}-{variant}")


def _normal(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


@dataclass
class Run:
    """A finished training run: its folder and config; its curve, logs and weights on disk."""

    variant: str
    dir: Path
    cfg: Config
    diverged: str | None = None  # the NonFiniteLoss message when training stopped on a non-finite loss

    @property
    def weights(self) -> Path:
        return self.dir / "best.safetensors"

    def curve(self) -> list[dict[str, float]]:
        """Validation rows (step, cpu_s, val_psnr, nfe, rel_residual, converged) as floats."""
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in _read_csv(self.dir / "val.csv")]

    def summary(self) -> dict[str, Any]:
        """Settings, learning curve, training cost and the final / best validation figures."""
        curve = self.curve()
        log = _read_csv(self.dir / "log.csv")
        last = log[-1] if log else {}
        best = max(curve, key=lambda r: r["val_psnr"]) if curve else {}
        return {"run_dir": str(self.dir), "config": config_to_dict(self.cfg), "curve": curve,
                "final_val": curve[-1] if curve else {}, "best_val": best,
                "steps": int(float(last.get("step", 0) or 0)), "cpu_s": float(last.get("cpu_s", 0) or 0),
                "elapsed_s": float(last.get("elapsed_s", 0) or 0),
                "final_loss": float(last["loss"]) if last.get("loss") else None, "diverged": self.diverged}

    def load(self, device: str | None = None):  # noqa: ANN201 -- a DEQDenoiser
        from nerd.weights import load_weights

        model, _ = load_weights(self.weights, device=device or "cpu")  # callers pass ctx.dev
        return model

    def memo(self, key: str, fn: Callable[[], Any]) -> Any:
        """fn() cached in measurements.json under `key`, valid while best.safetensors is unchanged."""
        from nerd.weights import read_metadata

        return memo(self.dir / "measurements.json", key, read_metadata(self.weights)["sha256"], fn)


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def memo(path: Path, key: str, stamp: str, fn: Callable[[], Any]) -> Any:
    """A JSON cache: return the value stored under `key` if it was stored with `stamp`, else compute and store it."""
    cache: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    entry = cache.get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp:
        return entry["value"]
    value = _normal(fn())
    cache = json.loads(path.read_text()) if path.exists() else {}
    cache[key] = {"stamp": stamp, "value": value}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(cache, indent=1))
    tmp.replace(path)
    return value


def train_run(ctx: Context, exp: str, variant: str, cfg: Config) -> Run:
    """Train variant `variant` of experiment `exp`, or resume it, or reuse it when finished."""
    from nerd.checkpoint import load_checkpoint
    from nerd.io import list_images
    from nerd.train import NonFiniteLoss, train

    run_dir = ctx.out / exp / "runs" / f"{ctx.preset}-{variant}"
    ckpt, marker = run_dir / "last.pt", run_dir / "diverged.txt"
    n_train = len(list_images(cfg.train.data)) - cfg.train.val_images
    total = cfg.train.total_steps(n_train)
    resume = False
    if ckpt.exists() or marker.exists():
        saved = json.loads((run_dir / "config.json").read_text())
        if saved != _normal(config_to_dict(cfg)):
            raise ExperimentError(f"{run_dir} holds a run with another config (an earlier preset, --steps or "
                                  "--data?): delete it or choose another --out")
    if marker.exists():
        return _diverged(ctx, exp, Run(variant, run_dir, cfg, marker.read_text().strip()))
    if ckpt.exists():
        step = load_checkpoint(ckpt)["step"]  # runs no code from the file; WeightsError for a damaged one
        if step >= total and (run_dir / "best.safetensors").exists():
            return Run(variant, run_dir, cfg)
        resume = True
        ctx.log(f"{exp}/{variant}: resuming at step {step} of {total}")
    else:
        for stale in ("log.csv", "val.csv", "measurements.json"):  # a start killed before its first checkpoint
            (run_dir / stale).unlink(missing_ok=True)
        ctx.log(f"{exp}/{variant}: training {total} steps -> {run_dir}")
    try:
        train(cfg, out=run_dir, resume=resume, device=ctx.device, progress=ctx.progress)
    except NonFiniteLoss as err:  # a result, not a failure: the variant is scored with its best weights
        marker.write_text(f"{err}\n")
        return _diverged(ctx, exp, Run(variant, run_dir, cfg, str(err)))
    step = load_checkpoint(ckpt)["step"]
    if step < total:  # stopped by a signal: the checkpoint is kept, the same command resumes it
        ctx.log(f"{exp}/{variant}: stopped at step {step} of {total}; re-run the same command to resume")
        raise KeyboardInterrupt
    return Run(variant, run_dir, cfg)


def _diverged(ctx: Context, exp: str, run: Run) -> Run:
    """A run whose loss became non-finite: usable through its best validation weights, if it has any."""
    if not run.weights.exists():
        raise ExperimentError(f"{exp}/{run.variant}: training diverged before its first validation ({run.diverged});"
                              f" delete {run.dir} to retry")
    ctx.log(f"{exp}/{run.variant}: training diverged ({run.diverged}); scoring its best validation weights")
    return run


def evaluate_on(ctx: Context, method: Any, sigma255: float, *, solver: SolverConfig | None = None,
                images: Sequence[Path] | None = None, limit: int | None | str = "default", name: str = "nerd",
                set_name: str = "Set12") -> dict[str, Any]:
    """`nerd.evaluate.evaluate` on the test set (or `images`): the report as a dict (means, per-image rows)."""
    from nerd.evaluate import evaluate

    lim = ctx.test_limit() if limit == "default" else limit
    report = evaluate(method, images if images is not None else ctx.test_images(), sigma255, set_name=set_name,
                      progress=ctx.progress, solver=solver, method_name=name, limit=lim)  # type: ignore[arg-type]
    out = report.to_dict()
    out.pop("protocol", None)
    return out


def test_key(ctx: Context, sigma255: float, extra: str = "") -> str:
    """Cache key of a test evaluation: folder, sigma255, image limit and anything else that changes it."""
    return f"{ctx.folder('Set12').name}-s{sigma255:g}-limit{ctx.test_limit()}{('-' + extra) if extra else ''}"


def test_scores(ctx: Context, run: Run, sigma255: float | None = None) -> dict[str, Any]:
    """The run's best-validation weights scored on the test set at its own sigma255 (cached)."""
    s = sigma255 if sigma255 is not None else run.cfg.train.sigma[0]
    return run.memo(test_key(ctx, s), lambda: evaluate_on(ctx, run.load(ctx.dev), s))


def means(report: dict[str, Any]) -> tuple[float, float]:
    """(PSNR, SSIM) means of an evaluation dict."""
    return float(report["means"]["psnr"]), float(report["means"]["ssim"])
