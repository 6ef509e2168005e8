"""`nerd serve`: a local web page that denoises one image and shows the equilibrium forming.

The page (a gradio Blocks app, `build_app`) takes a noisy image file (gray or colour, 8/16-bit PNG/TIFF, JPEG, BMP),
checks it as `nerd denoise` does (`nerd.io.read_picture`: bit depth, colour, alpha, `max_pixels` from the header),
estimates sigma or takes it, and denoises it with `nerd.denoise.denoise_image` and the shipped weights nearest sigma
(`nerd.weights.nearest`) or given ones; a colour image as `nerd denoise --colour` sends it (`nerd.colour`'s shipped
method with the shipped weights: the opponent luminance Y solved, the chroma by a guided filter; R, G and B with
given weights). Besides the result (a compare slider, a download at the input's bit depth)
it shows the solve: x_hat decoded from the solver's iterate z_k after each step k (scrub through them) and the
relative residual ||f(z_k) - z_k|| / ||f(z_k)|| of each, the quantity the solver stops on.

How the iterates are seen: a forward hook on the model's implicit layer receives every state z the solver
evaluates f at (the same hook point as the progress bar of `denoise_image`), so the solver is untouched and nothing
is solved twice. Frame k is the image that x_hat_k = y + decode(z_k) gives (k = 0: the start z = 0; for a colour
image, its chroma and inverse transform applied as the library does); the solver returns, per plane, the iterate
with the lowest residual, so the result is one of the frames. Frames are kept for whole-image solves by one weights
file only (a tiled solve runs one solve per tile).

Everything here that does work is a plain function or an `Engine` method, testable without a browser; gradio is
imported inside `build_app` and `launch` only, so `import nerd.serve` needs no gradio and `import nerd` stays cheap.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nerd.config import DEFAULT_MAX_PIXELS, DEFAULT_MAX_UPLOAD_MB  # the CLI's defaults too
from nerd.config import DEFAULT_SERVE_HOST as DEFAULT_HOST
from nerd.errors import NerdError

VIEW_SIDE = 1024  # frames of the iteration view are kept at most this long a side (the download is full size)
COMPARE_SIDE = 2048  # the compare slider's images likewise
INPUT_TYPES = [".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp"]
INSTALL_HINT = "the web page needs gradio: pip install 'nerd[serve]' (or pip install -e '.[serve]' in a clone)"

Progress = Callable[[float, str], None]  # (fraction done in [0, 1], what is happening)


class ServeError(NerdError):
    """A request the page cannot serve as asked (no file, a file over the upload limit), or gradio missing."""


def require_gradio() -> Any:
    """The gradio module; ServeError with the install line when it is not installed."""
    try:
        import gradio
    except ImportError:
        raise ServeError(INSTALL_HINT) from None
    return gradio


@dataclass
class Outcome:
    """One denoised upload.

    Attributes:
        y: float32 (H, W) or (H, W, 3) noisy image on [0, 1], as read.
        x_hat: float32, y's shape, the denoised image on [0, 1].
        depth: the input's bit depth (8, 16; 32 for float TIFF), the download's.
        sigma: the noise std the weights were chosen for, 0-255 scale.
        estimated: sigma was estimated from y (else given).
        weights: the shipped name or the file name of the weights used; weights_sigma: their training sigma.
        summary: `nerd.denoise.DenoiseSummary` of the solve.
        frames: uint16 (h, w) or (h, w, 3) x_hat_k for k = 0 .. K-1 (K = f-evaluations; k = 0 decodes z = 0), the
            whole image as that iterate gives it, at most VIEW_SIDE a side; empty for a tiled solve.
        residuals: float (K, P) relative residual of iterate k per solved plane.
        steps: float (K,) RMS change of x_hat from iterate k-1 to k on the 0-255 scale (NaN at k = 0).
        psnr: float (K,) PSNR (dB) of x_hat_k against a known clean image (the bundled sample's), else None.
        names: the solved planes' names ("gray"; "R", "G", "B"; "Y": a colour image's opponent luminance).
        colour: how a colour image went through the gray weights (`nerd.colour`'s plan), "" otherwise.
        output: the written result file (PNG; TIFF for float input).
        report: one line saying what was done.
    """

    y: np.ndarray
    x_hat: np.ndarray
    depth: int
    sigma: float
    estimated: bool
    weights: str
    weights_sigma: float
    summary: Any
    frames: list[np.ndarray] = field(default_factory=list)
    residuals: np.ndarray = field(default_factory=lambda: np.zeros((0, 1)))
    steps: np.ndarray = field(default_factory=lambda: np.zeros(0))
    psnr: np.ndarray | None = None
    names: list[str] = field(default_factory=lambda: ["gray"])
    colour: str = ""
    output: Path | None = None
    report: str = ""


def display(x: np.ndarray, side: int | None = None) -> np.ndarray:
    """x: float [0, 1] or uint16 (H, W) / (H, W, 3) -> uint8 of the same layout for a browser, shrunk (area
    filter) to at most `side` pixels a side when given."""
    from PIL import Image

    from nerd.io import to_pixels

    u8 = (np.rint(x / 257.0).astype(np.uint8) if x.dtype == np.uint16 else to_pixels(x, 8))
    h, w = u8.shape[:2]
    if side is None or max(h, w) <= side:
        return u8
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(u8).resize(size, Image.Resampling.BOX))


def _shrink16(x: np.ndarray, side: int) -> np.ndarray:
    """float [0, 1] (H, W[, 3]) -> uint16, at most `side` a side (the iteration view's frames: a 16-bit frame is
    half a float one and keeps 1/65535 steps)."""
    from PIL import Image

    from nerd.io import to_pixels

    h, w = x.shape[:2]
    if max(h, w) > side:
        scale = side / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        planes = [np.asarray(Image.fromarray(p.astype(np.float32), mode="F").resize(size, Image.Resampling.BOX))
                  for p in (np.moveaxis(x, -1, 0) if x.ndim == 3 else x[None])]
        x = np.stack(planes, -1) if x.ndim == 3 else planes[0]
    return to_pixels(x, 16)


@dataclass
class Route:
    """How one image goes through the weights, as `nerd denoise` sends it.

    Attributes:
        weights: {weights name: the planes it solves, in one batch} (a colour method may need two files).
        planes: float32 (P, H, W) the noisy planes of the solve the frames follow (gray: the image; R, G, B; or a
            colour transform's solved planes, such as the opponent luminance Y).
        names: the P planes' names ("gray"; "R", "G", "B"; "Y").
        finish: (P, H, W) unclipped estimates of those planes -> the image they give, (H, W) or (H, W, 3) on [0, 1]
            (a colour transform's guided chroma and inverse included).
        colour_weights: what `denoise_image(colour_weights=...)` takes for this route (None: one model, R, G, B or
            gray).
        colour: the colour plan's description (`nerd.colour.ColourPlan.describe`), "" for gray or R, G, B.
    """

    weights: dict[str, list[int]]
    planes: np.ndarray
    names: list[str]
    finish: Callable[[np.ndarray], np.ndarray]
    colour_weights: Any = None
    colour: str = ""


class IterateRecorder:
    """A forward hook on a DEQDenoiser's implicit layer that sees every f-evaluation of a solve: it reports progress
    and, when `frames`, decodes the estimate x_hat_k = y + decode(z_k) of each iterate z_k.

    Args:
        model: the DEQDenoiser being solved (one solve at a time: the `Engine` holds a lock).
        route: the planes the solve sees and how its estimates become the image (`Route`).
        total: f-evaluations the whole job may take (solves x tiles x max_iter), for the progress fraction.
        frames: record frames and residuals (a whole-image solve by one model); False: progress only.
        clean: float (H, W[, 3]) clean image for a PSNR per iterate, or None.
        progress: called with (fraction, text) at every f-evaluation, or None.
    """

    def __init__(self, model: Any, route: Route, total: int, *, frames: bool, clean: np.ndarray | None = None,
                 progress: Progress | None = None) -> None:
        self.model, self.route, self.total = model, route, max(1, total)
        self.keep, self.clean, self.progress = frames, clean, progress
        self.count = 0
        self.frames: list[np.ndarray] = []
        self.residuals: list[np.ndarray] = []
        self.steps: list[float] = []
        self.psnr: list[float] = []
        self._previous: np.ndarray | None = None
        self._y: Any = None

    def __call__(self, module: Any, args: tuple[Any, ...], fz: Any) -> None:
        """The hook: args[0] is z (P, C, H, W), fz = f(z). Returns None (a value would replace the layer's output)."""
        self.count += 1
        if self.progress is not None:
            self.progress(min(self.count / self.total, 1.0), f"solver iteration {self.count}")
        if self.keep:
            self._record(args[0], fz)

    def _record(self, z: Any, fz: Any) -> None:
        import torch

        b = z.shape[0]
        diff = (fz - z).reshape(b, -1).norm(dim=1)
        rel = diff / (fz.reshape(b, -1).norm(dim=1) + 1e-12)  # the solver's own residual (nerd.deq.solvers)
        self.residuals.append(rel.float().cpu().numpy())
        if self._y is None:
            self._y = torch.from_numpy(self.route.planes).to(z.device)[:, None]
        out = self.model.decode(z.to(self._y.dtype))
        estimate = (self._y + out if self.model.cfg.equilibrium == "noise" else out)[:, 0].float().cpu().numpy()
        x = self.route.finish(estimate)
        step = float("nan") if self._previous is None else float(np.sqrt(np.mean((x - self._previous) ** 2)) * 255)
        self._previous = x
        self.steps.append(step)
        if self.clean is not None:
            from nerd.metrics import psnr

            self.psnr.append(psnr(x, self.clean))
        self.frames.append(_shrink16(x, VIEW_SIDE))


class Engine:
    """What the page does, without the page: reads and checks an upload, picks weights, denoises, records the
    iterates, writes the download. One solve at a time (a lock): the recorder hooks the shared model.

    Args:
        weights: a weights name or .safetensors path used for every sigma; None: the shipped weights nearest sigma.
        device: "cpu", "cuda", ...; None: CUDA when available.
        max_upload_mb: larger files are refused (the server refuses them at upload too).
        max_pixels: images of more pixels are refused from their header (0: no limit), as `nerd denoise`.
    """

    def __init__(self, weights: str | None = None, *, device: str | None = None,
                 max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        from nerd.denoise import default_device

        if not (math.isfinite(max_upload_mb) and max_upload_mb > 0):
            raise ServeError(f"--max-upload-mb must be > 0, got {max_upload_mb:g}")
        if max_pixels < 0:
            raise ServeError(f"--max-pixels must be >= 0 (0: no limit), got {max_pixels}")
        self.weights, self.device = weights, device or default_device()
        self.max_upload_mb, self.max_pixels = float(max_upload_mb), int(max_pixels)
        self.workdir = Path(tempfile.mkdtemp(prefix="nerd-serve-"))
        self._models: dict[str, tuple[Any, dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._jobs = 0
        if weights is not None:
            self.model(weights)  # a bad --weights fails at start, not at the first upload

    def close(self) -> None:
        """Remove the written results."""
        shutil.rmtree(self.workdir, ignore_errors=True)

    def model(self, name: str) -> tuple[Any, dict[str, Any]]:
        """(DEQDenoiser, info) of weights `name`, loaded (and checked) once."""
        from nerd.weights import load_weights

        if name not in self._models:
            self._models[name] = load_weights(name, device=self.device)
        return self._models[name]

    def trained(self) -> dict[str, float]:
        """{weights name: training sigma} to choose from: the given weights, or the shipped ones."""
        from nerd.weights import read_metadata, shipped

        if self.weights is not None:
            return {self.weights: float(self.model(self.weights)[1]["sigma"])}
        found = {name: float(read_metadata(path)["sigma"]) for name, path in shipped().items()}
        if not found:
            raise ServeError("no shipped weights are installed to choose from; start with --weights NAME|PATH")
        return found

    def budgets(self) -> dict[str, int]:
        """{weights name: the iteration cap (max_iter) of the solver stored with it}: the most a solve runs when the
        iteration dial is left at 0 (shipped: 17, each solve stopping earlier once below its tolerance)."""
        from nerd.config import solver_config_from_json
        from nerd.weights import read_metadata, resolve

        return {name: int(solver_config_from_json(read_metadata(resolve(name))["solver"]).max_iter)
                for name in self.trained()}

    def read(self, path: str | Path) -> Any:
        """The upload as a `nerd.io.Picture` (gray (H, W) or colour (H, W, 3) on [0, 1]), checked as `nerd denoise`
        checks a file; ImageError/ServeError naming the file by its own name (not the server's upload path)."""
        from nerd.io import read_picture

        path = Path(path)
        if not path.is_file():
            raise ServeError("drop or choose an image file first")
        size = path.stat().st_size
        if size > self.max_upload_mb * 1e6:
            raise ServeError(f"{path.name}: {size / 1e6:.1f} MB, more than this page's upload limit of "
                             f"{self.max_upload_mb:g} MB (nerd serve --max-upload-mb)")
        try:
            return read_picture(path, colour=True, max_pixels=self.max_pixels)
        except NerdError as err:
            raise type(err)(" ".join(str(err).replace(str(path), path.name).split())) from None

    def denoise(self, path: str | Path, *, sigma: float | None = None, iters: int | None = None,
                progress: Progress | None = None) -> Outcome:
        """Denoise one uploaded file.

        Args:
            path: the image file.
            sigma: noise std on the 0-255 scale; None: estimated from the image (wavelet MAD).
            iters: the solver's iteration cap (None: the weights' own).
            progress: called with (fraction, text) as the solve goes, or None.

        Returns:
            The Outcome, its result written under `workdir`.
        """
        from nerd.cli import check_sigma
        from nerd.denoise import estimate_sigma255

        picture = self.read(path)
        name = Path(path).name
        estimated = sigma is None
        if estimated:
            try:
                sigma = estimate_sigma255(picture.x)
            except ValueError as err:
                raise ServeError(f"{name}: cannot estimate sigma: {err}") from None
        else:
            sigma = check_sigma(sigma, "sigma")
        if iters is not None and not (isinstance(iters, int) and iters >= 1):
            raise ServeError(f"iterations must be a whole number >= 1, got {iters!r}")
        trained = self.trained()
        with self._lock:
            route, solve_sigma = self.route(picture.x, sigma, trained)
            outcome = self._solve(route, picture, solve_sigma, iters, _clean_for(path), progress)
        outcome.sigma, outcome.estimated = sigma, estimated
        first = next(iter(route.weights))
        outcome.weights = ", ".join(_label(n) for n in route.weights)
        outcome.weights_sigma, outcome.colour = trained[first], route.colour
        outcome.output = self._write(name, outcome.x_hat, outcome.depth, picture.alpha)
        outcome.report = report(outcome)
        return outcome

    def route(self, y: np.ndarray, sigma: float, trained: dict[str, float]) -> tuple[Route, float]:
        """How `nerd denoise` sends y (float (H, W) or (H, W, 3)) of noise `sigma` (0-255) through the weights, and
        the sigma the solve is given: gray, or a colour image's R, G, B, by the weights nearest sigma (--weights:
        those); a colour image with the shipped weights by `nerd.colour`'s shipped method (`ColourWeights`)."""
        from nerd.colour import ColourWeights, denoise_colour
        from nerd.weights import nearest

        solve_sigma = min(sigma, 255.0) if sigma > 0 else trained[nearest(sigma, trained)]  # a flat image: 0
        if y.ndim == 3 and self.weights is None:
            weights = ColourWeights(trained, lambda name: self.model(name)[0])
            plan = weights.plan(solve_sigma)
            first, idx = next(iter(plan.solves.items()))
            planes = np.ascontiguousarray(plan.method.transform.forward(y)[idx], dtype=np.float32)

            def finish(solved: np.ndarray) -> np.ndarray:  # the chroma and the inverse, as the library does them
                return denoise_colour(y, solve_sigma, trained, lambda _p, _n: (solved, None), plan.method)[0]

            return Route(plan.solves, planes, [plan.planes[i].name for i in idx], finish, weights,
                         f"colour {plan.describe()}"), solve_sigma
        name = nearest(sigma, trained)
        planes = np.ascontiguousarray(np.moveaxis(y, -1, 0)) if y.ndim == 3 else y[None]
        names = ["R", "G", "B"] if y.ndim == 3 else ["gray"]

        def clip(solved: np.ndarray) -> np.ndarray:
            return np.clip(np.moveaxis(solved, 0, -1) if y.ndim == 3 else solved[0], 0.0, 1.0)

        return Route({name: list(range(len(names)))}, planes, names, clip), solve_sigma

    def _solve(self, route: Route, picture: Any, sigma: float, iters: int | None, clean: np.ndarray | None,
               progress: Progress | None) -> Outcome:
        """denoise_image with the recorder hooked on the model(s) of the route (tiles as `nerd denoise --tile auto`
        picks them); frames for a whole-image solve by one weights file."""
        import torch

        from nerd.denoise import denoise_image
        from nerd.tiling import OVERLAP, available_bytes, choose_tile, tiles

        y = picture.x
        models = {name: self.model(name)[0] for name in route.weights}
        model = next(iter(models.values()))
        solver = model.solver.override(max_iter=iters)
        h, w = y.shape[:2]
        planes = max(len(idx) for idx in route.weights.values())
        plan = choose_tile(h, w, model.cfg.channels, solver, available_bytes(torch.device(self.device)), planes)
        count = len(tiles(h, w, plan.tile, OVERLAP)) if plan.tile is not None else 1
        recorder = IterateRecorder(model, route, len(models) * count * solver.max_iter,
                                   frames=plan.tile is None and len(models) == 1, clean=clean, progress=progress)
        handles = [m.layer.register_forward_hook(recorder) for m in models.values()]
        try:
            x_hat, summary = denoise_image(model, y, sigma, solver=solver, device=self.device, tile=plan.tile,
                                           colour_weights=route.colour_weights)
        finally:
            for handle in handles:
                handle.remove()
        k = len(recorder.residuals)
        return Outcome(y=y, x_hat=x_hat, depth=picture.depth, sigma=sigma, estimated=False, weights="",
                       weights_sigma=0.0, summary=summary, frames=recorder.frames, names=route.names,
                       residuals=np.array(recorder.residuals).reshape(k, len(route.names)),
                       steps=np.array(recorder.steps, dtype=float),
                       psnr=np.array(recorder.psnr) if clean is not None and recorder.psnr else None)

    def _write(self, name: str, x_hat: np.ndarray, depth: int, alpha: np.ndarray | None) -> Path:
        """The result as `<stem>-denoised.png` (`.tif` for a float input) in a folder of its own."""
        from nerd.io import write_image

        self._jobs += 1
        folder = self.workdir / f"{self._jobs:05d}"
        folder.mkdir()
        out = folder / f"{Path(name).stem}-denoised{'.tif' if depth == 32 else '.png'}"
        write_image(out, x_hat, depth, alpha=alpha)
        return out


def _label(weights: str) -> str:
    """A weights name as shown: a shipped name as is, a file by its file name."""
    from nerd.weights import shipped

    return weights if weights in shipped() else Path(weights).name


def _clean_for(path: str | Path) -> np.ndarray | None:
    """The bundled sample's clean image when `path` holds exactly the bundled noisy sample, else None."""
    from nerd.denoise import SAMPLE_CLEAN, SAMPLE_NOISY
    from nerd.io import read_image

    try:
        same = _sha256(Path(path)) == _sha256(SAMPLE_NOISY)
    except OSError:
        return None
    return read_image(SAMPLE_CLEAN)[0] if same else None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def report(outcome: Outcome) -> str:
    """One line: sigma (estimated or given), the weights, and `nerd.denoise.describe`'s solve report."""
    from nerd.denoise import describe

    how = "estimated" if outcome.estimated else "given"
    far = abs(outcome.weights_sigma - outcome.sigma) > 0.5 and not outcome.colour  # a colour plan says its own
    trained = f" (trained for sigma {outcome.weights_sigma:g})" if far else ""
    kind = "colour" if outcome.y.ndim == 3 else "gray"
    depth = "float" if outcome.depth == 32 else f"{outcome.depth}-bit"
    colour = f"; {outcome.colour}" if outcome.colour else ""
    return (f"sigma {outcome.sigma:.1f} ({how}) -> weights {outcome.weights}{trained}{colour}; {depth} {kind}, "
            f"{describe(outcome.summary)}")


def residual_table(outcome: Outcome) -> Any:
    """The residual curve as a pandas DataFrame (gradio's plots take one): columns iteration (k), series (each
    solved plane: gray, R/G/B or Y; and the tolerance), log10 of the relative residual."""
    import pandas as pd

    k, planes = outcome.residuals.shape
    rows = [(i, outcome.names[p], math.log10(max(float(outcome.residuals[i, p]), 1e-12))) for p in range(planes)
            for i in range(k)]
    tol = outcome.summary.tol
    if tol > 0 and k:
        rows += [(i, f"tol {tol:g}", math.log10(tol)) for i in (0, k - 1)]
    return pd.DataFrame(rows, columns=["iteration", "series", "log10 residual"])


def step_table(outcome: Outcome) -> Any:
    """How x_hat settles, as a pandas DataFrame: iteration (k >= 1), series, log10 of the RMS change of x_hat from
    iterate k-1 to k on the 0-255 scale."""
    import pandas as pd

    rows = [(k, "x̂ change", math.log10(max(float(s), 1e-6))) for k, s in enumerate(outcome.steps) if k > 0]
    return pd.DataFrame(rows, columns=["iteration", "series", "log10 RMS change"])


def psnr_table(outcome: Outcome) -> Any:
    """PSNR (dB) of each iterate's x_hat against the known clean image, as a pandas DataFrame (empty without
    one)."""
    import pandas as pd

    values = [] if outcome.psnr is None else list(enumerate(outcome.psnr))
    return pd.DataFrame([(k, "PSNR", float(v)) for k, v in values], columns=["iteration", "series", "PSNR (dB)"])


def frame_caption(outcome: Outcome, k: int) -> str:
    """What frame k shows: its residual, how much x_hat moved in that step, its PSNR when the clean image is
    known."""
    if not outcome.frames:
        return "The iteration view needs a whole-image solve; this image was solved in tiles."
    k = min(max(int(k), 0), len(outcome.frames) - 1)
    residual = ", ".join(f"{r:.2e}" for r in outcome.residuals[k])
    parts = [f"x̂ from iterate z_{k}" + (" (the start, z = 0)" if k == 0 else f" after {k} solver step"
                                         + "s" * (k != 1)), f"relative residual {residual}"]
    if not math.isnan(outcome.steps[k]):
        parts.append(f"changed by {outcome.steps[k]:.2f}/255 RMS in this step")
    if outcome.psnr is not None:
        parts.append(f"PSNR {outcome.psnr[k]:.2f} dB against the sample's clean image")
    best = np.argmin(outcome.residuals, axis=0)  # the iterate the solver returns, per plane
    if (best == k).all():
        parts.append("the lowest residual: the iterate the solver returns")
    elif (best == k).any():
        which = ", ".join(n for n, b in zip(outcome.names, best, strict=True) if b == k)
        parts.append(f"the iterate the solver returns for {which}")
    return "; ".join(parts)


def handle_denoise(engine: Engine, file: str | None, estimate: bool, sigma: float | None, iters: float,
                   progress: Progress | None = None) -> tuple[Any, ...]:
    """The Denoise button: the outputs of the page's components, in `build_app`'s order (compare pair, report,
    download, scrub slider, frame, caption, residual / step / PSNR plots, the Outcome for the session's state).
    A NerdError becomes a gradio.Error with its one-line message (shown in the page, no traceback)."""
    gr = require_gradio()
    if not file:
        raise gr.Error("Drop or choose an image file first.", print_exception=False)
    try:
        if progress is not None:
            progress(0.0, "reading the image")
        outcome = engine.denoise(file, sigma=None if estimate else sigma, iters=int(iters) or None,
                                 progress=progress)
    except NerdError as err:
        raise gr.Error(" ".join(str(err).split()), print_exception=False) from None
    last = max(len(outcome.frames) - 1, 0)
    pair = (display(outcome.y, COMPARE_SIDE), display(outcome.x_hat, COMPARE_SIDE))
    frame = display(outcome.frames[last]) if outcome.frames else None
    return (pair, outcome.report, gr.DownloadButton(value=str(outcome.output), visible=True),
            gr.Slider(minimum=0, maximum=max(last, 1), value=last, step=1, interactive=bool(outcome.frames)),
            frame, frame_caption(outcome, last), residual_table(outcome), step_table(outcome),
            gr.LinePlot(value=psnr_table(outcome), visible=outcome.psnr is not None), outcome)


def handle_scrub(k: float, outcome: Outcome | None) -> tuple[np.ndarray | None, str]:
    """The iterate slider: (uint8 x_hat_k for display, its caption); nothing before a solve."""
    if outcome is None or not outcome.frames:
        return None, "" if outcome is None else frame_caption(outcome, 0)
    k = min(max(int(k), 0), len(outcome.frames) - 1)
    return display(outcome.frames[k]), frame_caption(outcome, k)


def handle_sample(engine: Engine) -> tuple[str, bool, float]:
    """The sample button: a copy of the bundled noisy sample as the upload, sigma given as its 25."""
    from nerd.denoise import SAMPLE_NOISY, SAMPLE_SIGMA

    copy = engine.workdir / "sample" / SAMPLE_NOISY.name
    copy.parent.mkdir(exist_ok=True)
    shutil.copyfile(SAMPLE_NOISY, copy)
    return str(copy), False, SAMPLE_SIGMA


def build_app(engine: Engine) -> Any:
    """The page as a gradio Blocks app, not launched (`launch` serves it; tests call `.launch` themselves).

    Args:
        engine: what the page's handlers call.

    Returns:
        gradio.Blocks.
    """
    gr = require_gradio()
    budgets = engine.budgets()
    own = ", ".join(f"{_label(name)} {n}" for name, n in budgets.items())

    def on_denoise(file: str | None, estimate: bool, sigma: float | None, iters: float,
                   progress: Any = gr.Progress()) -> tuple[Any, ...]:  # noqa: B008 -- gradio's way to ask for it
        return handle_denoise(engine, file, estimate, sigma, iters, lambda f, text: progress(f, desc=text))

    def on_sample() -> tuple[str, bool, float]:
        return handle_sample(engine)

    with gr.Blocks(title="NERD: equilibrium image denoising", analytics_enabled=False) as app:
        gr.Markdown("## NERD: equilibrium image denoising\nDrop a noisy photo (gray or colour, 8/16-bit PNG or "
                    "TIFF, JPEG, BMP). NERD finds the noise as the fixed point z* = f(z*) of one layer and "
                    "subtracts it; below, watch the estimate x̂ form as the solver iterates.")
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                upload = gr.File(label="Noisy image", file_types=INPUT_TYPES, type="filepath", elem_id="upload")
                sample = gr.Button("Use the bundled sample (σ = 25)", size="sm", elem_id="sample")
                estimate = gr.Checkbox(value=True, label="Estimate σ from the image", elem_id="estimate")
                sigma = gr.Number(value=25.0, minimum=0.1, maximum=255, label="σ (noise std, 0–255 scale)",
                                  elem_id="sigma")
                iters = gr.Slider(0, max(2 * max(budgets.values()), 30), value=0, step=1,
                                  label="Solver iterations (cap)", elem_id="iters",
                                  info=f"0: the weights' own solver (at most {own} iterations, fewer once "
                                       "it converges); a number caps it: fewer, faster; more, closer to z*")
                run = gr.Button("Denoise", variant="primary", elem_id="denoise")
                download = gr.DownloadButton("Download the result", visible=False, elem_id="download")
            with gr.Column(scale=2):
                compare = gr.ImageSlider(label="Noisy | denoised (drag the slider)", type="numpy", format="png",
                                         elem_id="compare", interactive=False)
                summary = gr.Markdown(elem_id="report")
        gr.Markdown("### The equilibrium forming")
        with gr.Row():
            with gr.Column(scale=1):
                scrub = gr.Slider(0, 1, value=0, step=1, label="Iterate k", interactive=False, elem_id="scrub")
                frame = gr.Image(label="x̂ from iterate z_k", type="numpy", format="png", interactive=False,
                                 height=340, elem_id="frame")
                caption = gr.Markdown(elem_id="caption")
            with gr.Column(scale=1):
                curve = gr.LinePlot(x="iteration", y="log10 residual", color="series", height=200,
                                    title="Relative residual ||f(z_k) − z_k|| / ||f(z_k)|| (log10)",
                                    elem_id="residuals")
                steps = gr.LinePlot(x="iteration", y="log10 RMS change", color="series", height=200,
                                    title="How much x̂ changes in each step (RMS, 0–255 scale, log10)",
                                    elem_id="steps")
                quality = gr.LinePlot(x="iteration", y="PSNR (dB)", color="series", height=200, visible=False,
                                      title="PSNR of x̂ from each iterate (the sample's clean image is known)",
                                      elem_id="psnr")
        sample.click(on_sample, outputs=[upload, estimate, sigma])
        run.click(on_denoise, inputs=[upload, estimate, sigma, iters],
                  outputs=[compare, summary, download, scrub, frame, caption, curve, steps, quality, state])
        # on the user's moves only: a .change would also fire on the Denoise button's update of the slider, and
        # gradio would write the same frame's cached file again while the browser reads it
        scrub.input(handle_scrub, inputs=[scrub, state], outputs=[frame, caption], show_progress="hidden")
    return app


def launch(engine: Engine, *, host: str = DEFAULT_HOST, port: int | None = None, block: bool = True) -> Any:
    """Serve `build_app(engine)` at http://host:port (port None: gradio's first free one from 7860); the upload
    limit is enforced by the server too. Returns the app (with block=False, still serving: `app.close()`)."""
    app = build_app(engine)
    app.queue(default_concurrency_limit=1)  # one solve at a time, the others queue with their place shown
    app.launch(server_name=host, server_port=port, max_file_size=f"{engine.max_upload_mb:g}mb",
               prevent_thread_lock=not block, share=False, ssr_mode=False, mcp_server=False, quiet=not block,
               allowed_paths=[str(engine.workdir)])
    return app
