"""`nerd bench`: speed, memory and solver figures of NERD next to DnCNN-S and BM3D, in one run.

Writes ``<out>/bench-<device>[-quick].json`` (every figure, the machine, torch and thread count) and
``<out>/solvers-<device>[-quick].png``; prints every section as a table. The model is the shipped ``nerd-s25``,
or `--weights`; without either, only the sections that need no NERD weights run.
"""

from __future__ import annotations

import argparse

from nerd.lab.bench_report import SECTIONS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark speed, memory and solvers (writes results/bench/bench-<device>.json)",
        description="Benchmark NERD against DnCNN-S and BM3D on this machine: matmul limit, f-evaluation "
        "GFLOP/s, seconds per image, solvers, peak memory, adaptive stopping. Medians after warm-up.",
    )
    p.add_argument("--quick", action="store_true",
                   help="small sizes (64x64 crops, the shipped model only, 2 repeats): a few minutes on a CPU")
    p.add_argument("--out", default="results/bench", metavar="DIR", help="folder for the JSON and the plot")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)")
    p.add_argument("--weights", default=None, metavar="NAME|PATH",
                   help="NERD weights: shipped name or .safetensors path (default: nerd-s25 when shipped)")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="root of Set12 / BSD68 / Train400 (default: $NERD_DATA, else ../shared/data)")
    p.add_argument("--anchors", default=None, metavar="DIR",
                   help="folder of dncnn_sigma*.safetensors (default: $NERD_ANCHORS, else ../shared/anchors)")
    p.add_argument("--repeats", type=int, default=None, metavar="N",
                   help="timed runs per figure, after one warm-up (default: 3; --quick: 2)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch threads (default: torch's)")
    p.add_argument("--tol", type=float, default=None, metavar="T",
                   help="convergence tolerance of the tol / solver / adaptive sections (default: the model's)")
    p.add_argument("--crop", type=int, default=None, metavar="N",
                   help="centre-crop every image to N x N and cap patches at N (default: whole images; --quick: 64)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), metavar="S",
                   help=f"sections to run (default: all of {', '.join(SECTIONS)})")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="only print the markdown tables of an earlier results file, measure nothing")
    # Test knob: a randomly initialised model of a preset instead of weights (speed figures only).
    p.add_argument("--preset", default=None, help=argparse.SUPPRESS)


def _check(args: argparse.Namespace) -> None:
    from nerd.cli import UserError
    from nerd.config import SolverConfig

    if args.repeats is not None and args.repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    if args.tol is not None:
        SolverConfig().override(tol=args.tol)  # the config's own check (a ConfigError: one line, exit 2)
    if args.crop is not None and args.crop < 11:
        raise UserError(f"--crop must be >= 11 (SSIM / BM3D need room), got {args.crop}")
    if args.weights and args.preset:
        raise UserError("--weights and --preset exclude each other")


def _subject(args: argparse.Namespace, device: str):
    """The model under test (or None, with a note on stderr) from --preset, --weights or the shipped nerd-s25."""
    import sys

    from nerd.lab.bench import Subject

    if args.preset:
        import torch

        from nerd.models import create_model

        torch.manual_seed(0)
        model = create_model(args.preset)
        return Subject(model.to(device).eval(), f"{args.preset} (random weights)", 25.0, None)
    from nerd.weights import load_weights, shipped

    name = args.weights or ("nerd-s25" if "nerd-s25" in shipped() else None)
    if name is None:
        print("nerd bench: note: no shipped nerd-s25 and no --weights: NERD sections are skipped", file=sys.stderr)
        return None
    model, info = load_weights(name, device=device)
    return Subject(model, info["name"], info["sigma"], info["path"])


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from nerd.cli import UserError, check_device
    from nerd.lab.bench import BenchSettings, markdown_tables, run_bench
    from nerd.paths import data_root as find_data_root

    _check(args)
    if args.render:
        try:
            print(markdown_tables(args.render), end="")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:  # not a bench results file
            raise UserError(f"cannot render {args.render}: {err}") from None
        return 0
    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in {"repeats": args.repeats, "tol": args.tol, "crop": args.crop}.items()
                 if v is not None}
    if args.crop is not None:
        overrides["feval_image"] = args.crop
    overrides["sections"] = tuple(args.sections)
    settings = BenchSettings.standard(args.device, args.quick, **overrides)
    data_root = find_data_root(args.data)
    if {"inference", "solvers", "adaptive"} & set(args.sections) and not data_root.is_dir():
        raise UserError(f"data root {data_root} not found (set --data or NERD_DATA)")
    subject = _subject(args, args.device)
    _, path = run_bench(subject, settings, data_root=data_root, out_dir=Path(args.out), anchors=args.anchors,
                        log=lambda text: print(text, flush=True))
    print(f"wrote {path}")
    return 0
