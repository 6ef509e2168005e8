"""`nerd bench`: NERD's speed, memory and solver figures next to DnCNN-S and BM3D, measured side by side.

Benchmarks are not tests: `run_bench` measures, prints readable tables and writes ``bench-<device>[-quick].json``
(plus ``solvers-<device>[-quick].png``), from which `markdown_tables` renders the speed tables of docs/performance.md.

Sections of one run (all on one machine, in one process, so ratios are taken side by side):

* ``machine``: the machine's limit, torch.mm GFLOP/s in fp32 and bf16.
* ``feval``: one f-evaluation of the implicit layer (`model.layer(z, s)` under `torch.no_grad()` and
  `parametrize.cached()`) in ms and achieved GFLOP/s, as a fraction of the same-dtype matmul figure.
* ``inference``: seconds per image and PSNR of NERD at fixed iteration counts (tol 0) and at its tolerance,
  DnCNN-S and BM3D, on a Set12 and a BSD68 image with the protocol's noise.
* ``solvers``: f-evaluations and time to reach the tolerance for Broyden, Anderson and plain iteration, with the
  residual-vs-evaluations traces (paper Fig. 10).
* ``memory``: peak memory of inference at 4 vs 17 iterations and of one training step (phantom / implicit /
  unrolled); each case runs in a fresh subprocess (see `_memory_child`).
* ``adaptive``: per-image stopping on the relative residual vs a fixed 17 iterations on held-out Train400 images.
* ``options``: the optimisations tried on one f-evaluation (bf16 autocast, channels_last, torch.compile, attention
  tile sizes, weight norm recomputed per call), each timed against the plain fp32 layer in the same round robin and
  checked to give the same output.

Timing: `time.perf_counter`, `torch.cuda.synchronize()` around each call on CUDA, median of `repeats` calls after
`warmup` calls; the methods of a comparison run interleaved (round robin), so a noisy neighbour hits all alike.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils import parametrize

from nerd import allocator
from nerd.config import SOLVER_NAMES, GradConfig, ModelConfig, SolverConfig
from nerd.lab.bench_report import (  # noqa: F401 (markdown_tables re-exported)
    SECTIONS,
    _clean,
    _render_meta,
    markdown_tables,
    plot_solvers,
    render_section,
    targets,
)
from nerd.models.nerd import DEQDenoiser
from nerd.sigma import to_unit

MIB = 2**20
Log = Callable[[str], None]


def _window_keys(n: int, r: int) -> int:
    """Sum over the n positions of one axis of the window length truncated at the borders."""
    return sum(min(i + r, n - 1) - max(i - r, 0) + 1 for i in range(n))


def implicit_layer_flops(cfg: ModelConfig, h: int, w: int, batch: int = 1) -> dict[str, int]:
    """FLOPs of one f-evaluation of the implicit layer on (batch, C, h, w), counted analytically.

    Counted (a multiply-add is 2 FLOPs, as torch.utils.flop_counter counts them):

    * ``convs``: the transformation block's two 3x3 convs C -> eC -> C, dense over the zero-padded border
      (2 * 9 * C * eC * h * w each);
    * ``projections``: the q/k/v projection C -> 3C and the output projection C -> C (per pixel);
    * ``attention``: Q K^T and A V over the keys each query actually needs: its q x q window truncated at the
      image border (sum over pixels of the window's area, separable in y and x), 2 * C FLOPs per (query, key)
      for each product (heads x head dim = C).

    Not counted: biases, GroupNorms, softmax, ReLU and residual adds (O(h w C) each, against O(h w C^2)), and
    the work a kernel wastes on masked or padded keys (see `attention_flops_computed`).

    Returns:
        {"convs", "projections", "attention", "total"} for the whole batch.
    """
    c, e, hw = cfg.channels, cfg.channels * cfg.expansion, h * w
    out = {"convs": 0, "projections": 0, "attention": 0}
    if cfg.blocks in ("both", "trans"):
        out["convs"] = 2 * (2 * 9 * c * e * hw)
    if cfg.blocks in ("both", "nl"):
        r = cfg.window // 2
        out["projections"] = 2 * hw * c * 3 * c + 2 * hw * c * c
        out["attention"] = 2 * (2 * c * _window_keys(h, r) * _window_keys(w, r))
    out = {k: v * batch for k, v in out.items()}
    out["total"] = sum(out.values())
    return out


def attention_flops_computed(cfg: ModelConfig, h: int, w: int, batch: int = 1) -> int:
    """FLOPs of Q K^T and A V that `neighbourhood_attention` actually computes, masked and padded keys included.

    Mirrors its dispatch: one (masked) attention over all h w tokens, or b x b query tiles against their
    (b + 2r)^2 halos (tiles padded to whole tiles).
    """
    from nerd.models.attention import _tile_side

    if cfg.blocks not in ("both", "nl"):
        return 0
    r, c = cfg.window // 2, cfg.channels
    if 2 * r + 1 >= 2 * max(h, w) - 1 or _tile_side(h, w, r, cfg.attn_block) >= max(h, w):
        pairs = (h * w) ** 2
    else:
        t = cfg.attn_block
        pairs = math.ceil(h / t) * math.ceil(w / t) * t * t * (t + 2 * r) ** 2
    return 2 * (2 * c * pairs) * batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of one call, synchronised on CUDA."""
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def interleaved(
    calls: dict[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int = 0
) -> dict[str, tuple[list[float], Any]]:
    """Time every call `repeats` times, round robin, after `warmup` untimed rounds: {name: (seconds, last result)}."""
    for _ in range(warmup):
        for fn in calls.values():
            timed(fn, device)
    times: dict[str, list[float]] = {name: [] for name in calls}
    last: dict[str, Any] = {}
    for _ in range(repeats):
        for name, fn in calls.items():
            sec, last[name] = timed(fn, device)
            times[name].append(sec)
    return {name: (times[name], last.get(name)) for name in calls}


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


@dataclass
class BenchSettings:
    """What one run measures; `standard(device, quick)` gives the full and the --quick sets.

    Attributes:
        device: "cpu" or "cuda".
        quick: the small, few-minute variant (recorded in the file name).
        repeats, warmup: timed and untimed calls per figure.
        crop: centre-crop every image to crop x crop (None: whole images).
        patch, patch_batch: the training-sized input of the f-evaluation and of the training step.
        feval_image: side of the image-sized f-evaluation and of the inference memory case.
        iters: fixed NERD iteration counts of the inference table (run with tol 0).
        tol: the convergence tolerance (None: the model's solver tol).
        solver_cap: f-evaluation cap of the solver comparison.
        matmul_n: side of the square matmuls.
        paper_feval: also time the paper preset's f-evaluation (random weights: speed does not depend on them).
        options_compile: include torch.compile among the options (compiling takes a minute or more on a CPU).
        val_images: held-out Train400 images of the adaptive-stopping section.
        sections: the sections to run.
    """

    device: str = "cpu"
    quick: bool = False
    repeats: int = 3
    warmup: int = 1
    crop: int | None = None
    patch: int = 64
    patch_batch: int = 4
    feval_image: int = 256
    iters: tuple[int, ...] = (4, 8, 17)
    tol: float | None = None
    solver_cap: int = 30
    matmul_n: int = 2048
    paper_feval: bool = True
    options_compile: bool = True
    val_images: int = 8
    sections: tuple[str, ...] = SECTIONS

    @classmethod
    def standard(cls, device: str = "cpu", quick: bool = False, **overrides: Any) -> BenchSettings:
        """The full run (whole images, paper and shipped presets) or --quick (64² crops, shipped model only)."""
        base: dict[str, Any] = {"matmul_n": 2048 if device == "cpu" else 8192}
        if quick:
            base.update(quick=True, repeats=2, crop=64, patch=32, feval_image=64, solver_cap=17, paper_feval=False,
                        options_compile=False)
        return cls(device=device, **{**base, **overrides})


@dataclass
class Subject:
    """The NERD model under test: the model, how a subprocess rebuilds it, its name and noise level."""

    model: DEQDenoiser
    name: str
    sigma255: float
    weights_path: str | None = None  # None: random weights of `model.cfg` (the --preset test knob)


def write_side_by_side(out: Path, script: str, argv: list[str] | None, rows: list[dict[str, Any]],
                       loadavg_start: float, **meta: Any) -> None:
    """Write the results file of a side-by-side script (`scripts/<script>`), as `python tools/readme.py` reads it:
    {"meta": the run's conditions (CPU model, torch, 1-minute load at the start, date, the command line) and `meta`,
    "rows": rows}. `argv` is the script's arguments (None: sys.argv's)."""
    import datetime

    conditions = {"torch": torch.__version__, "device_name": device_name(torch.device("cpu")),
                  "loadavg_start": loadavg_start, "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                  "command": " ".join([f"python scripts/{script}", *(argv if argv is not None else sys.argv[1:])])}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": {**meta, **conditions}, "rows": rows}, indent=1))
    print(f"wrote {out}")


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bench_matmul(device: torch.device, n: int, repeats: int, warmup: int) -> dict[str, Any]:
    """torch.mm n x n in fp32 and bf16: ms and GFLOP/s (2 n^3 FLOPs)."""
    out: dict[str, Any] = {"n": n}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        secs, _ = interleaved({name: lambda a=a, b=b: torch.mm(a, b)}, device, repeats, warmup)[name]
        sec = median(secs)
        out[name] = {"ms": 1e3 * sec, "gflops": 2 * n**3 / sec / 1e9}
    return out


