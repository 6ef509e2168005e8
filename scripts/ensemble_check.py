"""What the self-ensemble (`nerd denoise --ensemble N`) buys: PSNR and time for N = 1, 2, 4, 8 on held-out images.

    python scripts/ensemble_check.py --sigma 15 25 50 --threads 2   # about 12 minutes a sigma on 2 idle cores

The 8 validation images held out of Train400 (whole, 180x180, never a test set; noise drawn as the training runs'
validation draws it, from RandomState(i) for image i, though the runs validate on 96x96 centre crops), the shipped
weights of each sigma with their solver. Each image is solved once on each of the square's 8 symmetries
(`nerd.data.patches.dihedral`) and turned back; the result for N is the mean of the first N, which is what
`denoise_image(..., ensemble=N)` computes (tests/test_denoise.py checks that), and its time is the sum of those N
solves. Writes results/bench/ensemble.json, which `python tools/readme.py` renders into docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SIZES = (1, 2, 4, 8)


def check(sigma255: float) -> list[dict]:
    """A row per ensemble size: mean PSNR / SSIM and seconds per image (and their change from one solve), with the
    shipped weights of sigma255."""
    from nerd.data.patches import dihedral, load_folder, undo_dihedral, validation_pairs
    from nerd.metrics import psnr, ssim
    from nerd.paths import data_root
    from nerd.weights import load_weights

    model, info = load_weights(f"nerd-s{sigma255:g}")
    _, val, paths = load_folder(Path(data_root()) / "Train400", 8)
    scores: dict[int, list[tuple[float, float, float]]] = {n: [] for n in SIZES}
    pairs = validation_pairs(val, sigma255)
    with torch.inference_mode():
        model.equilibrium(pairs[0][1], sigma255 / 255)  # warm-up: the first solve of a size is slower
    for (x, y), path in zip(pairs, paths, strict=True):
        outs, seconds = [], []
        for k in range(max(SIZES)):
            start = time.perf_counter()
            with torch.inference_mode():
                outs.append(undo_dihedral(model.equilibrium(dihedral(y, k), sigma255 / 255).x_hat, k))
            seconds.append(time.perf_counter() - start)
        clean = x[0, 0].double().numpy()
        for n in SIZES:
            x_hat = torch.stack(outs[:n]).mean(0).clamp(0, 1)[0, 0].double().numpy()
            scores[n].append((psnr(x_hat, clean), ssim(x_hat, clean), sum(seconds[:n])))
        print(f"{path.name}: " + "  ".join(f"x{n} {scores[n][-1][0]:.3f}" for n in SIZES), flush=True)
    rows = []
    for n in SIZES:
        p, s, t = (sum(v[i] for v in scores[n]) / len(scores[n]) for i in range(3))
        rows.append({"sigma": sigma255, "weights": info["sha256"][:12], "images": len(paths), "ensemble": n,
                     "psnr": p, "ssim": s, "seconds": t, "delta_psnr": p - rows[0]["psnr"] if rows else 0.0,
                     "time_ratio": t / rows[0]["seconds"] if rows else 1.0})
    return rows


def main() -> None:
    from nerd.lab.bench import write_side_by_side

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sigma", type=float, nargs="+", default=[25.0])
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench" / "ensemble.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    rows = [row for s in args.sigma for row in check(s)]
    write_side_by_side(args.out, "ensemble_check.py", None, rows, load, repeats=1, threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
