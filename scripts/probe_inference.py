"""Inference-time settings of shipped NERD weights, scored on the held-out Train400 images (never a test set).

    python scripts/probe_inference.py --sigma 25 --threads 2            # all variants, about 25 minutes on 2 cores
    python scripts/probe_inference.py --sigma 25 --only it17 q41        # some of them

Whole held-out images (the last 8 of Train400, 180x180) with the training run's fixed validation noise. Variants:
solver budgets (`it8`, `it17`, `it30`: 30 steps at tol 1e-4), attention windows wider or narrower than trained
(`q25` .. `q65`: the attention has no position bias, so q can change at inference), and the geometric
self-ensemble (`x2`, `x4`, `x8`: the mean over that many of the 8 rotations/flips, each undone). Prints the mean
PSNR (dB), per-image PSNRs and seconds per variant. A probe for the issue's notes, not a benchmark.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from nerd.data.patches import dihedral, load_folder, undo_dihedral, validation_pairs
from nerd.evaluate import default_data_root
from nerd.weights import load_weights


def psnr(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    return 10 * math.log10(1 / (x_hat.clamp(0, 1).double() - x.double()).pow(2).mean().item())


def ensemble(model, y: torch.Tensor, sigma: float, solver, passes: int) -> torch.Tensor:  # noqa: ANN001
    """Mean of `passes` dihedral transforms of y, each denoised and transformed back."""
    outs = [undo_dihedral(model.equilibrium(dihedral(y, k), sigma, solver=solver).x_hat, k) for k in range(passes)]
    return torch.stack(outs).mean(0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sigma", type=float, default=25.0)
    p.add_argument("--weights", default=None, help="default: the shipped nerd-s<sigma>")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--only", nargs="+", default=None, help="variant names (default: all)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    _, val, _ = load_folder(Path(default_data_root()) / "Train400", 8)
    pairs = validation_pairs(val, args.sigma, 0)
    model, info = load_weights(args.weights or f"nerd-s{args.sigma:g}")
    base, attn = model.solver, model.layer.msa
    variants = {
        "it17": dict(), "it8": dict(solver=replace(base, max_iter=8, memory=8)),
        "it30": dict(solver=replace(base, max_iter=30, memory=30, tol=1e-4)),
        **{f"q{q}": dict(window=q) for q in (25, 41, 49, 65)},
        **{f"x{n}": dict(passes=n) for n in (2, 4, 8)},
    }
    print(f"{info['name']} ({info['sha256'][:12]}), sigma {args.sigma:g}, trained window {attn.window}", flush=True)
    for name in args.only or list(variants):
        v = variants[name]
        trained = attn.window
        attn.window = v.get("window", trained)
        start = time.perf_counter()
        with torch.no_grad():
            scores = [psnr(ensemble(model, y, args.sigma / 255, v.get("solver", base), v.get("passes", 1)), x)
                      for x, y in pairs]
        attn.window = trained
        print(f"{name}: {sum(scores) / len(scores):.4f} dB ({time.perf_counter() - start:.0f} s)  "
              + " ".join(f"{s:.2f}" for s in scores), flush=True)


if __name__ == "__main__":
    main()
