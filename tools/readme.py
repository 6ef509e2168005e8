"""Regenerate the documentation's tables from the committed results files: `python tools/readme.py [--check]`.

Each generated block sits between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` in one page: README.md or a page
of docs/ (each block in exactly one of them). No number in those blocks is typed by hand: they come from
results/eval/*.json (`nerd eval`), results/training/*.json (collected from training runs with
`python tools/readme.py --collect RUN...`), results/bench/*.json (`nerd bench`), results/experiments/
(`nerd experiment`) and the metadata of the shipped weights. Links inside a block are relative to the folder of the
page that shows it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nerd.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"


def pages() -> list[Path]:
    """The pages that hold generated blocks: README.md, then docs/*.md by name."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _link(path: Path, base: Path) -> str:
    """`path` as a link from a page in folder `base` (posix, relative)."""
    return Path(os.path.relpath(path, base)).as_posix()

# The paper's Table I (NERD trained on BSD, PSNR / SSIM), quoted as published, for side-by-side reading only.
PAPER_NERD = {
    ("Set12", 15): (33.20, 0.9118), ("Set12", 25): (30.84, 0.8736), ("Set12", 50): (27.72, 0.8075),
    ("BSD68", 15): (31.91, 0.8975), ("BSD68", 25): (29.43, 0.8370), ("BSD68", 50): (26.49, 0.7389),
    ("Urban100", 15): (33.48, 0.9341), ("Urban100", 25): (31.03, 0.9013), ("Urban100", 50): (27.62, 0.8292),
}

TABLE_SETS, TABLE_SIGMAS = ("Set12", "BSD68", "Urban100"), (15, 25, 50)  # rows of the results tables, in order


EARLIER_MAX_ITER = 17  # the solver the shipped files carried before their stopping rule (scripts/apply_budget.py)
EARLIER_TOL = 1e-3


def _shipped_solve(which: str = "shipped") -> Callable[[dict, int], bool]:
    """A test of a NERD report's meta (or a partial file's key) at sigma.

    which="shipped": the shipped weights of that sigma as they are now, with their own solver (the checksum covers
    the solver, and a run with `--iters` records its own cap); which="earlier": the same tensors with the earlier
    default of 17 iterations at tolerance 1e-3 (the checksum recomputed with the report's solver). Reports of
    weights since replaced, or of another solver setting (the 6/11-iteration caps shipped for a while), match
    neither."""
    from safetensors.torch import load_file

    from nerd.config import SolverConfig, dumps
    from nerd.weights import _header, read_metadata, shipped, tensors_sha256

    files = {name: (path, read_metadata(path)) for name, path in shipped().items()}
    cap = {name: json.loads(meta["solver"])["max_iter"] for name, (_, meta) in files.items()}
    tensors: dict[str, dict] = {}

    def earlier_sha(name: str, solver: dict) -> str | None:
        path, meta = files[name]
        try:
            header = _header({**meta, "solver": dumps(SolverConfig(**solver))})
        except (TypeError, ValueError):
            return None
        if name not in tensors:
            tensors[name] = load_file(str(path))
        return tensors_sha256(tensors[name], header)

    def test(meta: dict, sigma: int) -> bool:
        name, solver = f"nerd-s{sigma}", meta.get("solver") or {}
        if name not in files:
            return False
        if which == "shipped":
            return meta.get("sha256") == files[name][1]["sha256"] and solver.get("max_iter") == cap[name]
        return (solver.get("max_iter") == EARLIER_MAX_ITER and solver.get("tol") == EARLIER_TOL
                and meta.get("sha256") not in (None, files[name][1]["sha256"])
                and meta.get("sha256") == earlier_sha(name, solver))

    return test


def _results(name: str) -> dict | None:
    """results/<name> (a JSON results file) read, or None when it is not there yet."""
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def _eval_files(pattern: str) -> list[Path]:
    """Reports under results/eval and its earlier-17it/ folder (the reports of the earlier default, kept apart
    because a new run of the same weights and set writes the same file name)."""
    return sorted((RESULTS / "eval").glob(pattern)) + sorted((RESULTS / "eval" / "earlier-17it").glob(pattern))


def _load_evals(ensemble: int = 1, which: str = "shipped") -> dict[tuple[str, str, int], dict]:
    """Full-set eval results by (method, set, sigma) of `nerd eval --ensemble` (1: single solves); NERD results only
    for the shipped weights and solver (which="earlier": the same weights at the earlier 17 iterations)."""
    is_shipped = _shipped_solve(which)
    found: dict[tuple[str, str, int], dict] = {}
    for path in _eval_files("eval-*.json"):
        data = json.loads(path.read_text())
        if data.get("limit"):
            continue  # partial runs never enter the table
        if data.get("meta", {}).get("ensemble", 1) != ensemble:
            continue  # a self-ensemble's figures are reported apart from the single solves'
        sigma = round(data["sigma"])
        method = data["method"]
        if method == "nerd" and not is_shipped(data.get("meta", {}), sigma):
            continue
        found[(method, data["set"], sigma)] = data
    return found


def _nerd_in_progress(ensemble: int = 1, which: str = "shipped") -> dict[tuple[str, int], int]:
    """Images finished by interrupted `nerd eval [--ensemble N]` runs of the shipped weights (their `.partial` files),
    by (set, sigma): a cell not measured yet says how far its resumable run has come."""
    is_shipped = _shipped_solve(which)
    done: dict[tuple[str, int], int] = {}
    for path in _eval_files("eval-nerd-*.json.partial"):
        try:
            data = json.loads(path.read_text())
            key = json.loads(data["key"])
            sigma = round(key["sigma"])
            if is_shipped(key, sigma) and key.get("ensemble", 1) == ensemble:
                done[(key["set"], sigma)] = max(done.get((key["set"], sigma), 0), len(data["rows"]))
        except (ValueError, KeyError, TypeError):
            continue  # not a partial file of this tool's format
    return done


def _cell(data: dict | None) -> str:
    """A report's mean 'PSNR / SSIM', or 'not measured'."""
    return f"{data['means']['psnr']:.2f} / {data['means']['ssim']:.4f}" if data else "not measured"


def results_table() -> str:
    evals, earlier = _load_evals(), _load_evals(which="earlier")
    in_progress = _nerd_in_progress()
    lines = [
        "| set | σ | nerd (ours, shipped) | iterations | s/image | nerd, 17 iterations | DnCNN-S | BM3D "
        "| NERD (paper, published) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for set_name in TABLE_SETS:
        for sigma in TABLE_SIGMAS:
            cells = []
            nerd = evals.get(("nerd", set_name, sigma))
            for method in ("nerd", "dncnn", "bm3d"):
                cells.append(_cell(evals.get((method, set_name, sigma))))
            if not nerd and (set_name, sigma) in in_progress:
                cells[0] += f" ({in_progress[(set_name, sigma)]} images done, resumable)"
            iters = f"{nerd['means']['nfe']:.1f}" if nerd and nerd["means"].get("nfe") is not None else "–"
            secs = f"{nerd['means']['seconds']:.1f}" if nerd else "–"
            if nerd and str(nerd.get("meta", {}).get("device", "cpu")).startswith("cuda"):
                secs += " (GPU)"  # scored on a GPU (same float32 protocol); its seconds are not a CPU's
            before = earlier.get(("nerd", set_name, sigma))
            paper = PAPER_NERD.get((set_name, sigma))
            paper_cell = f"{paper[0]:.2f} / {paper[1]:.4f}" if paper else "–"
            row = [set_name, str(sigma), cells[0], iters, secs, _cell(before) if before else "–", cells[1], cells[2],
                   paper_cell]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# --- colour (nerd.colour; `nerd eval` on CBSD68 / Kodak24; scripts/colour_study.py)

COLOUR_SETS, COLOUR_SIGMAS = ("CBSD68", "Kodak24"), (15, 25, 50)
COLOUR_SET_SIZES = {"CBSD68": 68, "Kodak24": 24}  # images per set (../shared/data/README.md)
# CBM3D's published CBSD68 figures (quoted in ../shared/data/README.md from the FFDNet / DRUNet tables), for reading
# beside the measured ones only.
CBM3D_PUBLISHED = {("CBSD68", 15): 33.52, ("CBSD68", 25): 30.71, ("CBSD68", 50): 27.38}


def _colour_reports() -> dict[tuple[str, str, int], dict]:
    """Colour `nerd eval` results by (method, set, sigma), from reports and from the partial files of runs not
    finished yet (the one with more images where both exist): method "nerd:<colour method>" for NERD with the
    shipped weights' tensors as they are now (the solver that ran is in the report), "cbm3d". Each value:
    {"rows": {image: row}, "meta": ..., "complete": bool}."""
    from safetensors.torch import load_file

    from nerd.evaluate import check_row, digest
    from nerd.weights import shipped, tensors_sha256

    shipped_sha = {name: tensors_sha256(load_file(str(path))) for name, path in shipped().items()}
    found: dict[tuple[str, str, int], dict] = {}
    for path in sorted((RESULTS / "eval").glob("eval-*-s*.json*")):
        if not (path.name.endswith(".json") or path.name.endswith(".json.partial")):
            continue
        try:
            data = json.loads(path.read_text())
            if path.name.endswith(".partial"):
                key = json.loads(data["key"])
                meta, rows, set_name, sigma, method = key, data["rows"], key["set"], key["sigma"], key["method"]
                rows = [{k: v for k, v in r.items() if k != "sha256"} for r in rows
                        if r.get("sha256") == digest(data["key"], {k: v for k, v in r.items() if k != "sha256"})]
            else:
                meta, rows, set_name, sigma, method = (data["meta"], data["rows"], data["set"], data["sigma"],
                                                       data["method"])
                if data.get("limit") or data.get("rows_sha256") != digest(rows):
                    continue
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not meta.get("colour"):
            continue
        if method == "nerd":
            used = meta.get("weights_tensors_sha256") or {}
            if not used or any(shipped_sha.get(name) != sha for name, sha in used.items()):
                continue  # weights since replaced, or not shipped ones
            method = f"nerd:{meta.get('colour_method')}"
        rows = {r["name"]: r for r in rows if not isinstance(check_row(r), str)}
        k = (method, set_name, round(sigma))
        if rows and len(rows) > len(found.get(k, {}).get("rows", {})):
            found[k] = {"rows": rows, "meta": meta, "complete": path.name.endswith(".json")}
    return found


def colour_table(full: bool = False) -> str:
    """NERD on the colour sets with the shipped colour method and with R, G, B each on its own, beside CBM3D, every
    mean over the same images (those all three have finished: a set not finished yet says how many of how many)."""
    from nerd.colour import SHIPPED

    found = _colour_reports()
    cols = [f"nerd:{SHIPPED}", "nerd:rgb", "cbm3d"]
    head = (f"| set | σ | images | NERD colour (`{SHIPPED}`, shipped) | NERD per-channel RGB | CBM3D | "
            "NERD − CBM3D (dB) | CBM3D (published) |")
    if full:
        head += " NERD iterations | s/image NERD / RGB / CBM3D | NERD ahead of CBM3D on |"
    lines = [head, "| --- | ---: | ---: |" + " ---: |" * (5 + 3 * full)]
    for set_name in COLOUR_SETS:
        total = COLOUR_SET_SIZES[set_name]  # not read from the data folder: a page renders the same everywhere
        for sigma in COLOUR_SIGMAS:
            reps = [found.get((c, set_name, sigma)) for c in cols]
            if not any(reps):
                continue
            common = set.intersection(*(set(r["rows"]) for r in reps if r))
            if not common:
                continue

            def mean(rep: dict | None, what: str = "psnr", common: set = common) -> float | None:
                return sum(rep["rows"][n][what] for n in common) / len(common) if rep else None

            def cell(rep: dict | None) -> str:
                return f"{mean(rep):.2f} / {mean(rep, 'ssim'):.4f}" if rep else "not measured"

            n = len(common)
            images = f"{n}" + (f" of {total}" if total and n < total else "")
            gap = f"{mean(reps[0]) - mean(reps[2]):+.2f}" if reps[0] and reps[2] else "–"
            pub = CBM3D_PUBLISHED.get((set_name, sigma))
            row = [set_name, str(sigma), images, *(cell(r) for r in reps), gap, f"{pub:.2f}" if pub else "–"]
            if full:
                nfe = mean(reps[0], "nfe") if reps[0] else None
                row.append(f"{nfe:.1f}" if nfe is not None else "–")
                row.append(" / ".join(f"{mean(r, 'seconds'):.1f}" if r else "–" for r in reps))
                if reps[0] and reps[2]:
                    ahead = sum(reps[0]["rows"][i]["psnr"] > reps[2]["rows"][i]["psnr"] for i in common)
                    row.append(f"{ahead} of {n}")
                else:
                    row.append("–")
            lines.append("| " + " | ".join(row) + " |")
    if len(lines) == 2:
        return "_not measured yet: `nerd eval --method nerd --sets CBSD68 Kodak24 --sigma 25` (and `--method cbm3d`)_"
    return "\n".join(lines)


def colour_study_table() -> str:
    """results/colour/study.json (`scripts/colour_study.py`): every colour method on Kodak24 crops, per sigma, the
    mean over the images every method has, against per-channel RGB."""
    data = _results("colour/study.json")
    if data is None:
        return "_not measured yet: `python scripts/colour_study.py`_"
    meta, out = data["meta"], []
    for sigma in sorted({r["sigma"] for r in data["rows"]}):
        rows = [r for r in data["rows"] if r["sigma"] == sigma]
        by: dict[str, dict[str, dict]] = {}
        for r in rows:
            by.setdefault(r["method"], {})[r["image"]] = r
        full = max(len(v) for v in by.values())
        commands = "; ".join(f"`{c}`" for c in meta.get("commands") or [meta["command"]])
        out += [f"σ = {sigma:g}, by {commands} ({meta['set']}, {meta['crop']}×{meta['crop']} centre crops; "
                f"{meta['machine']}, torch {meta['torch']}, {meta['threads']} thread(s); NERD at the iteration budget "
                f"{', '.join(f'{k} {v}' for k, v in meta['budget'].items())}):", "",
                "| method | images | PSNR (dB) | − per-channel RGB, same images (dB) | s/image | planes → weights | "
                "solves |", "| --- | ---: | ---: | ---: | ---: | --- | ---: |"]
        rgb = by.get("rgb", {})
        table = []
        for name, imgs in by.items():
            psnr = sum(r["psnr"] for r in imgs.values()) / len(imgs)
            both = [i for i in imgs if i in rgb]
            delta = ((sum(imgs[i]["psnr"] - rgb[i]["psnr"] for i in both) / len(both)) if both and name != "rgb"
                     else None)
            secs = sum(r["seconds"] for r in imgs.values()) / len(imgs)
            first = next(iter(imgs.values()))
            planes = ", ".join(f"{p[0]} {p[1]:.1f} → {p[2] or 'guided filter'}" for p in first.get("planes", [])) or "–"
            solves = str(first.get("solves", "–"))
            n = f"{len(imgs)}" + (f" of {full}" if len(imgs) < full else "")
            gain = "–" if delta is None else f"{delta:+.3f}"
            table.append((psnr if len(imgs) == full else -1,
                          f"| `{name}` | {n} | {psnr:.3f} | {gain} | {secs:.1f} | {planes} | {solves} |"))
        out += [line for _, line in sorted(table, key=lambda t: -t[0])] + [""]
    shas = ", ".join(f"{k} `{v[:12]}`" for k, v in meta["weights_sha256"].items())
    out.append(f"Weights: {shas}. {meta['protocol']}. Seconds: {meta['seconds_note']}.")
    return "\n".join(out)


def _latest_evals() -> dict[tuple[str, str, int], dict]:
    """`_load_evals()`, falling back per cell to the same weights' reports at the earlier 17 iterations where the
    budget's are not measured yet (the tables that use it name the iterations of each row)."""
    return {**_load_evals(which="earlier"), **_load_evals()}


def vs_bm3d_table() -> str:
    """Per image, the shipped NERD against BM3D wherever both scored a whole set: the mean gap, on how many images
    NERD is ahead, and the median / worst per-image difference (a mean alone hides whether a few images carry it)."""
    import statistics

    evals = _latest_evals()
    lines = ["| set | σ | NERD iterations | images | NERD − BM3D, mean (dB) | NERD ahead on | median (dB) "
             "| worst (dB, image) | best (dB, image) |", "| --- | ---: |" + " ---: |" * 7]
    for set_name in TABLE_SETS:
        for sigma in TABLE_SIGMAS:
            nerd, bm3d = evals.get(("nerd", set_name, sigma)), evals.get(("bm3d", set_name, sigma))
            if not nerd or not bm3d:
                continue
            theirs = {r["name"]: r["psnr"] for r in bm3d["rows"]}
            named = sorted((r["psnr"] - theirs[r["name"]], r["name"]) for r in nerd["rows"] if r["name"] in theirs)
            if not named:
                continue
            diff = [d for d, _ in named]
            cap = str(nerd["meta"]["solver"]["max_iter"])
            row = [set_name, str(sigma), cap, str(len(diff)), f"{sum(diff) / len(diff):+.2f}",
                   f"{sum(d > 0 for d in diff)} of {len(diff)}", f"{statistics.median(diff):+.2f}",
                   f"{named[0][0]:+.2f} ({named[0][1]})", f"{named[-1][0]:+.2f} ({named[-1][1]})"]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def solver_table() -> str:
    """What the solver did on the test sets with the shipped weights (one solve an image): how many images reached the
    tolerance within the cap, and the median / largest relative residual where it stopped (the mean iterations are
    the results table's)."""
    import statistics

    evals = _latest_evals()
    lines = ["| set | σ | iteration cap | images | reached tol | residual, median | residual, largest (image) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for set_name in TABLE_SETS:
        for sigma in TABLE_SIGMAS:
            nerd = evals.get(("nerd", set_name, sigma))
            rows = [r for r in (nerd or {}).get("rows", []) if r.get("residual") is not None]
            if not rows:
                continue
            tol = nerd["meta"]["solver"]["tol"]
            worst = max(rows, key=lambda r: r["residual"])
            reached = sum(bool(r.get("converged")) for r in rows)
            lines.append(f"| {set_name} | {sigma} | {nerd['meta']['solver']['max_iter']} | {len(rows)} | {reached} "
                         f"(tol {tol:g}) | {statistics.median(r['residual'] for r in rows):.1e} "
                         f"| {worst['residual']:.1e} ({worst['name']}) |")
    return "\n".join(lines)


def ensemble_eval_table() -> str:
    """The shipped NERD self-ensembled (`nerd eval --ensemble N`) on the test sets, beside its single solves and BM3D
    (which is not ensembled): whole sets only, and those under way (a resumable partial file) say how far they are."""
    from nerd.config import ENSEMBLES

    # one solve each (NERD's single solves, BM3D) at the solver setting the self-ensemble ran with: the shipped
    # budget, or the earlier 17 iterations on the same tensors
    single = {"shipped": _load_evals(), "earlier": _load_evals(which="earlier")}
    lines = ["| set | σ | solves | iterations | nerd, one solve | nerd, mean of the solves | gain (dB) | BM3D "
             "| vs BM3D (dB) | ahead of BM3D on | s/image |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    runs = {}
    for n in ENSEMBLES[1:]:
        evals = {k: ("earlier", v) for k, v in _load_evals(n, "earlier").items()}
        evals.update({k: ("shipped", v) for k, v in _load_evals(n).items()})
        evals.update({("nerd", *k): ("earlier", None) for k in _nerd_in_progress(n, "earlier")
                      if ("nerd", *k) not in evals})  # a run under way at 17 iterations compares with those
        runs[n] = (evals, {**_nerd_in_progress(n, "earlier"), **_nerd_in_progress(n)})
    for set_name in TABLE_SETS:
        for sigma in TABLE_SIGMAS:
            for n, (evals, in_progress) in runs.items():
                which, many = evals.get(("nerd", set_name, sigma), ("shipped", None))
                one = single[which].get(("nerd", set_name, sigma))
                theirs = single["shipped"].get(("bm3d", set_name, sigma))
                if not many and (set_name, sigma) not in in_progress:
                    continue
                if not many:
                    row = [set_name, str(sigma), str(n), "–", _cell(one),
                           f"under way ({in_progress[(set_name, sigma)]} images done, resumable)", "–", _cell(theirs),
                           "–", "–", "–"]
                else:
                    psnr = many["means"]["psnr"]
                    gain = f"{psnr - one['means']['psnr']:+.2f}" if one else "–"
                    vs = f"{psnr - theirs['means']['psnr']:+.2f}" if theirs else "–"
                    ref = {r["name"]: r["psnr"] for r in theirs["rows"]} if theirs else {}
                    ahead = [r["psnr"] > ref[r["name"]] for r in many["rows"] if r["name"] in ref]
                    row = [set_name, str(sigma), str(n), str(many["meta"]["solver"]["max_iter"]), _cell(one),
                           _cell(many), gain, _cell(theirs), vs, f"{sum(ahead)} of {len(ahead)}" if ahead else "–",
                           f"{many['means']['seconds']:.1f}"]
                lines.append("| " + " | ".join(row) + " |")
    if len(lines) == 2:
        lines.append("| no self-ensembled run yet | | | | | | | | | | |")
    return "\n".join(lines)


def collect_run(run: Path) -> Path:
    """Summarise a training run folder (config, validation curve, CPU time) into results/training/<run>.json."""
    config = json.loads((run / "config.json").read_text())
    with open(run / "val.csv", newline="") as fh:
        val = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]
    # A stage started from earlier weights validates them at step 0: where it started, not what it reached.
    init_val = next((r["val_psnr"] for r in val if r["step"] == 0), None)
    val = [r for r in val if r["step"] > 0]
    log_rows = []
    if (run / "log.csv").exists():
        with open(run / "log.csv", newline="") as fh:
            log_rows = list(csv.DictReader(fh))
    # A run stopped by its time budget validates at its final step without a log.csv row there, so the
    # later of the two files' last rows is where training ended (both carry step, elapsed_s and cpu_s).
    keys = ("step", "elapsed_s", "cpu_s")
    ends = [{k: float(rows[-1].get(k) or 0) for k in keys} for rows in (log_rows, val) if rows]
    last = max(ends, key=lambda r: r["step"], default=dict.fromkeys(keys, 0.0))
    where = run / "machine.json"  # runs from before train.py wrote it trained on this CPU
    machine = json.loads(where.read_text()) if where.is_file() else {"device": "cpu", "name": "cpu"}
    out = RESULTS / "training" / f"{run.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "run": run.name,
        "machine": machine,
        "config": config,
        "validation": val,
        "steps": int(last["step"]),
        "cpu_hours": last["cpu_s"] / 3600,
        "wall_hours": last["elapsed_s"] / 3600,
        "crops": int(last["step"]) * config["train"]["batch"],
        "best_val_psnr": max((r["val_psnr"] for r in val), default=None),
        "init_val_psnr": init_val,
    }
    out.write_text(json.dumps(summary, indent=1))
    return out


def val_reference(sigma255: float, crop: int = 96, holdout: int = 8) -> Path:
    """Noisy input, DnCNN-S and BM3D on the training runs' validation crops (held-out Train400) at `sigma255`:
    the scale on which the runs' validation PSNR can be read. Writes results/training/val-reference-s<S>.json
    (crop 0: the whole held-out images, as a run with `val_crop = 0` validates, to val-reference-s<S>-whole.json)."""
    import math

    import torch

    from nerd.data.patches import load_folder, validation_pairs
    from nerd.models.bm3d import BM3D
    from nerd.models.dncnn import load_dncnn
    from nerd.paths import data_root

    _, val, _ = load_folder(data_root() / "Train400", holdout)
    methods = {"noisy": lambda y, s: y, "dncnn": load_dncnn(round(sigma255)).eval(), "bm3d": BM3D()}
    scores = {}
    with torch.no_grad():
        for name, method in methods.items():
            psnrs = []
            for x, y in validation_pairs(val, sigma255, crop):
                mse = (method(y, sigma255 / 255).clamp(0, 1).double() - x.double()).pow(2).mean().item()
                psnrs.append(10 * math.log10(1 / mse))
            scores[name] = sum(psnrs) / len(psnrs)
    out = RESULTS / "training" / f"val-reference-s{round(sigma255)}{'' if crop else '-whole'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"sigma": sigma255, "crop": crop, "images": holdout, "val_psnr": scores}, indent=1))
    return out


def _pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, or None without matplotlib (the plots are optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_training(prefix: str) -> Path | None:
    """results/training/<prefix>curves.png: validation PSNR against CPU-hours of the collected runs."""
    plt = _pyplot()
    if plt is None:
        return None
    runs = [json.loads(p.read_text()) for p in sorted((RESULTS / "training").glob(f"{prefix}*.json"))]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for s in runs:
        ax.plot([r["cpu_s"] / 3600 for r in s["validation"]], [r["val_psnr"] for r in s["validation"]],
                marker="o", ms=3, label=s["run"])
    ax.set_xlabel("training CPU-hours (process CPU time)")
    ax.set_ylabel("validation PSNR (dB), held-out Train400")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = RESULTS / "training" / f"{prefix}curves.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


# How the shipped sigma-25 weights were grown: each stage warm-started from the previous one's best weights (its
# config's `init` names the file of the time, not the run behind it, so the lineage is written down here). The
# sigma-15 / 50 runs are fine-tunes from the sigma-25 stage of the same letter (nerd-s15b from nerd-s25b, ...).
SIGMA25_STAGES = ("cpu-B-s25", "nerd-s25", "nerd-s25b", "nerd-s25c", "nerd-s25d")


# The sigma-25 stages continued on a GPU (scripts/gpu_train.sh) from nerd-s25d's weights, in order.
GPU_SIGMA25_STAGES = ("nerd-s25-gpu", "nerd-s25b-gpu")


def chained(
    runs: dict[str, dict], stages: tuple[str, ...], gpu: bool = False
) -> dict[str, tuple[list[float], list[float]]]:
    """(CPU-hours, validation PSNR) of each collected stage, each stage's hours counted from the end of the ones
    before it: the learning curve of weights grown stage by stage. Stages not collected are left out. With `gpu`,
    GPU wall-clock minutes instead of CPU-hours."""
    clock, per, _ = _clock(gpu)
    curves, offset = {}, 0.0
    for name in (n for n in stages if n in runs):
        val = runs[name]["validation"]
        curves[name] = ([offset + r[clock] / per for r in val], [r["val_psnr"] for r in val])
        offset += runs[name]["wall_hours"] * 60 if gpu else runs[name]["cpu_hours"]
    return curves


def plot_stages() -> Path | None:
    """results/training/nerd-stages.png: the learning curves behind the shipped weights, one column per sigma, with
    DnCNN-S and BM3D on the same validation crops. Top row, this CPU: sigma 25's stages chained on cumulative
    CPU-hours (each stage restarts its cosine schedule), sigma 15 / 50's fine-tunes on their own CPU-hours. Bottom
    row, a GPU: the runs that continued from the CPU's weights (and any trained there from scratch), on GPU
    wall-clock minutes; the two clocks are not comparable, hence two rows."""
    plt = _pyplot()
    if plt is None:
        return None
    folder = RESULTS / "training"
    runs = {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json") if not p.stem.startswith("val-")}
    runs = {n: r for n, r in runs.items() if not validated_whole(r)}  # the curves share the 96² crops' scale
    if not any(name in runs for name in SIGMA25_STAGES):
        return None
    gpu_runs = {n: r for n, r in runs.items() if on_gpu(r) and n.startswith("nerd-")}
    cpu_runs = {n: r for n, r in runs.items() if not on_gpu(r)}
    rows = 2 if gpu_runs else 1
    fig, axes = plt.subplots(rows, 3, figsize=(13, 3.6 * rows), squeeze=False)
    for row, (group, gpu) in enumerate(((cpu_runs, False), (gpu_runs, True))[:rows]):
        clock, per, _ = _clock(gpu)
        for ax, sigma in zip(axes[row], (15, 25, 50), strict=True):
            stages = GPU_SIGMA25_STAGES if gpu else SIGMA25_STAGES
            if sigma == 25:
                for name, (xs, ys) in chained(group, stages, gpu).items():
                    ax.plot(xs, ys, marker="o", ms=3, label=name)
            others = sorted(n for n in group if n.startswith("nerd-") and f"{sigma}" in n.split("-")[1]
                            and not (sigma == 25 and n in stages))
            for name in others:
                val = group[name]["validation"]
                cfg = group[name].get("config", {}).get("train", {})
                start = f"from {Path(cfg['init']).stem}" if cfg.get("init") else "from scratch"
                ax.plot([r[clock] / per for r in val], [r["val_psnr"] for r in val], marker="o", ms=3,
                        label=f"{name} ({start})")
            if gpu:
                ax.set_xlabel("GPU minutes (wall-clock, one H100, bf16)")
            else:
                ax.set_xlabel("cumulative CPU-hours" if sigma == 25 else "fine-tuning CPU-hours (after a σ-25 stage)")
            ref = folder / f"val-reference-s{sigma}.json"
            if ref.is_file():
                scores = json.loads(ref.read_text())["val_psnr"]
                for method, style in (("bm3d", ":"), ("dncnn", "--")):
                    ax.axhline(scores[method], color="grey", ls=style, lw=1, label=f"{method} (same crops)")
            ax.set_title(f"sigma {sigma}, {'GPU' if gpu else 'this CPU'}")
            ax.set_ylabel("validation PSNR (dB)")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.suptitle("learning curves of the shipped weights (held-out Train400, 96² crops)")
    fig.tight_layout()
    out = folder / "nerd-stages.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def on_gpu(summary: dict) -> bool:
    """Whether a collected run trained on a GPU (its hours are then GPU wall-clock time, not CPU time)."""
    return summary.get("machine", {}).get("device") == "cuda"


def validated_whole(summary: dict) -> bool:
    """Whether a collected run validated on the whole held-out images (`val_crop = 0`): its PSNR reads about 0.3 dB
    above the 96² crops' scale, so it is marked in the table and left out of the stage plot."""
    return not summary.get("config", {}).get("train", {}).get("val_crop", 96)


def compute_label(summary: dict) -> str:
    """A run's training compute in its own unit: CPU-hours (process time) or GPU-minutes (wall-clock)."""
    if on_gpu(summary):
        name = summary["machine"].get("name", "GPU").replace("NVIDIA ", "").split()[0]
        return f"{summary['wall_hours'] * 60:.1f} {name}-min"
    return f"{summary['cpu_hours']:.2f} CPU-h"


def _clock(gpu: bool) -> tuple[str, float, str]:
    """(val.csv column, seconds per unit, unit suffix) of a run's compute: CPU seconds in hours, or GPU
    wall-clock seconds in minutes."""
    return ("elapsed_s", 60.0, "m") if gpu else ("cpu_s", 3600.0, "h")


def last_doubling_gain(validation: list[dict[str, float]], clock: str = "cpu_s") -> float | None:
    """The learning curve's slope per doubling of compute: validation PSNR at the end minus at half the run's
    compute (`clock`: CPU or wall-clock seconds; linear interpolation between validations); None when no validation
    lies at or before the half."""
    points = [(r[clock], r["val_psnr"]) for r in validation]
    if len(points) < 2:
        return None
    half = points[-1][0] / 2
    for (c0, v0), (c1, v1) in zip(points, points[1:], strict=False):
        if c0 <= half <= c1:
            return points[-1][1] - (v0 + (v1 - v0) * (half - c0) / max(c1 - c0, 1e-9))
    return None


def training_table(prefix: str) -> str:
    """Validation PSNR against CPU-hours for the collected runs whose name starts with `prefix`, with the gain over
    each run's last doubling of CPU time (what doubling it again would give if the curve keeps its slope)."""
    rows = []
    summaries = [json.loads(p.read_text()) for p in (RESULTS / "training").glob(f"{prefix}*.json")]
    for s in sorted(summaries, key=lambda s: (on_gpu(s), s["run"])):  # this CPU's runs, then a GPU's
        m, t, g = s["config"]["model"], s["config"]["train"], s["config"]["grad"]
        clock, per, unit = _clock(on_gpu(s))
        curve = ", ".join(f"{r['val_psnr']:.2f}@{r[clock] / per:.2f}{unit}" for r in s["validation"])
        if s.get("init_val_psnr") is not None:  # the stage's own weights at step 0
            curve = f"init {s['init_val_psnr']:.2f}, {curve}"
        gain = last_doubling_gain(s["validation"], clock)
        default = ModelConfig.expansion  # the paper's width factor
        wide = f", hidden ×{m['expansion']}" if m.get("expansion", default) != default else ""
        label = f"{s['run']} (val: whole images)" if validated_whole(s) else s["run"]
        rows.append(
            f"| {label} | {m['channels']} / {m['heads']} / {m['window']}{wide} | {t['crop']}² × {t['batch']} | "
            f"{t.get('train_iters') or s['config']['solver']['max_iter']} / T{g['steps']} | {s['crops']:,} | "
            f"{compute_label(s)} | {s['best_val_psnr']:.2f} | {'–' if gain is None else f'{gain:+.2f}'} | {curve} |"
        )
    if not rows:
        return "_no runs collected yet_"
    whole = any(validated_whole(s) for s in summaries)
    references = (RESULTS / "training").glob("val-reference-s*.json")
    for path in sorted(references, key=lambda p: (p.stem.endswith("-whole"), p.name)):  # the crops' rows first
        ref = json.loads(path.read_text())
        on_crops = bool(ref.get("crop", 96))
        if not on_crops and not whole:  # the whole-image scale only beside a run that validated on it
            continue
        refs = ", ".join(f"{k} {v:.2f}" for k, v in ref["val_psnr"].items())
        where = "same validation crops" if on_crops else "whole held-out images"
        rows.append(f"| _reference, σ {ref['sigma']:g}_ | {where} | | | | | | | {refs} |")
    head = [
        "| run | channels / heads / q | crop × batch | Broyden / phantom T | crops | compute | best val PSNR (dB) "
        "| gain, last doubling (dB) | val PSNR @ compute (h: CPU-hours, m: GPU-minutes) |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    return "\n".join(head + rows)


def _init_name(init: str, name: str) -> str:
    """How the `init` of weights `name` reads in the model card: a run's exported file names the run, a shipped
    file its name (the file as it was when the run started, which a later run may have replaced)."""
    from nerd.weights import shipped

    path = Path(init)
    if path.parent.name == "weights" or init in shipped():  # src/nerd/weights/<name>.safetensors, or its name
        when = "earlier" if path.stem == name else "then"
        return f"the {when} shipped {path.stem} (see the training table)"
    if path.parent.name == "device_data":  # an export carried to a GPU machine (scripts/gpu_train.sh)
        return f"run {path.stem}'s weights"
    return f"run {path.parent.name}"


def model_card() -> str:
    from nerd.weights import read_metadata, shipped

    lines = ["| weights | σ | model | trained | validation PSNR | sha256 |", "| --- | ---: | --- | --- | ---: | --- |"]
    for name, path in shipped().items():
        meta = read_metadata(path)
        cfg, train, scores = json.loads(meta["model"]), json.loads(meta["train"]), json.loads(meta["scores"])
        model = f"{cfg['channels']} ch, {cfg['heads']} heads, q {cfg['window']}"
        init = train.get("config", {}).get("train", {}).get("init", "")
        machine = train.get("machine", {})
        if machine.get("device") == "cuda":  # GPU wall-clock minutes (the process CPU time means nothing there)
            gpu_name, precision = machine.get("name", "GPU"), machine.get("precision")
            spent = f"{train.get('hours', 0) * 60:.1f} min on one {gpu_name} ({precision})"
        else:
            spent = f"{train.get('cpu_hours', train.get('hours', 0)):.2f} CPU-h"
        trained = (f"{train.get('crops', 0):,} crops, {spent}"
                   + (f", warm-started from {_init_name(init, name)}" if init else ""))
        val = scores.get("val_psnr")
        lines.append(f"| `{name}` | {float(meta['sigma']):g} | {model} | {trained} | "
                     f"{'–' if val is None else f'{val:.2f}'} | `{meta['sha256'][:12]}` |")
    return "\n".join(lines) if len(lines) > 2 else "_no weights shipped yet_"


def validate_table(*names: str) -> str:
    """results/training/<name>.json files (`nerd validate ... --json`): weights files on the held-out images, one
    table of rows per file, the file's crop (or whole images) in its header."""
    tables = []
    for name in names:
        path = RESULTS / "training" / f"{name}.json"
        if not path.is_file():
            tables.append(f"_not measured yet: `nerd validate ... --json results/training/{name}.json`_")
            continue
        data = json.loads(path.read_text())
        held_out = f"{len(data['val_images'])} held-out " + (f"{data['val_crop']}² crops" if data["val_crop"]
                                                              else "whole images")
        lines = [f"| weights | sha256 | σ | val PSNR (dB), {held_out} | f-evaluations | converged |",
                 "| --- | --- | ---: | ---: | ---: | ---: |"]
        for r in data["rows"]:
            lines.append(f"| `{r['weights']}` | `{r['sha256']}` | {r['sigma']:g} | {r['val_psnr']:.4f} "
                         f"| {r['nfe']:.1f} | {r['converged']:.0%} |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def _optional(module: str, func: str, *args: object) -> str:
    try:
        mod = __import__(module, fromlist=[func])
        return getattr(mod, func)(*args)
    except (ImportError, AttributeError, FileNotFoundError, ValueError) as err:
        return f"_not generated: {err}_"


def speed_tables(base: Path = ROOT) -> str:
    """The full `nerd bench` files of results/bench, their plot links relative to `base` (the page's folder)."""
    files = sorted((RESULTS / "bench").glob("bench-*.json"))
    full = [f for f in files if not f.stem.endswith("quick")] or files
    if not full:
        return "_no benchmark results yet_"
    return "\n\n".join(_optional("nerd.lab.bench_report", "markdown_tables", f, _link(f.parent, base), 3)
                       for f in full)


def _ab_table(file: str, script: str, what: str, header: Callable[[dict], list[str]], row: Callable[[dict], str],
              left: int = 1, note: Callable[[dict], str] = lambda data: "", single: str = "run") -> str:
    """A side-by-side results file of `scripts/<script>`: its command and conditions (and `note(data)`), then a
    table under `header(data)`, a row a case, its first `left` columns left-aligned. `what` names the repeated
    unit ("runs"); a file of single runs says "one <single> each"."""
    path = RESULTS / "bench" / file
    if not path.is_file():
        return f"_not measured yet: `python scripts/{script}`_"
    data = json.loads(path.read_text())
    meta, header, extra = data["meta"], header(data), note(data)
    threads = f"{meta['threads']} thread(s)" + (f" on {meta['cores']} cores" if "cores" in meta else "")
    runs = f"medians of {meta['repeats']} interleaved {what}" if meta["repeats"] > 1 else f"one {single} each"
    lines = [f"`{meta['command']}` ({meta['device_name']}, torch {meta['torch']}, {threads}, {runs}, "
             f"1-minute load {meta['loadavg_start']:.1f} at the start{extra}):",
             "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * left + " ---: |" * (len(header) - left)]
    return "\n".join(lines + [row(r) for r in data["rows"]])


def attention_ab_table() -> str:
    """results/bench/attention-ab.json (`scripts/ab_attention.py`): the attention before / after a change."""
    return _ab_table("attention-ab.json", "ab_attention.py --rev REV", "runs",
                     lambda data: ["case", f"before ({data['meta']['rev']}), s", "now, s", "speed-up",
                                   "max abs. difference"],
                     lambda r: f"| {r['case']} | {r['before_s']:.3f} | {r['now_s']:.3f} | {r['speedup']:.2f}× "
                               f"| {r['max_abs_diff']:.1e} |")


def kernel_ab_table() -> str:
    """results/bench/attention-kernel-ab.json (`scripts/ab_attention.py --out ...`): the CPU attention kernel against
    the SDPA path of the revision before it."""
    return _ab_table("attention-kernel-ab.json", "ab_attention.py --rev REV --out results/bench/"
                     "attention-kernel-ab.json", "runs",
                     lambda data: ["case", f"SDPA path ({data['meta']['rev']}), s", "kernel, s", "speed-up",
                                   "max abs. difference"],
                     lambda r: f"| {r['case']} | {r['before_s']:.3f} | {r['now_s']:.3f} | {r['speedup']:.2f}× "
                               f"| {r['max_abs_diff']:.1e} |")


def malloc_ab_table() -> str:
    """results/bench/malloc-ab.json (`scripts/ab_malloc.py`): whole `nerd eval` processes per malloc setting."""

    def note(data: dict) -> str:
        weights = sorted({r["weights"] for r in data["rows"] if r.get("weights")})
        nfe = sorted({r["nfe"] for r in data["rows"]})
        return "; " + ", ".join([*weights, f"{'/'.join(map(str, nfe))} solver iterations, protocol noise"])

    return _ab_table("malloc-ab.json", "ab_malloc.py", "processes",
                     lambda data: ["image", "malloc", "solver s", "speed-up", "process wall s", "kernel CPU s",
                                   "peak RSS MiB", "PSNR (dB)"],
                     lambda r: f"| {r['set']} {r['image']} | {r['variant']} | {r['solver_s']:.1f} "
                               f"| {r['speedup_solver']:.2f}× | {r['wall_s']:.1f} | {r['sys_s']:.1f} "
                               f"| {r['maxrss_mib']:.0f} | {r['psnr']:.2f} |",
                     left=2, note=note, single="process")


def tiling_table() -> str:
    """results/bench/tiling.json (`scripts/tiling_check.py`): whole-image against tiled solves."""

    def note(data: dict) -> str:
        weights = sorted({r["weights"] for r in data["rows"]})
        return f"; σ {data['meta']['sigma']:g}, weights {', '.join(weights)}, protocol noise"

    def row(r: dict) -> str:
        solve = "whole image"
        if r["tile"] and r["tile_shape"]:
            solve = f"--tile {r['tile']}: {r['tiles']} tiles of {r['tile_shape'][1]}×{r['tile_shape'][0]}"
        elif r["tile"]:
            solve = f"--tile {r['tile']}: one tile (the whole image)"
        return (f"| {r['image']} ({r['width']}×{r['height']}) | {solve} | {r['nfe']} "
                f"| {r['converged_tiles']}/{r['tiles']} | {r['seconds']:.1f} | {1 / r['speed']:.2f}× "
                f"| {r['peak_mib']:.0f} | {r['estimate_mib']:.0f} | {r['psnr']:.3f} | {r['delta_psnr']:+.3f} "
                f"| {r['ssim']:.4f} |")

    return _ab_table("tiling.json", "tiling_check.py", "processes",
                     lambda data: ["image", "solve", "iterations (most)", "converged", "solver s", "time vs whole",
                                   "peak MiB", "estimate MiB", "PSNR (dB)", "vs whole (dB)", "SSIM"],
                     row, left=2, note=note, single="process")


def ensemble_table() -> str:
    """results/bench/ensemble.json (`scripts/ensemble_check.py`): the self-ensemble on held-out images."""

    def note(data: dict) -> str:
        rows = data["rows"]
        return (f"; weights {', '.join(sorted({r['weights'] for r in rows}))}, {rows[0]['images']} held-out "
                "Train400 images, validation noise")

    return _ab_table("ensemble.json", "ensemble_check.py", "runs",
                     lambda data: ["σ", "--ensemble", "PSNR (dB)", "vs 1 (dB)", "SSIM", "s/image", "time vs 1"],
                     lambda r: f"| {r['sigma']:g} | {r['ensemble']} | {r['psnr']:.3f} | {r['delta_psnr']:+.3f} "
                               f"| {r['ssim']:.4f} | {r['seconds']:.1f} | {r['time_ratio']:.2f}× |",
                     left=0, note=note)


BUDGET_TOLERANCE_DB = 0.01  # a budget may cost at most this much validation PSNR against the full 17 iterations


def chosen_budget(rows: list[dict]) -> int:
    """The smallest cap N such that every cap from N on is within BUDGET_TOLERANCE_DB of the longest solve (a cap
    that happens to land close but is followed by a worse one is not chosen)."""
    ok = [abs(r["delta_db"]) <= BUDGET_TOLERANCE_DB for r in rows]
    for i in range(len(rows)):
        if all(ok[i:]):
            return int(rows[i]["iters"])
    return int(rows[-1]["iters"])


def budget_table() -> str:
    """results/budget/budget.json (`scripts/choose_budget.py`): validation PSNR against the solver's iteration cap,
    per shipped file, and the budget each would take."""
    data = _results("budget/budget.json")
    if data is None:
        return "_not measured yet: `python scripts/choose_budget.py`_"
    caps = [4, 5, 6, 7, 8, 10, 12, 17]
    lines = [f"`python scripts/choose_budget.py` (torch {data['meta']['torch']}; {len(data['meta']['images'])} "
             "held-out Train400 images, whole; change of the mean PSNR from the 17-iteration solve, dB):", "",
             "| weights | σ | 17 iterations (dB) | " + " | ".join(f"N = {n}" for n in caps)
             + f" | a cap alone (≤ {BUDGET_TOLERANCE_DB} dB from N on) | rel residual max there |",
             "| --- | ---: | ---: |" + " ---: |" * (len(caps) + 2)]
    for res in data["results"]:
        by_n = {r["iters"]: r for r in res["rows"]}
        n = chosen_budget(res["rows"])
        cells = [f"{by_n[c]['delta_db']:+.3f}" for c in caps]
        lines.append(f"| {res['weights']} | {res['sigma']:g} | {by_n[17]['psnr']:.3f} | " + " | ".join(cells)
                     + f" | {n} | {by_n[n]['rel_residual_max']:.1e} |")
    return "\n".join(lines)


def chosen_rule(rules: list[dict]) -> dict:
    """The stopping rule with the largest tol (the fewest f-evaluations) that keeps the mean and every image within
    BUDGET_TOLERANCE_DB of the longest solve; the smallest tol tried when none does."""
    fine = [r for r in rules if min(r["delta_db"], r["worst_delta_db"]) >= -BUDGET_TOLERANCE_DB]
    return max(fine, key=lambda r: r["tol"]) if fine else min(rules, key=lambda r: r["tol"])


def rules_table() -> str:
    """results/budget/budget.json: the stopping rules "relative residual below tol, else 17 iterations" per shipped
    file: f-evaluations and the change of the mean and worst-image PSNR, and the rule each file ships with."""
    data = _results("budget/budget.json") or {}
    if not all("rules" in res for res in data.get("results", [{}])):
        return "_not measured yet: `python scripts/choose_budget.py`_"
    tols = [r["tol"] for r in data["results"][0]["rules"]]
    lines = [f"`python scripts/choose_budget.py`, the same {len(data['meta']['images'])} images and trajectories: "
             "stop at the first iterate whose relative residual is below tol, else at 17 (mean f-evaluations; "
             "change of the mean PSNR / of the worst image's PSNR from the 17-iteration solve, dB):", "",
             "| weights | σ | " + " | ".join(f"tol {t:g}" for t in tols)
             + f" | rule (mean and worst ≥ −{BUDGET_TOLERANCE_DB} dB) |",
             "| --- | ---: |" + " ---: |" * (len(tols) + 1)]
    for res in data["results"]:
        cells = [f"{r['nfe_mean']:.1f} it, {r['delta_db']:+.3f} / {r['worst_delta_db']:+.3f}" for r in res["rules"]]
        rule = chosen_rule(res["rules"])
        lines.append(f"| {res['weights']} | {res['sigma']:g} | " + " | ".join(cells)
                     + f" | tol {rule['tol']:g}: {rule['nfe_mean']:.2f} it (at most {rule['nfe_max']}) |")
    return "\n".join(lines)


def large_image_table() -> str:
    """results/bench/large-image.json (`scripts/large_image_check.py`): the whole `nerd denoise` process on large
    synthetic photos, its peak resident size beside the tile planner's estimate."""
    data = _results("bench/large-image.json")
    if data is None:
        return "_not measured yet: `python scripts/large_image_check.py`_"
    rows = data["rows"]
    sizes = " ".join(f"{r['megapixels']:.0f}" for r in rows)
    lines = [f"`python scripts/large_image_check.py --megapixels {sizes} --tile {rows[0]['tile']} "
             f"--iters {rows[0]['iters']}`"
             f" ({data['meta']['weights']}, torch {data['meta']['torch']}, {data['meta']['threads']} threads):", "",
             "| image | megapixels | tiles | peak resident (GiB) | estimate (GiB) | peak / estimate | seconds |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['width']}x{r['height']} | {r['megapixels']:.1f} | {r['tiles']} of "
                     f"{r['tile_shape'][1]}x{r['tile_shape'][0]} | {r['peak_mib'] / 1024:.2f} | "
                     f"{r['estimate_mib'] / 1024:.2f} | {r['peak_over_estimate']:.2f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def onnx_table() -> str:
    """results/bench/onnx.json (`scripts/onnx_check.py`): the ONNX export beside PyTorch on the same images."""
    data = _results("bench/onnx.json")
    if data is None:
        return "_not measured yet: `python scripts/onnx_check.py`_"
    m = data["meta"]
    lines = [f"`{m['command'].strip()}` ({m['weights']}, {m['iters']} iterations, tol {m['tol']:g}; "
             f"torch {m['torch']}, onnxruntime {m['onnxruntime']}, {m['threads']} threads each on {m['device_name']}, "
             f"medians of {m['repeats']} interleaved runs; export {m['export_s']:.0f} s, "
             f"file {m['onnx_mib']:.1f} MiB):", "",
             "| image | PyTorch (s) | ONNX Runtime (s) | ORT / PyTorch time | max abs difference | in 1/255 |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in data["rows"]:
        lines.append(f"| {r['image']} | {r['pytorch_s']:.2f} | {r['ort_s']:.2f} | {r['ort_s'] / r['pytorch_s']:.2f}× "
                     f"| {r['max_abs_diff']:.1e} | {r['max_abs_diff_255']:.3f} |")
    return "\n".join(lines)


def pnp_table() -> str:
    """results/pnp/deblur.json (`examples/pnp_deblur.py`): plug-and-play deblurring, each prior's mean PSNR and
    time, then every image. The file is checked first (`nerd.lab.pnp.read_results`): a bad one raises EvalError."""
    path = RESULTS / "pnp" / "deblur.json"
    if not path.is_file():
        return "_not measured yet: `python examples/pnp_deblur.py`_"
    from nerd.lab.pnp import read_results

    data = read_results(path)
    m, means, rows = data["meta"], data["means"], data["rows"]
    n = len(rows)
    images = (f"all {n} images of {m.get('set', '?')}" if m.get("all_images")
              else f"the first {n} images of {m.get('set', '?')} by name")
    where = ", ".join(x for x in (m.get("device_name"), f"torch {m['torch']}", f"{m['threads']} thread(s)") if x)
    blur, sched = m["blur"], m["schedule"]
    levels = m["schedule"].get("sigmas255") or []
    schedule = f"{sched.get('iters', '?')} HQS iterations" + (
        f", denoiser level {levels[0]:.0f} → {levels[-1]:.2f} log-spaced" if levels else "")
    nerd_iters = (m.get("nerd") or {}).get("solver_max_iter")
    extra = f"; NERD {nerd_iters} solver iterations a call" if nerd_iters else ""
    deepinv = m.get("deepinv") or {}
    if deepinv and not deepinv.get("ran"):
        extra += f"; deepinv's own DPIR not run: {deepinv.get('reason', '?')}"

    def secs(s: float) -> str:
        return f"{s:.1f}" if s >= 1 else f"{s:.2f}"

    lines = [f"`{m['command'].strip()}` ({where}; {images}; Gaussian blur σ {blur['sigma']:g} px, "
             f"{blur['size']}×{blur['size']}, {blur.get('boundary', 'circular')} boundary, noise σ "
             f"{m['noise_sigma255']:g}/255; {schedule}{extra}):", "",
             "| restoration | mean PSNR (dB) | vs blurred input (dB) | CPU s/image | wall s/image |",
             "| --- | ---: | ---: | ---: | ---: |", f"| blurred input | {means['blurred_psnr']:.2f} | +0.00 | – | – |"]
    for p in data["priors"]:
        r = means[p["key"]]
        lines.append(f"| {p['label']} | {r['psnr']:.2f} | {r['psnr'] - means['blurred_psnr']:+.2f} "
                     f"| {secs(r['cpu_seconds'])} | {secs(r['seconds'])} |")
    keys = [p["key"] for p in data["priors"]]
    lines += ["", "Per image, PSNR (dB):", "", "| image | size | blurred | " + " | ".join(keys) + " |",
              "| --- | --- |" + " ---: |" * (len(keys) + 1)]
    for r in rows:
        cells = " | ".join(f"{r['results'][k]['psnr']:.2f}" for k in keys)
        lines.append(f"| {r['image']} | {r['width']}×{r['height']} | {r['blurred_psnr']:.2f} | {cells} |")
    return "\n".join(lines)


def process_table() -> str:
    """results/bench/process.json (`scripts/process_bench.py`): whole `nerd denoise` processes against whole BM3D
    processes on the same noisy files, and what the shipped stopping rule gives up against 17 iterations."""
    data = _results("bench/process.json")
    if data is None:
        return "_not measured yet: `python scripts/process_bench.py`_"
    m = data["meta"]
    lines = [f"`python scripts/process_bench.py` ({m['cpu']}, {m['capability']}, {m['cores']} cores, torch "
             f"{m['torch']}, attention: {m['attention']}; σ {m['sigma']:g}; medians of "
             f"{len(data['rows'][0]['times']['nerd'])} interleaved runs; 1-minute load {m['loadavg_start']:.1f} at "
             f"the start, {m['loadavg_end']:.1f} at the end):", "",
             "| image | nerd denoise (s) | BM3D (s) | nerd / BM3D time | nerd PSNR | BM3D PSNR "
             "| nerd, 17 iterations: s, PSNR | the rule's PSNR loss (dB) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in data["rows"]:
        sec, db = r["seconds"], r["psnr"]
        lines.append(f"| {r['image']} | {sec['nerd']:.1f} | {sec['bm3d']:.1f} | {sec['nerd'] / sec['bm3d']:.2f}× "
                     f"| {db['nerd']:.2f} | {db['bm3d']:.2f} | {sec['nerd 17 it']:.1f}, {db['nerd 17 it']:.2f} "
                     f"| {db['nerd'] - db['nerd 17 it']:+.3f} |")
    return "\n".join(lines)


def feval_profile_table() -> str:
    """results/bench/feval-profile.json (`scripts/feval_profile.py`): one f-evaluation's time by operator group,
    each group's useful FLOPs against the fp32 matmul rate."""
    data = _results("bench/feval-profile.json")
    if data is None:
        return "_not measured yet: `python scripts/feval_profile.py`_"
    m = data["meta"]
    lines = [f"`python scripts/feval_profile.py` ({m['weights']}, {m['image'][1]}×{m['image'][0]}, {m['capability']}, "
             f"{m['threads']} threads, torch {m['torch']}, attention: {m['attention']}; median of {m['repeats']} "
             f"f-evaluations, split by one `torch.profiler` pass; fp32 matmul {data['matmul_gflops']:.0f} GFLOP/s):",
             "", "| part | s | share | useful GFLOP | GFLOP/s | s at the matmul rate |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in data["rows"]:
        rate = f"{r['gflops']:.0f}" if r["gflops"] else "–"
        gflop = f"{r['gflop']:.1f}" if r["gflop"] else "–"
        lines.append(f"| {r['group']} | {r['seconds']:.3f} | {100 * r['share']:.0f} % | {gflop} | {rate} "
                     f"| {r['seconds_at_matmul_rate']:.3f} |")
    lines.append(f"| **one f-evaluation** | **{data['seconds']:.3f}** | 100 % | {data['gflop']:.1f} "
                 f"| {data['gflops']:.0f} ({100 * data['fraction_of_matmul']:.0f} % of matmul) "
                 f"| {data['seconds_at_matmul_rate']:.3f} |")
    return "\n".join(lines)


def warm_start_table() -> str:
    """results/bench/warm-start.json (`scripts/warm_start_check.py`): the self-ensemble with each solve started from
    the previous symmetry's equilibrium, against every solve from z = 0."""
    data = _results("bench/warm-start.json")
    if data is None:
        return "_not measured yet: `python scripts/warm_start_check.py`_"
    m = data["meta"]
    lines = [f"`python scripts/warm_start_check.py --sigma ...` (the {data['rows'][0]['images']} held-out images, "
             f"`--ensemble 8`, the shipped weights and their stopping rule, tol {m['tol']:g}; torch {m['torch']}):",
             "", "| σ | start of each solve | PSNR (dB) | f-evaluations a solve | vs from z = 0 (dB, mean / worst) |",
             "| ---: | --- | ---: | ---: | ---: |"]
    for r in data["rows"]:
        start = "z = 0" if r["mode"] == "cold" else "the previous equilibrium, turned"
        change = "–" if r["mode"] == "cold" else f"{r['delta_db']:+.3f} / {r['worst_delta_db']:+.3f}"
        lines.append(f"| {r['sigma']} | {start} | {r['psnr']:.3f} | {r['nfe_per_solve']:.2f} | {change} |")
    return "\n".join(lines)


def train_speed_table() -> str:
    """results/bench/train-speed.json (`scripts/train_speed.py`): training steps with the CPU attention kernel
    against the SDPA path, one process, the same seed."""
    data = _results("bench/train-speed.json")
    if data is None:
        return "_not measured yet: `python scripts/train_speed.py`_"
    m = data["meta"]
    n = len(data["times"]["kernel"])
    lines = [f"`python scripts/train_speed.py` ({m['recipe']}'s settings at {m['crop']}² crops × {m['batch']}, "
             f"Broyden {m['train_iters']}, {m['grad']} gradient steps; {m['capability']}, {m['threads']} threads, "
             f"torch {m['torch']}; medians of {n} steps each, interleaved in blocks of two):", "",
             "| attention | s/step | crops/s | speed-up |", "| --- | ---: | ---: | ---: |"]
    for name in ("sdpa", "kernel"):
        lines.append(f"| {name} | {data['seconds_per_step'][name]:.2f} | {data['crops_per_second'][name]:.2f} | "
                     f"{data['crops_per_second'][name] / data['crops_per_second']['sdpa']:.2f}× |")
    diff = data["loss_max_rel_difference"]
    lines += ["", f"Both runs drew the same crops: their losses differ by at most {diff:.1e} (relative) over the "
              f"{len(data['losses']['kernel'])} steps."]
    return "\n".join(lines)


# Each block's maker takes the folder of the page that shows it (for the links inside the block).
BLOCKS: dict[str, Callable[[Path], str]] = {
    "results": lambda base: results_table(),
    "colour": lambda base: colour_table(),
    "colour-full": lambda base: colour_table(full=True),
    "colour-study": lambda base: colour_study_table(),
    "vs-bm3d": lambda base: vs_bm3d_table(),
    "ensemble-eval": lambda base: ensemble_eval_table(),
    "training-compare": lambda base: training_table("cpu-"),
    "training-shipped": lambda base: training_table("nerd-"),
    "model-card": lambda base: model_card(),
    "validate-shipped": lambda base: validate_table("validate-shipped"),
    "validate-s50d": lambda base: validate_table("validate-s50d", "validate-s50d-whole"),
    "speed": speed_tables,
    "attention-ab": lambda base: attention_ab_table(),
    "kernel-ab": lambda base: kernel_ab_table(),
    "malloc-ab": lambda base: malloc_ab_table(),
    "tiling": lambda base: tiling_table(),
    "ensemble": lambda base: ensemble_table(),
    "solver-stats": lambda base: solver_table(),
    "budget": lambda base: budget_table(),
    "rules": lambda base: rules_table(),
    "feval-profile": lambda base: feval_profile_table(),
    "warm-start": lambda base: warm_start_table(),
    "large-image": lambda base: large_image_table(),
    "onnx": lambda base: onnx_table(),
    "pnp": lambda base: pnp_table(),
    "process": lambda base: process_table(),
    "train-speed": lambda base: train_speed_table(),
    "speed-now": lambda base: _optional("nerd.lab.bench_report", "markdown_tables", RESULTS / "bench" / "after-malloc"
                                        / "bench-cpu.json", _link(RESULTS / "bench" / "after-malloc", base), 3),
    "experiments": lambda base: _optional("nerd.lab.experiments", "markdown_summary", RESULTS / "experiments", base),
}


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.S)


def render(text: str, base: Path = ROOT) -> str:
    """`text` (a page in folder `base`) with every block it holds regenerated."""
    for name, make in BLOCKS.items():
        pattern = _pattern(name)
        if pattern.search(text):
            body = make(base).rstrip("\n") + "\n"
            text = pattern.sub(lambda m, b=body: m.group(1) + b + m.group(2), text)
    return text


def placement(texts: dict[Path, str]) -> dict[str, list[Path]]:
    """Which pages hold each block (complete BEGIN/END pairs), by block name."""
    return {name: [page for page, text in texts.items() if _pattern(name).search(text)] for name in BLOCKS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/readme.py", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a page (README.md, docs/*.md) is out of date or a block is not in exactly one")
    parser.add_argument("--collect", nargs="+", metavar="RUN", help="summarise training runs into results/training")
    parser.add_argument("--val-reference", nargs="+", type=float, metavar="SIGMA",
                        help="score noisy / DnCNN-S / BM3D on the runs' validation crops at these sigmas")
    parser.add_argument("--val-crop", type=int, default=96,
                        help="with --val-reference: the crop side, 0 for the whole held-out images (default 96)")
    args = parser.parse_args(argv)
    for sigma in args.val_reference or []:
        print(f"wrote {val_reference(sigma, args.val_crop)}")
    for run in args.collect or []:
        print(f"collected {collect_run(Path(run))}")
    if args.collect:
        plot_training("cpu-")
        plot_stages()
    texts = {page: page.read_text() for page in pages()}
    misplaced = {name: where for name, where in placement(texts).items() if len(where) != 1}
    for name, where in misplaced.items():
        found = ", ".join(str(p.relative_to(ROOT)) for p in where) or "no page"
        print(f"block {name!r} must be in exactly one page, found in: {found}", file=sys.stderr)
    rendered = {page: render(old, page.parent) for page, old in texts.items()}  # every page before any is written
    stale = [page.relative_to(ROOT) for page, old in texts.items() if rendered[page] != old]
    if not args.check:
        for name in stale:
            (ROOT / name).write_text(rendered[ROOT / name])
    if args.check:
        for name in stale:
            print(f"{name} is out of date: run `python tools/readme.py`", file=sys.stderr)
        return 1 if stale or misplaced else 0
    print("regenerated: " + ", ".join(map(str, stale)) if stale else "every page already up to date")
    return 1 if misplaced else 0


if __name__ == "__main__":
    raise SystemExit(main())
