"""Side-by-side timing of the neighbourhood attention of this checkout against the one of an earlier revision.

    python scripts/ab_attention.py --rev ee5f55c --threads 1     # about 10 minutes on one core

The earlier `src/nerd/models/attention.py` is read with `git show REV:...` and loaded as a module; both versions
run in this process, interleaved round robin (`nerd.lab.bench.interleaved`), on the same inputs: the attention alone
(whole images, training patches forward and backward) and a whole NERD denoise with the shipped sigma-25 weights
(17 Broyden iterations), where the earlier attention is swapped into the model. Also records the largest output
difference (the two must agree). Writes results/bench/attention-ab.json, which `python tools/readme.py` renders.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

import nerd.models.attention as current
from nerd.lab.bench import interleaved, median, write_side_by_side
from nerd.weights import load_weights

ROOT = Path(__file__).resolve().parents[1]
PATH = "src/nerd/models/attention.py"


def load_revision(rev: str):  # noqa: ANN201 -- a module
    """The attention module as it was at `rev`."""
    text = subprocess.run(["git", "show", f"{rev}:{PATH}"], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout
    with tempfile.TemporaryDirectory() as folder:  # the module lives on in memory once executed
        file = Path(folder) / "attention_at_rev.py"
        file.write_text(text)
        spec = importlib.util.spec_from_file_location("attention_at_rev", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def attention_case(module, shape: tuple[int, ...], window: int, backward: bool) -> Callable[[], torch.Tensor]:
    """One call of `module.neighbourhood_attention` on fixed random (B, heads, H, W, d) inputs."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=g).requires_grad_(backward) for _ in range(3))
    weight = torch.randn(*shape, generator=g)

    def call() -> torch.Tensor:
        if not backward:
            with torch.no_grad():
                return module.neighbourhood_attention(q, k, v, window)
        out = module.neighbourhood_attention(q, k, v, window)
        return torch.cat([t.flatten() for t in torch.autograd.grad((out * weight).sum(), (q, k, v))])

    return call


def denoise_case(module, side: int) -> Callable[[], torch.Tensor]:
    """A whole denoise of a (1, 1, side, side) noisy image with nerd-s25, 17 iterations, `module`'s attention."""
    model, _ = load_weights("nerd-s25")
    model.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, side // 8, side // 8, generator=g)
    x = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear")
    y = x + 25 / 255 * torch.randn(x.shape, generator=g)
    solver = replace(model.solver, max_iter=17, tol=0.0)

    def call() -> torch.Tensor:
        saved = current.neighbourhood_attention
        current.neighbourhood_attention = module.neighbourhood_attention  # NeighbourhoodMSA looks it up here
        try:
            with torch.inference_mode():
                return model(y, 25 / 255, solver=solver)
        finally:
            current.neighbourhood_attention = saved

    return call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rev", required=True, help="the earlier revision (e.g. a commit hash)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench" / "attention-ab.json")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    old = load_revision(args.rev)
    rev = subprocess.run(["git", "rev-parse", "--short", args.rev], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    cases: list[tuple[str, Callable[[Any], Callable[[], torch.Tensor]]]] = [
        ("attention, image 256×256, 3 heads × 16, q 33", lambda m: attention_case(m, (1, 3, 256, 256, 16), 33, False)),
        ("attention, image 321×481 (BSD68), q 33", lambda m: attention_case(m, (1, 3, 321, 481, 16), 33, False)),
        ("attention, training patches 12×64², forward", lambda m: attention_case(m, (12, 3, 64, 64, 16), 33, False)),
        ("attention, training patches 12×64², forward + backward",
         lambda m: attention_case(m, (12, 3, 64, 64, 16), 33, True)),
        ("nerd-s25 denoise 256×256, Broyden 17", lambda m: denoise_case(m, 256)),
    ]
    rows = []
    for label, make in cases:
        calls = {"before": make(old), "now": make(current)}
        timings = interleaved(calls, torch.device("cpu"), args.repeats, warmup=1)
        before, now = (median(timings[k][0]) for k in ("before", "now"))
        diff = float((timings["before"][1] - timings["now"][1]).abs().max())
        rows.append({"case": label, "before_s": before, "now_s": now, "speedup": before / now, "max_abs_diff": diff})
        print(f"{label}: {before:.3f} s -> {now:.3f} s ({before / now:.2f}x), max |diff| {diff:.1e}", flush=True)
    write_side_by_side(args.out, "ab_attention.py", argv, rows, load, rev=rev, threads=args.threads,
                       repeats=args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