def _layer_inputs(channels: int, side: int, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Seeded (z, u) of shape (batch, channels, side, side): the inputs of a timed f-evaluation."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(batch, channels, side, side, generator=gen)
    return z.to(device), torch.randn(batch, channels, side, side, generator=gen).to(device)


def _feval_cases(
    models: dict[str, DEQDenoiser], cases: list[tuple[str, int, int]], device: torch.device
) -> Iterator[tuple[str, torch.nn.Module, ModelConfig, tuple[str, int, int], Tensor, Tensor]]:
    """(preset, layer in eval mode, config, case, z, u) for every model and case."""
    for preset, model in models.items():
        for case in cases:
            yield (preset, model.layer.eval(), model.cfg, case, *_layer_inputs(model.cfg.channels, case[1], case[2],
                                                                               device))


def _feval_subjects(subject: Subject | None, s: BenchSettings, device: torch.device) -> tuple[
        dict[str, DEQDenoiser], list[tuple[str, int, int]]]:
    """The models (paper preset with random weights, the subject) and cases (patch batch, image) of an f-evaluation."""
    models: dict[str, DEQDenoiser] = {}
    if s.paper_feval:
        from nerd.models import create_model

        models["paper"] = create_model("paper").to(device).eval()
    if subject is not None:
        models[subject.name] = subject.model
    patch = min(s.patch, s.crop) if s.crop else s.patch
    return models, [("patch", patch, s.patch_batch), ("image", s.crop or s.feval_image, 1)]


def _layer_call(mod: torch.nn.Module, bf16: bool = False, cached: bool = True) -> Callable[[Tensor, Tensor], Tensor]:
    """call(z, u) -> f: one f-evaluation without autograd, weight norm computed once (`cached`), optionally bf16."""

    def call(z: Tensor, u: Tensor) -> Tensor:
        amp = torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=bf16)
        with torch.no_grad(), amp, (parametrize.cached() if cached else nullcontext()):
            return mod(z, u)

    return call


