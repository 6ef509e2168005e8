"""The evaluation protocol in one place: noisy images, a denoiser, PSNR/SSIM/time per image (+ solver stats).

For every image (sorted by name): x = pixel / 255, y = `protocol_noisy(x, sigma255)` (seed 0 per image, not
clipped), x_hat = method(y, sigma255 / 255) under `torch.no_grad()` on a (1, 1, H, W) float32 tensor, clipped
to [0, 1], PSNR and SSIM in float64 against x. A set's figure is the mean over its images
(../shared/data/README.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from nerd import allocator
from nerd.config import SolverConfig, check_ensemble
from nerd.data.noise import protocol_noisy
from nerd.errors import EvalError
from nerd.io import list_images, load_gray
from nerd.metrics import psnr, ssim
from nerd.models.base import Denoiser
from nerd.models.nerd import DEQDenoiser
from nerd.paths import DATA_HELP
from nerd.sigma import check_sigma255, to_unit

Method = Denoiser | Callable[[Tensor, float], Tensor]
SSIM_MIN_SIDE = 11  # Wang's Gaussian window: sigma 1.5 truncated at 3.5 sigma
# What a row's numbers mean, written into every report and into the key of a partial file: rows measured under
# another protocol (another noise draw, another metric) are never reused.
PROTOCOL = ("x = pixel/255; y = x + sigma/255 * RandomState(0).randn(*x.shape) per image, not clipped; x_hat "
            "clipped to [0,1]; PSNR float64; SSIM skimage gaussian_weights sigma 1.5 use_sample_covariance False")
# Sane figures for a row read back from a file. PSNR of a [0, 1]-clipped estimate is >= 0 dB; 100 dB is an MSE of
# 1e-10, which no estimate of a noisy image reaches (a freshly measured row above it -- sigma < 0.003 -- is still
# reported, only never reused from a cache).
PSNR_RANGE = (0.0, 100.0)


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """Score in IEEE float32 on a GPU too; the previous settings are restored afterwards (a context or a decorator).

    PyTorch lets cuDNN run float32 convolutions in TF32 (a 10-bit mantissa) on Ampere and later GPUs by default, so a
    score would depend on the card; the protocol's figures are float32 on every device. No effect on a CPU.
    """
    # The allow_tf32 flags (not torch >= 2.9's fp32_precision knobs): they switch cuDNN's convolutions and RNNs
    # together and work from torch 2.3 on; setting some of the newer knobs only would make later reads of these raise.
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


class Noisy(Denoiser):
    """The identity "denoiser" (x_hat = y): the noisy input's own scores, a floor for every method."""

    def forward(self, y: Tensor, sigma: float | Tensor | None = None) -> Tensor:
        return y


@dataclass
class Row:
    """One image's result. nfe / residual / converged are None for methods without an equilibrium solver."""

    name: str
    psnr: float
    ssim: float
    seconds: float
    nfe: int | None = None
    residual: float | None = None
    converged: bool | None = None


