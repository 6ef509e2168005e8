"""Refit the decoder's last convolution of shipped NERD weights by exact least squares at the inference equilibrium.

    python scripts/refit_readout.py --sigma 25 --threads 2                 # all 392 training images, resumable
    python scripts/refit_readout.py --sigma 25 --images 16 --threads 2     # a pilot on the first 16

Why: training decodes the state after a short solve (`train_iters` Broyden steps plus the phantom gradient's damped
steps, on 64^2 crops), while inference decodes z* of the 17-step solve on whole images. The decoder is
`x_hat - y = Conv3x3(ReLU(BN(z*)))`; with BN frozen, its last convolution is linear in the features
phi = ReLU(BN(z*)), so the convolution that minimises the squared error over whole training images is the solution
of one (9C + 1)-unknown least-squares problem. This script solves the equilibrium of every training image of
Train400 (the last 8 are held out, never used here) under fixed noise, accumulates the normal equations in float64
(resumable: `--state` is rewritten every few images), solves them, and scores the old and the refitted readout on the
8 held-out images (whole 180^2, the validation noise of `validation_pairs`). With `--out` it writes the refitted
weights; whether they are shipped is `nerd validate`'s call (the training run's validation crops), never a test set.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nerd.checkpoint import atomic_save, load_plain
from nerd.data.patches import load_folder, validation_pairs
from nerd.metrics import psnr
from nerd.paths import data_root
from nerd.weights import load_weights, save_weights


def features(model, y: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """phi = ReLU(BN(z*)): the last convolution's input at the inference equilibrium, (1, C, H, W)."""
    with torch.no_grad():
        return model.decode.body[:-1](model.equilibrium(y).z_star)


def design(phi: torch.Tensor) -> torch.Tensor:
    """(H*W, 9C + 1) float64 rows: the 3x3 zero-padded neighbourhoods of phi (conv2d's weight order) and a 1."""
    cols = F.unfold(phi.double(), 3, padding=1)[0].T  # (HW, C*9), index c*9 + ky*3 + kx as in weight.view(1, -1)
    return torch.cat([cols, cols.new_ones(cols.shape[0], 1)], 1)


def _is_state(state: object, n: int) -> bool:
    """`state` is an accumulator this script wrote for a (n, n) system: the fields it reads, with their types."""
    return (isinstance(state, dict) and isinstance(state.get("weights"), str)
            and all(isinstance(state.get(k), int) for k in ("done", "pixels"))
            and isinstance(state.get("A"), torch.Tensor) and state["A"].shape == (n, n)
            and isinstance(state.get("b"), torch.Tensor) and state["b"].shape == (n,))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sigma", type=float, default=25.0)
    p.add_argument("--weights", default=None, help="default: the shipped nerd-s<sigma>")
    p.add_argument("--images", type=int, default=0, help="use the first N training images (default: all)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--state", default=None, help="normal-equation accumulator (default: runs/refit-s<sigma>.pt)")
    p.add_argument("--out", default=None, help="write the refitted weights here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train, val, _ = load_folder(Path(data_root()) / "Train400", 8)
    if args.images:
        train = train[: args.images]
    model, info = load_weights(args.weights or f"nerd-s{args.sigma:g}")
    conv = model.decode.body[-1]
    state_path = Path(args.state or f"runs/refit-s{args.sigma:g}.pt")
    n = conv.in_channels * 9 + 1
    state = {"weights": info["sha256"], "done": 0, "A": torch.zeros(n, n, dtype=torch.float64),
             "b": torch.zeros(n, dtype=torch.float64), "pixels": 0}
    if state_path.exists():
        state = load_plain(state_path, "refit state")  # tensors and plain values only: runs no code from the file
        if not _is_state(state, n):
            raise SystemExit(f"{state_path} is not a refit state of this model; remove it or pass another --state")
        if state["weights"] != info["sha256"]:
            raise SystemExit(f"{state_path} was accumulated for other weights; remove it or pass another --state")
    print(f"{info['name']} ({info['sha256'][:12]}), sigma {args.sigma:g}: {state['done']} of {len(train)} images "
          "already accumulated", flush=True)
    state_path.parent.mkdir(parents=True, exist_ok=True)
    start, first = time.perf_counter(), state["done"]
    for i in range(first, len(train)):
        x = train[i][None]
        gen = torch.Generator().manual_seed(1_000_003 * int(args.sigma) + i)
        y = x + args.sigma / 255.0 * torch.randn(x.shape, generator=gen)
        u = design(features(model, y))
        state["A"] += u.T @ u
        state["b"] += u.T @ (x - y).double().flatten()
        state["pixels"] += u.shape[0]
        state["done"] = i + 1
        if state["done"] % 8 == 0 or state["done"] == len(train):
            atomic_save(state, state_path)
            rate = (time.perf_counter() - start) / (state["done"] - first)
            print(f"  {state['done']}/{len(train)} images ({rate:.1f} s an image this run)", flush=True)

    w = torch.linalg.solve(state["A"], state["b"])
    refit = copy.deepcopy(model)
    rconv = refit.decode.body[-1]
    with torch.no_grad():
        rconv.weight.copy_(w[:-1].view_as(rconv.weight).float())
        rconv.bias.copy_(w[-1:].float())
    old_w = torch.cat([conv.weight.detach().flatten(), conv.bias.detach()]).double()
    rel = ((w - old_w).norm() / old_w.norm()).item()

    rows = []
    for x, y in validation_pairs(val, args.sigma, 0):
        phi = features(model, y)
        with torch.no_grad():
            rows.append((psnr(y + conv(phi), x), psnr(y + rconv(phi), x)))
    old = sum(r[0] for r in rows) / len(rows)
    new = sum(r[1] for r in rows) / len(rows)
    report = {"weights": info["name"], "sha256": info["sha256"], "sigma": args.sigma, "train_images": state["done"],
              "pixels": state["pixels"], "relative_change": rel, "val_whole_old": old, "val_whole_refit": new,
              "val_per_image": rows}
    print(json.dumps({k: v for k, v in report.items() if k != "val_per_image"}), flush=True)
    print("per image (old -> refit): " + " ".join(f"{a:.2f}->{b:.2f}" for a, b in rows), flush=True)
    if args.out:
        train_meta = dict(info.get("train") or {})
        train_meta["readout_refit"] = {k: v for k, v in report.items() if k != "val_per_image"}
        save_weights(refit, args.out, sigma255=args.sigma, scores=info.get("scores"), train=train_meta)
        print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
