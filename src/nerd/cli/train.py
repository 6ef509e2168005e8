"""`nerd train`: train NERD from a TOML recipe on any folder of images; resumable."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train NERD from a config (TOML); --resume continues a killed run")
    p.add_argument("--config", required=True, help="TOML recipe, e.g. configs/nerd-s25.toml")
    p.add_argument("--out", help="run folder (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--data", help="training folder (default: $NERD_DATA/Train400 or ../shared/data/Train400)")
    p.add_argument("--steps", type=int, help="override the total optimiser steps")
    p.add_argument("--device", metavar="cpu|cuda[:N]", help="default: cuda when available")
    p.add_argument("--max-minutes", type=float, help="stop with a checkpoint after this many minutes")
    p.add_argument("--max-cpu-minutes", type=float,
                   help="stop with a checkpoint once the run has used this much process CPU time in total")
    p.add_argument("--stop-after", type=int, help="stop with a checkpoint at this step (as if killed there)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still written)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nerd.cli import UserError, check_device
    from nerd.train import load_recipe, train

    if args.resume and (args.steps is not None or args.data is not None):
        raise UserError("--resume continues a run with the config saved in it; --steps/--data cannot change it")
    path = Path(args.config)
    if not path.is_file():
        raise UserError(f"config not found: {path}")
    cfg = load_recipe(path, data=args.data, steps=args.steps)  # ConfigError, one line naming the file
    out = Path(args.out) if args.out else Path("runs") / cfg.name
    if args.device is not None:
        check_device(args.device)
    # TrainError, WeightsError, NonFiniteLoss ...: all NerdError, reported in one line by `nerd.cli.main`
    run_dir = train(cfg, out=out, resume=args.resume, device=args.device, stop_after=args.stop_after,
                    max_minutes=args.max_minutes, max_cpu_minutes=args.max_cpu_minutes,
                    progress=not args.no_progress)
    # only what is there: a run stopped early may not have validated (best.safetensors, val.csv) or logged yet
    names = ("last.pt", "best.safetensors", "log.csv", "val.csv", "curve.png")
    present = [name + (" resumable" if name == "last.pt" else "") for name in names if (run_dir / name).is_file()]
    print(f"run folder: {run_dir} ({', '.join(present) or 'no files yet'})")
    return 0
