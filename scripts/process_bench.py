"""Whole processes side by side: `nerd denoise` with default flags against a BM3D process on the same noisy file.

    python scripts/process_bench.py                    # 4 images, 2 rounds: about 15 minutes on 2 cores

What a user waits for, start to finish: each command runs as its own process (interpreter start, imports, reading
the file, the solve, writing the result) and is timed from outside with `time.perf_counter`. The images, noisy at
sigma 25 with the evaluation protocol's seed-0 noise and stored as 8-bit PNG, are a 256² and a 512² Set12 image, a
768×512 gray photo (the centre of Urban100's img_002) and a 500×500 colour photo (Kodak24's kodim01), from
$NERD_DATA or ../shared/data. Per image, in one round robin:

* ``nerd``: `nerd denoise NOISY -o OUT --sigma 25` (`--colour` for the colour photo): the shipped weights at their
  own stopping rule, both cores;
* ``bm3d``: the `bm3d` package in a Python process (`bm3d.bm3d`, `bm3d.bm3d_rgb` for colour) reading and writing
  the same formats;
* ``nerd 17 it``: `nerd denoise ... --iters 17 --tol 1e-3`, the earlier default (the paper's solver), for the PSNR
  the shipped stopping rule gives up (timed once).

Writes results/bench/process.json (medians, every time, PSNRs, the commands, the CPU), which `python tools/readme.py`
renders into docs/performance.md. Nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SIGMA255 = 25.0
BM3D = f"""import sys, numpy as np, bm3d
from PIL import Image
y = np.asarray(Image.open(sys.argv[1]), dtype=np.float64) / 255
x_hat = bm3d.bm3d_rgb(y, {SIGMA255} / 255) if y.ndim == 3 else bm3d.bm3d(y, {SIGMA255} / 255)
Image.fromarray((np.clip(x_hat, 0, 1) * 255).round().astype(np.uint8)).save(sys.argv[2])
"""


def cases(data: Path) -> list[tuple[str, np.ndarray]]:
    """(label, clean image in [0, 1], (H, W) or (H, W, 3))."""
    from nerd.io import read_image

    def crop(x: np.ndarray, h: int, w: int) -> np.ndarray:
        top, left = (x.shape[0] - h) // 2, (x.shape[1] - w) // 2
        return x[top:top + h, left:left + w]

    def read(*parts: str) -> np.ndarray:
        return read_image(data.joinpath(*parts), colour=True)[0].astype(np.float64)

    return [("Set12 01.png, 256×256 gray", read("Set12", "01.png")),
            ("Set12 08.png, 512×512 gray", read("Set12", "08.png")),
            ("Urban100 img_002 centre, 768×512 gray", crop(read("Urban100", "img_002.png"), 512, 768)),
            ("Kodak24 kodim01, 500×500 colour", read("Kodak24", "kodim01.png"))]


def noisy_file(x: np.ndarray, path: Path) -> None:
    """The protocol's seed-0 noise at sigma 25, clipped and stored as an 8-bit PNG (what a user's photo is)."""
    from PIL import Image

    from nerd.data.noise import protocol_noisy

    y = np.clip(protocol_noisy(x, SIGMA255), 0, 1)
    Image.fromarray((y * 255).round().astype(np.uint8)).save(path)


def psnr(path: Path, x: np.ndarray) -> float:
    from nerd.io import read_image

    x_hat = read_image(path, colour=x.ndim == 3)[0].astype(np.float64)
    mse = float(np.mean((x_hat - x) ** 2))
    return 10 * np.log10(1 / mse)


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-400:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.environ.get("NERD_DATA") or str(ROOT / ".." / "shared" / "data"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "results" / "bench" / "process.json"))
    args = parser.parse_args(argv)
    import torch

    nerd = [sys.executable, "-m", "nerd", "denoise"]
    rows = []
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for i, (label, x) in enumerate(cases(Path(args.data))):
            src = folder / f"noisy{i}.png"
            noisy_file(x, src)
            colour = ["--colour"] if x.ndim == 3 else []
            cmds = {
                "nerd": [*nerd, str(src), "-o", str(folder / f"nerd{i}.png"), "--sigma", f"{SIGMA255:g}", *colour,
                         "--no-progress", "-q"],
                "bm3d": [sys.executable, "-c", BM3D, str(src), str(folder / f"bm3d{i}.png")],
                "nerd 17 it": [*nerd, str(src), "-o", str(folder / f"nerd17_{i}.png"), "--sigma", f"{SIGMA255:g}",
                               *colour, "--iters", "17", "--tol", "1e-3", "--no-progress", "-q"],
            }
            if i == 0:  # warm the page cache and the attention kernel's build cache, untimed
                timed(cmds["nerd"][:-2] + ["--iters", "1", "--no-progress", "-q"])
                timed(cmds["bm3d"])
            times: dict[str, list[float]] = {k: [] for k in cmds}
            for r in range(args.rounds):
                for name, cmd in cmds.items():
                    if name == "nerd 17 it" and r:
                        continue  # the reference's PSNR needs one run; its time is shown once
                    times[name].append(timed(cmd))
                    print(f"{label}: {name} {times[name][-1]:.1f} s", flush=True)
            outs = {"nerd": folder / f"nerd{i}.png", "bm3d": folder / f"bm3d{i}.png",
                    "nerd 17 it": folder / f"nerd17_{i}.png"}
            rows.append({"image": label, "shape": list(x.shape),
                         "seconds": {k: statistics.median(v) for k, v in times.items()}, "times": times,
                         "psnr": {k: psnr(p, x) for k, p in outs.items()},
                         "commands": {k: [Path(c).name if c.startswith(tmp) else c for c in v]
                                      for k, v in cmds.items()}})
    from nerd.lab.bench import device_name
    from nerd.models import attention_kernel

    meta = {"script": "scripts/process_bench.py", "argv": sys.argv[1:], "cpu": device_name(torch.device("cpu")),
            "capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "sigma": SIGMA255,
            "attention": "kernel" if attention_kernel.enabled() and attention_kernel.load() is not None else "sdpa",
            "loadavg_start": load_start, "loadavg_end": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, allow_nan=False) + "\n")
    os.replace(tmp_out, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
