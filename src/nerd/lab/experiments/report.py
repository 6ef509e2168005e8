"""Writing an experiment's results: ``<out>/<name>.json`` (everything), ``.md`` (paper next to ours, verdict) and
``.png`` (its figure); `markdown_summary` renders every finished experiment of a folder for docs/experiments.md."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nerd.lab.experiments.core import Context
from nerd.lab.experiments.verdict import Verdict, overall


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "header": self.header, "rows": self.rows}


@dataclass
class Outcome:
    """What one experiment measured and concluded.

    Attributes:
        name: the experiment ("equilibrium").
        paper: where the paper reports it ("Table IV, Fig. 7").
        title: what it compares.
        tables: markdown tables, the paper's figures next to ours.
        claims: the judged claims; the primary ones make the verdict.
        data: every measurement (runs with settings, curves, validation and test figures), for the JSON.
        notes: how the experiment departs from the paper at this preset, caveats.
        plot: draws the figure: called with matplotlib.pyplot, returns the Figure.
    """

    name: str
    paper: str
    title: str
    tables: list[Table]
    claims: list[Verdict]
    data: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    plot: Callable[[Any], Any] | None = None
    trains: bool = True

    @property
    def verdict(self) -> str:
        return overall(self.claims)


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def ps(psnr: float | None, ssim: float | None) -> str:
    """'30.84/0.8736'."""
    return "-" if psnr is None else f"{psnr:.2f}/{ssim:.4f}" if ssim is not None else f"{psnr:.2f}"


def write_outcome(ctx: Context, outcome: Outcome) -> dict[str, Any]:
    """Write <out>/<name>.json, .md and .png; print the verdict; return the JSON dict."""
    ctx.out.mkdir(parents=True, exist_ok=True)
    result = {
        "name": outcome.name,
        "paper": outcome.paper,
        "title": outcome.title,
        "preset": ctx.preset,
        "trains": outcome.trains,
        "verdict": outcome.verdict,
        "claims": [c.to_dict() for c in outcome.claims],
        "tables": [t.to_dict() for t in outcome.tables],
        "notes": outcome.notes,
        "settings": ctx.settings(),
        "data": outcome.data,
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    base = ctx.out / outcome.name
    png = _plot(outcome, base.with_suffix(".png"))
    result["figure"] = png.name if png else None
    _atomic_write(base.with_suffix(".json"), json.dumps(result, indent=1, default=str) + "\n")
    _atomic_write(base.with_suffix(".md"), render_markdown(result))
    print(verdict_text(result), flush=True)
    print(f"wrote {base}.json, {base}.md" + (f", {png}" if png else " (no figure: matplotlib missing)"), flush=True)
    return result


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _plot(outcome: Outcome, path: Path) -> Path | None:
    if outcome.plot is None:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig = outcome.plot(plt)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def verdict_text(result: dict[str, Any]) -> str:
    """The printed verdict: the experiment's status, then each claim's paper and measured ordering."""
    lines = [f"{result['name']} ({result['paper']}) [{result['preset']}]: {result['verdict']}"]
    for c in result["claims"]:
        tag = "" if c["primary"] else " (secondary)"
        lines.append(f"  {c['claim']}{tag}: paper {c['paper_order']} | ours {c['our_order']} -> {c['status']}")
    return "\n".join(lines)


def _table_md(t: dict[str, Any]) -> str:
    lines = [f"**{t['title']}**", ""] if t["title"] else []

    def cell(c: object) -> str:
        return str(c).replace("|", "\\|")

    lines.append("| " + " | ".join(cell(c) for c in t["header"]) + " |")
    lines.append("| " + " | ".join("---" for _ in t["header"]) + " |")
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in t["rows"]]
    return "\n".join(lines) + "\n"


def render_markdown(result: dict[str, Any], level: int = 2, figure_dir: str = "") -> str:
    """The experiment's markdown: title, preset, tables (paper next to ours), verdict, claims, notes, figure."""
    h = "#" * level
    s = result["settings"]
    b = s["budget"]
    lines = [f"{h} {result['name']}: {result['title']} ({result['paper']})", ""]
    res = (f"resolution {s['resolution']:g} dB" if s["resolution"] is not None
           else "no resolution (a pipeline check)")
    if result.get("trains", True):
        what = f"model `{b['model']}`, crop {b['crop']}, batch {b['batch']}, seed {s['seed']}"
    else:
        w = result["data"].get("weights")
        w = ", ".join(f"sigma {k}: {v}" for k, v in w.items()) if isinstance(w, dict) else w
        what = f"weights `{w}`"
    lines.append(f"Preset `{result['preset']}`: {what}; {res}; written {result['written']}.")
    lines.append("")
    lines += [_table_md(t) for t in result["tables"]]
    lines.append(f"**Verdict: {result['verdict']}**")
    lines.append("")
    for c in result["claims"]:
        tag = "" if c["primary"] else " *(secondary)*"
        note = f" — {c['note']}" if c["note"] else ""
        lines.append(f"- {c['claim']}{tag} [{c['metric']}]: paper {c['paper_order']}; ours {c['our_order']} "
                     f"→ **{c['status']}**{note}")
    if result["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in result["notes"]]
    if result.get("figure"):
        lines += ["", f"![{result['name']}]({figure_dir}{result['figure']})"]
    return "\n".join(lines) + "\n"


def link_prefix(out: Path, base: Path | None = None) -> str:
    """The results folder as a link prefix: relative to `base` (the folder of the page that links it), or without
    `base` relative to the working folder when inside it (else as given)."""
    if base is not None:
        rel = Path(os.path.relpath(out.resolve(), base.resolve()))
    else:
        try:
            rel = out.resolve().relative_to(Path.cwd().resolve())
        except ValueError:
            rel = out
    return "" if str(rel) in ("", ".") else f"{rel.as_posix()}/"


def markdown_summary(out_dir: str | Path, names: list[str] | None = None, base: Path | None = None) -> str:
    """All finished experiments of `out_dir` (their JSON files) as markdown: a summary table, then each one; links
    relative to `base` (see `link_prefix`)."""
    from nerd.lab.experiments import EXPERIMENTS

    out = Path(out_dir)
    results = []
    for name in names or list(EXPERIMENTS):
        path = out / f"{name}.json"
        if path.exists():
            results.append(json.loads(path.read_text()))
    if not results:
        where = link_prefix(out, base).rstrip("/") or "."
        return f"_No experiment results in {where} yet: run `nerd experiment NAME --out {where}`._\n"
    lines = ["| experiment | paper | what it compares | preset | verdict |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['name']} | {r['paper']} | {r['title']} | {r['preset']} | {r['verdict']} |")
    body = [render_markdown(r, level=3, figure_dir=link_prefix(out, base)) for r in results]
    return "\n".join(lines) + "\n\n" + "\n".join(body)
