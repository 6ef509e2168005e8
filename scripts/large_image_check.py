"""Does the tile planner's memory estimate hold on large images? The whole `nerd denoise` process on synthetic
noisy photos of 12 and 40 megapixels, its peak resident size beside the planner's estimate.

    python scripts/large_image_check.py              # 12 and 40 MP, tiles of 512, 2 iterations: about 20 minutes

Each size runs `nerd denoise --tile T --iters K --max-pixels 0` as its own process on a PNG written here (smooth
shapes plus Gaussian noise of sigma 25), and takes its peak resident size from `os.wait4`. The estimate is what
`nerd denoise --tile auto` decides with: one tile's solve (`nerd.tiling.solve_bytes`, whose fixed part covers the
interpreter and torch) plus the whole image's own buffers (`IMAGE_BYTES_PER_PIXEL` a pixel). A few iterations
suffice: the solver's history is sized by its cap and `fit_memory`, and the estimate is computed for the same cap.
Writes results/bench/large-image.json, which `python tools/readme.py` renders into docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def synthetic(path: Path, height: int, width: int) -> None:
    """A smooth gray picture with sigma-25 noise, written as an 8-bit PNG, a band of rows at a time."""
    from PIL import Image

    rng = np.random.RandomState(0)
    out = np.empty((height, width), np.uint8)
    xx = np.arange(width)[None, :]
    for top in range(0, height, 512):
        yy = np.arange(top, min(top + 512, height))[:, None]
        clean = 0.5 + 0.3 * np.sin(xx / 97.0) * np.cos(yy / 61.0)
        out[top:top + len(yy)] = np.clip((clean + 25 / 255 * rng.randn(*clean.shape)) * 255, 0, 255).round()
    Image.fromarray(out).save(path)


def estimate(height: int, width: int, tile: int, iters: int) -> dict:
    from nerd.tiling import IMAGE_BYTES_PER_PIXEL, OVERLAP, solve_bytes, tiles
    from nerd.weights import load_weights

    model, _ = load_weights("nerd-s25")
    solver = model.solver.override(max_iter=iters)
    pieces = tiles(height, width, tile, OVERLAP)
    tile_pixels = pieces[0][2].numel()
    solve = solve_bytes(tile_pixels, model.cfg.channels, solver)
    return {"tiles": len(pieces), "tile_shape": list(pieces[0][2].shape), "solve_mib": solve / 2**20,
            "estimate_mib": (solve + IMAGE_BYTES_PER_PIXEL * height * width) / 2**20}


def measure(megapixels: float, tile: int, iters: int, folder: Path) -> dict:
    width = int(round((megapixels * 1e6 * 4 / 3) ** 0.5))  # a 4:3 photo
    height = int(round(megapixels * 1e6 / width))
    src, dst = folder / f"noisy-{megapixels:g}mp.png", folder / f"out-{megapixels:g}mp.png"
    synthetic(src, height, width)
    cmd = [sys.executable, "-m", "nerd", "denoise", str(src), "-o", str(dst), "--sigma", "25", "--tile", str(tile),
           "--iters", str(iters), "--max-pixels", "0", "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"nerd denoise failed on {src.name}: {err.strip()}")
    row = {"megapixels": height * width / 1e6, "height": height, "width": width, "tile": tile, "iters": iters,
           "peak_mib": usage.ru_maxrss / 1024, "seconds": seconds, "report": out.strip().splitlines()[-1],
           **estimate(height, width, tile, iters)}
    row["peak_over_estimate"] = row["peak_mib"] / row["estimate_mib"]
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--megapixels", type=float, nargs="+", default=[12.0, 40.0])
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench" / "large-image.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(mp, args.tile, args.iters, Path(tmp)) for mp in args.megapixels]
    import torch

    meta = {"script": "scripts/large_image_check.py", "torch": torch.__version__, "weights": "nerd-s25",
            "threads": torch.get_num_threads()}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, allow_nan=False) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
