"""Inference-time settings of shipped NERD weights, scored on the held-out Train400 images (never a test set).

    python scripts/probe_inference.py --sigma 25 --threads 2            # all variants, about 25 minutes on 2 cores
    python scripts/probe_inference.py --sigma 25 --only it17 q41        # some of them

Whole held-out images (the last 8 of Train400, 180x180) with the training run's fixed validation noise. Variants:
solver budgets (`it8`, `it17`, `it30`: 30 steps at tol 1e-4), attention windows wider or narrower than trained
(`q25` .. `q65`: the attention has no position bias, so q can change at inference), and the geometric
self-ensemble (`x2`, `x4`, `x8`: the mean over that many of the 8 rotations/flips, each undone), tiled inference
(`tile64`, `tile96`: overlapping tiles of the training crop's scale, averaged where they overlap: does GroupNorm's
whole-image statistic differ from the crops'?), BatchNorm statistics re-estimated on 720 training crops with the
inference solver (`bn`: training accumulated them over 6-iteration solves), and the mean of the weights with another
file of the same model (`soup`, with `--soup PATH`). Prints the mean PSNR (dB), per-image PSNRs and seconds per
variant. A probe for the issue's notes, not a benchmark.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import replace
from pathlib import Path

import torch

from nerd.data.patches import PatchSampler, dihedral, load_folder, undo_dihedral, validation_pairs
from nerd.metrics import psnr
from nerd.paths import data_root
from nerd.weights import load_weights


def ensemble(model, y: torch.Tensor, sigma: float, solver, passes: int) -> torch.Tensor:  # noqa: ANN001
    """Mean of `passes` dihedral transforms of y, each denoised and transformed back."""
    outs = [undo_dihedral(model.equilibrium(dihedral(y, k), sigma, solver=solver).x_hat, k) for k in range(passes)]
    return torch.stack(outs).mean(0)


def tiled(model, y: torch.Tensor, sigma: float, solver, tile: int, overlap: int = 16) -> torch.Tensor:  # noqa: ANN001
    """Denoise y in overlapping tile x tile pieces and average them where they overlap."""

    def starts(n: int) -> list[int]:
        first = list(range(0, max(n - tile, 0) + 1, tile - overlap))
        return first if first[-1] + tile >= n else [*first, n - tile]

    out, count = torch.zeros_like(y), torch.zeros_like(y)
    for i in starts(y.shape[-2]):
        for j in starts(y.shape[-1]):
            part = (..., slice(i, i + tile), slice(j, j + tile))
            out[part] += model.equilibrium(y[part], sigma, solver=solver).x_hat
            count[part] += 1
    return out / count


def reestimated_bn(model, train: list[torch.Tensor], sigma255: float, batches: int = 60, batch: int = 12):  # noqa: ANN001, ANN201
    """A copy of `model` whose BatchNorm running statistics are the plain mean over `batches` noisy 64^2 training
    crops, each solved with the model's inference solver (no weights change)."""
    m = copy.deepcopy(model)
    norms = [mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
        bn.train()
    sampler = PatchSampler(train, 64, (sigma255,), torch.Generator().manual_seed(123))
    with torch.no_grad():
        for _ in range(batches):
            m(sampler.sample(batch)[1])
    return m.eval()


def soup(model, path: str):  # noqa: ANN001, ANN201
    """A copy of `model` with the mean of its weights and those of `path` (same architecture)."""
    other, _ = load_weights(path)
    mine, theirs = model.state_dict(), other.state_dict()
    m = copy.deepcopy(model)
    m.load_state_dict({k: (v + theirs[k]) / 2 if v.is_floating_point() else v for k, v in mine.items()})
    return m.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sigma", type=float, default=25.0)
    p.add_argument("--weights", default=None, help="default: the shipped nerd-s<sigma>")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--only", nargs="+", default=None, help="variant names (default: all)")
    p.add_argument("--soup", default=None, help="weights to average with (variant `soup`; skipped without it)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train, val, _ = load_folder(Path(data_root()) / "Train400", 8)
    pairs = validation_pairs(val, args.sigma, 0)
    model, info = load_weights(args.weights or f"nerd-s{args.sigma:g}")
    base, attn = model.solver, model.layer.msa
    variants = {
        "it17": dict(), "it8": dict(solver=replace(base, max_iter=8, memory=8)),
        "it30": dict(solver=replace(base, max_iter=30, memory=30, tol=1e-4)),
        **{f"q{q}": dict(window=q) for q in (25, 41, 49, 65)},
        **{f"x{n}": dict(passes=n) for n in (2, 4, 8)},
        "tile64": dict(tile=64), "tile96": dict(tile=96), "bn": dict(bn=True),
        **({"soup": dict(soup=args.soup)} if args.soup else {}),
    }
    print(f"{info['name']} ({info['sha256'][:12]}), sigma {args.sigma:g}, trained window {attn.window}", flush=True)
    for name in args.only or list(variants):
        v = variants[name]
        trained = attn.window
        attn.window = v.get("window", trained)
        start = time.perf_counter()
        m = model
        if v.get("bn"):
            m = reestimated_bn(model, train, args.sigma)
        elif "soup" in v:
            m = soup(model, v["soup"])
        solver = v.get("solver", base)
        with torch.no_grad():
            if "tile" in v:
                x_hats = [tiled(m, y, args.sigma / 255, solver, v["tile"]) for _, y in pairs]
            else:
                x_hats = [ensemble(m, y, args.sigma / 255, solver, v.get("passes", 1)) for _, y in pairs]
            scores = [psnr(x_hat, x) for x_hat, (x, _) in zip(x_hats, pairs, strict=True)]
        attn.window = trained
        print(f"{name}: {sum(scores) / len(scores):.4f} dB ({time.perf_counter() - start:.0f} s)  "
              + " ".join(f"{s:.2f}" for s in scores), flush=True)


if __name__ == "__main__":
    main()
