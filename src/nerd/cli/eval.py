"""`nerd eval`: score a method (nerd, dncnn, bm3d, noisy) on benchmark sets under the one protocol.

Writes ``<out>/eval-<tag>-<set>-s<sigma>.json`` per (set, sigma) and a summary ``<out>/eval-<tag>.md``; the tag is
the method, then the weights name (nerd), any solver overrides, ``x<N>`` for `--ensemble` and ``first<N>`` for
`--limit`. The summary covers
this run's reports and those an earlier run left in ``<out>`` under the same tag (for nerd: of the same weights file),
so a BSD68 run after a Set12 one adds to its summary instead of replacing it. Prints the means.
While a set runs, ``<out>/eval-<tag>-<set>-s<sigma>.json.partial`` keeps the finished images, so the same command
after an interruption continues where it stopped (and removes the file when the set's report is written).

Files read back are not trusted: a cached row is reused only when it was written under this run's key (method,
set, sigma, protocol, weights checksum, solver) and its figures are sane (`nerd.evaluate.check_row`); other images
are measured again, with a one-line note. An earlier report that fails the same checks is left out of the summary,
with a note. Every file is written atomically (temporary file + os.replace) as strict JSON (no NaN/Infinity).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from nerd.config import SOLVER_NAMES

METHODS = ("nerd", "dncnn", "bm3d", "cbm3d", "noisy")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="score a method on benchmark sets (PSNR, SSIM, time, solver stats)",
        description="Score a denoiser on benchmark sets with the shared protocol (seed-0 noise per image). "
        "An interrupted run continues where it stopped when the same command runs again.",
    )
    p.add_argument("--method", choices=METHODS, default="nerd", help="denoiser to score (default: nerd)")
    p.add_argument("--sets", nargs="+", default=["Set12"], metavar="SET",
                   help="set folders under --data (default: Set12)")
    p.add_argument("--sigma", nargs="+", type=float, default=[25.0], metavar="S",
                   help="noise levels on the 0-255 scale (default: 25)")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="root of the set folders (default: $NERD_DATA, else ../shared/data)")
    p.add_argument("--out", default="results/eval", metavar="DIR",
                   help="folder for the JSON and markdown reports (the results tables read results/eval)")
    p.add_argument("--weights", default=None, metavar="NAME|PATH",
                   help="nerd weights: shipped name or .safetensors path (default: nerd-s<sigma> per sigma)")
    p.add_argument("--iters", type=int, default=None, metavar="N", help="nerd: solver max iterations")
    p.add_argument("--tol", type=float, default=None, metavar="T", help="nerd: solver relative tolerance")
    p.add_argument("--solver", choices=SOLVER_NAMES, default=None,
                   help="nerd: solver")
    p.add_argument("--compile", action="store_true",
                   help="nerd: torch.compile the implicit layer (pays on many same-size images: the first image of "
                   "each size compiles, about 10-30 s on a CPU; see docs/performance.md)")
    p.add_argument("--anchors", default=None, metavar="DIR",
                   help="dncnn: folder of DnCNN-S weights; per sigma S the first found of dncnn_sigmaS.safetensors, "
                   "sigma=S.mat (the authors' MatConvNet file from github.com/cszn/DnCNN, model/specifics), "
                   "dncnn_sigmaS.pth or sigma=S.pth (a PyTorch state dict; pickled models are refused); "
                   "see docs/evaluation.md (default: $NERD_ANCHORS, else ../shared/anchors)")
    p.add_argument("--ensemble", type=int, default=1, metavar="N",
                   help="self-ensemble: score the mean of N solves (1, 2, 4 or 8), each on a rotated/flipped copy "
                   "of the noisy image and turned back; N times the time; reported apart from the single-solve "
                   "figures (its files' tag ends in xN; docs/evaluation.md, 'Self-ensemble'); default 1")
    p.add_argument("--colour-method", "--color-method", default=None, metavar="NAME",
                   help="nerd on colour sets (CBSD68, Kodak24): how the gray weights see a colour image "
                   "(nerd.colour.METHODS; default: the shipped nerd.colour.SHIPPED; 'rgb': R, G, B each on its own)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N images of each set")
    p.add_argument("--device", default="cpu", metavar="cpu|cuda[:N]", help="where nerd and dncnn run (default: cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check(args: argparse.Namespace) -> None:
    from nerd.cli import UserError, check_sigma

    for sigma255 in args.sigma:
        check_sigma(sigma255)
    from nerd.config import check_ensemble

    check_ensemble(args.ensemble, "--ensemble")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    nerd_only = {"--weights": args.weights, "--iters": args.iters, "--tol": args.tol, "--solver": args.solver,
                 "--compile": args.compile or None}
    given = [k for k, v in nerd_only.items() if v is not None]
    if args.method != "nerd" and given:
        raise UserError(f"{', '.join(given)} only apply to --method nerd")
    if args.anchors is not None and args.method != "dncnn":
        raise UserError("--anchors only applies to --method dncnn")
    if args.iters is not None and args.iters < 1:
        raise UserError(f"--iters must be >= 1, got {args.iters}")
    if args.colour_method is not None:
        from nerd.colour import METHODS as COLOUR_METHODS

        if args.method != "nerd":
            raise UserError("--colour-method only applies to --method nerd")
        if args.colour_method not in COLOUR_METHODS:
            raise UserError(f"unknown --colour-method {args.colour_method!r}; choose one of "
                            f"{', '.join(COLOUR_METHODS)}")


def _tag(args: argparse.Namespace, weights_name: str | None) -> str:
    parts = [args.method]
    if weights_name:
        parts.append(weights_name)
    if args.solver:
        parts.append(args.solver)
    if args.iters is not None:
        parts.append(f"it{args.iters}")
    if args.tol is not None:
        parts.append(f"tol{args.tol:g}")
    if args.ensemble > 1:
        parts.append(f"x{args.ensemble}")
    if args.limit is not None:
        parts.append(f"first{args.limit}")
    return "-".join(parts)


def _report_name(tag: str, set_name: str, sigma255: float) -> str:
    """The file name of one (set, sigma) report; `set_name` "*" makes it a glob pattern."""
    return f"eval-{tag}-{set_name}-s{sigma255:g}.json"


def _with_earlier(out: Path, reports: list, tags: dict[float, str]) -> list:
    """This run's reports, then the reports in `out` of the same tag and sigma for other sets (a nerd report only
    when its weights checksum is this run's: a file since replaced is not summarised beside the new one)."""
    import dataclasses
    import json
    import sys

    from nerd.evaluate import Report, Row, check_row, digest

    done = {(r.set_name, r.sigma255) for r in reports}
    sha = {r.sigma255: r.meta.get("sha256") for r in reports}
    earlier = []
    for sigma255, tag in tags.items():
        prefix, suffix = _report_name(tag, "*", sigma255).split("*")
        for path in sorted(out.glob(prefix + "*" + suffix)):
            set_name = path.name[len(prefix):-len(suffix)]
            if "-" in set_name or (set_name, sigma255) in done:
                continue  # another tag's report (its tag goes on, e.g. "-first3-Set12"), or one this run rewrote
            try:
                data = json.loads(path.read_text())
                old = Report.from_dict(data)
                meta_ok = isinstance(old.meta, dict)
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue  # not a report of this tool's format: it is not summarised
            if not meta_ok or old.meta.get("sha256") != sha.get(sigma255):
                continue
            # Edited or damaged figures (99 dB, NaN) must not reach the summary beside this run's.
            # Reports written before rows_sha256 existed (results/eval) carry none: their ranges are still checked.
            checked = [check_row(r) for r in data["rows"]]
            bad = [c for c in checked if not isinstance(c, Row)]
            if "rows_sha256" in data and data["rows_sha256"] != digest(data["rows"]):
                bad.insert(0, "rows edited or damaged: their checksum does not match")
            if bad or not checked or old.sigma255 != sigma255:
                why = bad[0] if bad else "no rows" if not checked else f"sigma {old.sigma255}"
                print(f"nerd eval: note: {path} failed checks ({why}); left out of the summary", file=sys.stderr)
                continue
            earlier.append(dataclasses.replace(old, rows=checked))
    return reports + earlier


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import sys

    from nerd import allocator
    from nerd.cli import UserError, check_device
    from nerd.errors import EvalError
    from nerd.evaluate import (
        Noisy,
        evaluate,
        resolve_sets,
        summary_markdown,
        write_text_atomic,
    )
    from nerd.paths import data_root as find_data_root

    _check(args)
    check_device(args.device)
    data_root = find_data_root(args.data)
    sets = resolve_sets(data_root, args.sets)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise EvalError(f"--out {out} is a file; give a folder for the reports")
    from nerd.evaluate import is_colour_set

    colour_sets = {name: images for name, images in sets.items() if is_colour_set(name)}
    sets = {name: images for name, images in sets.items() if name not in colour_sets}
    _check_colour(args, sets, colour_sets)
    if colour_sets:
        _run_colour(args, colour_sets, data_root, out)
        if not sets:
            return 0

    def load(sigma255: float):
        """(method, weights name or None, meta, solver override) for one noise level."""
        if args.method == "noisy":
            return Noisy(), None, {}, None
        if args.method == "bm3d":
            try:
                import bm3d  # noqa: F401
            except ImportError:
                raise UserError("--method bm3d needs the bm3d package: pip install 'nerd[bm3d]'") from None
            from nerd.models.bm3d import BM3D

            return BM3D(), None, {"profile": "np", "num_threads": 1}, None
        if args.method == "dncnn":
            from nerd.models.dncnn import anchors_dir, find_dncnn_file, load_dncnn_file

            path = find_dncnn_file(sigma255, args.anchors)  # .safetensors, else the authors' .mat, else .pth
            model = load_dncnn_file(path)
            meta = {"anchors": str(anchors_dir(args.anchors)), "weights_file": path.name}
            return model.to(args.device), None, meta, None
        from nerd.weights import default_name, load_weights

        name = args.weights or default_name(sigma255)
        model, info = load_weights(name, device=args.device)
        solver = model.solver.override(name=args.solver, max_iter=args.iters, tol=args.tol)
        if args.compile:
            model.layer.compile()  # in place: the solver, the statistics and the weights' keys are unchanged
        if info["sigma"] != sigma255:
            print(f"nerd eval: note: weights {info['name']} were trained for sigma {info['sigma']:g}, "
                  f"evaluated at sigma {sigma255:g}", file=sys.stderr)
        meta = {"weights": info["name"], "weights_sigma": info["sigma"], "sha256": info["sha256"],
                "model": dataclasses.asdict(model.cfg), "compiled": args.compile}
        return model, info["name"], meta, solver

    loaded = {sigma255: load(sigma255) for sigma255 in args.sigma}  # fail fast, before any long run
    # One summary per tag; the weights name joins the tag only when all levels used the same file.
    names = {loaded[s][1] or "" for s in args.sigma}
    summary = out / f"eval-{_tag(args, names.pop() if len(names) == 1 else None)}.md"
    targets = [summary]
    for sigma255 in args.sigma:
        for set_name in sets:
            report_path = out / _report_name(_tag(args, loaded[sigma255][1]), set_name, sigma255)
            targets += [report_path, report_path.with_name(report_path.name + ".partial")]
    for target in targets:  # a folder where a report goes would fail only after the long run
        if target.exists() and not target.is_file():
            raise EvalError(f"{target}: a folder (or other non-file) is in the way of this report; move it away")
    reports = []
    head = f"{'set':<16} {'sigma':>5} {'images':>6} {'PSNR':>8} {'SSIM':>7} {'s/image':>8} {'nfe':>6}"
    print(head, flush=True)
    for sigma255 in args.sigma:
        method, weights_name, meta, solver = loaded[sigma255]
        for set_name, images in sets.items():
            path = out / _report_name(_tag(args, weights_name), set_name, sigma255)
            # per-image progress, a rerun continues from it; not *.json, so that no reader of results takes it for one
            partial = path.with_name(path.name + ".partial")
            report = evaluate(method, images, sigma255, set_name=set_name, progress=not args.no_progress,
                              solver=solver, method_name=args.method, limit=args.limit,
                              meta={**meta, "data": str(data_root), "malloc": allocator.status}, partial=partial,
                              ensemble=args.ensemble)
            if report.meta.get("resumed_rows"):
                print(f"nerd eval: {report.meta['resumed_rows']} image(s) reused from {partial} "
                      "(an interrupted run)", file=sys.stderr)
            reports.append(report)
            write_text_atomic(path, report.to_json() + "\n")  # strict JSON: EvalError on a non-finite figure
            partial.unlink(missing_ok=True)
            m = report.means
            nfe = f"{m['nfe']:.1f}" if m["nfe"] is not None else "-"
            print(f"{set_name:<16} {sigma255:>5g} {len(report.rows):>6} {m['psnr']:>8.3f} {m['ssim']:>7.4f} "
                  f"{m['seconds']:>8.2f} {nfe:>6}", flush=True)
    reports = _with_earlier(out, reports, {s: _tag(args, loaded[s][1]) for s in args.sigma})
    header = f"# nerd eval --method {args.method}\n\ndata: {os.fspath(data_root)}\n\n"
    details = "\n".join(r.to_markdown() for r in reports)
    write_text_atomic(summary, header + summary_markdown(reports) + "\n" + details)
    print(f"wrote {summary} and {len(reports)} JSON report(s) in {out}")
    return 0


