"""`nerd experiment NAME`: one table or figure of the paper's Sec. VII, trained / evaluated and judged.

Writes ``<out>/<NAME>.json``, ``.md`` and ``.png`` and prints the paper's ordering next to ours with a verdict.
Re-running skips finished training runs and resumes unfinished ones (``<out>/<NAME>/runs/``).
"""

from __future__ import annotations

import argparse

NAMES = ("equilibrium", "postnorm", "heads", "blocks", "neighbourhood", "phantom", "iterations", "convergence",
         "features", "depth")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "experiment",
        help="reproduce one of the paper's tables / figures and judge it against the paper",
        description="Run one experiment of the paper's Sec. VII (or 'all', or 'list' to show them): train what it "
        "needs, score it on Set12, write <out>/<NAME>.json/.md/.png and print the verdict.",
    )
    p.add_argument("name", choices=(*NAMES, "all", "list"), metavar="NAME",
                   help=f"one of {', '.join(NAMES)}; 'all' runs them in turn; 'list' describes them")
    p.add_argument("--preset", choices=("smoke", "quick", "paper"), default="quick",
                   help="smoke: tiny, seconds (tests); quick: small models for a 2-core CPU, about an hour each; "
                   "paper: the paper's settings, for a GPU (default: quick)")
    p.add_argument("--out", default="results/experiments", metavar="DIR",
                   help="results folder (default: results/experiments)")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="data root with Train400, Set12, Middlebury2006 (default: $NERD_DATA, else ../shared/data)")
    p.add_argument("--train-dir", default=None, metavar="DIR", help="training folder (default: <data>/Train400)")
    p.add_argument("--test-dir", default=None, metavar="DIR", help="test folder (default: <data>/Set12)")
    p.add_argument("--depth-dir", default=None, metavar="DIR",
                   help="depth maps (default: <data>/Middlebury2006)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="score only the first N test images (default: smoke 2, quick 7 = Set12's 256x256 ones, "
                   "paper all)")
    p.add_argument("--weights", default=None, metavar="NAME|PATH",
                   help="convergence / features / depth: weights to use (default: shipped nerd-s<sigma>)")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="optimiser steps of every training run (default: the preset's)")
    p.add_argument("--seed", type=int, default=0, help="seed of every run (default 0)")
    p.add_argument("--resolution", type=float, default=None, metavar="DB",
                   help="smallest PSNR difference treated as measured (default: the preset's)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (1 is several times faster than 2 when another job shares a 2-core CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _context(args: argparse.Namespace):  # noqa: ANN202 -- nerd.lab.experiments.Context
    from pathlib import Path

    from nerd.cli import UserError
    from nerd.lab.experiments import Context
    from nerd.paths import data_root

    for flag, value, low in (("--limit", args.limit, 1), ("--steps", args.steps, 1)):
        if value is not None and value < low:
            raise UserError(f"{flag} must be >= {low}, got {value}")
    if args.resolution is not None and not args.resolution > 0:
        raise UserError(f"--resolution must be > 0, got {args.resolution:g}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: CUDA is not available")
    data = Path(args.data) if args.data else data_root()

    def opt(p: str | None) -> Path | None:
        return Path(p) if p else None

    return Context(preset=args.preset, out=Path(args.out), data=data, train_dir=opt(args.train_dir),
                   test_dir=opt(args.test_dir), depth_dir=opt(args.depth_dir), limit=args.limit,
                   weights=args.weights, steps=args.steps, device=args.device, seed=args.seed,
                   resolution=args.resolution, progress=not args.no_progress)


def run(args: argparse.Namespace) -> int:
    import sys

    from nerd.cli import UserError
    from nerd.lab.experiments import EXPERIMENTS, run_experiment

    if args.name == "list":
        for e in EXPERIMENTS.values():
            kind = "trains" if e.trains else "uses weights"
            print(f"{e.name:<14} {e.paper:<17} {kind:<13} {e.title}")
        return 0
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    ctx = _context(args)
    names = list(EXPERIMENTS) if args.name == "all" else [args.name]
    from nerd.errors import NerdError

    failed = []
    for name in names:
        try:
            run_experiment(name, ctx)
        except NerdError as err:  # any error of the user's: 'all' goes on with the other experiments
            if len(names) == 1:
                raise UserError(f"{name}: {err}") from None
            failed.append(f"{name}: {err}")  # 'all' goes on with the others
            print(f"nerd experiment: {name} skipped: {err}", file=sys.stderr, flush=True)
    if failed:
        raise UserError(f"{len(failed)} of {len(names)} experiments failed: " + "; ".join(failed))
    return 0
