"""`nerd export RUN --out FILE.safetensors`: a run's best (or last) weights, with config and scores as metadata.

`nerd export WEIGHTS --format onnx --iters N --out FILE.onnx`: shipped weights (a name) or a .safetensors file as an
ONNX graph of exactly N Broyden iterations, weight norm folded, dynamic height and width (`nerd.onnx_export`).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a run's weights as safetensors with config and scores in metadata, or weights as ONNX",
        description="Export a training run (or checkpoint) to .safetensors, or weights to an ONNX graph.",
        epilog="ONNX (--format onnx, or an --out ending in .onnx): RUN is a shipped weights name (see `nerd info`) or "
        "a .safetensors file; the graph runs exactly --iters Broyden iterations (default: the weights' max_iter), a "
        "sample freezing once its residual is below --tol (default: the weights' tol), so ONNX Runtime gives what "
        "`nerd denoise --iters N --tol T` gives on a whole-image solve. Input 'noisy' and output 'denoised' are "
        "(batch, 1, height, width) float32 on [0, 1], all dynamic; the output is clamped to [0, 1]. "
        "Needs pip install 'nerd[onnx]'.",
    )
    p.add_argument("run", help="run folder (runs/NAME), or a checkpoint .pt (its last.pt, or one by another "
                   "name, e.g. from git history), which is exported as --last; with --format onnx: a shipped "
                   "weights name or a .safetensors file")
    p.add_argument("--out", required=True, help="destination .safetensors (or, with --format onnx, .onnx) file")
    p.add_argument("--format", choices=["safetensors", "onnx"],
                   help="default: onnx when --out ends in .onnx, else safetensors")
    p.add_argument("--iters", metavar="N", type=int,
                   help="onnx: Broyden iterations unrolled into the graph (default: the weights' max_iter)")
    p.add_argument("--tol", metavar="T", type=float,
                   help="onnx: relative residual below which a sample stops changing (0: every iteration counts; "
                   "default: the weights' tol, as nerd denoise)")
    p.add_argument("--last", action="store_true",
                   help="export last.pt instead of the best validated weights (its moving average where the run "
                   "kept one: train.ema)")
    p.add_argument("--scores", help="JSON file of measured scores to store in the metadata (e.g. an eval result)")


def run(args: argparse.Namespace) -> int:
    fmt = args.format or ("onnx" if str(args.out).lower().endswith(".onnx") else "safetensors")
    if fmt == "onnx":
        return _run_onnx(args)
    from nerd.cli import UserError

    for option, value in (("--iters", args.iters), ("--tol", args.tol)):
        if value is not None:
            raise UserError(f"{option} applies to --format onnx only")
    return _run_safetensors(args)


def _run_onnx(args: argparse.Namespace) -> int:
    """Weights (shipped name or .safetensors) -> an ONNX file of a fixed number of Broyden iterations."""
    import time
    from pathlib import Path

    from nerd.cli import UserError
    from nerd.onnx_export import export_onnx, require

    src = Path(args.run)
    if src.suffix == ".pt" or src.is_dir():
        raise UserError(f"--format onnx exports weights (a shipped name or a .safetensors file), not {args.run}; "
                        f"export the run to .safetensors first")
    if args.last or args.scores:
        raise UserError("--last and --scores apply to a run's safetensors export, not to --format onnx")
    out = _check_out(args.out)
    require("onnx")  # before loading weights and tracing: the one-line install hint
    from nerd.weights import load_weights

    model, info = load_weights(args.run)
    iters = model.solver.max_iter if args.iters is None else args.iters
    start = time.perf_counter()
    meta = export_onnx(model, out, iters=iters, tol=args.tol,
                       metadata={"weights": info["name"], "weights_sha256": info["sha256"], "sigma": info["sigma"]})
    print(f"wrote {out} ({info['name']}, sigma {info['sigma']:g}: {meta['iters']} Broyden iterations, tol "
          f"{meta['tol']:g}, {meta['memory']} updates kept; input 'noisy', output 'denoised', (batch, 1, H, W) "
          f"float32 on [0, 1]; {time.perf_counter() - start:.0f} s)")
    return 0


def _run_safetensors(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from nerd.checkpoint import kept_weights, load_checkpoint, restore
    from nerd.cli import UserError
    from nerd.config import config_from_dict, config_to_dict
    from nerd.models import DEQDenoiser
    from nerd.weights import load_weights, save_weights

    src = Path(args.run)
    from_pt = src.suffix == ".pt"  # a checkpoint by any name (e.g. from git history): that one, as with --last
    run_dir = src.parent if from_pt else src
    if not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}")
    _check_out(args.out)
    extra = {}
    if args.scores:
        try:
            extra = json.loads(Path(args.scores).read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read scores {args.scores}: {' '.join(str(err).split())}") from None
        if not isinstance(extra, dict):
            raise UserError(f"--scores {args.scores}: a JSON object of named figures is needed, not a "
                            f"{type(extra).__name__}")
    best = run_dir / "best.safetensors"
    if not (args.last or from_pt) and best.exists():
        model, info = load_weights(best)
        scores, train_meta, sigma = {**info["scores"], **extra}, info["train"], info["sigma"]
    else:
        ckpt_path = src if from_pt else run_dir / "last.pt"
        if not ckpt_path.exists():
            raise UserError(f"checkpoint not found: {ckpt_path}" if from_pt
                            else f"no best.safetensors or last.pt in {run_dir}")
        ckpt = load_checkpoint(ckpt_path)  # runs no code from the file; WeightsError for a damaged one
        cfg = config_from_dict(ckpt["config"])
        model = DEQDenoiser(cfg.model, solver=cfg.solver, grad=cfg.grad)
        restore(model, kept_weights(ckpt), ckpt_path, "model")  # the moving average, where the run kept one
        # the run's best validation figure belongs to best.safetensors, not to these last weights
        scores = {"run_best_val_psnr": round(ckpt["best_val"], 4), "last_step": ckpt["step"], **extra}
        run = src.stem if from_pt and src.name != "last.pt" else run_dir.name  # s25d.pt: "s25d", not its folder
        train_meta = {"run": run, "step": ckpt["step"], "hours": round(ckpt["elapsed_s"] / 3600, 3),
                      "crops": ckpt["step"] * cfg.train.batch, "config": config_to_dict(cfg)}
        sigma = cfg.train.sigma[0]
    where = run_dir / "machine.json"  # runs trained before train.py wrote it into the metadata itself
    if "machine" not in train_meta and where.is_file():
        try:
            train_meta = {**train_meta, "machine": json.loads(where.read_text())}
        except (OSError, ValueError):  # a damaged note of where it trained: the weights are still the weights
            train_meta = {**train_meta, "machine": "unreadable machine.json"}
    try:
        digest = save_weights(model, args.out, sigma255=sigma, scores=scores, train=train_meta)
    except OSError as err:  # a full disk or a read-only folder, after the loading: still one line
        raise UserError(f"cannot write {args.out}: {err.strerror or err}") from None
    print(f"wrote {args.out} (sigma {sigma:g}, sha256 {digest[:16]}..., scores {scores})")
    return 0


def _check_out(out: str) -> Path:
    """The output path, refused in one line when it is a folder or its folder does not exist."""
    from pathlib import Path

    from nerd.cli import UserError

    path = Path(out)
    if path.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name")
    if not path.resolve().parent.is_dir():
        raise UserError(f"output folder not found: {path.parent}")
    return path
