"""`nerd denoise`: denoise a user's noisy grayscale image(s) with shipped or given weights.

Order of work: every option, the weights and every input image (fully decoded) and output path are checked
first; only then are images denoised and written, one by one, each atomically (temporary file + os.replace).
So a bad input or option writes nothing at all. A failure while denoising (non-finite output) stops the run
there: the images already written are complete, the failing one and the rest are not written.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nerd.config import DEFAULT_MAX_PIXELS  # one owner: `nerd serve` reads it too

EPILOG = """\
scales: 8-bit pixels are read as pixel/255, 16-bit as pixel/65535; --sigma is always on the 0-255 scale
(a 16-bit image with noise std 6425 of 65535 has --sigma 25). Output keeps the input's size and bit depth;
its format follows the -o suffix (.png, .tif, .jpg, .bmp; 16-bit needs .png or .tif).
several inputs or a folder: -o is a folder (created if its parent exists), outputs keep the input names.
large images: a whole-image solve needs about 12 KB a pixel with the shipped weights (8 GB for 1024x644);
with --tile auto an image that would not fit is solved in tiles (said in its report line), whose result
differs slightly from a whole-image solve (docs/performance.md, "Large images: tiles").
colour images: refused unless --gray (their luminance, denoised) or --colour (nerd.colour's shipped method: the
same noise level in each RGB channel assumed; with --weights, each RGB channel on its own by those weights; NERD
itself is a grayscale denoiser).
With --gray, --sigma is the noise of each RGB channel and is converted to the luminance's
(x 0.669, ITU-R 601 luma: sigma 25 -> 16.7, said in a note); a gray input is unchanged.
alpha (LA, RGBA, transparent palette): kept unchanged beside the denoised gray or colour pixels in a .png or
.tif output; a .jpg or .bmp output cannot hold it: refused if any pixel is transparent, else dropped with a note.
exit status 2 on bad input, with one line on stderr naming every unusable input, and no output written.
"""


LONG_RUN_SECONDS = 60.0  # a run predicted to take longer says so, with its tiles, before it starts
FORECAST_MIN_WORK = 2_000_000  # pixels x channels x iterations x symmetries below which no forecast is measured


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "denoise",
        help="denoise noisy grayscale images (file, files or folder) with NERD weights",
        description="Denoise already-noisy grayscale images with the NERD weights for their noise level.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("noisy", nargs="*", metavar="NOISY", help="noisy image file(s), or a folder of images")
    p.add_argument("-o", "--output", metavar="OUT", help="output file, or folder for several images")
    p.add_argument(
        "--sigma",
        metavar="SIGMA|auto",
        help="noise std on the 0-255 scale (picks the shipped weights trained for the nearest sigma), or 'auto' "
        "to estimate it; default: the --weights' training sigma",
    )
    p.add_argument(
        "--weights", metavar="NAME|PATH", help="shipped weights name (see `nerd info`) or a .safetensors"
    )
    p.add_argument(
        "--gray", action="store_true",
        help="convert colour images to luminance instead of refusing; --sigma then means each RGB channel's noise and "
        "is converted to the luminance's (x 0.669)",
    )
    p.add_argument(
        "--colour", "--color", action="store_true",
        help="denoise a colour image: its opponent luminance by the gray weights for that plane's noise, its two "
        "colour-difference planes by a guided filter led by the denoised luminance (nerd.colour.SHIPPED; "
        "docs/usage.md, 'Colour'); with --weights, R, G and B each by those weights",
    )
    p.add_argument("--iters", metavar="N", help="solver iterations cap (overrides the weights' max_iter)")
    p.add_argument(
        "--tol", metavar="T",
        help="solver relative-residual tolerance, >= 0 (0: always run --iters; overrides the weights' tol)",
    )
    p.add_argument("--device", metavar="cpu|cuda[:N]", help="default: cuda when available, else cpu")
    p.add_argument(
        "--max-pixels", metavar="N", default=str(DEFAULT_MAX_PIXELS),
        help=f"refuse images of more than N pixels, read from the file's header before decoding (a decompression "
             f"bomb); default {DEFAULT_MAX_PIXELS:,} (50 megapixels), 0: no limit",
    )
    p.add_argument(
        "--tile",
        metavar="N|auto|off",
        default="auto",
        help="solve in overlapping tiles of at most N x N to bound memory; 'auto' (default): tiles only when the whole "
        "image would not fit in the memory available; 'off': always the whole image",
    )
    p.add_argument(
        "--ensemble",
        metavar="N",
        default="1",
        help="self-ensemble: the mean of N solves (1, 2, 4 or 8), each on a rotated/flipped copy and turned back; "
        "N times the time, a little higher PSNR (docs/evaluation.md, 'Self-ensemble'); default 1",
    )
    p.add_argument(
        "--sample", action="store_true", help="denoise the shipped sample image (sigma 25) and print PSNR"
    )
    p.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bar or report lines (errors still shown)"
    )
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar (report lines still shown; for logs)"
    )


@dataclass
class Job:
    """One image to denoise: where from, where to, its depth, sigma (0-255, as the model gets it) and weights name,
    and whether its alpha channel is written back."""

    src: Path
    dst: Path
    depth: int = 8
    sigma: float = 0.0
    weights: str = ""
    alpha: bool = False


def _unusable(problems: list[tuple[Path, Exception]]) -> Exception:
    """One error naming every unusable input: the error itself for one, else "N unusable inputs: a.png (reason);
    b.tif (reason)" (each reason without the path its message starts with)."""
    from nerd.errors import ImageError

    if len(problems) == 1:
        return problems[0][1]
    parts = []
    for src, err in problems:
        reason = " ".join(str(err).split())
        reason = reason[len(f"{src}: "):] if reason.startswith(f"{src}: ") else reason
        parts.append(f"{src} ({reason})")
    return ImageError(f"{len(problems)} unusable inputs: {'; '.join(parts)}")


