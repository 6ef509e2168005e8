"""Rendering of `nerd bench` results: the project's performance targets, the docs' speed tables and the solver plot.

Split from `nerd.lab.bench` so that the docs generator (tools/readme.py) can render a results file without the
measuring code.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

SECTIONS = ("machine", "feval", "options", "inference", "solvers", "memory", "adaptive")


TARGETS = (
    "f-eval >= 50 % of matmul (fp32, useful FLOPs)",
    "inference peak memory at 17 iters <= 1.1x at 4",
    "phantom step <= 0.5x memory of unrolled backprop",
    "adaptive stopping >= 30 % f-evals saved at <= 0.02 dB lost",
    "a NERD iteration count beats BM3D's PSNR faster than BM3D",
)
Verdict = tuple[bool, str] | None  # (met, the numbers), or None: not measured


def _find(cases: list[dict[str, Any]], **kw: Any) -> dict[str, Any] | None:
    return next((c for c in cases if "peak_mib" in c and all(c.get(k) == v for k, v in kw.items())), None)


def _memory_ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, limit: float) -> Verdict:
    if not (a and b and b["peak_mib"] > 0):
        return None
    r = a["peak_mib"] / b["peak_mib"]
    return r <= limit, f"{a['peak_mib']:.1f} vs {b['peak_mib']:.1f} MiB: {r:.2f}x"


def _feval_verdict(rows: list[dict[str, Any]]) -> Verdict:
    fp32 = [r for r in rows if r["dtype"] == "fp32" and r["fraction_of_matmul"] is not None]
    if not fp32:
        return None
    detail = "; ".join(f"{r['preset']} {r['case']}: {100 * r['fraction_of_matmul']:.0f} %" for r in fp32)
    return all(r["fraction_of_matmul"] >= 0.5 for r in fp32), detail


def _adaptive_verdict(ad: dict[str, Any] | None) -> Verdict:
    if not ad:
        return None
    met = ad["saved_fraction"] >= 0.30 and ad["psnr_lost_db"] <= 0.02
    return met, f"{100 * ad['saved_fraction']:.1f} % saved, {ad['psnr_lost_db']:+.4f} dB lost (tol {ad['tol']:g})"


def _bm3d_verdict(images: list[dict[str, Any]]) -> Verdict:
    """Per image, the NERD row with the fewest f-evaluations that has a higher PSNR than BM3D in less time."""
    methods = [{r["method"] for r in im["rows"]} for im in images]
    if not images or not all({"bm3d", "nerd"} <= m for m in methods):
        return None
    met, parts = True, []
    for im in images:
        bm = next(r for r in im["rows"] if r["method"] == "bm3d")
        wins = [r for r in im["rows"]
                if r["method"] == "nerd" and r["psnr"] > bm["psnr"] and r["seconds"] < bm["seconds"]]
        ref = f"BM3D {bm['psnr']:.2f} dB in {bm['seconds']:.2f} s"
        if wins:
            b = min(wins, key=lambda r: (r["nfe"], r["seconds"]))
            parts.append(f"{im['name']}: {b['label']} (nfe {b['nfe']}) {b['psnr']:.2f} dB in {b['seconds']:.2f} s "
                         f"vs {ref}")
        else:
            met = False
            parts.append(f"{im['name']}: no NERD row beats {ref}")
    return met, "; ".join(parts)


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The project's performance targets (`TARGETS`): met / not met / None (not measured), with the numbers."""
    cases = (res.get("memory") or {}).get("cases", [])
    verdicts = [
        _feval_verdict(res.get("feval") or []),
        _memory_ratio(_find(cases, kind="inference", iters=17), _find(cases, kind="inference", iters=4), 1.1),
        _memory_ratio(_find(cases, grad="phantom"), _find(cases, grad="unrolled"), 0.5),
        _adaptive_verdict(res.get("adaptive")),
        _bm3d_verdict(res.get("inference") or []),
    ]
    return [{"target": t, "met": v[0] if v else None, "detail": v[1] if v else "not measured"}
            for t, v in zip(TARGETS, verdicts, strict=True)]