def bench_feval(
    models: dict[str, DEQDenoiser], cases: list[tuple[str, int, int]], device: torch.device, s: BenchSettings,
    matmul: dict[str, Any] | None,
) -> list[dict[str, Any]]:
    """One f-evaluation `layer(z, s)` per (model, case (label, side, batch), dtype)."""
    rows = []
    for preset, layer, cfg, (label, side, batch), z, u in _feval_cases(models, cases, device):
        useful = implicit_layer_flops(cfg, side, side, batch)
        computed = useful["total"] - useful["attention"] + attention_flops_computed(cfg, side, side, batch)
        fp32, bf16 = _layer_call(layer), _layer_call(layer, bf16=True)
        # both dtypes in one round robin, so that a noisy neighbour hits them alike
        calls = {"fp32": lambda f=fp32, z=z, u=u: f(z, u), "bf16": lambda f=bf16, z=z, u=u: f(z, u)}
        timings = interleaved(calls, device, s.repeats, s.warmup)
        for dtype, (secs, _) in timings.items():
            sec = median(secs)
            mm = (matmul or {}).get(dtype, {}).get("gflops")
            gflops = useful["total"] / sec / 1e9
            rows.append({
                "preset": preset, "case": label, "batch": batch, "h": side, "w": side, "dtype": dtype,
                "ms": 1e3 * sec, "gflop": useful["total"] / 1e9, "gflop_computed": computed / 1e9,
                "flops": useful, "gflops": gflops, "gflops_computed": computed / sec / 1e9,
                "fraction_of_matmul": gflops / mm if mm else None,
            })
    return rows


