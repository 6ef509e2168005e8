"""The evaluation protocol in one place: noisy images, a denoiser, PSNR/SSIM/time per image (+ solver stats).

For every image (sorted by name): x = pixel / 255, y = `protocol_noisy(x, sigma255)` (seed 0 per image, not
clipped), x_hat = method(y, sigma255 / 255) under `torch.no_grad()` on a (1, 1, H, W) float32 tensor, clipped
to [0, 1], PSNR and SSIM in float64 against x. A set's figure is the mean over its images
(../shared/data/README.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from nerd import allocator
from nerd.config import SolverConfig
from nerd.data.noise import protocol_noisy
from nerd.errors import EvalError
from nerd.io import list_images, load_gray
from nerd.metrics import psnr, ssim
from nerd.models.base import Denoiser
from nerd.models.ensemble import check_ensemble
from nerd.models.nerd import DEQDenoiser
from nerd.paths import DATA_HELP, data_root
from nerd.sigma import check_sigma255, to_unit

Method = Denoiser | Callable[[Tensor, float], Tensor]
SSIM_MIN_SIDE = 11  # Wang's Gaussian window: sigma 1.5 truncated at 3.5 sigma


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
            "meta": self.meta,
            "protocol": "x = pixel/255; y = x + sigma/255 * RandomState(0).randn(*x.shape) per image, not "
            "clipped; x_hat clipped to [0,1]; PSNR float64; SSIM skimage gaussian_weights sigma 1.5 "
            "use_sample_covariance False",
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

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


def default_data_root() -> Path:
    """The data folder with no --data given (`nerd.paths.data_root`)."""
    return data_root()


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


def _read_partial(path: str | os.PathLike[str] | None, key: str) -> dict[str, Row]:
    """The rows of a partial file written under the same `key` (empty if none, unreadable or another key)."""
    if path is None or not Path(path).is_file():
        return {}
    try:
        data = json.loads(Path(path).read_text())
        if _partial_key(json.loads(data["key"])) != key:  # re-keyed: files written before "data" left the key
            return {}
        return {r["name"]: Row(**r) for r in data["rows"]}
    except (ValueError, KeyError, TypeError):
        return {}


def _write_partial(path: str | os.PathLike[str], key: str, rows: list[Row]) -> None:
    """Atomically (write + rename), so that a kill mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"key": key, "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    os.replace(tmp, path)


@ieee_fp32()
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
            file was written by the same method, set, sigma, solver and `meta` (else it is ignored and
            overwritten). The caller removes it once the report is saved.
        ensemble: 1 (default), 2, 4 or 8: x_hat is the mean of that many solves, each on one of the square's
            symmetries of y (`dihedral(y, k)`, k < ensemble) and turned back (the "x8" test mode of KAIR and
            SwinIR); recorded in `meta` when > 1. A NERD row then has the most f-evaluations and the largest
            residual of its solves, and is converged when every solve is; its seconds are all of them.

    Raises:
        EvalError: sigma255 <= 0, no images, an image smaller than SSIM's 11 x 11 window, or ensemble not in
            1, 2, 4, 8.
    """
    from tqdm import tqdm

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
    key = _partial_key({"method": name, "set": set_name, "sigma": float(sigma255), **info})
    done = _read_partial(partial, key)
    if partial is not None:
        # Provenance: these rows (their seconds too) come from an earlier, interrupted run.
        info["resumed_rows"] = sum(p.name in done for p in paths)
    rows: list[Row] = []
    bar = tqdm(paths, desc=f"{name} {set_name} s{sigma255:g}", unit="img", file=sys.stderr,
               disable=not progress or not sys.stderr.isatty(), leave=False)
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
        rows.append(Row(path.name, psnr(x_hat, x), ssim(x_hat, x), seconds, nfe, residual, converged))
        bar.set_postfix(psnr=f"{np.mean([r.psnr for r in rows]):.2f}")
        if partial is not None:
            done[path.name] = rows[-1]
            _write_partial(partial, key, list(done.values()))
        allocator.release()  # the next image starts from what it needs (the `nerd` command keeps freed memory)
    bar.close()
    return Report(name, set_name, float(sigma255), rows, limit, info)