def plot_solvers(solvers: dict[str, Any], path: Path) -> Path | None:
    """Residual vs f-evaluations per solver, one panel per image (paper Fig. 10); None without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    ims = solvers["images"]
    fig = Figure(figsize=(5 * len(ims), 3.8), layout="constrained")
    axes = fig.subplots(1, len(ims), squeeze=False)[0]
    for ax, im in zip(axes, ims, strict=True):
        for run in im["runs"]:
            trace = [v for v in run["trace"] if v is not None and math.isfinite(v)]
            ax.semilogy(range(1, len(trace) + 1), trace, marker=".", label=f"{run['solver']} ({run['nfe']})")
        ax.axhline(solvers["tol"], color="gray", ls="--", lw=0.8)
        ax.set(title=f"{im['set']} {im['name']} ({im['h']}x{im['w']})", xlabel="f-evaluations",
               ylabel="relative residual")
        ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _clean(obj: Any) -> Any:
    """JSON-ready: NaN / inf -> None, tuples -> lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def _f(v: Any, spec: str = ".2f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _table(head: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(head) - 1)
    sep = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def render_section(res: dict[str, Any], name: str) -> str:
    """One section of a results dict as markdown ("" when it was not measured)."""
    data = res.get(name)
    if not data:
        return ""
    if name == "machine":
        rows = [[f"torch.mm {data['n']}² {d}", _f(data[d]["ms"], ".1f"), _f(data[d]["gflops"], ".0f")]
                for d in ("fp32", "bf16")]
        return "### The machine's limit\n\n" + _table(["op", "ms", "GFLOP/s"], rows)
    if name == "feval":
        rows = [[r["preset"], f"{r['case']} {r['batch']}×{r['h']}²", r["dtype"], _f(r["ms"], ".1f"),
                 _f(r["gflop"], ".3g"), _f(r["gflop_computed"], ".3g"), _f(r["gflops"], ".1f"),
                 _f(None if r["fraction_of_matmul"] is None else 100 * r["fraction_of_matmul"], ".0f") + " %"]
                for r in data]
        head = ["model", "input", "dtype", "ms", "GFLOP useful", "GFLOP computed", "GFLOP/s useful", "of mm"]
        return ("### One f-evaluation of the implicit layer\n\n" + _table(head, rows, "lllrrrrr")
                + "\nUseful FLOPs: `implicit_layer_flops` (windows truncated at the border); computed: what the "
                "attention kernel does, masked and padded keys included.\n")
    if name == "options":
        rows = [[r["preset"], f"{r['case']} {r['batch']}×{r['h']}²", r["option"], _f(r["ms"], ".1f"),
                 _f(r["speedup"], ".2f") + ("×" if r["speedup"] is not None else ""),
                 _f(r["max_rel_diff"], ".1e") if not r["error"] else f"failed: {r['error']}"]
                for r in data]
        return ("### Optimisations tried on one f-evaluation\n\n"
                + _table(["model", "input", "option", "ms", "speed-up vs fp32", "max rel. difference"], rows,
                         "llllrr")
                + "\nEach option is timed in the same round robin as the plain fp32 layer (weight norm computed once "
                "per forward, the default); speed-up > 1 is faster. The difference is max |f - f_fp32| / max |f_fp32| "
                "on the same input. What is kept and why: see *Performance notes*.\n")
    if name == "inference":
        parts = ["### Inference (seconds per image, protocol noise)\n"]
        for im in data:
            bm = next((r for r in im["rows"] if r["method"] == "bm3d"), None)
            rows = []
            for r in im["rows"]:
                ratio = r["seconds"] / bm["seconds"] if bm else None
                dp = r["psnr"] - bm["psnr"] if bm else None
                rows.append([r["label"], _f(r["nfe"], "d"), _f(r["seconds"], ".3f"), _f(ratio, ".2f") + "×",
                             _f(r["psnr"], ".2f"), _f(dp, "+.2f")])
            parts.append(f"\n{im['set']} {im['name']} ({im['w']}×{im['h']})\n\n"
                         + _table(["method", "nfe", "s/image", "time vs BM3D", "PSNR (dB)", "vs BM3D (dB)"], rows))
        return "".join(parts)
    if name == "solvers":
        parts = [f"### Solvers to tol {data['tol']:g} (cap {data['max_iter']})\n"]
        for im in data["images"]:
            rows = [[r["solver"], str(r["nfe"]), _f(r["seconds"], ".3f"), _f(r["ms_per_feval"], ".1f"),
                     "yes" if r["converged"] else "no", _f(r["rel_residual"], ".2e"), _f(r["psnr"], ".2f")]
                    for r in im["runs"]]
            parts.append(f"\n{im['set']} {im['name']} ({im['w']}×{im['h']})\n\n"
                         + _table(["solver", "nfe", "s", "ms/f-eval", "converged", "rel residual", "PSNR"], rows))
        return "".join(parts)
    if name == "memory":
        rows = []
        for c in data["cases"]:
            what = (f"inference {c['iters']} it" if c["kind"] == "inference"
                    else f"train step, {c['grad']} (solve {c['iters']}, T {c['steps']})" if c["grad"] == "phantom"
                    else f"train step, {c['grad']} ({c['steps'] if c['grad'] == 'unrolled' else c['iters']} it)")
            rows.append([what, f"{c['batch']}×{c['h']}×{c['w']}", _f(c.get("peak_mib"), ".1f"),
                         _f(c.get("seconds"), ".3f")])
        return ("### Peak memory\n\n" + _table(["case", "input", "peak MiB (above baseline)", "s"], rows, "llrr")
                + f"\nMethod: {data['method']}.\n")
    if name == "adaptive":
        rows = [[r["name"], str(r["nfe_fixed"]), str(r["nfe_adaptive"]), _f(r["psnr_fixed"], ".3f"),
                 _f(r["psnr_adaptive"], ".3f")] for r in data["images"]]
        return (f"### Adaptive stopping (tol {data['tol']:g}) vs {data['max_iter']} iterations\n\n"
                + _table(["image", "nfe fixed", "nfe adaptive", "PSNR fixed", "PSNR adaptive"], rows)
                + f"\nf-evaluations saved {100 * data['saved_fraction']:.1f} %, time saved "
                f"{100 * data['seconds_saved_fraction']:.1f} %, PSNR lost {data['psnr_lost_db']:+.4f} dB.\n")
    if name == "targets":
        # a run of some sections (--sections) leaves targets unmeasured: one line names them instead of rows
        rows = [[t["target"], "met" if t["met"] else "not met", t["detail"]] for t in data if t["met"] is not None]
        unmeasured = [t["target"] for t in data if t["met"] is None]
        table = _table(["target", "status", "numbers"], rows, "lll") if rows else ""
        rest = f"\nNot measured by this run: {'; '.join(unmeasured)}.\n" if unmeasured else ""
        return "### Targets\n\n" + table + rest
    raise KeyError(name)


def _render_meta(res: dict[str, Any]) -> str:
    m = res["meta"]
    return (f"Measured by `nerd bench{' --quick' if m['quick'] else ''}` on {m['device_name']} ({m['device']}), "
            f"torch {m['torch']}, {m['threads']} thread(s), model {m['model_name']}"
            + (f" (weights sha256 {m['weights_sha256'][:12]})" if m.get("weights_sha256") else "")
            + "; times are medians of "
            f"{m['repeats']} run(s) after {m['warmup']} warm-up.\n")


def markdown_tables(json_path: str | os.PathLike[str], link_dir: str | None = None, level: int = 3) -> str:
    """The speed tables of docs/performance.md (every measured section and the target status) from a bench results JSON.

    Args:
        link_dir: where the document that shows the tables finds the JSON's folder (for the solver plot's link);
            None: no link.
        level: markdown heading level of each section's title (3: `###`; 4 nests them under a `###` section).
    """
    res = json.loads(Path(json_path).read_text())
    parts = [_render_meta(res)]
    for name in (*SECTIONS, "targets"):
        parts.append(render_section(res, name))
        plot = (res.get(name) or {}).get("plot") if name == "solvers" else None
        if plot and link_dir is not None:
            parts.append(f"![residual per f-evaluation, per solver]({link_dir}/{plot})\n")
    notes = res.get("notes") or []
    if notes:
        parts.append("Notes:\n\n" + "".join(f"- {n}\n" for n in notes))
    text = "\n".join(p for p in parts if p)
    return re.sub(r"^### ", "#" * level + " ", text, flags=re.M)