def _check_colour(args: argparse.Namespace, gray: dict, colour: dict) -> None:
    """Which methods and options apply to colour sets (CBSD68, Kodak24) and which to gray ones."""
    from nerd.cli import UserError

    if args.method == "cbm3d" and gray:
        raise UserError(f"--method cbm3d scores colour sets (CBSD68, Kodak24); {', '.join(gray)} are gray: "
                        "use --method bm3d")
    if colour and args.method in ("bm3d", "dncnn"):
        raise UserError(f"{', '.join(colour)}: colour sets take --method nerd, cbm3d or noisy, not {args.method}")
    if colour and (args.ensemble > 1 or args.compile):
        raise UserError("--ensemble and --compile are for gray sets only")
    if args.colour_method is not None and not colour:
        raise UserError("--colour-method applies to colour sets (CBSD68, Kodak24) only")


def _run_colour(args: argparse.Namespace, sets: dict, data_root: Path, out: Path) -> None:
    """Score a method on colour sets under the colour protocol (`nerd.evaluate.evaluate_colour`): nerd through
    `nerd.colour` (the shipped transform, or --colour-method), cbm3d (`bm3d.bm3d_rgb`), noisy."""
    import dataclasses
    import sys

    from nerd import allocator
    from nerd.cli import UserError
    from nerd.evaluate import cbm3d, digest, evaluate_colour, nerd_colour, summary_markdown, write_text_atomic

    def load(sigma255: float):
        """(method, tag name, meta, has solver statistics) at one noise level."""
        if args.method == "noisy":
            return (lambda y, s: (y, None)), None, {}, False
        if args.method == "cbm3d":
            try:
                import bm3d
            except ImportError:
                raise UserError("--method cbm3d needs the bm3d package: pip install 'nerd[bm3d]'") from None
            return cbm3d, None, {"profile": "np", "num_threads": 1, "bm3d": getattr(bm3d, "__version__", "?")}, False
        from safetensors.torch import load_file

        from nerd.colour import ColourWeights
        from nerd.weights import load_weights, resolve, tensors_sha256

        if args.weights:  # that one file for every plane
            model, info = load_weights(args.weights, device=args.device)
            weights = ColourWeights({info["name"]: info["sigma"]}, lambda _: model, args.colour_method)
        else:
            weights = ColourWeights.shipped(device=args.device, method=args.colour_method)
        plan = weights.plan(sigma255)
        files = sorted(plan.solves)
        base = weights.model(files[0]).solver
        solver = base.override(name=args.solver, max_iter=args.iters, tol=args.tol)
        # The tensors' checksum (not the file's, which also covers the file's own solver setting): the solver that
        # ran is recorded beside it, so a file whose default max_iter changed does not void rows of the same weights.
        shas = {name: tensors_sha256(load_file(str(resolve(args.weights) if args.weights else resolve(name))))
                for name in files}
        meta = {"colour_method": weights.method.name, "plan": plan.describe(), "weights": files,
                "weights_tensors_sha256": shas, "sha256": digest(shas), "solver": dataclasses.asdict(solver),
                "device": args.device}
        name = weights.method.name + (f"-{Path(args.weights).stem}" if args.weights else "")
        return nerd_colour(weights, solver, args.device), name, meta, True

    loaded = {sigma255: load(sigma255) for sigma255 in args.sigma}
    reports = []
    print(f"{'set':<16} {'sigma':>5} {'images':>6} {'PSNR':>8} {'SSIM':>7} {'s/image':>8} {'nfe':>6}", flush=True)
    tags = {}
    for sigma255 in args.sigma:
        method, name, meta, solver = loaded[sigma255]
        tags[sigma255] = tag = _tag(args, name)
        for set_name, images in sets.items():
            path = out / _report_name(tag, set_name, sigma255)
            partial = path.with_name(path.name + ".partial")
            for target in (path, partial):
                if target.exists() and not target.is_file():
                    raise UserError(f"{target}: a folder (or other non-file) is in the way of this report; move "
                                    "it away")
            report = evaluate_colour(method, images, sigma255, set_name=set_name, method_name=args.method,
                                     progress=not args.no_progress, limit=args.limit,
                                     meta={**meta, "data": str(data_root), "malloc": allocator.status},
                                     partial=partial, solver=solver)
            if report.meta.get("resumed_rows"):
                print(f"nerd eval: {report.meta['resumed_rows']} image(s) reused from {partial} "
                      "(an interrupted run)", file=sys.stderr)
            reports.append(report)
            write_text_atomic(path, report.to_json() + "\n")
            partial.unlink(missing_ok=True)
            m = report.means
            nfe = f"{m['nfe']:.1f}" if m["nfe"] is not None else "-"
            print(f"{set_name:<16} {sigma255:>5g} {len(report.rows):>6} {m['psnr']:>8.3f} {m['ssim']:>7.4f} "
                  f"{m['seconds']:>8.2f} {nfe:>6}", flush=True)
    reports = _with_earlier(out, reports, tags)
    names = set(tags.values())
    summary = out / f"eval-{names.pop() if len(names) == 1 else args.method}.md"
    header = f"# nerd eval --method {args.method} (colour)\n\ndata: {os.fspath(data_root)}\n\n"
    details = "\n".join(r.to_markdown() for r in reports)
    write_text_atomic(summary, header + summary_markdown(reports) + "\n" + details)
    print(f"wrote {summary} and {len(reports)} JSON report(s) in {out}")
