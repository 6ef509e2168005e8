"""`nerd validate WEIGHTS...`: mean PSNR of weights files on the images held out of Train400 for validation.

This is the figure that decides whether a new weights file replaces a shipped one (never a test set): the same
held-out images, fixed noise and centre crops as a training run's validation (`nerd.train.validate`), computed here
in float32 on whatever device, so files trained anywhere (a GPU's TF32/bf16 run included) compare on equal terms.
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="score weights files on the held-out validation images of Train400")
    p.add_argument("weights", nargs="+", help="shipped names (nerd-s25) or .safetensors paths")
    p.add_argument("--sigma", type=float, help="noise level (0-255; default: each file's own sigma)")
    p.add_argument("--data", help="training folder (default: $NERD_DATA/Train400 or ../shared/data/Train400)")
    p.add_argument("--val-images", type=int, default=8, help="images held out: the last N by name (default 8)")
    p.add_argument("--val-crop", type=int, default=96, help="centre-crop side, 0 for whole images (default 96)")
    p.add_argument("--device", default="cpu", metavar="cpu|cuda[:N]", help="default: cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0: PyTorch's default)")
    p.add_argument("--json", help="also write the rows to this JSON file")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch

    from nerd.cli import UserError, check_device, check_sigma
    from nerd.data.patches import load_folder, validation_pairs
    from nerd.evaluate import write_text_atomic
    from nerd.paths import data_root
    from nerd.train import validate
    from nerd.weights import load_weights

    check_device(args.device)
    if args.sigma is not None:
        check_sigma(args.sigma)
    for option, value, low in (("--val-images", args.val_images, 1), ("--val-crop", args.val_crop, 0),
                               ("--threads", args.threads, 0)):
        if value < low:
            raise UserError(f"{option} must be >= {low}, got {value}")
    if args.json and not Path(args.json).resolve().parent.is_dir():  # refused before the scoring, not after it
        raise UserError(f"--json {args.json}: its folder does not exist")
    if args.threads:
        torch.set_num_threads(args.threads)
    _, val_images, val_paths = load_folder(args.data or data_root() / "Train400", args.val_images)
    device = torch.device(args.device)
    rows, pairs_by_sigma = [], {}
    for name in args.weights:
        model, info = load_weights(name, device=device)  # WeightsError: one line from `nerd.cli.main`
        sigma = args.sigma if args.sigma is not None else float(info["sigma"])
        if sigma not in pairs_by_sigma:
            pairs_by_sigma[sigma] = validation_pairs(val_images, sigma, args.val_crop)
        stats = validate(model, pairs_by_sigma[sigma], sigma, device)
        rows.append({"weights": str(name), "sha256": info.get("sha256", "")[:12], "sigma": sigma,
                     **{k: round(v, 4) for k, v in stats.items()}})
        print(f"{name}: sigma {sigma:g}, val PSNR {stats['val_psnr']:.4f} dB, nfe {stats['nfe']:.1f}, "
              f"converged {stats['converged']:.0%}", flush=True)
    if args.json:
        write_text_atomic(args.json, json.dumps({"val_images": [p.name for p in val_paths], "val_crop": args.val_crop,
                                                 "rows": rows}, indent=2, allow_nan=False) + "\n")
    return 0
