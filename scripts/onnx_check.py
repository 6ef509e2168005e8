"""The ONNX export beside PyTorch: parity and CPU time on the same images, with the same thread count.

    python scripts/onnx_check.py                 # nerd-s25, 17 iterations, 2 threads, 3 timed rounds: ~5 min

Exports the weights with `nerd.onnx_export.export_onnx` (what `nerd export NAME --format onnx --iters N` does),
then on each image (the shipped sigma-25 sample, 256 x 256, and an odd 96 x 131 crop of it) times, round robin
after one untimed round, `nerd.denoise.denoise_image` (PyTorch, `torch.set_num_threads`) and the ONNX Runtime
session (CPU provider, intra-op threads) on the same noisy image; medians of the rounds, seconds per image. Parity
is the largest |ORT - PyTorch| over the pixels of the [0, 1] outputs (both clamped, before 8-bit quantisation).
The peak memory of each backend on the 256 x 256 image is measured in a fresh process (the peak resident size
above the size before the first call). A row's nfe and rel_residual are PyTorch's: its solver stops a sample at
the weights' tol, while the graph always spends --iters f-evaluations (with the same answer). Writes
results/bench/onnx.json.
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
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CROP = (slice(60, 156), slice(70, 201))  # 96 x 131: odd, not a multiple of the attention's tiles


def images() -> dict[str, Any]:
    """{name: (noisy float32 (H, W) on [0, 1], clean)} from the shipped sigma-25 sample."""
    import numpy as np

    from nerd.denoise import SAMPLE_CLEAN, SAMPLE_NOISY
    from nerd.io import load_gray

    y, x = load_gray(SAMPLE_NOISY).astype(np.float32), load_gray(SAMPLE_CLEAN).astype(np.float64)
    return {"sample 256x256": (y, x), "sample crop 96x131": (np.ascontiguousarray(y[CROP]), x[CROP])}


def memory_child(backend: str, onnx_path: str, weights: str, iters: int, threads: int) -> dict[str, Any]:
    """In this (fresh) process: the peak resident size of one 256 x 256 denoise above the size before it."""
    import numpy as np
    import torch

    from nerd import allocator
    from nerd.lab.bench import proc_status_bytes

    allocator.tune()
    torch.set_num_threads(threads)
    y = images()["sample 256x256"][0]
    if backend == "ort":
        from nerd.onnx_export import onnx_session, run_onnx

        session = onnx_session(onnx_path, threads)

        def call() -> np.ndarray:
            return run_onnx(session, y)
    else:
        from nerd.denoise import denoise_image
        from nerd.weights import load_weights

        model = load_weights(weights)[0]
        solver = model.solver.override(max_iter=iters)

        def call() -> np.ndarray:
            return denoise_image(model, y, 25.0, solver=solver, device="cpu")[0]
    Path("/proc/self/clear_refs").write_text("5")  # the peak counts from here (Linux)
    base = proc_status_bytes("VmRSS")
    call()
    return {"backend": backend, "peak_mib": (proc_status_bytes("VmHWM") - base) / 2**20,
            "pixels": int(y.size)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="nerd-s25")
    p.add_argument("--iters", type=int, default=17, help="solver iterations (the shipped weights' max_iter: 17)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per image (after one untimed)")
    p.add_argument("--out", default=str(ROOT / "results" / "bench" / "onnx.json"))
    p.add_argument("--memory-child", nargs=2, metavar=("BACKEND", "ONNX"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child[0], args.memory_child[1], args.weights, args.iters,
                                      args.threads)))
        return 0

    from nerd import allocator

    allocator.tune()  # as the `nerd` command does
    import numpy as np
    import onnx
    import onnxruntime
    import torch

    from nerd.denoise import denoise_image
    from nerd.lab.bench import device_name, median
    from nerd.metrics import psnr
    from nerd.onnx_export import export_onnx, onnx_session, run_onnx
    from nerd.weights import load_weights

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    model, info = load_weights(args.weights)
    solver = model.solver.override(max_iter=args.iters)
    tmp = Path(tempfile.mkdtemp(prefix="onnx_check."))
    path = tmp / f"{args.weights}-{args.iters}.onnx"
    start = time.perf_counter()
    meta = export_onnx(model, path, iters=args.iters, metadata={"weights": info["name"]})
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    session = onnx_session(path, args.threads)
    session_s = time.perf_counter() - start
    print(f"exported in {export_s:.0f} s ({path.stat().st_size / 2**20:.1f} MiB), session in {session_s:.1f} s",
          flush=True)

    rows = []
    for name, (y, x) in images().items():
        def run_torch(y: np.ndarray = y) -> np.ndarray:
            return denoise_image(model, y, 25.0, solver=solver, device="cpu")[0]

        def run_ort(y: np.ndarray = y) -> np.ndarray:
            return run_onnx(session, y)

        calls = {"pytorch": run_torch, "ort": run_ort}
        times: dict[str, list[float]] = {k: [] for k in calls}
        out: dict[str, np.ndarray] = {}
        for round_ in range(args.repeats + 1):  # round 0: untimed
            for key, fn in calls.items():
                start = time.perf_counter()
                out[key] = fn()
                if round_:
                    times[key].append(time.perf_counter() - start)
        _, summary = denoise_image(model, y, 25.0, solver=solver, device="cpu")
        diff = float(np.abs(out["ort"] - out["pytorch"]).max())
        quantised = np.abs(np.round(out["ort"] * 255) - np.round(out["pytorch"] * 255)).max()
        row = {
            "image": name, "height": int(y.shape[0]), "width": int(y.shape[1]),
            "pytorch_s": median(times["pytorch"]), "ort_s": median(times["ort"]),
            "pytorch_runs_s": [round(t, 3) for t in times["pytorch"]],
            "ort_runs_s": [round(t, 3) for t in times["ort"]],
            "max_abs_diff": diff, "max_abs_diff_255": diff * 255, "max_8bit_levels_apart": int(quantised),
            "psnr_pytorch": psnr(out["pytorch"].astype(np.float64), x),
            "psnr_ort": psnr(out["ort"].astype(np.float64), x),
            "nfe": summary.nfe, "rel_residual": summary.rel_residual,
        }
        row["ort_speedup"] = row["pytorch_s"] / row["ort_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)

    memory = []
    for backend in ("pytorch", "ort"):
        res = subprocess.run([sys.executable, __file__, "--weights", args.weights, "--iters", str(args.iters),
                              "--threads", str(args.threads), "--memory-child", backend, str(path)],
                             check=True, capture_output=True, text=True)
        memory.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(memory[-1], flush=True)

    result = {
        "meta": {"weights": info["name"], "weights_sha256": info["sha256"][:12], "iters": args.iters,
                 "tol": meta["tol"], "memory": meta["memory"], "attention_tile": meta["attention_tile"],
                 "opset": meta["opset"], "exporter": meta["exporter"], "threads": args.threads,
                 "repeats": args.repeats, "export_s": export_s, "session_s": session_s,
                 "onnx_mib": path.stat().st_size / 2**20, "torch": torch.__version__,
                 "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "device_name": device_name(
                     torch.device("cpu")), "cores": os.cpu_count(), "malloc": allocator.status,
                 "loadavg_start": load_start, "loadavg_end": os.getloadavg()[0],
                 "date": time.strftime("%Y-%m-%d %H:%M"), "command": "python scripts/onnx_check.py " +
                 " ".join(argv if argv is not None else sys.argv[1:])},
        "rows": rows, "memory_256x256": memory,
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    path.unlink()
    tmp.rmdir()
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
