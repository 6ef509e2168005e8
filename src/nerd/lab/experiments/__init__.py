"""The paper's experiments (Sec. VII), one command each: `nerd experiment NAME --preset smoke|quick|paper`.

Each experiment trains or loads what it needs, writes ``<out>/<name>.json`` (settings, curves, validation and test
figures), ``<out>/<name>.md`` (the paper's figures next to ours, with a verdict) and ``<out>/<name>.png``, and
prints the paper's ordering next to ours: "reproduced", "not reproduced" or "not measurable at this scale"
(`nerd.lab.experiments.verdict`). Training runs live in ``<out>/<name>/runs/`` and resume when re-run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nerd.lab.experiments.core import BUDGETS, PRESETS, Context, ExperimentError


@dataclass(frozen=True)
class Experiment:
    name: str
    paper: str
    title: str
    module: str
    trains: bool

    def function(self) -> Callable[[Context], Any]:
        import importlib

        return getattr(importlib.import_module(f"nerd.lab.experiments.{self.module}"), self.name)


EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (
    Experiment("equilibrium", "Table IV, Fig. 7", "noise vs image as the equilibrium; learning curves",
               "equilibrium", True),
    Experiment("postnorm", "Table V, Fig. 8", "with / without post-normalisation; norm, variance, noise level",
               "equilibrium", True),
    Experiment("heads", "Table VI", "1 / 4 / 8 attention heads", "ablations", True),
    Experiment("blocks", "Table VII", "NL only / Trans only / both", "ablations", True),
    Experiment("neighbourhood", "Table VIII", "neighbourhood size q at training and inference", "ablations", True),
    Experiment("phantom", "Fig. 11", "T and lambda of the phantom gradient", "ablations", True),
    Experiment("iterations", "Fig. 1", "PSNR vs inference iterations: NERD vs an unrolled model", "iterations",
               True),
    Experiment("convergence", "Fig. 10", "residual per f-evaluation: Broyden vs plain iteration", "probes", False),
    Experiment("features", "Fig. 6, Fig. 9", "decoded z* and s; attention maps of the heads", "probes", False),
    Experiment("depth", "Table III", "shipped weights on Middlebury 2006 depth maps", "depth", False),
)}


def run_experiment(name: str, ctx: Context) -> dict[str, Any]:
    """Run experiment `name` in `ctx` and write its JSON, markdown and figure; returns the JSON dict."""
    from nerd.lab.experiments.report import write_outcome

    if name not in EXPERIMENTS:
        raise ExperimentError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    outcome = EXPERIMENTS[name].function()(ctx)
    return write_outcome(ctx, outcome)


def markdown_summary(out_dir: Any, base: Any = None) -> str:
    """Every finished experiment in `out_dir` as markdown (a summary table, then each one), links relative to the
    folder `base` of the page that shows it (default: the working folder)."""
    from nerd.lab.experiments.report import markdown_summary as render

    return render(out_dir, base=base)


__all__ = ["BUDGETS", "EXPERIMENTS", "PRESETS", "Context", "Experiment", "ExperimentError", "markdown_summary",
           "run_experiment"]