def _number(text: str | None, option: str, kind: type, low: float) -> Any:
    """Parse an option value, UserError unless finite and >= low."""
    from nerd.cli import UserError

    if text is None:
        return None
    try:
        value = kind(text)
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise UserError(f"{option} must be {noun}, got {text!r}") from None
    if not math.isfinite(value) or value < low:
        raise UserError(f"{option} must be >= {low:g}, got {text!r}")
    return value


def _parse_sigma(text: str | None) -> float | str | None:
    """--sigma: None (not given), 'auto', or a noise level in (0, 255]."""
    from nerd.cli import UserError, check_sigma

    if text is None or text.lower() == "auto":
        return None if text is None else "auto"
    try:
        float(text)
    except ValueError:
        raise UserError(f"--sigma must be a number on the 0-255 scale or 'auto', got {text!r}") from None
    return check_sigma(text)


def _parse_tile(text: str) -> int | str | None:
    """--tile: 'auto', None for 'off', or a side length of at least twice the tiles' overlap."""
    from nerd.cli import UserError
    from nerd.tiling import OVERLAP

    if text.lower() in ("auto", "off"):
        return None if text.lower() == "off" else "auto"
    side = _number(text, "--tile", int, -math.inf)
    if side < 2 * OVERLAP:
        raise UserError(f"--tile must be at least {2 * OVERLAP} (twice the tiles' overlap), got {text!r}")
    return side


def _tile_for(shape: tuple[int, ...], choice: int | str | None, model: Any, solver: Any, device: str) -> tuple[
    int | None, str
]:
    """The tile side for one image (None: whole) and, when --tile auto had something to say, the line saying it."""
    import torch

    from nerd.tiling import available_bytes, choose_tile

    if choice != "auto":
        return choice, ""  # type: ignore[return-value]
    available = available_bytes(torch.device(device))
    planes = shape[2] if len(shape) == 3 else 1  # a colour image's channels are solved as one batch
    plan = choose_tile(shape[0], shape[1], model.cfg.channels, solver, available, planes)
    if plan.budget is None or (plan.tile is None and plan.fits):
        return plan.tile, ""
    gib = 2**30
    why = f"the whole image needs about {plan.whole_bytes / gib:.1f} GiB and {available / gib:.1f} GiB is available"  # type: ignore[operator]
    if plan.tile is None:
        return None, f"{why}: it may not fit (it is no larger than the smallest tile)"
    line = f"{why}: solving it in tiles of at most {plan.tile}x{plan.tile} (--tile off to force the whole image)"
    if not plan.fits:
        line += f"; even these need about {plan.tile_bytes / gib:.1f} GiB and may not fit"  # type: ignore[operator]
    return plan.tile, line