@dataclass
class Report:
    """One method on one set at one noise level: per-image rows and their means.

    Attributes:
        method: method name ("nerd", "dncnn", "bm3d", "noisy", ...).
        set_name: dataset name (its folder name).
        sigma255: noise std on the 0-255 scale.
        rows: per-image results, sorted by image name.
        limit: only the first `limit` images were evaluated (None: the whole set).
        meta: anything else worth keeping (weights, solver config, device, threads).
    """

    method: str
    set_name: str
    sigma255: float
    rows: list[Row]
    limit: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def means(self) -> dict[str, float | None]:
        """Mean PSNR (dB), SSIM, seconds per image and solver f-evaluations (None without a solver)."""

        def mean(values: list[float]) -> float | None:
            return float(np.mean(values)) if values else None

        return {
            "psnr": mean([r.psnr for r in self.rows]),
            "ssim": mean([r.ssim for r in self.rows]),
            "seconds": mean([r.seconds for r in self.rows]),
            "nfe": mean([r.nfe for r in self.rows if r.nfe is not None]),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "set": self.set_name,
            "sigma": self.sigma255,
            "images": len(self.rows),
            "limit": self.limit,
            "means": self.means,
            "rows": [asdict(r) for r in self.rows],
            # Detects a hand edit or damage of the rows (not a forger, who can recompute it): `nerd eval` leaves
            # such a report out of its summary.
            "rows_sha256": digest([asdict(r) for r in self.rows]),
            "meta": self.meta,
            "protocol": COLOUR_PROTOCOL if self.meta.get("colour") else PROTOCOL,
        }

    def to_json(self) -> str:
        """Strict JSON (no NaN/Infinity, which other readers reject); EvalError naming a non-finite entry."""
        return strict_json(self.to_dict(), f"report of {self.method} on {self.set_name}", indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """The inverse of `to_dict` (the means are recomputed from the rows)."""
        return cls(method=data["method"], set_name=data["set"], sigma255=float(data["sigma"]),
                   rows=[Row(**r) for r in data["rows"]], limit=data.get("limit"), meta=data.get("meta", {}))

    def to_markdown(self) -> str:
        """A per-image table with a final mean row."""
        solver = any(r.nfe is not None for r in self.rows)
        head = "| image | PSNR (dB) | SSIM | s |" + (" nfe | residual | converged |" if solver else "")
        sep = "| --- | ---: | ---: | ---: |" + (" ---: | ---: | :---: |" if solver else "")
        lines = [f"### {self.method} on {self.set_name}, sigma {self.sigma255:g}", "", head, sep]
        for r in self.rows:
            line = f"| {r.name} | {r.psnr:.3f} | {r.ssim:.4f} | {r.seconds:.2f} |"
            if solver:
                line += f" {r.nfe} | {r.residual:.2e} | {'yes' if r.converged else 'no'} |"
            lines.append(line)
        m = self.means
        line = f"| **mean** | **{m['psnr']:.3f}** | **{m['ssim']:.4f}** | {m['seconds']:.2f} |"
        lines.append(line + (f" {m['nfe']:.1f} | | |" if solver else ""))
        return "\n".join(lines) + "\n"


def summary_markdown(reports: Sequence[Report]) -> str:
    """One table of means: a row per (set, sigma) report."""
    lines = [
        "| method | set | sigma | images | PSNR (dB) | SSIM | s/image | nfe |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for rep in reports:
        m = rep.means
        nfe = f"{m['nfe']:.1f}" if m["nfe"] is not None else "-"
        lines.append(
            f"| {rep.method} | {rep.set_name} | {rep.sigma255:g} | {len(rep.rows)} | {m['psnr']:.3f} | "
            f"{m['ssim']:.4f} | {m['seconds']:.2f} | {nfe} |"
        )
    return "\n".join(lines) + "\n"


def resolve_sets(data_root: str | os.PathLike[str], names: Sequence[str]) -> dict[str, list[Path]]:
    """Image lists (sorted by name) of the set folders `names` under `data_root` (Set12, BSD68, ...).

    Raises:
        EvalError: a set folder is missing or holds no images.
    """
    root = Path(data_root)
    sets: dict[str, list[Path]] = {}
    for name in names:
        folder = root / name
        if not folder.is_dir():
            have = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            known = f" (have: {', '.join(have[:10])}{', ...' if len(have) > 10 else ''})" if have else f"; {DATA_HELP}"
            raise EvalError(f"set {name!r} not found: no folder {folder}{known}")
        images = list_images(folder)
        if not images:
            raise EvalError(f"set {name!r} has no images in {folder}")
        sets[name] = images
    return sets


def _device_of(method: Method) -> torch.device:
    if isinstance(method, torch.nn.Module):
        for p in method.parameters():
            return p.device
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Entries of a report's meta that do not decide its rows: the device, threads, torch and malloc setting change timings
# only, and the data root is only where a machine keeps the set (a lent GPU reads a copy); a set begun on one machine
# can be finished on another with the same method, weights and settings.
_NOT_IN_KEY = ("device", "threads", "torch", "data", "malloc")


def _partial_key(entries: dict[str, Any]) -> str:
    """What must match for a partial file's rows to be reused."""
    return json.dumps({k: v for k, v in entries.items() if k not in _NOT_IN_KEY}, sort_keys=True, default=str)


def digest(*parts: Any) -> str:
    """sha256 (hex) of `parts` as canonical JSON (sorted keys, no spaces): the same for a row written and read back
    (floats round-trip through JSON exactly), different after any edit of a figure or a name."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def strict_json(data: Any, what: str, **dumps: Any) -> str:
    """`json.dumps(data, allow_nan=False)`: EvalError naming the first non-finite number (and where) instead."""
    try:
        return json.dumps(data, allow_nan=False, **dumps)
    except ValueError:
        raise EvalError(f"{what}: {_first_non_finite(data) or 'a number'} is not finite; nothing written") from None


def _first_non_finite(data: Any, where: str = "") -> str | None:
    """'where = value' of the first NaN/inf float in nested dicts and lists (None if there is none)."""
    if isinstance(data, float) and not math.isfinite(data):
        return f"{where or 'value'} = {data}"
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list | tuple) else ()
    for k, v in items:
        found = _first_non_finite(v, f"{where}.{k}" if where else str(k))
        if found:
            return found
    return None


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` to `path` through a temporary file in its folder and `os.replace`: a kill mid-write leaves the
    previous file (or none), never half of one. EvalError (one line) if the folder or the file cannot be written."""
    path = Path(path)
    try:
        if path.exists() and not path.is_file():
            raise EvalError(f"{path}: a folder (or other non-file) is in the way of this report; move it away")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise EvalError(f"{path}: cannot write it ({err.strerror or err})") from None
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600; a report gets the usual permissions
        os.replace(tmp, path)
    except OSError as err:
        raise EvalError(f"{path}: cannot write it ({err.strerror or err})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _number(row: dict[str, Any], name: str, low: float, high: float, *, low_open: bool = False) -> str | None:
    """Why `row[name]` is not a finite number in [low, high] ((low, high] with `low_open`), or None if it is."""
    value = row.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{name} {value!r} is not a number"
    if not math.isfinite(value) or value < low or (low_open and value == low) or value > high:
        return f"{name} {value!r} outside {'(' if low_open else '['}{low:g}, {high:g}]"
    return None


def check_row(row: Any, names: set[str] | None = None, solver: bool | None = None) -> Row | str:
    """A row read back from a file (a partial file, an earlier report) as a `Row`, or why it cannot be trusted.

    Args:
        row: one entry of a file's "rows" (a dict with Row's fields, nothing else).
        names: the set's image names (None: not checked).
        solver: True if the method has an equilibrium solver (nfe, residual, converged are then required), False
            if it has none (they must be null), None: either, but all three or none.

    Returns:
        The Row when every figure is sane (PSNR in (0, 100] dB, SSIM in [-1, 1], seconds >= 0, nfe an int >= 0,
        residual >= 0, converged a bool), else a short reason ("01.png: psnr 99.9 outside ...").
    """
    if not isinstance(row, dict) or set(row) != {f.name for f in fields(Row)}:
        return f"not a row ({sorted(row) if isinstance(row, dict) else type(row).__name__})"
    name = row["name"]
    if not isinstance(name, str) or (names is not None and name not in names):
        return f"{name!r} is not an image of this set"
    reasons = [_number(row, "psnr", *PSNR_RANGE, low_open=True), _number(row, "ssim", -1.0, 1.0),
               _number(row, "seconds", 0.0, math.inf)]
    stats = [row["nfe"], row["residual"], row["converged"]]
    has = [v is not None for v in stats]
    if any(has) and not all(has):
        reasons.append("solver statistics incomplete")
    elif solver is not None and any(has) != solver:
        reasons.append("solver statistics missing" if solver else "solver statistics for a method without one")
    elif all(has):
        if isinstance(row["nfe"], bool) or not isinstance(row["nfe"], int) or row["nfe"] < 0:
            reasons.append(f"nfe {row['nfe']!r} is not an int >= 0")
        reasons.append(_number(row, "residual", 0.0, math.inf))
        if not isinstance(row["converged"], bool):
            reasons.append(f"converged {row['converged']!r} is not true/false")
    reasons = [r for r in reasons if r]
    if reasons:
        return f"{name}: {', '.join(reasons)}"
    return Row(name, float(row["psnr"]), float(row["ssim"]), float(row["seconds"]), row["nfe"],
               None if row["residual"] is None else float(row["residual"]), row["converged"])


def _read_partial(path: str | os.PathLike[str] | None, key: str, names: set[str], solver: bool
                  ) -> tuple[dict[str, Row], str | None]:
    """The trusted rows of a partial file, and a one-line note on what was not trusted (None if all was).

    A row is reused only when the file was written under the same `key` (method, set, sigma, protocol, weights
    checksum, solver, ...), its own checksum (`digest(key, row)`, written with it) matches -- an edited or damaged
    row does not, even with figures in range (a PSNR edited to 99 dB) -- and it passes `check_row` against the
    set's image `names`; every other image is measured again. A file that is not a partial file (garbage, other
    types) is measured again from scratch.

    Raises:
        EvalError: a folder (or another non-file) is at `path`: the partial file could never be written there.
    """
    if path is None:
        return {}, None
    path = Path(path)
    if not path.exists():
        return {}, None
    if not path.is_file():
        raise EvalError(f"{path}: a folder (or other non-file) is in the way of the partial-results file; move it "
                        "away")
    try:
        data = json.loads(path.read_text())
        stored = json.loads(data["key"])
        rows = data["rows"]
        if not isinstance(stored, dict) or not isinstance(rows, list):
            raise TypeError("key or rows of the wrong type")
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        why = type(err).__name__ if isinstance(err, KeyError | OSError) else str(err).splitlines()[0][:80]
        return {}, f"not a readable partial-results file ({why}); every image is measured from scratch"
    if not rows:
        return {}, None
    # A file written before the protocol and per-row checksums entered partial files: the protocol it ran under is
    # today's (the text is new, the recipe is not), and its rows are trusted on their figures and names alone.
    legacy = "protocol" not in stored and not any(isinstance(r, dict) and "sha256" in r for r in rows)
    if legacy:
        stored = {**stored, "protocol": PROTOCOL}
    if _partial_key(stored) != key:  # re-keyed too: files written before "data" left the key still match
        ours = json.loads(key)
        other = sorted(k for k in ours.keys() | stored.keys()
                       if k not in _NOT_IN_KEY and json.dumps(ours.get(k), sort_keys=True, default=str)
                       != json.dumps(stored.get(k), sort_keys=True, default=str))
        return {}, (f"{len(rows)} cached rows failed checks and are recomputed (written under other settings: "
                    f"{', '.join(other)})")
    good: dict[str, Row] = {}
    bad: list[str] = []
    count = Counter(r.get("name") for r in rows if isinstance(r, dict) and isinstance(r.get("name"), str))
    for r in rows:
        name = r.get("name") if isinstance(r, dict) else None
        stored_digest = r.pop("sha256", None) if isinstance(r, dict) else None
        checked = check_row(r, names, solver)
        if isinstance(checked, Row) and not legacy and stored_digest != digest(key, r):
            checked = f"{name}: edited or damaged (its checksum does not match)"
        if isinstance(checked, Row) and count[checked.name] > 1:  # which of two rows is right? neither is trusted
            checked = f"{name}: {count[checked.name]} rows for this image"
        if isinstance(checked, Row):
            good[checked.name] = checked
        else:
            bad.append(checked)
    if not bad:
        return good, None
    more = f"; and {len(bad) - 2} more" if len(bad) > 2 else ""
    return good, f"{len(bad)} cached rows failed checks and are recomputed ({'; '.join(bad[:2])}{more})"


def _write_partial(path: str | os.PathLike[str], key: str, rows: list[Row]) -> None:
    """Atomically (write + rename), so that a kill mid-write leaves the previous file intact; strict JSON."""
    text = strict_json({"key": key, "rows": [{**asdict(r), "sha256": digest(key, asdict(r))} for r in rows]},
                       f"{path}", indent=1)
    write_text_atomic(path, text + "\n")


@ieee_fp32()
def _resume(partial: str | os.PathLike[str] | None, key: str, paths: list[Path], solver: bool, info: dict[str, Any],
            desc: str, progress: bool) -> tuple[dict[str, Row], Any]:
    """The rows an interrupted run of this key left in `partial` (by image name; a note on stderr for what is not
    reused), `info["resumed_rows"]` set for provenance (those rows and their seconds come from the earlier run),
    and the progress bar over `paths`."""
    from tqdm import tqdm

    done, note = _read_partial(partial, key, {p.name for p in paths}, solver)
    if note:
        print(f"note: {partial}: {note}", file=sys.stderr)
    if partial is not None:
        info["resumed_rows"] = sum(p.name in done for p in paths)
    bar = tqdm(paths, desc=desc, unit="img", file=sys.stderr, disable=not progress or not sys.stderr.isatty(),
               leave=False)
    return done, bar


def evaluate(
    method: Method,
    images: Sequence[str | os.PathLike[str]],
    sigma255: float,
    *,
    set_name: str,
    progress: bool = True,
    solver: SolverConfig | None = None,
    method_name: str | None = None,
    limit: int | None = None,
    meta: dict[str, Any] | None = None,
    partial: str | os.PathLike[str] | None = None,
    ensemble: int = 1,
) -> Report:
    """Run the protocol for `method` on `images` at noise level `sigma255` (0-255 scale).

    Args:
        method: a `Denoiser` (or any callable `(y, sigma) -> x_hat` on (1, 1, H, W) tensors, [0, 1] scale). A
            `DEQDenoiser` (NERD) is run through `equilibrium`, and its solver statistics are recorded.
        images: grayscale image files; evaluated in order of file name.
        sigma255: noise std on the 0-255 scale (> 0).
        set_name: the dataset's name, for the report.
        progress: show a progress bar on stderr (only when stderr is a terminal).
        solver: overrides NERD's solver config (ignored for other methods).
        method_name: name in the report; default the method's class name, lower-cased.
        limit: evaluate only the first `limit` images (recorded in the report).
        meta: extra entries for the report's `meta`.
        partial: a JSON file that keeps the finished images' rows, rewritten after every image, so that an
            interrupted run (a long set on a CPU) continues where it stopped: rows found there are reused when the
            file was written by the same method, set, sigma, protocol, solver and `meta` (weights checksum...) and
            each passes `check_row` (an image of the set, finite figures in sane ranges); every other image is
            measured again, and a one-line note on stderr says how many cached rows were not trusted. The caller
            removes it once the report is saved.
        ensemble: 1 (default), 2, 4 or 8: x_hat is the mean of that many solves, each on one of the square's
            symmetries of y (`dihedral(y, k)`, k < ensemble) and turned back (the "x8" test mode of KAIR and
            SwinIR); recorded in `meta` when > 1. A NERD row then has the most f-evaluations and the largest
            residual of its solves, and is converged when every solve is; its seconds are all of them.

    Raises:
        EvalError: sigma255 <= 0, no images, an image smaller than SSIM's 11 x 11 window, ensemble not in
            1, 2, 4, 8, a non-finite figure for an image (NaN output), a folder at `partial`'s path.
    """

    from nerd.models.ensemble import ensemble_solve

    sigma255 = check_sigma255(sigma255)
    check_ensemble(ensemble)
    paths = sorted((Path(p) for p in images), key=lambda p: p.name)
    if limit is not None:
        paths = paths[:limit]
    if not paths:
        raise EvalError(f"no images to evaluate in set {set_name!r}")
    name = method_name or type(method).__name__.lower()
    sigma = to_unit(sigma255)
    device = _device_of(method)
    is_deq = isinstance(method, DEQDenoiser)
    if isinstance(method, torch.nn.Module):
        method.eval()
    info: dict[str, Any] = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if is_deq:
        info["solver"] = asdict(solver or method.solver)
    info.update(meta or {})
    if ensemble > 1:  # only then: the key of a single-solve run (and its partial file) stays what it was
        info["ensemble"] = ensemble
    # The protocol is in the key (not in meta, whose entries a report prints): another noise draw or metric
    # never reuses these rows.
    key = _partial_key({"method": name, "set": set_name, "sigma": float(sigma255), "protocol": PROTOCOL, **info})
    done, bar = _resume(partial, key, paths, is_deq, info, f"{name} {set_name} s{sigma255:g}", progress)
    rows: list[Row] = []
    for path in bar:
        if path.name in done:
            rows.append(done[path.name])
            continue
        x = load_gray(path).astype(np.float64)  # (H, W) in [0, 1]
        if min(x.shape) < SSIM_MIN_SIDE:
            raise EvalError(f"{path}: {x.shape[0]}x{x.shape[1]} is smaller than SSIM's 11x11 window")
        y = torch.from_numpy(protocol_noisy(x, sigma255)).float()[None, None].to(device)  # (1, 1, H, W)
        nfe = residual = converged = None
        with torch.no_grad():
            _sync(device)
            start = time.perf_counter()
            x_hat_t, solves = ensemble_solve(method, y, sigma, ensemble, solver=solver)
            _sync(device)
            seconds = time.perf_counter() - start
        if is_deq:
            nfe = max(int(s.nfe[0]) for s in solves)
            residual = max(float(s.rel_residual[0]) for s in solves)
            converged = all(bool(s.converged[0]) for s in solves)
        x_hat = np.clip(x_hat_t[0, 0].detach().double().cpu().numpy(), 0.0, 1.0)
        row = Row(path.name, psnr(x_hat, x), ssim(x_hat, x), seconds, nfe, residual, converged)
        # A NaN output (a diverged solve, damaged weights) has no score; a mean over it would be one too. The rows
        # measured so far stay in the partial file.
        bad = [f"{k} {v}" for k, v in asdict(row).items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise EvalError(f"{path}: {name} gave a non-finite {', '.join(bad)} (NaN/inf output?); no report written")
        rows.append(row)
        bar.set_postfix(psnr=f"{np.mean([r.psnr for r in rows]):.2f}")
        if partial is not None:
            done[path.name] = rows[-1]
            _write_partial(partial, key, list(done.values()))
        allocator.release()  # the next image starts from what it needs (the `nerd` command keeps freed memory)
    bar.close()
    return Report(name, set_name, float(sigma255), rows, limit, info)



# --- colour sets (CBSD68, Kodak24): the colour protocol of ../shared/data/README.md

COLOUR_SETS = ("CBSD68", "Kodak24")
COLOUR_PROTOCOL = ("x = RGB pixel/255 (H, W, 3); y = x + sigma/255 * RandomState(0).randn(H, W, 3) per image, the same "
                   "sigma in each channel, not clipped; x_hat clipped to [0,1]; PSNR float64 over the three channels; "
                   "SSIM the mean of the three channels' (skimage gaussian_weights sigma 1.5 use_sample_covariance "
                   "False)")
# A colour method: (noisy float32 (H, W, 3) on [0, 1], sigma255) -> (x_hat (H, W, 3), (nfe, rel residual, converged)
# or None for a method without an equilibrium solver).
ColourMethod = Callable[[np.ndarray, float], tuple[np.ndarray, tuple[int, float, bool] | None]]


def is_colour_set(name: str) -> bool:
    """A colour set, scored under COLOUR_PROTOCOL: one of COLOUR_SETS by its folder name (any other set is scored
    as gray, where a colour image is refused as before)."""
    return name in COLOUR_SETS


def load_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """float64 (H, W, 3) on [0, 1] of an 8-bit RGB(A) image (alpha dropped; a gray file replicated)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0


def ssim_rgb(x_hat: np.ndarray, x: np.ndarray) -> float:
    """The mean over R, G, B of the protocol's SSIM."""
    return float(np.mean([ssim(x_hat[..., c], x[..., c]) for c in range(x.shape[-1])]))


def evaluate_colour(
    method: ColourMethod,
    images: Sequence[str | os.PathLike[str]],
    sigma255: float,
    *,
    set_name: str,
    method_name: str,
    progress: bool = True,
    limit: int | None = None,
    meta: dict[str, Any] | None = None,
    partial: str | os.PathLike[str] | None = None,
    solver: bool = False,
) -> Report:
    """`evaluate` for a colour set under COLOUR_PROTOCOL: each image read as RGB, its noise drawn (H, W, 3) from
    seed 0, `method(y, sigma255)` timed, PSNR / SSIM over the three channels. The partial file works as in
    `evaluate` (its key holds COLOUR_PROTOCOL, so no gray row is ever reused for a colour one).

    Args:
        solver: the method reports solver statistics (nfe, residual, converged) for every image.
    """

    sigma255 = check_sigma255(sigma255)
    paths = sorted((Path(p) for p in images), key=lambda p: p.name)[:limit]
    if not paths:
        raise EvalError(f"no images to evaluate in set {set_name!r}")
    info: dict[str, Any] = {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
                            "colour": True}
    info.update(meta or {})
    key = _partial_key({"method": method_name, "set": set_name, "sigma": float(sigma255),
                        "protocol": COLOUR_PROTOCOL, **info})
    done, bar = _resume(partial, key, paths, solver, info, f"{method_name} {set_name} s{sigma255:g}", progress)
    rows: list[Row] = []
    for path in bar:
        if path.name in done:
            rows.append(done[path.name])
            continue
        x = load_rgb(path)
        if min(x.shape[:2]) < SSIM_MIN_SIDE:
            raise EvalError(f"{path}: {x.shape[0]}x{x.shape[1]} is smaller than SSIM's 11x11 window")
        y = protocol_noisy(x, sigma255).astype(np.float32)  # RandomState(0).randn(H, W, 3)
        start = time.perf_counter()
        x_hat, stats = method(y, sigma255)
        seconds = time.perf_counter() - start
        x_hat = np.clip(np.asarray(x_hat, dtype=np.float64), 0.0, 1.0)
        nfe, residual, converged = stats if stats is not None else (None, None, None)
        row = Row(path.name, psnr(x_hat, x), ssim_rgb(x_hat, x), seconds, nfe, residual, converged)
        bad = [f"{k} {v}" for k, v in asdict(row).items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise EvalError(f"{path}: {method_name} gave a non-finite {', '.join(bad)}; no report written")
        rows.append(row)
        bar.set_postfix(psnr=f"{np.mean([r.psnr for r in rows]):.2f}")
        if partial is not None:
            done[path.name] = row
            _write_partial(partial, key, list(done.values()))
        allocator.release()
    bar.close()
    report = Report(method_name, set_name, float(sigma255), rows, limit, info)
    return report


def cbm3d(y: np.ndarray, sigma255: float) -> tuple[np.ndarray, None]:
    """CBM3D (`bm3d.bm3d_rgb`, its default opponent colour space, one thread) of a noisy (H, W, 3) image."""
    import bm3d

    profile = bm3d.BM3DProfile()
    profile.num_threads = 1
    return np.asarray(bm3d.bm3d_rgb(np.asarray(y, dtype=np.float64), sigma255 / 255.0, profile=profile)), None


def nerd_colour(weights: Any, solver: SolverConfig | None = None, device: str = "cpu") -> ColourMethod:
    """NERD on a colour image through `nerd.colour` (`weights`: a `nerd.colour.ColourWeights`), every solve with
    `solver` (None: each file's own)."""
    from nerd.denoise import denoise_image

    def run(y: np.ndarray, sigma255: float) -> tuple[np.ndarray, tuple[int, float, bool]]:
        with ieee_fp32():
            x_hat, summary = denoise_image(None, y, sigma255, solver=solver, device=device, colour_weights=weights)
        return x_hat, (int(summary.nfe), float(summary.rel_residual), bool(summary.converged))

    return run
