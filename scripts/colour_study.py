"""Which colour method should `nerd denoise --colour` use? Every method of `nerd.colour.METHODS` on Kodak24 crops.

    OMP_NUM_THREADS=1 nice -n 19 python scripts/colour_study.py --sigma 25 [--crop 160] [--methods rgb opp ...]

For each image of the set (sorted by name) its centre crop (crop x crop) is x; y = x + sigma/255 * n with n =
RandomState(0).randn(crop, crop, 3) (the colour protocol of ../shared/data/README.md, on the crop); each method's
x_hat = `nerd.colour.denoise_colour(...)`, PSNR over the three RGB channels (float64). CBM3D (`bm3d.bm3d_rgb`, one
thread) is scored on the same crops for reference.

Each NERD plane is solved with the shipped weights the method's plan names, at that file's inference budget
(--budget: 6 iterations for nerd-s15 / nerd-s25, 11 for nerd-s50; docs/performance.md), and cached by its content
(--cache), so methods that share a plane (the luminance of every ``opp*`` method) solve it once. Planes are solved
one at a time: on a CPU a batch of n planes costs about n times one plane (measured: 3 planes 17.7 s, one 4.8 s at
160x160), so a method's seconds are the sum of its planes' solves (and of its guided filter, if any).

Writes --out (results/colour/study.json) after every image: rerun the same command to continue.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from nerd import colour  # noqa: E402
from nerd.metrics import psnr  # noqa: E402

GUIDED = [f"opp-guided-r{r}-e{e:g}" for r in (2, 3, 4, 5, 6, 8) for e in (0.03, 0.1, 0.3, 1.0)]
DEFAULT_METHODS = [*GUIDED, "rgb", "cbm3d", "opp", "opp-orthonormal", "opp-k1.5", "ycbcr", "opp-noofs", "opp-k3"]


def crop_centre(x: np.ndarray, side: int) -> np.ndarray:
    h, w = x.shape[:2]
    if side <= 0 or side >= min(h, w):
        return x
    top, left = (h - side) // 2, (w - side) // 2
    return x[top:top + side, left:left + side]


def load_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0


def write_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


class PlaneSolver:
    """Solves single planes with the shipped weights at their budget, cached on disk by content."""

    def __init__(self, cache: Path, budget: dict[str, int]) -> None:
        from nerd import weights as nerd_weights

        self.cache, self.budget, self.models = cache, budget, {}
        self.trained = {n: float(nerd_weights.read_metadata(p)["sigma"]) for n, p in nerd_weights.shipped().items()}
        self.sha = {n: nerd_weights.read_metadata(p)["sha256"] for n, p in nerd_weights.shipped().items()}
        cache.mkdir(parents=True, exist_ok=True)
        self.seconds = 0.0  # of the planes the current method used (as measured when each was solved)
        self.wall = 0.0  # spent in this object's calls (solves, or cache reads)

    def model(self, name: str):  # noqa: ANN201
        if name not in self.models:
            from nerd.weights import load_weights

            self.models[name] = load_weights(name)[0]
        return self.models[name]

    def __call__(self, planes: np.ndarray, name: str) -> tuple[np.ndarray, None]:
        from nerd.denoise import _denoise_planes

        entered = time.perf_counter()
        out = np.empty_like(planes)
        for i, plane in enumerate(planes):
            key = hashlib.sha256(plane.tobytes() + f"|{plane.shape}|{name}|{self.sha[name]}|"
                                 f"{self.budget[name]}".encode()).hexdigest()[:32]
            file, meta = self.cache / f"{key}.npy", self.cache / f"{key}.json"
            if file.is_file() and meta.is_file():
                out[i] = np.load(file)
                self.seconds += json.loads(meta.read_text())["seconds"]
                continue
            model = self.model(name)
            solver = model.solver.override(max_iter=self.budget[name])
            x, summary = _denoise_planes(model, plane[None], self.trained[name], solver=solver, device="cpu",
                                         tile=None, overlap=None, ensemble=1, progress=False, clip=False)
            out[i] = x[0]
            np.save(file, x[0])
            meta.write_text(json.dumps({"seconds": summary.seconds, "nfe": summary.nfe, "weights": name}))
            self.seconds += summary.seconds
        self.wall += time.perf_counter() - entered
        return out, None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", default="Kodak24")
    p.add_argument("--data", default=None, help="root of the set folders (default: $NERD_DATA, else ../shared/data)")
    p.add_argument("--sigma", nargs="+", type=float, default=[25.0])
    p.add_argument("--crop", type=int, default=160, help="centre crop side (0: whole images)")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--budget", default="nerd-s15:6,nerd-s25:6,nerd-s50:11",
                   help="solver iterations per weights file (docs/performance.md, the budget section)")
    p.add_argument("--out", default=str(ROOT / "results" / "colour" / "study.json"))
    p.add_argument("--cache", default=str(ROOT / "runs" / "colour-study-cache"))
    args = p.parse_args(argv)

    import torch

    from nerd.paths import data_folder

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    budget = {k: int(v) for k, v in (item.split(":") for item in args.budget.split(","))}
    folder = data_folder(args.set, args.data)
    from nerd.io import list_images

    images = list_images(folder)[: args.limit]
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    solver = PlaneSolver(Path(args.cache), budget)
    command = "OMP_NUM_THREADS=1 nice -n 19 python scripts/colour_study.py " + " ".join(sys.argv[1:] if argv is None
                                                                                       else argv)
    old = data.get("meta", {})
    commands = old.get("commands") or ([old["command"]] if "command" in old else [])
    data["meta"] = {
        "commands": commands + [command] * (command not in commands),
        "set": args.set, "crop": args.crop, "budget": budget, "weights_sha256": solver.sha,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "protocol": "x = centre crop of pixel/255 (RGB); y = x + sigma/255 * RandomState(0).randn(h, w, 3); x_hat "
                    "clipped to [0,1]; PSNR float64 over the three channels",
        "seconds_note": "NERD planes solved one at a time on one thread, each once (cached across methods); a "
                        "method's seconds are the sum of its planes' solves",
    }
    done = {(r["method"], r["image"], r["sigma"]) for r in data["rows"]}
    for sigma in args.sigma:
        for name in args.methods:
            for path in images:
                if (name, path.name, sigma) in done:
                    continue
                x = crop_centre(load_rgb(path), args.crop)
                y = x + sigma / 255.0 * np.random.RandomState(0).randn(*x.shape)
                row = {"method": name, "image": path.name, "sigma": sigma}
                if name == "cbm3d":
                    import bm3d

                    profile = bm3d.BM3DProfile()
                    profile.num_threads = 1
                    start = time.perf_counter()
                    x_hat = np.clip(bm3d.bm3d_rgb(y, sigma / 255.0, profile=profile), 0.0, 1.0)
                    row["seconds"] = time.perf_counter() - start
                else:
                    solver.seconds = solver.wall = 0.0
                    start = time.perf_counter()
                    x_hat, _, plan = colour.denoise_colour(y.astype(np.float32), sigma, solver.trained, solver, name)
                    # the planes' solves as measured, plus the rest (transforms, guided filter) as it ran now
                    row["seconds"] = solver.seconds + (time.perf_counter() - start - solver.wall)
                    row["planes"] = [[pc.name, round(pc.sigma, 3), pc.weights] for pc in plan.planes]
                    row["solves"] = len(plan.solves)
                row["psnr"] = psnr(np.asarray(x_hat, dtype=np.float64), x)
                data["rows"].append(row)
                write_atomic(out, data)
                print(f"{name:24s} {path.name:14s} s{sigma:g} {row['psnr']:.3f} dB {row['seconds']:.1f} s", flush=True)
            mine = [r["psnr"] for r in data["rows"] if r["method"] == name and r["sigma"] == sigma]
            print(f"== {name} sigma {sigma:g}: {np.mean(mine):.3f} dB over {len(mine)} images", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