def _forecast(shape: tuple[int, ...], tile: int | None, model: Any, solver: Any, ensemble: int, device: str) -> str:
    """A line predicting a long run's time before it starts ('' for a short one): the f-evaluations it may take
    times one f-evaluation's time, measured here on a small crop (`nerd.tiling.forecast_seconds`)."""
    from nerd.tiling import OVERLAP, forecast_seconds, tiles

    h, w = shape[:2]
    channels = shape[2] if len(shape) == 3 else 1
    if h * w * channels * solver.max_iter * ensemble < FORECAST_MIN_WORK:  # a few seconds: not worth measuring
        return ""
    pieces = tiles(h, w, tile, OVERLAP) if tile is not None and max(h, w) > tile else None
    count = len(pieces) if pieces else 1
    tile_pixels = pieces[0][2].numel() if pieces else h * w
    solves = count * ensemble
    seconds = forecast_seconds(model, tile_pixels * channels, solves, solver, device)  # a colour tile: one batch
    if seconds < LONG_RUN_SECONDS:
        return ""
    where = f"{count} tiles of {tile_pixels / 1e6:.2f} MP" if pieces else "the whole image"
    return (f"{w}x{h}: {solves} solve{'s' * (solves > 1)} ({where}{f', {channels} channels a batch' * (channels > 1)}"
            f"{f' x {ensemble} symmetries' * (ensemble > 1)}) of up to {solver.max_iter} iterations: about "
            f"{_duration(seconds)} on this machine")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _inputs(args: argparse.Namespace) -> tuple[list[Path], bool]:
    """The input files and whether this is a batch (several files or a folder)."""
    from nerd.cli import UserError
    from nerd.denoise import SAMPLE_NOISY
    from nerd.io import IMAGE_SUFFIXES, list_images

    if args.sample:
        if args.noisy:
            raise UserError("give either NOISY or --sample, not both")
        return [SAMPLE_NOISY], False
    if not args.noisy:
        raise UserError("give NOISY (an image file, several files or a folder), or --sample")
    files: list[Path] = []
    problems: list[tuple[Path, Exception]] = []  # all of them in one line, not the first only
    for text in args.noisy:
        path = Path(text)
        if path.is_dir():
            found = list_images(path)
            if not found:
                problems.append((path, UserError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")))
            files += found
        elif path.exists():
            files.append(path)
        else:
            problems.append((path, UserError(f"{path}: no such file or folder")))
    if problems:
        raise _unusable(problems)
    return files, len(args.noisy) > 1 or Path(args.noisy[0]).is_dir()


def _writable_folder(folder: Path, what: str) -> None:
    from nerd.cli import UserError

    if not folder.exists():
        raise UserError(f"{what} {folder} does not exist")
    if not folder.is_dir():
        raise UserError(f"{what} {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{what} {folder} is not writable")


def _plan(files: list[Path], batch: bool, out: str | None) -> tuple[list[Job], Path | None]:
    """Output path of each input; returns (jobs, output folder to create after validation or None)."""
    from nerd.cli import UserError
    from nerd.io import FORMATS

    if not out:
        raise UserError("give -o OUT: an output file (or a folder, for several images)")
    target = Path(out)
    folder = out.endswith(("/", os.sep))  # "-o new/" names a folder even before it exists (Path drops the "/")
    create: Path | None = None
    if batch or folder:
        if target.exists() and not target.is_dir():
            what = "several images need an output folder" if batch else "-o ends with a slash"
            raise UserError(f"-o {target}: {what}, and this is a file")
        if not target.exists():
            if not folder and target.suffix.lower() in FORMATS:
                raise UserError(f"-o {target}: several images need an output folder, not a file name; "
                                f"give a folder (it is created) or a single input image")
            _writable_folder(target.parent, "parent of the output folder")
            create = target
        else:
            _writable_folder(target, "output folder")
        jobs = [Job(src, target / src.name) for src in files]
    else:
        dst = target / files[0].name if target.is_dir() else target
        _writable_folder(dst.parent, "output folder")
        jobs = [Job(files[0], dst)]
    seen: dict[Path, Path] = {}
    for job in jobs:
        if job.dst.is_dir():
            raise UserError(f"{job.dst}: the output would replace a folder of that name; choose another -o")
        key = job.dst.resolve()
        if key == job.src.resolve():
            raise UserError(f"{job.dst}: output would overwrite its input; choose another -o")
        if key in seen:
            raise UserError(f"{seen[key]} and {job.src} would both be written to {job.dst}")
        seen[key] = job.src
    return jobs, create


def _shipped_sigmas() -> dict[str, float]:
    """Training sigma of each shipped weights file, from its metadata."""
    from nerd.weights import shipped

    return _sigmas_of(tuple(shipped().items()))


@functools.lru_cache(maxsize=4)
def _sigmas_of(files: tuple[tuple[str, Path], ...]) -> dict[str, float]:
    """{name: training sigma} of these weights files (cached: every image of a folder asks)."""
    from nerd.weights import WeightsError, read_metadata

    sigmas = {}
    for name, path in files:
        try:
            sigmas[name] = float(read_metadata(path)["sigma"])
        except (WeightsError, KeyError, ValueError):
            continue
    return sigmas


def _nearest_shipped(sigma: float) -> str:
    """Name of the shipped weights whose training sigma is nearest `sigma` (`nerd.weights.nearest`)."""
    from nerd.cli import UserError
    from nerd.weights import nearest

    trained = _shipped_sigmas()
    if not trained:
        raise UserError("no shipped weights are installed to choose from; give --weights NAME|PATH")
    return nearest(sigma, trained)


def _load(name: str, device: str, cache: dict[str, tuple[Any, dict[str, Any]]]) -> tuple[Any, dict[str, Any]]:
    from nerd.weights import load_weights

    if name not in cache:
        cache[name] = load_weights(name, device=device)
    return cache[name]


def run(args: argparse.Namespace) -> int:

    from tqdm import tqdm

    from nerd import allocator
    from nerd.cli import UserError, check_device
    from nerd.config import check_ensemble
    from nerd.denoise import (
        SAMPLE_CLEAN,
        SAMPLE_SIGMA,
        DenoiseError,
        convergence,
        default_device,
        denoise_image,
        describe,
        estimate_sigma255,
    )
    from nerd.errors import ImageError, NerdError
    from nerd.io import keeps_alpha, luma_sigma255, output_format, read_image, read_picture, to_pixels, write_image
    from nerd.metrics import psnr as psnr_db

    if args.gray and args.colour:
        raise UserError("give --gray (luminance) or --colour (each RGB channel), not both")
    sigma = _parse_sigma(args.sigma)
    per_channel = isinstance(sigma, float)  # a --sigma N: with --gray, each RGB channel's noise (converted below)
    iters = _number(args.iters, "--iters", int, 1)
    tol = _number(args.tol, "--tol", float, 0)
    tile_choice = _parse_tile(args.tile)
    ensemble = _number(args.ensemble, "--ensemble", int, 1)
    check_ensemble(ensemble, "--ensemble")
    max_pixels = _number(args.max_pixels, "--max-pixels", int, 0)
    from PIL import Image

    # Pillow's own bomb check (a warning above its limit, an error above twice it) follows ours: off with 0, and
    # never below a limit the user raised
    Image.MAX_IMAGE_PIXELS = None if max_pixels == 0 else max(max_pixels, Image.MAX_IMAGE_PIXELS or 0)
    device = check_device(args.device or default_device())
    files, batch = _inputs(args)  # the paths exist (images are decoded below, after the weights)
    if sigma is None and args.sample:
        sigma = SAMPLE_SIGMA
    if sigma is None and not args.weights:
        raise UserError("give --sigma (noise std on the 0-255 scale, or 'auto') or --weights")
    say = (lambda line: None) if args.quiet else tqdm.write

    models: dict[str, tuple[Any, dict[str, Any]]] = {}
    if args.weights:  # explicit weights: check them before reading any image
        _, info = _load(args.weights, device, models)
        if sigma is None:
            sigma = info["sigma"]
    elif isinstance(sigma, float):
        _load(_nearest_shipped(sigma), device, models)

    jobs, create = _plan(files, batch, args.output)
    cached: dict[Path, Any] = {}
    problems: list[tuple[Path, Exception]] = []  # every unusable input, named together in one line
    notes: list[str] = []  # printed once every input is known to be usable (a refusal stays one line on stderr)
    for job in jobs:  # validate every image (fully decoded) and its output format before writing anything
        try:
            picture = read_picture(job.src, gray=args.gray, colour=args.colour, max_pixels=max_pixels)
            job.depth = picture.depth
            fmt = output_format(job.dst, job.depth)
            if picture.alpha is not None:
                job.alpha = keeps_alpha(job.dst)
                if not job.alpha and (picture.alpha < 255).any():
                    raise ImageError(f"{job.src}: transparent pixels, which {fmt} cannot hold; write .png or .tif "
                                     "to keep its alpha channel, or flatten the image first")
                if not job.alpha:
                    notes.append(f"note: {job.src.name}: its alpha channel (fully opaque) is dropped: {fmt} has none")
            if sigma == "auto":
                try:
                    job.sigma = estimate_sigma255(picture.x)
                except ValueError as err:
                    raise UserError(f"{job.src}: --sigma auto: {err}") from None
        except NerdError as err:
            problems.append((job.src, err))
            continue
        if sigma == "auto":  # measured on what the model sees (a colour image's luminance with --gray)
            job.weights = args.weights or _nearest_shipped(job.sigma)
            trained = models[job.weights][1]["sigma"] if args.weights else _shipped_sigmas()[job.weights]
            far = ""
            if abs(trained - job.sigma) > 5:
                far = f" (trained for sigma {trained:g}{'' if args.weights else ': the nearest there is'})"
            flat = " (the image looks noise-free or flat)" if job.sigma < 1 else ""
            say(f"{job.src.name}: estimated sigma {job.sigma:.1f}{flat} (0-255 scale) -> weights {job.weights}{far}")
        else:
            job.sigma = float(sigma)  # type: ignore[arg-type]
            if picture.luma and per_channel:  # the luminance of a colour image has less noise than each channel
                job.sigma = luma_sigma255(job.sigma)
                line = f"note: --gray: sigma {sigma:g} per RGB channel -> {job.sigma:.1f} in the luminance"
                notes += [line] if line not in notes else []
            job.weights = args.weights or _nearest_shipped(job.sigma)
        if len(jobs) == 1:
            cached[job.src] = picture
    if problems:
        raise _unusable(problems)
    if not args.quiet:
        for line in notes:
            print(line, file=sys.stderr)
    for name in dict.fromkeys(job.weights for job in jobs):  # load (and check) every weights file needed
        _, info = _load(name, device, models)
        if not isinstance(sigma, float) or args.quiet:
            continue
        for level in sorted({job.sigma for job in jobs if job.weights == name}):
            if abs(info["sigma"] - level) > 0.5:
                what = f"--sigma {level:g}" if level == sigma else f"sigma {level:.1f} (the luminance's)"
                why = "" if args.weights else f"no shipped weights were trained for {what.lstrip('-')}, so "
                print(f"note: {why}{name} (trained for sigma {info['sigma']:g}) denoises {what}", file=sys.stderr)
    if create is not None:
        create.mkdir()

    bar = tqdm(jobs, unit="image", disable=args.quiet or len(jobs) < 2, file=sys.stderr)
    for job in bar:
        model, _ = models[job.weights]
        solver = model.solver.override(max_iter=iters, tol=tol)
        picture = cached.pop(job.src, None) or read_picture(job.src, gray=args.gray, colour=args.colour,
                                                            max_pixels=max_pixels)
        y = picture.x
        sigma_in = job.sigma if job.sigma > 0 else models[job.weights][1]["sigma"]
        tile, why = _tile_for(y.shape, tile_choice, model, solver, device)
        if why:
            say(f"{job.src.name}: {why}")
        if not args.quiet:
            forecast = _forecast(y.shape, tile, model, solver, ensemble, device)
            if forecast:
                print(f"{job.src.name}: {forecast}", file=sys.stderr, flush=True)
        colour_weights = None
        if y.ndim == 3 and y.shape[2] == 3 and not args.weights:  # nerd.colour's shipped method, shipped weights
            from nerd.colour import ColourWeights

            colour_weights = ColourWeights(_shipped_sigmas(), lambda name: _load(name, device, models)[0])
            say(f"{job.src.name}: colour {colour_weights.plan(min(sigma_in, 255.0)).describe()}")
        try:
            x_hat, summary = denoise_image(
                model, y, min(sigma_in, 255.0), solver=solver, device=device, tile=tile,
                ensemble=ensemble, progress=not (args.quiet or args.no_progress), colour_weights=colour_weights,
            )
        except DenoiseError as err:
            raise UserError(f"{job.src}: {err}") from None
        write_image(job.dst, x_hat, job.depth, alpha=picture.alpha if job.alpha else None)
        allocator.release()  # freed memory back to the kernel between images
        say(f"{job.src.name}: {describe(summary)} -> {job.dst}")
        if summary.alarm and args.quiet:
            print(f"warning: {job.src.name}: solver {convergence(summary)}", file=sys.stderr)
        if args.sample:
            clean, _ = read_image(SAMPLE_CLEAN)
            out = to_pixels(x_hat, 8).astype("float32") / 255.0
            print(
                f"PSNR {psnr_db(out, clean):.2f} dB against sample_clean.png "
                f"(noisy input {psnr_db(y, clean):.2f} dB)"
            )
    return 0