def _option_layers(layer: torch.nn.Module, s: BenchSettings, image: bool) -> dict[str, Callable[..., Any]]:
    """The variants of `bench_options`: name -> call(z, u); every one computes the same f as the baseline."""
    import copy

    plain = _layer_call
    out: dict[str, Callable[..., Any]] = {
        "fp32 (baseline)": plain(layer),
        "bf16 autocast": plain(layer, bf16=True),
        "weight norm recomputed per f-eval": plain(layer, cached=False),
    }
    last = copy.deepcopy(layer).to(memory_format=torch.channels_last)
    cl = plain(last)
    out["channels_last"] = lambda z, u: cl(z.contiguous(memory_format=torch.channels_last),
                                           u.contiguous(memory_format=torch.channels_last))
    if image:  # tile sizes only matter where the attention is tiled (the image case)
        for block in (8, 32):
            tiled = copy.deepcopy(layer)
            tiled.msa.block = block
            out[f"attention tiles {block}² (default {layer.msa.block}²)"] = plain(tiled)
    if s.options_compile:
        out["torch.compile"] = plain(torch.compile(copy.deepcopy(layer), dynamic=False))
    return out


def bench_options(
    models: dict[str, DEQDenoiser], cases: list[tuple[str, int, int]], device: torch.device, s: BenchSettings,
    log: Log = print,
) -> list[dict[str, Any]]:
    """Tried optimisations of one f-evaluation, per (model, case): ms, speed-up over the plain fp32 layer timed in
    the same round robin, and the largest output difference from it (bf16 differs by rounding; the rest must agree
    to fp32 rounding). A variant that fails (e.g. torch.compile without a compiler) is recorded with its error."""
    rows = []
    for preset, layer, _cfg, (label, side, batch), z, u in _feval_cases(models, cases, device):
        variants = _option_layers(layer, s, image=label == "image")
        ref = variants["fp32 (baseline)"](z, u)
        calls, errors, diffs = {}, {}, {}
        for name, fn in variants.items():
            try:
                sec, got = timed(lambda fn=fn, z=z, u=u: fn(z, u), device)  # first call: compiles here
                diffs[name] = float((got.float() - ref).abs().max() / ref.abs().max())
                calls[name] = lambda fn=fn, z=z, u=u: fn(z, u)
                if name == "torch.compile":
                    log(f"options: torch.compile of {preset} {label}: first call {sec:.1f} s")
            except Exception as err:  # noqa: BLE001 (a failed option is a result, not a crash)
                errors[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        timings = interleaved(calls, device, s.repeats, s.warmup)
        base = median(timings["fp32 (baseline)"][0])
        for name in variants:
            row: dict[str, Any] = {"preset": preset, "case": label, "batch": batch, "h": side, "w": side,
                                   "option": name}
            if name in errors:
                row.update(ms=None, speedup=None, max_rel_diff=None, error=errors[name])
            else:
                sec = median(timings[name][0])
                row.update(ms=1e3 * sec, speedup=base / sec, max_rel_diff=diffs[name], error=None)
            rows.append(row)
    return rows


def _nerd_call(model: DEQDenoiser, y: Tensor, sigma: float, solver: SolverConfig) -> Callable[[], Any]:
    def call() -> tuple[Tensor, int]:
        with torch.no_grad():
            eq = model.equilibrium(y, sigma, solver=solver)
        return eq.x_hat, int(eq.stats.nfe[0])

    return call


def _warm_up(model: DEQDenoiser, y: Tensor, sigma: float, device: torch.device) -> None:
    """One untimed 2-iteration solve: covers every NERD timing at y's size."""
    timed(_nerd_call(model, y, sigma, replace(model.solver, max_iter=2, tol=0.0)), device)


def _noisy(im: dict[str, Any], device: torch.device) -> Tensor:
    return torch.from_numpy(im["y"]).float()[None, None].to(device)  # (1, 1, H, W)


def _psnr(x_hat: Tensor, x: np.ndarray) -> float:
    from nerd.metrics import psnr

    return psnr(x_hat[0, 0].detach().double().cpu().numpy(), x)


def bench_inference(
    subject: Subject | None, images: list[dict[str, Any]], baselines: dict[str, Callable[[Tensor], Tensor]],
    device: torch.device, s: BenchSettings, tol: float,
) -> list[dict[str, Any]]:
    """Seconds per image and PSNR, every method on every image, interleaved round robin."""
    out = []
    for im in images:
        x, y = im["x"], _noisy(im, device)
        calls: dict[str, Callable[[], Any]] = {}
        meta: dict[str, dict[str, Any]] = {}
        if subject is not None:
            model, sigma = subject.model, to_unit(subject.sigma255)
            for k in s.iters:
                calls[f"nerd {k} it"] = _nerd_call(model, y, sigma, replace(model.solver, max_iter=k, tol=0.0))
                meta[f"nerd {k} it"] = {"method": "nerd", "iters": k, "tol": 0.0}
            solver = replace(model.solver, tol=tol)
            label = f"nerd tol {tol:g}"
            calls[label] = _nerd_call(model, y, sigma, solver)
            meta[label] = {"method": "nerd", "iters": solver.max_iter, "tol": tol}
            _warm_up(model, y, sigma, device)
        for name, fn in baselines.items():
            calls[name] = (lambda fn=fn, y=y: (fn(y), None))
            meta[name] = {"method": name}
            timed(calls[name], device)  # warm-up
        results = interleaved(calls, device, s.repeats)
        rows = []
        for name, (secs, (x_hat, nfe)) in results.items():
            rows.append({"label": name, **meta[name], "seconds": median(secs), "times": secs,
                         "psnr": _psnr(x_hat, x), "nfe": nfe})
        out.append({"set": im["set"], "name": im["name"], "h": x.shape[0], "w": x.shape[1], "rows": rows})
    return out


def bench_solvers(
    subject: Subject, images: list[dict[str, Any]], device: torch.device, s: BenchSettings, tol: float
) -> dict[str, Any]:
    """Broyden, Anderson and plain iteration to `tol` (cap `solver_cap`): nfe, time, residual traces."""
    model, sigma = subject.model, to_unit(subject.sigma255)
    out: dict[str, Any] = {"tol": tol, "max_iter": s.solver_cap, "images": []}
    for im in images:
        y = _noisy(im, device)
        _warm_up(model, y, sigma, device)
        runs = []
        for name in SOLVER_NAMES:
            # Anderson keeps 2 m full-size iterates: m 5 (its usual memory) rather than Broyden's m.
            memory = min(model.solver.memory, 5) if name == "anderson" else model.solver.memory
            solver = replace(model.solver, name=name, max_iter=s.solver_cap, tol=tol, memory=memory)
            with torch.no_grad():
                sec, eq = timed(lambda solver=solver, y=y: model.equilibrium(y, sigma, solver=solver), device)
            st = eq.stats
            nfe = int(st.nfe[0])
            runs.append({
                "solver": name, "config": dataclasses.asdict(solver), "nfe": nfe, "seconds": sec,
                "ms_per_feval": 1e3 * sec / max(nfe, 1),
                "converged": bool(st.converged[0]), "rel_residual": float(st.rel_residual[0]),
                "psnr": _psnr(eq.x_hat, im["x"]), "trace": [float(v) for v in st.trace[0].cpu()],
            })
        out["images"].append({"set": im["set"], "name": im["name"], "h": im["x"].shape[0],
                              "w": im["x"].shape[1], "runs": runs})
    return out


def bench_adaptive(
    subject: Subject, images: list[dict[str, Any]], device: torch.device, tol: float, cap: int = 17
) -> dict[str, Any]:
    """Per-image stopping at `tol` vs a fixed `cap` iterations: f-evaluations saved, PSNR lost."""
    model, sigma = subject.model, to_unit(subject.sigma255)
    rows = []
    warmed: set[torch.Size] = set()
    for im in images:
        y = _noisy(im, device)
        if y.shape not in warmed:
            _warm_up(model, y, sigma, device)
            warmed.add(y.shape)
        row: dict[str, Any] = {"name": im["name"]}
        for key, t in (("fixed", 0.0), ("adaptive", tol)):
            sec, (x_hat, nfe) = timed(_nerd_call(model, y, sigma, replace(model.solver, max_iter=cap, tol=t)),
                                      device)
            row.update({f"nfe_{key}": nfe, f"psnr_{key}": _psnr(x_hat, im["x"]), f"seconds_{key}": sec})
        rows.append(row)
    nfe_f = sum(r["nfe_fixed"] for r in rows)
    nfe_a = sum(r["nfe_adaptive"] for r in rows)
    return {
        "tol": tol, "max_iter": cap, "images": rows,
        "saved_fraction": 1 - nfe_a / nfe_f,
        "psnr_lost_db": float(np.mean([r["psnr_fixed"] for r in rows]) - np.mean([r["psnr_adaptive"] for r in rows])),
        "seconds_saved_fraction": 1 - sum(r["seconds_adaptive"] for r in rows) / sum(r["seconds_fixed"] for r in rows),
    }


MEMORY_METHOD = {
    "cpu": "each case in a fresh subprocess, after one untimed warm-up call: the peak resident set (VmHWM, reset "
    "through /proc/self/clear_refs) minus the resident set before the timed calls (VmRSS); PyTorch's CPU "
    "allocator does not cache and glibc's mmap threshold is fixed at 128 KiB, so freed tensors leave the "
    "resident set",
    "cuda": "each case in a fresh subprocess, after one untimed warm-up call: torch.cuda.max_memory_allocated "
    "minus memory_allocated before the timed calls",
}


def memory_cases(s: BenchSettings) -> list[dict[str, Any]]:
    """Inference at 4 vs 17 iterations (one image) and one training step per gradient mode (a patch batch)."""
    side = s.crop or s.feval_image
    patch = min(s.patch, s.crop) if s.crop else s.patch
    infer = [{"kind": "inference", "iters": k, "batch": 1, "h": side, "w": side} for k in (4, 17)]
    train = [
        {"kind": "train", "grad": "phantom", "steps": 8, "iters": 17},
        {"kind": "train", "grad": "implicit", "steps": 1, "iters": 17},
        {"kind": "train", "grad": "unrolled", "steps": 17, "iters": 17},
    ]
    return infer + [{**c, "batch": s.patch_batch, "h": patch, "w": patch} for c in train]


def proc_status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


def _memory_child() -> int:
    """Run one memory case (JSON spec on stdin) in this fresh process; print the result as JSON on stdout."""
    from nerd.config import config_from_dict

    spec = json.loads(sys.stdin.read())
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    if spec["weights"]:
        from nerd.weights import load_weights

        model, _ = load_weights(spec["weights"])
    else:
        cfg = config_from_dict({"model": spec["model"], "solver": spec["solver"]})
        torch.manual_seed(0)
        model = DEQDenoiser(cfg.model, solver=cfg.solver)
    model.to(device)
    case, sigma = spec["case"], spec["sigma255"] / 255
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(case["batch"], 1, case["h"], case["w"], generator=gen)
    y = (x + sigma * torch.randn(x.shape, generator=gen)).to(device)
    x = x.to(device)
    solver = replace(model.solver, max_iter=case["iters"], tol=0.0)
    if case["kind"] == "inference":
        model.eval()

        def run() -> None:
            with torch.no_grad():
                model.equilibrium(y, sigma, solver=solver)
    else:
        model.train()
        model.grad = GradConfig(mode=case["grad"], steps=case["steps"])

        def run() -> None:
            for p in model.parameters():
                p.grad = None
            F.mse_loss(model.equilibrium(y, sigma, solver=solver).x_hat, x).backward()

    run()  # warm-up: one-time allocations (kernels, thread pools, caches) belong to the baseline
    gc.collect()
    note = ""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
        except OSError:
            note = "VmHWM could not be reset: the peak may include the start-up's"
        base = proc_status_bytes("VmRSS")
    times = [timed(run, device)[0] for _ in range(spec["repeats"])]
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else proc_status_bytes("VmHWM")) - base
    print(json.dumps({"peak_bytes": peak, "baseline_bytes": base, "times": times, "note": note}))
    return 0


