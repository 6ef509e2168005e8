"""Colour images through the grayscale NERD: a linear colour transform, each plane's noise level, its weights.

NERD's shipped weights are grayscale. A colour image (H, W, 3) on [0, 1] with i.i.d. Gaussian noise of std sigma in
each RGB channel is denoised as three planes: P = A @ rgb + b (a 3 x 3 matrix A, offsets b), each plane denoised by
the gray weights chosen for its own noise, then rgb = A^-1 (P_hat - b), clipped to [0, 1]. Plane k's noise std is
exactly sigma * ||A_k|| (the Euclidean norm of row k); planes whose rows are orthogonal keep independent noise.

The weights of a plane are `nerd.weights.nearest` of `factor_k * sigma_k` among the available files (a `factor` above
1 picks weights trained for more noise than the plane has: stronger smoothing, which suits the colour-difference
planes, whose signal is weak). The network does not read sigma (each file is trained for one level), so the factor
changes which file solves the plane and nothing else. Planes sharing a file are solved as one batch; a method
whose planes need two files runs two batched solves (`ColourPlan.solves`).

The methods measured (scripts/colour_study.py; docs/evaluation.md, "Colour"):

- ``rgb``: R, G, B at sigma each (the earlier `--colour`).
- ``opp-orthonormal``: the orthonormal opponent transform ((R+G+B)/sqrt3, (R-B)/sqrt2 + 1/2, (R-2G+B)/sqrt6 + 1/2),
  sigma in every plane; its luminance spans [0, sqrt3], outside what the gray weights were trained on.
- ``opp``: the same directions scaled into [0, 1]: Y = (R+G+B)/3 (sigma/sqrt3), C1 = (R-B)/2 + 1/2 (sigma/sqrt2),
  C2 = (R-2G+B)/4 + 1/2 (sigma sqrt6/4); rows still orthogonal.  ``opp-kF``: chroma weights for F x their sigma;
  ``opp-noofs``: chroma without the +1/2 offset (centred on 0).
- ``ycbcr``: ITU-R 601 full-range YCbCr (Y, Cb + 1/2, Cr + 1/2); rows not orthogonal (correlated plane noise).
- ``opp-guided-rR-eE``: only Y goes through NERD; each chroma plane is the guided filter (He et al. 2010, radius R,
  regulariser eps = E (sigma/255)^2, sigma each RGB channel's) of its noisy plane guided by the denoised Y: one
  plane solved instead of three.

`SHIPPED` names the one `nerd denoise --colour`, `nerd eval` (colour sets) and `nerd.NERD` use.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from nerd.errors import ConfigError
from nerd.sigma import check_sigma255
from nerd.weights import nearest

SQRT2, SQRT3, SQRT6 = math.sqrt(2.0), math.sqrt(3.0), math.sqrt(6.0)


@dataclass(frozen=True)
class ColourTransform:
    """An invertible linear colour transform: plane k = sum_c matrix[k][c] * rgb[c] + offsets[k].

    Attributes:
        name: short name ("rgb", "opp", ...).
        planes: the planes' names, e.g. ("Y", "C1", "C2").
        matrix: (3, 3) rows: plane k from (R, G, B).
        offsets: added to each plane after the matrix (1/2 centres a colour-difference plane in [0, 1]).
    """

    name: str
    planes: tuple[str, str, str]
    matrix: tuple[tuple[float, float, float], ...]
    offsets: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def a(self) -> np.ndarray:
        """The (3, 3) float64 matrix."""
        return np.asarray(self.matrix, dtype=np.float64)

    def forward(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) RGB (any float scale, noisy or not) -> (3, H, W) float32 planes."""
        rgb = np.asarray(rgb, dtype=np.float64)
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) image, got shape {rgb.shape}")
        planes = np.einsum("kc,hwc->khw", self.a, rgb) + np.asarray(self.offsets)[:, None, None]
        return planes.astype(np.float32)

    def inverse(self, planes: np.ndarray) -> np.ndarray:
        """(3, H, W) planes -> (H, W, 3) float32 RGB, not clipped (the exact inverse of `forward`)."""
        p = np.asarray(planes, dtype=np.float64) - np.asarray(self.offsets)[:, None, None]
        return np.einsum("ck,khw->hwc", np.linalg.inv(self.a), p).astype(np.float32)

    def plane_sigmas(self, sigma255: float) -> tuple[float, float, float]:
        """Each plane's noise std (0-255 scale) when each RGB channel has i.i.d. noise of std `sigma255`."""
        norms = np.linalg.norm(self.a, axis=1)
        return tuple(float(sigma255 * n) for n in norms)  # type: ignore[return-value]

    def noise_correlation(self) -> np.ndarray:
        """(3, 3) correlation of the planes' noise (identity when the rows are orthogonal)."""
        cov = self.a @ self.a.T
        d = np.sqrt(np.diag(cov))
        return cov / np.outer(d, d)


