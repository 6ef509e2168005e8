"""What tiling costs: whole-image solves against tiled ones (`denoise_image(tile=...)`), on the same noisy images.

    python scripts/tiling_check.py        # Urban100 img_001, BSD68 test001, Set12 01; tiles 512/256/128: ~20 min

Each (image, tile) is one process (the `nerd` command's allocator setting, the shipped weights of --sigma, their
17-iteration Broyden solver, protocol noise as in `nerd eval`), so that its peak resident size (`os.wait4`) is its
own. Reports PSNR and SSIM against the clean image, the difference from the whole-image solve, the solver's
seconds and the peak memory of the solve (the peak resident size above the process's size before it, which is
what the memory available has to hold), beside `nerd.tiling.solve_bytes`' estimate (what `nerd denoise --tile
auto` decides with). Writes results/bench/tiling.json, which `python tools/readme.py` renders into docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def one(path: str, tile: int, sigma: float) -> dict[str, Any]:
    """Denoise one image in this process (tile 0: whole) and score it."""
    from nerd import allocator

    allocator.tune()  # as the `nerd` command does
    import numpy as np

    from nerd.data.noise import protocol_noisy
    from nerd.denoise import denoise_image
    from nerd.io import load_gray
    from nerd.lab.bench import proc_status_bytes
    from nerd.metrics import psnr, ssim
    from nerd.tiling import fit_memory, history_maps, solve_bytes
    from nerd.weights import load_weights

    model, info = load_weights(f"nerd-s{sigma:g}")
    x = load_gray(path).astype(np.float64)
    y = protocol_noisy(x, sigma).astype(np.float32)
    Path("/proc/self/clear_refs").write_text("5")  # the peak counts from here (Linux)
    base = proc_status_bytes("VmRSS")
    x_hat, s = denoise_image(model, y, sigma, device="cpu", tile=tile or None)
    peak = proc_status_bytes("VmHWM") - base
    shape = s.tile_shape or x.shape
    return {"psnr": psnr(x_hat.astype(np.float64), x), "ssim": ssim(x_hat.astype(np.float64), x),
            "seconds": s.seconds, "tiles": s.tiles, "nfe": s.nfe, "converged_tiles": s.tiles -
            s.unconverged_tiles, "height": x.shape[0], "width": x.shape[1], "weights": info["sha256"][:12],
            "tile_shape": s.tile_shape, "channels": model.cfg.channels,
            "history_maps": history_maps(fit_memory(model.solver, model.cfg.channels * shape[0] * shape[1])),
            "estimate_mib": solve_bytes(shape[0] * shape[1], model.cfg.channels, model.solver) / 2**20,
            "peak_mib": peak / 2**20, "malloc": allocator.status}


def run_child(path: Path, tile: int, sigma: float) -> dict[str, Any]:
    """`one` in a fresh process: its report, wall time and whole-process peak resident size."""
    cmd = [sys.executable, __file__, "--one", str(path), str(tile), f"{sigma:g}"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:  # Ctrl-C: do not leave a long child behind
        proc.kill()
        proc.wait()
        raise
    out = proc.stdout.read() if proc.stdout else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out}")
    return {**json.loads(out.strip().splitlines()[-1]), "wall_s": time.perf_counter() - start,
            "maxrss_mib": usage.ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", nargs="+", default=["Urban100/img_001.png", "BSD68/test001.png", "Set12/01.png"],
                        help="images under --data")
    parser.add_argument("--tiles", nargs="+", type=int, default=[512, 256, 128], help="tile sides to compare")
    parser.add_argument("--sigma", type=float, default=25.0)
    parser.add_argument("--data", type=Path, default=None, help="default: $NERD_DATA, else ../shared/data")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench" / "tiling.json")
    parser.add_argument("--one", nargs=3, metavar=("PATH", "TILE", "SIGMA"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), float(args.one[2]))))
        return 0
    from nerd.paths import data_root

    data = args.data or data_root()
    load = os.getloadavg()[0]
    rows = []
    for image in args.images:
        whole = None
        for tile in [0, *args.tiles]:
            r = run_child(data / image, tile, args.sigma)
            whole = whole or r
            r.update(image=image, tile=tile, delta_psnr=r["psnr"] - whole["psnr"],
                     speed=whole["seconds"] / r["seconds"])
            rows.append(r)
            print(f"{image} {'whole' if not tile else f'tile {tile}'}: {r['psnr']:.3f} dB ({r['delta_psnr']:+.3f}), "
                  f"{r['tiles']} tile(s), {r['seconds']:.1f} s, peak {r['peak_mib']:.0f} MiB above the start "
                  f"(estimate {r['estimate_mib']:.0f})", flush=True)
    import torch

    from nerd.lab.bench import write_side_by_side
    write_side_by_side(args.out, "tiling_check.py", argv, rows, load, repeats=1, threads=torch.get_num_threads(),
                       cores=os.cpu_count(), sigma=args.sigma)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
