"""Plug-and-play deblurring: half-quadratic splitting (HQS) with a denoiser as the prior, DPIR's schedule.

The problem: y = k ⊛ x + n, a blur k applied with a circular boundary (so the blur is diagonal in the Fourier
domain) plus white Gaussian noise of standard deviation σ. HQS (Zhang et al., DPIR, TPAMI 2021) alternates

    x_k = argmin_x ||y - k ⊛ x||² + α_k ||x - z_{k-1}||²      the data step, closed form by FFT (`CircularBlur.solve`)
    z_k = D(x_k, s_k)                                         the prior step: any denoiser at noise level s_k

from z_0 = y, with the denoiser's level s_k falling log-spaced from 49/255 to σ and α_k = λ σ² / s_k² (λ = 0.23),
the parameters of deepinv's `deepinv.optim.dpir.get_DPIR_params` and of DPIR's own code (`dpir_schedule`). Any
`forward(x, sigma)` denoiser on the [0, 1] scale is a prior: `nerd.NERD`, a DnCNN-S per level (`NearestLevel`), a
Gaussian smoother. Nothing here needs deepinv; `examples/pnp_deblur.py` runs it on Set12 and writes
results/pnp/deblur.json, which `read_results` checks before docs/evaluation.md shows it.

Shapes and scales everywhere: images are (B, C, H, W) float tensors on the [0, 1] scale (not clipped); noise levels
are standard deviations on that same scale (σ255 / 255).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nerd.errors import ConfigError, EvalError

Denoiser = Callable[[Tensor, float], Tensor]
"""A prior: `denoiser(x, sigma) -> x_hat`, x (B, C, H, W) on [0, 1], sigma a float on the same scale."""

DPIR_START = 49.0 / 255.0  # the denoiser's first level in DPIR
DPIR_LAMBDA = 0.23  # DPIR's λ: alpha_k = λ σ² / s_k²  (deepinv: lamb = 1 / 0.23 on the step size)
DPIR_ITERS = 8


def gaussian_kernel(sigma: float, size: int = 25) -> Tensor:
    """A normalised isotropic Gaussian blur kernel: float64 (size, size), sum 1, centred at (size // 2, size // 2).

    Args:
        sigma: its standard deviation in pixels, > 0.
        size: its side, odd, >= 1.
    """
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ConfigError(f"blur sigma must be a positive number of pixels, got {sigma!r}")
    if not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ConfigError(f"kernel size must be an odd positive int, got {size!r}")
    r = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(r**2) / (2.0 * float(sigma) ** 2))
    k = g[:, None] * g[None, :]
    return k / k.sum()


class CircularBlur:
    """Convolution with a kernel on (H, W) images, circular boundary, as its transfer function (OTF).

    Args:
        kernel: (kh, kw) real kernel, its centre at (kh // 2, kw // 2); any size (taps that wrap around an image
            smaller than the kernel are summed).
        shape: (H, W) of the images it applies to.

    The blur is a convolution, (k ⊛ x)[i, j] = Σ_{a,b} k[a, b] x[i - a + kh // 2, j - b + kw // 2] with indices
    modulo (H, W); its adjoint is the correlation with k (`adjoint`). Computed in float64, returned in the input's
    dtype.
    """

    def __init__(self, kernel: Tensor, shape: tuple[int, int]) -> None:
        if not isinstance(kernel, Tensor) or kernel.ndim != 2 or not bool(torch.isfinite(kernel).all()):
            raise ConfigError("kernel must be a finite 2-D tensor (kh, kw)")
        h, w = (int(s) for s in shape)
        if h < 1 or w < 1:
            raise ConfigError(f"image shape must be positive, got {shape!r}")
        kh, kw = kernel.shape
        rows = (torch.arange(kh) - kh // 2) % h
        cols = (torch.arange(kw) - kw // 2) % w
        psf = torch.zeros(h, w, dtype=torch.float64)
        psf.index_put_((rows[:, None].expand(kh, kw).reshape(-1), cols[None, :].expand(kh, kw).reshape(-1)),
                       kernel.to(torch.float64).reshape(-1), accumulate=True)
        self.kernel = kernel.detach().to(torch.float64).clone()
        self.shape = (h, w)
        self.otf = torch.fft.fft2(psf)  # complex128 (H, W)
        self.otf2 = self.otf.abs() ** 2  # float64 (H, W): |K|²

    def _check(self, x: Tensor, what: str) -> None:
        if not isinstance(x, Tensor) or x.ndim < 2 or tuple(x.shape[-2:]) != self.shape:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ConfigError(f"{what}: expected (..., {self.shape[0]}, {self.shape[1]}), got {got}")

    def _apply(self, x: Tensor, otf: Tensor) -> Tensor:
        otf = otf.to(x.device)
        return torch.fft.ifft2(torch.fft.fft2(x.to(torch.float64)) * otf).real.to(x.dtype)

    def __call__(self, x: Tensor) -> Tensor:
        """k ⊛ x for x (..., H, W)."""
        self._check(x, "blur input")
        return self._apply(x, self.otf)

    def adjoint(self, x: Tensor) -> Tensor:
        """kᵀ x (correlation with k) for x (..., H, W)."""
        self._check(x, "adjoint input")
        return self._apply(x, self.otf.conj())

    def solve(self, y: Tensor, z: Tensor | float, alpha: float) -> Tensor:
        """The data step: argmin_x ||y - k ⊛ x||² + alpha ||x - z||², i.e. (KᵀK + alpha I) x = Kᵀy + alpha z.

        Args:
            y: (..., H, W) the degraded image.
            z: (..., H, W) (broadcastable to y) or a number: the point the step is pulled towards.
            alpha: > 0, the weight of ||x - z||² (DPIR's ρ_k; small: trust y, large: stay near z).

        Returns:
            x: y's shape and dtype.
        """
        self._check(y, "y")
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise ConfigError(f"alpha must be a positive number, got {alpha!r}")
        otf = self.otf.to(y.device)
        rhs = torch.fft.fft2(y.to(torch.float64)) * otf.conj()
        if isinstance(z, Tensor):
            rhs = rhs + alpha * torch.fft.fft2(torch.broadcast_to(z, y.shape).to(y.device, torch.float64))
        elif z:
            rhs = rhs + alpha * torch.fft.fft2(torch.full(y.shape, float(z), dtype=torch.float64, device=y.device))
        x = torch.fft.ifft2(rhs / (self.otf2.to(y.device) + alpha)).real
        return x.to(y.dtype)


def wiener(y: Tensor, blur: CircularBlur, alpha: float, mean: Tensor | float = 0.0) -> Tensor:
    """The Wiener / Tikhonov deconvolution with a flat signal spectrum: argmin ||y - k ⊛ x||² + alpha ||x - mean||²
    (alpha = noise / signal power). (B, C, H, W) -> same; no prior beyond `mean`."""
    return blur.solve(y, mean, alpha)


def dpir_schedule(noise: float, iters: int = DPIR_ITERS, start: float = DPIR_START,
                  lam: float = DPIR_LAMBDA) -> tuple[list[float], list[float]]:
    """DPIR's parameters: the denoiser's levels s_k and the data-step weights alpha_k, k = 1..iters.

    s_k runs log-spaced from `start` down to `noise` (both on the [0, 1] scale); alpha_k = lam * max(noise, 0.01)² /
    s_k², as deepinv's `get_DPIR_params` (its HQS step size γ_k = (s_k / max(noise, 0.01))² / lam, alpha = 1 / γ).

    Returns:
        (sigmas, alphas): two lists of `iters` floats.
    """
    if not (isinstance(noise, (int, float)) and 0 < noise <= 1):
        raise ConfigError(f"noise must be in (0, 1] (sigma255 / 255), got {noise!r}")
    if not isinstance(iters, int) or iters < 1:
        raise ConfigError(f"iters must be a positive int, got {iters!r}")
    if not (0 < start <= 1) or not (lam > 0):
        raise ConfigError(f"start must be in (0, 1] and lam > 0, got {start!r}, {lam!r}")
    if iters == 1:
        sigmas = [float(noise)]
    else:
        a, b = math.log10(start), math.log10(noise)
        sigmas = [10 ** (a + (b - a) * i / (iters - 1)) for i in range(iters)]
    floor = max(float(noise), 0.01)
    return sigmas, [lam * floor**2 / s**2 for s in sigmas]


def hqs(y: Tensor, blur: CircularBlur, denoiser: Denoiser, sigmas: Sequence[float], alphas: Sequence[float], *,
        x0: Tensor | None = None, denoise_last: bool = True) -> Tensor:
    """Plug-and-play HQS: for k = 1..K, x = blur.solve(y, z, alphas[k]), then z = denoiser(x, sigmas[k]).

    Args:
        y: (B, C, H, W) the blurred, noisy image on [0, 1] (not clipped).
        blur: the degradation, built for (H, W).
        denoiser: the prior, `denoiser(x, sigma) -> x_hat` (x (B, C, H, W) on [0, 1], sigma a float on that scale).
        sigmas: the denoiser's noise level at each iteration ([0, 1] scale), K of them.
        alphas: the data step's weight at each iteration (> 0), K of them.
        x0: the starting point z_0, (B, C, H, W); default y (as DPIR).
        denoise_last: False returns the last data step's x instead of the last denoiser output.

    Returns:
        (B, C, H, W) in y's dtype, not clipped. Runs under `torch.no_grad()`.
    """
    if not isinstance(y, Tensor) or y.ndim != 4 or not y.is_floating_point():
        got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ConfigError(f"y must be a (B, C, H, W) floating tensor, got {got}")
    if len(sigmas) != len(alphas) or not sigmas:
        raise ConfigError(f"sigmas and alphas must be two non-empty lists of one length, got {len(sigmas)} and "
                          f"{len(alphas)}")
    z = y if x0 is None else x0
    with torch.no_grad():
        x = z
        for k, (s, a) in enumerate(zip(sigmas, alphas, strict=True)):
            x = blur.solve(y, z, float(a))
            if denoise_last or k < len(sigmas) - 1:
                z = denoiser(x, float(s)).to(y.dtype)
                if z.shape != y.shape:
                    raise ConfigError(f"the denoiser returned {tuple(z.shape)} for {tuple(y.shape)}")
            else:
                z = x
    return z


class NearestLevel:
    """Denoisers trained one per noise level as one `denoiser(x, sigma)`: each call goes to the level nearest
    sigma (`nerd.weights.nearest`'s rule: on a tie the higher), as `nerd.NERD` picks its weights.

    Args:
        models: {sigma255: denoiser}, each `denoiser(x, sigma) -> x_hat` (e.g. DnCNN-S per level).
    """

    def __init__(self, models: Mapping[float, Callable[..., Tensor]]) -> None:
        if not models:
            raise ConfigError("NearestLevel needs at least one {sigma255: denoiser}")
        self.models = dict(models)
        self.used: dict[float, int] = {}  # sigma255 of each model -> calls, for the report

    def level(self, sigma: float) -> float:
        from nerd.weights import nearest

        trained = {str(k): float(k) for k in self.models}
        return float(nearest(float(sigma) * 255.0, trained))

    def __call__(self, x: Tensor, sigma: float) -> Tensor:
        s255 = self.level(sigma)
        key = next(k for k in self.models if float(k) == s255)
        self.used[s255] = self.used.get(s255, 0) + 1
        with torch.no_grad():
            return self.models[key](x, sigma)


def gaussian_smoother(width: float) -> Denoiser:
    """A denoiser that ignores sigma: circular Gaussian smoothing of `width` pixels (for tests and baselines)."""
    kernel = gaussian_kernel(width, 2 * math.ceil(3 * width) + 1)

    def smooth(x: Tensor, sigma: float) -> Tensor:
        return CircularBlur(kernel, tuple(x.shape[-2:]))(x)

    return smooth


# --- the results file: results/pnp/deblur.json


_ROW_KEYS = {"image", "height", "width", "blurred_psnr", "results"}
_FIELDS = ("psnr", "seconds", "cpu_seconds")  # of each prior's result in a row, and of its means


def _finite(value: Any, low: float, high: float) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and low <= value <= high)


def means(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    """{"blurred_psnr": mean, key: {"psnr": mean, "seconds": mean, "cpu_seconds": mean}} over `rows`, each prior."""
    n = len(rows)
    out: dict[str, Any] = {"blurred_psnr": sum(r["blurred_psnr"] for r in rows) / n}
    for key in keys:
        out[key] = {field: sum(r["results"][key][field] for r in rows) / n for field in _FIELDS}
    return out


def check_results(data: Any, source: str = "results") -> dict[str, Any]:
    """`data` (a parsed deblur.json) if it is a whole, consistent results file; EvalError (one line) otherwise.

    Checked: an object with `meta` (command, torch, threads, noise_sigma255, blur, schedule), `priors` (a non-empty
    list of {key, label}, keys unique), `rows` (non-empty; each image once, with its PSNR of the blurred input and
    {psnr, seconds, cpu_seconds} for every prior, finite, PSNR in (0, 200] dB, times >= 0) and `means`, which must
    be the means of the rows (a file edited by hand or stitched from two runs fails there).
    """
    def bad(why: str) -> EvalError:
        return EvalError(f"{source}: {why}; not a results file of examples/pnp_deblur.py")

    if not isinstance(data, dict):
        raise bad("not a JSON object")
    for name, kind in (("meta", dict), ("priors", list), ("rows", list), ("means", dict)):
        if not isinstance(data.get(name), kind):
            raise bad(f"'{name}' missing or not a {kind.__name__}")
    meta = data["meta"]
    missing = sorted({"command", "torch", "threads", "noise_sigma255", "blur", "schedule"} - set(meta))
    if missing:
        raise bad(f"meta lacks {', '.join(missing)}")
    if not _finite(meta["noise_sigma255"], 1e-9, 255):
        raise bad(f"meta.noise_sigma255 {meta['noise_sigma255']!r} is not in (0, 255]")
    blur = meta["blur"]
    if not isinstance(blur, dict) or not _finite(blur.get("sigma"), 1e-9, math.inf) \
            or not isinstance(blur.get("size"), int) or not isinstance(meta["schedule"], dict):
        raise bad("meta.blur must hold the kernel's sigma and int size, meta.schedule must be an object")
    priors = data["priors"]
    if not priors or not all(isinstance(p, dict) and isinstance(p.get("key"), str) and isinstance(p.get("label"), str)
                             for p in priors):
        raise bad("'priors' must be a non-empty list of {key, label} strings")
    keys = [p["key"] for p in priors]
    if len(set(keys)) != len(keys):
        raise bad(f"prior keys repeat: {keys}")
    rows = data["rows"]
    if not rows:
        raise bad("no rows")
    seen = set()
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not _ROW_KEYS <= set(row) or not isinstance(row["results"], dict):
            raise bad(f"row {i} lacks {sorted(_ROW_KEYS - set(row) if isinstance(row, dict) else _ROW_KEYS)}")
        if row["image"] in seen:
            raise bad(f"image {row['image']!r} twice")
        seen.add(row["image"])
        if not _finite(row["blurred_psnr"], 1e-9, 200):
            raise bad(f"row {i} ({row['image']}): blurred_psnr {row['blurred_psnr']!r} is not a PSNR")
        if sorted(row["results"]) != sorted(keys):
            raise bad(f"row {i} ({row['image']}): results for {sorted(row['results'])}, priors are {sorted(keys)}")
        for key, res in row["results"].items():
            if not isinstance(res, dict) or not _finite(res.get("psnr"), 1e-9, 200) \
                    or not all(_finite(res.get(f), 0, math.inf) for f in ("seconds", "cpu_seconds")):
                raise bad(f"row {i} ({row['image']}): {key} needs a PSNR in (0, 200] and seconds, cpu_seconds >= 0, "
                          f"got {res!r}")
    expected = means(rows, keys)
    got = data["means"]
    pairs = [("blurred_psnr", expected["blurred_psnr"], got.get("blurred_psnr"))]
    for key in keys:
        for field in _FIELDS:
            pairs.append((f"{key}.{field}", expected[key][field], (got.get(key) or {}).get(field)))
    for name, want, have in pairs:
        if not _finite(have, -math.inf, math.inf) or abs(have - want) > 1e-6 * max(1.0, abs(want)):
            raise bad(f"means.{name} is {have!r}, the rows' mean is {want:.6g}")
    return data


def read_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a results file (`check_results`); EvalError (one line) if it is missing, not JSON (NaN and
    Infinity included) or not a consistent file."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise EvalError(f"{path}: cannot read it ({getattr(err, 'strerror', None) or err})") from None

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        data = json.loads(text, parse_constant=no_constants)
    except ValueError as err:
        raise EvalError(f"{path}: not strict JSON ({err})") from None
    return check_results(data, str(path))


__all__ = ["DPIR_ITERS", "DPIR_LAMBDA", "DPIR_START", "CircularBlur", "Denoiser", "NearestLevel", "check_results",
           "dpir_schedule", "gaussian_kernel", "gaussian_smoother", "hqs", "means", "read_results", "wiener"]