RGB = ColourTransform("rgb", ("R", "G", "B"), ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)))
OPPONENT = ColourTransform("opp", ("Y", "C1", "C2"),
                           ((1 / 3, 1 / 3, 1 / 3), (1 / 2, 0.0, -1 / 2), (1 / 4, -1 / 2, 1 / 4)), (0.0, 0.5, 0.5))
OPPONENT_NO_OFFSET = dataclasses.replace(OPPONENT, name="opp-noofs", offsets=(0.0, 0.0, 0.0))
OPPONENT_ORTHONORMAL = ColourTransform(
    "opp-orthonormal", ("Y", "C1", "C2"),
    ((1 / SQRT3, 1 / SQRT3, 1 / SQRT3), (1 / SQRT2, 0.0, -1 / SQRT2), (1 / SQRT6, -2 / SQRT6, 1 / SQRT6)),
    (0.0, 0.5, 0.5))
YCBCR = ColourTransform("ycbcr", ("Y", "Cb", "Cr"),
                        ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312)),
                        (0.0, 0.5, 0.5))


@dataclass(frozen=True)
class ColourMethod:
    """How a colour image goes through the gray weights.

    Attributes:
        name: the method's name (`METHODS`).
        transform: the colour transform.
        factors: per plane, the multiple of its noise std at which its weights are chosen (1: the nearest).
        chroma: "nerd" (every plane through NERD) or "guided" (only plane 0; planes 1, 2 by the guided filter
            guided by the denoised plane 0).
        radius, eps: the guided filter's window radius (pixels) and regulariser, in units of the RGB noise
            variance (sigma/255)^2 (so one setting follows the noise level).
    """

    name: str
    transform: ColourTransform
    factors: tuple[float, float, float] = (1.0, 1.0, 1.0)
    chroma: str = "nerd"
    radius: int = 0
    eps: float = 0.0

    @property
    def solved(self) -> tuple[int, ...]:
        """The planes that go through NERD."""
        return (0, 1, 2) if self.chroma == "nerd" else (0,)


def _opp_k(factor: float) -> ColourMethod:
    return ColourMethod(f"opp-k{factor:g}", OPPONENT, (1.0, factor, factor))


def _guided(radius: int, eps: float) -> ColourMethod:
    return ColourMethod(f"opp-guided-r{radius}-e{eps:g}", OPPONENT, chroma="guided", radius=radius, eps=eps)


METHODS: dict[str, ColourMethod] = {m.name: m for m in (
    ColourMethod("rgb", RGB),
    ColourMethod("opp-orthonormal", OPPONENT_ORTHONORMAL),
    ColourMethod("opp", OPPONENT),
    _opp_k(1.5), _opp_k(3.0),
    ColourMethod("opp-noofs", OPPONENT_NO_OFFSET),
    ColourMethod("ycbcr", YCBCR),
    *(_guided(r, e) for r in (2, 3, 4, 5, 6, 8) for e in (0.03, 0.1, 0.3, 1.0)),
)}
# The method of `nerd denoise --colour`, `nerd eval` on colour sets and `nerd.NERD` on 3-channel input, chosen on
# Kodak24 crops (scripts/colour_study.py, results/colour/study.json).
SHIPPED = "opp-guided-r3-e0.3"