def bench_memory(subject: Subject, s: BenchSettings, log: Log) -> dict[str, Any]:
    """Every memory case in its own subprocess (see MEMORY_METHOD)."""
    cases = []
    for case in memory_cases(s):
        spec = {
            "weights": subject.weights_path, "model": dataclasses.asdict(subject.model.cfg),
            "solver": dataclasses.asdict(subject.model.solver), "device": s.device, "threads": torch.get_num_threads(),
            "sigma255": subject.sigma255, "case": case, "repeats": s.repeats,
        }
        cmd = [sys.executable, "-c", "import sys; from nerd.lab.bench import _memory_child; sys.exit(_memory_child())"]
        # Fixed glibc thresholds: every block >= 128 KiB is mmapped and unmapped on free, so the resident set
        # follows the live tensors (glibc's dynamic threshold would keep freed warm-up blocks resident).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
        proc = subprocess.run(cmd, input=json.dumps(spec), capture_output=True, text=True, check=False, env=env)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
            log(f"memory case {case} failed: {tail[0]}")
            cases.append({**case, "error": tail[0]})
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        times = res["times"]
        cases.append({**case, "peak_mib": res["peak_bytes"] / MIB, "baseline_mib": res["baseline_bytes"] / MIB,
                      "seconds": median(times), "times": times, "note": res["note"]})
    return {"method": MEMORY_METHOD[torch.device(s.device).type], "cases": cases}


