"""Training crops per second with the CPU attention kernel against the SDPA path, side by side in one process.

    python scripts/train_speed.py                      # 8 steps each, interleaved: about 10 minutes on 2 cores

The shipped recipe's CPU stage (the small preset, 48 features; 64² crops × 12, Broyden 6 in the forward, phantom
gradient of 3 steps; configs/history/nerd-s25b.toml's settings at crop 64 and batch 12), from the same seed twice:
one training run whose attention takes the SDPA path (``NERD_ATTENTION=sdpa``) and one that runs the kernel, each
a `nerd.train` run object taking real AdamW steps on Train400 crops. Steps alternate in blocks of two, so a noisy
neighbour hits both alike; the first block of each is a warm-up and not counted. Both runs draw the same crops, so
their losses must agree step by step (to float rounding that grows slowly over the steps): the kernel changes the
speed, not the training. Writes results/bench/train-speed.json, which `python tools/readme.py` renders into
docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="counted steps per path")
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--out", default=str(ROOT / "results" / "bench" / "train-speed.json"))
    args = parser.parse_args(argv)
    import torch

    from nerd.models import attention_kernel
    from nerd.train import _Run, load_recipe

    recipe = ROOT / "configs" / "history" / "nerd-s25b.toml"
    cfg = load_recipe(recipe, crop=args.crop, batch=args.batch, init="", steps=10_000, minutes=0.0)
    paths = {"sdpa": "sdpa", "kernel": "auto"}
    times: dict[str, list[float]] = {k: [] for k in paths}
    losses: dict[str, list[float]] = {k: [] for k in paths}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {k: _Run(cfg, Path(tmp) / k, None, rank=0, world=1, dev=torch.device("cpu")) for k in paths}
        for run in runs.values():
            run.t_step, run.c_step = time.monotonic(), time.process_time()
        blocks = args.steps // 2 + 1
        for b in range(blocks):
            for name, run in runs.items():
                os.environ["NERD_ATTENTION"] = paths[name]
                for _ in range(2):
                    start = time.perf_counter()
                    loss, _ = run.train_step()
                    sec = time.perf_counter() - start
                    losses[name].append(loss.item())
                    if b:  # the first block warms up
                        times[name].append(sec)
                print(f"block {b}: {name} {sec:.2f} s/step, loss {loss.item():.6f}", flush=True)
    os.environ.pop("NERD_ATTENTION", None)
    crops = {k: args.batch / statistics.median(v) for k, v in times.items()}
    diff = max(abs(a - b) / abs(b) for a, b in zip(losses["kernel"], losses["sdpa"], strict=True))
    meta = {"script": "scripts/train_speed.py", "argv": sys.argv[1:], "recipe": str(recipe.relative_to(ROOT)),
            "crop": args.crop, "batch": args.batch, "train_iters": cfg.train.train_iters,
            "grad": f"{cfg.grad.mode} {cfg.grad.steps}", "threads": torch.get_num_threads(),
            "capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "kernel_built": attention_kernel.load() is not None, "loadavg_end": os.getloadavg()[0],
            "date": time.strftime("%Y-%m-%d %H:%M")}
    result = {"meta": meta, "seconds_per_step": {k: statistics.median(v) for k, v in times.items()},
              "crops_per_second": crops, "speed_up": crops["kernel"] / crops["sdpa"],
              "loss_max_rel_difference": diff, "times": times, "losses": losses}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    os.replace(tmp_out, out)
    print(f"crops/s: sdpa {crops['sdpa']:.2f}, kernel {crops['kernel']:.2f} ({result['speed_up']:.2f}x); "
          f"loss max rel. difference {diff:.1e}; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