def method(name: str | ColourMethod | None = None) -> ColourMethod:
    """A method by name (None: `SHIPPED`); ConfigError for an unknown one."""
    if isinstance(name, ColourMethod):
        return name
    name = SHIPPED if name is None else name
    if name not in METHODS:
        raise ConfigError(f"unknown colour method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


@dataclass(frozen=True)
class PlaneChoice:
    """One plane of a plan: its name, noise std (0-255 scale, exact) and the weights that solve it (None: not
    solved by NERD)."""

    name: str
    sigma: float
    weights: str | None


@dataclass(frozen=True)
class ColourPlan:
    """What a method does to an image of noise std `sigma` (0-255, each RGB channel)."""

    method: ColourMethod
    sigma: float
    planes: tuple[PlaneChoice, PlaneChoice, PlaneChoice]

    @property
    def solves(self) -> dict[str, list[int]]:
        """{weights name: the planes it solves}, in plane order: one batched solve each."""
        out: dict[str, list[int]] = {}
        for k, p in enumerate(self.planes):
            if p.weights is not None:
                out.setdefault(p.weights, []).append(k)
        return out

    def describe(self) -> str:
        """'opp: Y sigma 14.4 -> nerd-s15, C1 sigma 17.7 -> nerd-s15, C2 sigma 15.3 -> nerd-s15 (1 batched solve)'."""
        parts = [f"{p.name} sigma {p.sigma:.1f} -> {p.weights or 'guided filter'}" for p in self.planes]
        n = len(self.solves)
        return f"{self.method.name}: {', '.join(parts)} ({n} batched solve{'s' * (n != 1)})"


def plan(sigma255: float, trained: Mapping[str, float], which: str | ColourMethod | None = None) -> ColourPlan:
    """The planes, their exact noise levels and their weights for an image with noise `sigma255` in each channel.

    Args:
        sigma255: each RGB channel's noise std, 0-255 scale.
        trained: {weights name: training sigma (0-255)} to choose from (one entry: that file for every plane).
        which: a method or its name (None: `SHIPPED`).
    """
    m = method(which)
    sigma255 = check_sigma255(sigma255)
    if not trained:
        raise ConfigError("no weights to choose from")
    sigmas = m.transform.plane_sigmas(sigma255)
    planes = tuple(PlaneChoice(name, s, nearest(s * f, dict(trained)) if k in m.solved else None)
                   for k, (name, s, f) in enumerate(zip(m.transform.planes, sigmas, m.factors, strict=True)))
    return ColourPlan(m, sigma255, planes)  # type: ignore[arg-type]


def box_mean(x: np.ndarray, r: int) -> np.ndarray:
    """Mean of x (H, W) over the (2r+1)^2 window around each pixel, the window cut at the borders."""
    x = np.asarray(x, dtype=np.float64)
    h, w = x.shape

    def along(a: np.ndarray, axis: int, n: int) -> np.ndarray:
        c = np.cumsum(np.insert(a, 0, 0.0, axis=axis), axis=axis)
        idx = np.arange(n)
        hi, lo = np.minimum(idx + r + 1, n), np.maximum(idx - r, 0)
        return np.take(c, hi, axis=axis) - np.take(c, lo, axis=axis)

    ones = np.ones((h, w))
    return along(along(x, 0, h), 1, w) / along(along(ones, 0, h), 1, w)


def guided_filter(guide: np.ndarray, src: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """He et al.'s guided filter (ECCV 2010): `src` (H, W) smoothed where `guide` (H, W) is flat, its edges kept
    where the guide has them; float64 out."""
    i, p = np.asarray(guide, dtype=np.float64), np.asarray(src, dtype=np.float64)
    mi, mp = box_mean(i, radius), box_mean(p, radius)
    var = box_mean(i * i, radius) - mi * mi
    cov = box_mean(i * p, radius) - mi * mp
    a = cov / (var + eps)
    b = mp - a * mi
    return box_mean(a, radius) * i + box_mean(b, radius)


def guided_filter_torch(guide: Any, src: Any, radius: int, eps: Any) -> Any:
    """`guided_filter` on tensors (N, 1, H, W) (differentiable; eps a float or an (N,) tensor): the same figures.
    The box mean is `avg_pool2d` without the padding counted, i.e. the window cut at the borders."""
    import torch.nn.functional as F  # noqa: N812

    def box(x: Any) -> Any:
        return F.avg_pool2d(x, 2 * radius + 1, stride=1, padding=radius, count_include_pad=False)

    eps = eps.reshape(-1, 1, 1, 1) if hasattr(eps, "reshape") else eps
    mi, mp = box(guide), box(src)
    a = (box(guide * src) - mi * mp) / (box(guide * guide) - mi * mi + eps)
    b = mp - a * mi
    return box(a) * guide + box(b)


def denoise_colour_batch(x: Any, sigma255: Any, trained: Mapping[str, float], model_for: Callable[[str], Any],
                         solver_for: Callable[[Any, Any], Any], which: str | ColourMethod | None = None) -> Any:
    """`denoise_colour` on a tensor batch (B, 3, H, W), one noise level per sample ((B,) sigma255, 0-255 scale):
    the planes of every sample that need the same weights are one batched solve; differentiable where the solver
    is (`nerd.NERD` with autograd on). Not clipped (the denoiser contract)."""
    import torch

    m = method(which)
    a = torch.as_tensor(m.transform.a, dtype=x.dtype, device=x.device)
    off = torch.as_tensor(m.transform.offsets, dtype=x.dtype, device=x.device).reshape(1, 3, 1, 1)
    planes = torch.einsum("kc,bchw->bkhw", a, x) + off
    plans = [plan(float(s), trained, m) for s in sigma255.tolist()]
    groups: dict[str, list[tuple[int, int]]] = {}
    for i, p in enumerate(plans):
        for k in m.solved:
            groups.setdefault(p.planes[k].weights, []).append((i, k))  # type: ignore[arg-type]
    solved: dict[tuple[int, int], Any] = {}
    for name, pairs in groups.items():
        model = model_for(name)
        part = torch.stack([planes[i, k] for i, k in pairs])[:, None]
        s = torch.tensor([plans[i].planes[k].sigma / 255.0 for i, k in pairs], dtype=x.dtype, device=x.device)
        out = model(part, s, solver=solver_for(model, part))
        solved.update({pair: out[j, 0] for j, pair in enumerate(pairs)})
    rows = []
    for i in range(x.shape[0]):
        rows.append(torch.stack([solved.get((i, k), planes[i, k]) for k in range(3)]))
    est = torch.stack(rows)
    if m.chroma == "guided":
        eps = m.eps * (sigma255.to(x.device, x.dtype) / 255.0) ** 2
        guide = est[:, :1]
        chroma = [guided_filter_torch(guide, planes[:, k:k + 1], m.radius, eps) for k in (1, 2)]
        est = torch.cat([guide, *chroma], dim=1)
    inv = torch.as_tensor(np.linalg.inv(m.transform.a), dtype=x.dtype, device=x.device)
    return torch.einsum("ck,bkhw->bchw", inv, est - off)


# A batched solve: (float32 (n, H, W) planes, weights name) -> (float32 (n, H, W) estimates, not clipped; summary).
Solve = Callable[[np.ndarray, str], tuple[np.ndarray, Any]]


def denoise_colour(y: np.ndarray, sigma255: float, trained: Mapping[str, float], solve: Solve,
                   which: str | ColourMethod | None = None) -> tuple[np.ndarray, list[Any], ColourPlan]:
    """Denoise a colour image with a method: transform, one batched solve per weights file, guided chroma if the
    method has it, inverse transform, clip.

    Args:
        y: float (H, W, 3) noisy RGB on [0, 1] (not clipped).
        sigma255: each channel's noise std, 0-255 scale.
        trained: {weights name: training sigma} available to `solve`.
        solve: solves a stack of planes with the named weights (`nerd.denoise.denoise_image` passes its tiled,
            self-ensembled solver).
        which: a method or its name (None: `SHIPPED`).

    Returns:
        (x_hat float32 (H, W, 3) clipped to [0, 1], the summaries of the solves in order, the plan).
    """
    p = plan(sigma255, trained, which)
    m = p.method
    planes = m.transform.forward(y)
    out = planes.copy()
    summaries = []
    for name, idx in p.solves.items():
        x, summary = solve(np.ascontiguousarray(planes[idx]), name)
        out[idx] = x
        summaries.append(summary)
    if m.chroma == "guided":
        for k in (1, 2):
            out[k] = guided_filter(out[0], planes[k], m.radius, m.eps * (sigma255 / 255.0) ** 2)
    x_hat = np.clip(m.transform.inverse(out), 0.0, 1.0)
    return x_hat.astype(np.float32, copy=False), summaries, p


class ColourWeights:
    """The gray weights a colour image may be solved with: {name: training sigma} and how to load each (once).

    Args:
        trained: {weights name: the sigma (0-255) it was trained for}.
        load: name -> a `DEQDenoiser` (called once per name; the result is kept).
        method: the colour method (None: `SHIPPED`).
    """

    def __init__(self, trained: Mapping[str, float], load: Callable[[str], Any],
                 method: str | ColourMethod | None = None) -> None:
        if not trained:
            raise ConfigError("no weights to choose from")
        self.trained, self._load, self.method = dict(trained), load, globals()["method"](method)
        self._models: dict[str, Any] = {}

    @classmethod
    def shipped(cls, device: str | None = None, method: str | ColourMethod | None = None) -> ColourWeights:
        """Every shipped weights file (`nerd.weights.shipped`), each read when a plane first needs it."""
        from nerd import weights as nerd_weights

        trained = {name: float(nerd_weights.read_metadata(path)["sigma"])
                   for name, path in nerd_weights.shipped().items()}
        return cls(trained, lambda name: nerd_weights.load_weights(name, device=device or "cpu")[0], method)

    def model(self, name: str) -> Any:
        if name not in self._models:
            self._models[name] = self._load(name)
        return self._models[name]

    def plan(self, sigma255: float) -> ColourPlan:
        return plan(sigma255, self.trained, self.method)


def merge_summaries(summaries: list[Any]) -> Any:
    """One `DenoiseSummary` for the solves of a colour image (the worst of each statistic, 3 channels, their
    seconds added)."""
    first = summaries[0]
    return dataclasses.replace(
        first, nfe=max(s.nfe for s in summaries), rel_residual=max(s.rel_residual for s in summaries),
        abs_residual=max(s.abs_residual for s in summaries), converged=all(s.converged for s in summaries),
        channels=3, unconverged_tiles=sum(s.unconverged_tiles for s in summaries),
        alarm_tiles=sum(s.alarm_tiles for s in summaries), seconds=sum(s.seconds for s in summaries),
        max_iter=max(s.max_iter for s in summaries))


def denoise_with(weights: ColourWeights, y: np.ndarray, sigma255: float,
                 solve_planes: Callable[[Any, np.ndarray], tuple[np.ndarray, Any]]) -> tuple[np.ndarray, Any]:
    """`denoise_colour` with `weights`' method and models; `solve_planes(model, planes)` is one batched solve
    returning (estimates, DenoiseSummary). Returns (x_hat (H, W, 3), the merged summary)."""
    x_hat, summaries, _ = denoise_colour(y, sigma255, weights.trained,
                                         lambda planes, name: solve_planes(weights.model(name), planes),
                                         weights.method)
    return x_hat, merge_summaries(summaries)


# Entries of a gray DEQDenoiser's state dict whose shape follows the image channels: the injection's input
# BatchNorm and first conv, the decoder's last conv.
_INPUT_BN = "inject.body.0."
_INPUT_CONV = "inject.body.1.weight"
_OUTPUT_CONV = ("decode.body.2.weight", "decode.body.2.bias")


def colour_state_from_gray(state: Mapping[str, Any], channels: int = 3) -> dict[str, Any]:
    """A `channels`-channel NERD's state dict from a gray one's, to start colour training from gray weights.

    Everything but the image-facing ends is shared as is. The input BatchNorm's per-channel entries are repeated;
    the injection's first conv reads each channel with 1/channels of the gray kernel (a gray image given as
    `channels` equal planes then injects exactly what the gray model injects); the decoder's last conv is repeated
    for each output channel (each predicts the gray model's noise). So on a gray picture replicated in RGB the
    colour model starts out as the gray one, in every channel.

    Args:
        state: a gray (in_channels 1) `DEQDenoiser` state dict.
        channels: the colour model's image channels (3).
    """
    out = dict(state)
    for key, value in state.items():
        if key.startswith(_INPUT_BN) and getattr(value, "ndim", 0) == 1 and value.shape[0] == 1:
            out[key] = value.repeat(channels)
    if _INPUT_CONV in state:
        out[_INPUT_CONV] = state[_INPUT_CONV].repeat(1, channels, 1, 1) / channels
    for key in _OUTPUT_CONV:
        if key in state:
            out[key] = state[key].repeat(channels, *([1] * (state[key].ndim - 1)))
    return out


__all__ = [
    "METHODS", "OPPONENT", "RGB", "SHIPPED", "YCBCR", "ColourMethod", "ColourPlan", "ColourTransform", "ColourWeights",
    "PlaneChoice", "box_mean", "colour_state_from_gray", "denoise_colour", "denoise_colour_batch", "denoise_with",
    "guided_filter", "guided_filter_torch", "merge_summaries", "method", "plan",
]