def _centre(x: np.ndarray, crop: int | None) -> np.ndarray:
    if not crop:
        return x
    h, w = x.shape
    top, left = max(0, (h - crop) // 2), max(0, (w - crop) // 2)
    return x[top : top + crop, left : left + crop]


def _image(set_name: str, path: Path, sigma255: float, crop: int | None) -> dict[str, Any]:
    from nerd.data.noise import protocol_noisy
    from nerd.io import load_gray

    x = _centre(load_gray(path).astype(np.float64), crop)
    return {"set": set_name, "name": path.name, "x": x, "y": protocol_noisy(x, sigma255)}


def inference_images(data_root: Path, sigma255: float, crop: int | None) -> tuple[list[dict[str, Any]], list[str]]:
    """The first 256 x 256 image of Set12 and the first image of BSD68 (481 x 321), protocol noise; notes."""
    from nerd.io import list_images, load_gray

    images, notes = [], []
    for set_name, shape in (("Set12", (256, 256)), ("BSD68", None)):
        folder = data_root / set_name
        paths = list_images(folder) if folder.is_dir() else []
        if not paths:
            notes.append(f"{set_name}: no images in {folder}; skipped")
            continue
        pick = next((p for p in paths if shape is None or load_gray(p).shape == shape), paths[0])
        images.append(_image(set_name, pick, sigma255, crop))
    return images, notes


def validation_images(data_root: Path, n: int, sigma255: float, crop: int | None) -> list[dict[str, Any]]:
    """The last n Train400 images by sorted name (held out of training), protocol noise."""
    from nerd.io import list_images

    folder = data_root / "Train400"
    paths = list_images(folder)[-n:] if folder.is_dir() else []
    return [_image("Train400", p, sigma255, crop) for p in paths]


def _weights_sha(subject: Subject | None) -> str | None:
    """The checksum of the subject's weights file (None: random weights), so a results file names what it measured."""
    if subject is None or subject.weights_path is None:
        return None
    from nerd.weights import read_metadata

    return read_metadata(subject.weights_path).get("sha256")


def run_bench(
    subject: Subject | None, s: BenchSettings, *, data_root: Path, out_dir: Path, anchors: str | None = None,
    log: Log = print,
) -> tuple[dict[str, Any], Path]:
    """Measure every section of `s.sections`, print each as a table, write the JSON (and the solver plot).

    Args:
        subject: the NERD model (None: only the sections that need no NERD weights run).
    Returns:
        (results, path of the JSON).
    """
    device = torch.device(s.device)
    sigma255 = subject.sigma255 if subject else 25.0
    tol = s.tol if s.tol is not None else (subject.model.solver.tol if subject else 1e-3)
    tag = device.type + ("-quick" if s.quick else "")
    res: dict[str, Any] = {"meta": {
        "device": device.type, "device_name": device_name(device), "torch": torch.__version__,
        "python": platform.python_version(), "threads": torch.get_num_threads(), "quick": s.quick,
        "malloc": allocator.status,
        "repeats": s.repeats, "warmup": s.warmup, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "settings": dataclasses.asdict(s), "sigma": sigma255, "tol": tol,
        "model_name": subject.name if subject else "none",
        "weights_sha256": _weights_sha(subject),
        "model": dataclasses.asdict(subject.model.cfg) if subject else None,
        "solver": dataclasses.asdict(subject.model.solver) if subject else None,
    }}
    notes: list[str] = []
    res["notes"] = notes
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    res["meta"]["loadavg_start"] = load
    if load is not None and device.type == "cpu" and load >= 0.5:
        notes.append(f"the machine was busy (1-minute load average {load:.1f} at the start): other processes share "
                     f"the {os.cpu_count()} cores, timings are inflated and noisy")
    if subject is not None:
        subject.model.to(device).eval()
    log(_render_meta(res))

    def show(name: str) -> None:
        text = render_section(res, name)
        if text:
            log(text)

    if "machine" in s.sections:
        res["machine"] = bench_matmul(device, s.matmul_n, s.repeats, s.warmup)
        show("machine")
    if {"feval", "options"} & set(s.sections):
        models, cases = _feval_subjects(subject, s, device)
    if "feval" in s.sections:
        if subject is None:
            notes.append("f-eval: no NERD weights (nerd-s25 not shipped, no --weights): the shipped model is skipped")
        res["feval"] = bench_feval(models, cases, device, s, res.get("machine"))
        show("feval")
    if "options" in s.sections:
        res["options"] = bench_options(models, cases, device, s, log)
        show("options")
    images: list[dict[str, Any]] = []
    if {"inference", "solvers"} & set(s.sections):
        images, more = inference_images(data_root, sigma255, s.crop)
        notes.extend(more)
    if "inference" in s.sections and images:
        baselines: dict[str, Callable[[Tensor], Tensor]] = {}
        try:
            from nerd.models.dncnn import load_dncnn

            dncnn = load_dncnn(sigma255, anchors).to(device)
            baselines["dncnn"] = lambda y: dncnn(y, to_unit(sigma255))
        except (FileNotFoundError, ValueError) as err:
            notes.append(f"DnCNN-S skipped: {err}")
        try:
            import bm3d  # noqa: F401

            from nerd.models.bm3d import BM3D

            bm3d_model = BM3D()
            baselines["bm3d"] = lambda y: bm3d_model(y, to_unit(sigma255))
        except ImportError:
            notes.append("BM3D skipped: the bm3d package is not installed (pip install 'nerd[bm3d]')")
        if subject is None:
            notes.append("inference: no NERD weights, baselines only")
        with torch.no_grad():
            res["inference"] = bench_inference(subject, images, baselines, device, s, tol)
        show("inference")
    needs_model = [n for n in ("solvers", "memory", "adaptive") if n in s.sections]
    if subject is None and needs_model:
        notes.append(f"{', '.join(needs_model)}: skipped, no NERD weights (nerd-s25 not shipped, no --weights)")
    if subject is not None and "solvers" in s.sections and images:
        res["solvers"] = bench_solvers(subject, images, device, s, tol)
        plot = plot_solvers(res["solvers"], out_dir / f"solvers-{tag}.png")
        res["solvers"]["plot"] = plot.name if plot else None
        if plot is None:
            notes.append("solver plot skipped: matplotlib is not installed")
        show("solvers")
    if subject is not None and "memory" in s.sections:
        res["memory"] = bench_memory(subject, s, log)
        show("memory")
    if subject is not None and "adaptive" in s.sections:
        val = validation_images(data_root, s.val_images, sigma255, s.crop)
        if val:
            res["adaptive"] = bench_adaptive(subject, val, device, tol)
            show("adaptive")
        else:
            notes.append(f"adaptive: no Train400 folder under {data_root}; skipped")
    res["meta"]["loadavg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    res["targets"] = targets(res)
    show("targets")
    for n in notes:
        log(f"note: {n}")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench-{tag}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_clean(res), indent=1) + "\n")
    os.replace(tmp, path)
    return res, path
