"""Where one f-evaluation's time goes on a whole image, against the machine's fp32 matmul rate.

    python scripts/feval_profile.py                # 768x512, 2 threads: about a minute

The shipped sigma-25 weights' implicit layer on a 768x512 image (the process benchmark's photo size), in fp32 on the
CPU with the default attention path: the fp32 matmul rate of this machine (its fastest 2048² matmul, timed between
the f-evaluations, since the clock of a shared machine wanders), the median time of one f-evaluation, and a
`torch.profiler` pass over one more, its operators grouped (attention, 3x3 convolutions, the q/k/v and output
projections, GroupNorm, and the layout copies and element-wise work between them). Each group's
useful FLOPs are counted analytically (`nerd.lab.bench.implicit_layer_flops`: the attention over each query's
truncated window, not what a kernel computes) and set against its time. The last column of each row is what the
group would take at the matmul rate: the sum bounds any fp32 f-evaluation on this machine from below.

Writes results/bench/feval-profile.json, which `python tools/readme.py` renders into docs/performance.md. Nothing
else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# profiler operator names -> group; anything else counts as "layout and element-wise"
GROUPS = {
    "attention": ("_Attention", "aten::_scaled_dot_product", "flex_attention"),
    "3x3 convolutions": ("aten::mkldnn_convolution", "aten::convolution", "aten::_convolution"),
    "projections": ("aten::addmm", "aten::mm", "aten::bmm", "aten::linear", "aten::matmul"),
    "GroupNorm": ("aten::native_group_norm",),
}
OTHER = "layout and element-wise"


def group_of(name: str) -> str:
    for group, names in GROUPS.items():
        if any(name.startswith(n) for n in names):
            return group
    return OTHER


def matmul_seconds(a: torch.Tensor, b: torch.Tensor, repeats: int = 4) -> float:
    """The fastest of `repeats` 2048² fp32 matmuls, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "results" / "bench" / "feval-profile.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from torch.profiler import ProfilerActivity, profile

    from nerd.lab.bench import implicit_layer_flops
    from nerd.models import attention_kernel
    from nerd.weights import load_weights

    model, info = load_weights("nerd-s25")
    h, w = args.height, args.width
    y = torch.rand(1, 1, h, w, generator=torch.Generator().manual_seed(0))
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    with torch.inference_mode(), model._normalised_weights():
        s = model.inject(y)
        z = model.layer(torch.zeros_like(s), s)  # a state of the solve's scale, not zeros
        for _ in range(2):
            model.layer(z, s)
            a @ b
        times, mm_times = [], []
        for _ in range(args.repeats):  # matmuls between the f-evaluations: the clock the two see is the same
            mm_times.append(matmul_seconds(a, b))
            start = time.perf_counter()
            model.layer(z, s)
            times.append(time.perf_counter() - start)
        mm_times.append(matmul_seconds(a, b))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model.layer(z, s)
    mm = 2 * 2048**3 / min(mm_times) / 1e9  # the machine's rate: its fastest matmul
    seconds = statistics.median(times)
    spent: dict[str, float] = {g: 0.0 for g in [*GROUPS, OTHER]}
    for event in prof.key_averages():
        spent[group_of(event.key)] += event.self_cpu_time_total / 1e6
    profiled = sum(spent.values())
    flops = implicit_layer_flops(model.cfg, h, w)
    useful = {"attention": flops["attention"], "3x3 convolutions": flops["convs"],
              "projections": flops["projections"], "GroupNorm": 0, OTHER: 0}
    rows = []
    for group, sec in spent.items():
        share = sec / profiled
        rows.append({"group": group, "seconds": seconds * share, "share": share, "gflop": useful[group] / 1e9,
                     "gflops": useful[group] / (seconds * share) / 1e9 if useful[group] else None,
                     "seconds_at_matmul_rate": useful[group] / 1e9 / mm})
    meta = {"script": "scripts/feval_profile.py", "image": [h, w], "weights": info["name"],
            "sha256": info["sha256"][:12], "threads": args.threads, "repeats": args.repeats,
            "capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "attention": "kernel" if attention_kernel.usable(s) else "sdpa",
            "loadavg": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M")}
    result = {"meta": meta, "matmul_gflops": mm, "matmul_seconds": mm_times, "seconds": seconds, "times": times,
              "gflop": flops["total"] / 1e9, "gflops": flops["total"] / seconds / 1e9,
              "fraction_of_matmul": flops["total"] / seconds / 1e9 / mm,
              "seconds_at_matmul_rate": flops["total"] / 1e9 / mm, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    for r in rows:
        rate = f"{r['gflops']:.0f} GFLOP/s" if r["gflops"] else "-"
        print(f"{r['group']:26s} {r['seconds']:.3f} s ({100 * r['share']:.0f} %), {rate}")
    print(f"f-evaluation {seconds:.3f} s, {result['gflops']:.0f} GFLOP/s = {100 * result['fraction_of_matmul']:.0f} % "
          f"of the matmul rate ({mm:.0f} GFLOP/s); at that rate: {result['seconds_at_matmul_rate']:.3f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
