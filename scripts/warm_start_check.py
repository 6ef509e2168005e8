"""Warm starts for the self-ensemble: start each symmetry's solve from the previous one's equilibrium, turned.

    python scripts/warm_start_check.py --sigma 25      # about 3 minutes on 2 cores

The 8 images held out of Train400 (the training runs' fixed validation noise), each denoised with `--ensemble 8`
twice with the shipped weights and their own stopping rule: every symmetry's solve from z = 0 (what `nerd denoise`
does), and every solve after the first from the previous symmetry's equilibrium, turned back and into the next
symmetry. Per mode: the mean PSNR of the ensemble and the mean f-evaluations per solve. Writes
results/bench/warm-start.json, which `python tools/readme.py` renders into docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from nerd.data.patches import dihedral, load_folder, undo_dihedral, validation_pairs
from nerd.deq.core import deq_solve
from nerd.metrics import psnr
from nerd.paths import data_folder
from nerd.weights import load_weights

ROOT = Path(__file__).resolve().parents[1]
MODES = ("cold", "warm")


def ensemble(model, y: torch.Tensor, warm: bool) -> tuple[torch.Tensor, list[int]]:  # noqa: ANN001
    """The 8-symmetry mean for y (1, 1, H, W), and each solve's f-evaluations."""
    total, previous, nfes = torch.zeros_like(y), None, []
    for k in range(8):
        y_k = dihedral(y, k)
        s = model.inject(y_k)
        z0 = torch.zeros_like(s) if previous is None or not warm else dihedral(undo_dihedral(previous, k - 1), k)
        sol = deq_solve(lambda z, s=s: model.layer(z, s), z0, model.solver, model.grad)
        previous = sol.z
        nfes.append(int(sol.stats.nfe.max()))
        total += undo_dihedral(y_k + model.decode(sol.z), k)
    return (total / 8).clamp(0, 1), nfes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sigma", type=int, nargs="+", default=[25], choices=(15, 25, 50))
    parser.add_argument("--data", default=None, help="folder holding Train400 (default: $NERD_DATA or ../shared/data)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench" / "warm-start.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    _, val, paths = load_folder(data_folder("Train400", args.data), 8)
    rows = []
    for sigma255 in args.sigma:
        model, info = load_weights(f"nerd-s{sigma255}")
        psnrs: dict[str, list[float]] = {m: [] for m in MODES}
        nfes: dict[str, list[int]] = {m: [] for m in MODES}
        with torch.inference_mode(), model._normalised_weights():
            for x, y in validation_pairs(val, sigma255):
                for mode in MODES:
                    x_hat, n = ensemble(model, y, warm=mode == "warm")
                    psnrs[mode].append(psnr(x_hat[0, 0].double().numpy(), x[0, 0].double().numpy()))
                    nfes[mode] += n
        deltas = [w - c for w, c in zip(psnrs["warm"], psnrs["cold"], strict=True)]
        for mode in MODES:
            rows.append({"sigma": sigma255, "weights": info["sha256"][:12], "mode": mode, "images": len(paths),
                         "psnr": statistics.mean(psnrs[mode]), "nfe_per_solve": statistics.mean(nfes[mode]),
                         "delta_db": statistics.mean(deltas) if mode == "warm" else 0.0,
                         "worst_delta_db": min(deltas) if mode == "warm" else 0.0})
            print(rows[-1], flush=True)
    meta = {"script": "scripts/warm_start_check.py", "tol": float(model.solver.tol),
            "max_iter": int(model.solver.max_iter), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, allow_nan=False) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
