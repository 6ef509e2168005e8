"""ONNX export of a NERD model: a fixed number of Broyden iterations unrolled into one static graph.

`FixedBroyden` is an export-only forward of a `DEQDenoiser` that computes exactly what
`model.equilibrium(y, solver=model.solver.override(max_iter=N, tol=T)).x_hat` computes (clamped to [0, 1], as
`nerd.denoise.denoise_image` returns it), with nothing but tensor operations:

* the weight normalisation is folded into plain weights (the parametrizations are evaluated once and removed);
* the solver runs exactly N f-evaluations, the way `nerd.deq.solvers.broyden` does: its low-rank updates are plain
  matrix products over the stored secant pairs (a ring of `memory` slots); a sample that stops (relative residual
  below T, or non-finite values) is frozen with `torch.where` instead of leaving the loop, so the graph always
  spends N evaluations and returns the same answer as the early-stopping solver;
* the solver's answer is the iterate with the lowest relative residual seen, not the last: selected in the graph
  with `torch.where` over the residual norms, like `nerd.deq.solvers._Tracker`;
* the neighbourhood attention is `tiled_attention`: the exact q x q windows of `nerd.models.attention` computed on
  b x b query tiles at every image size (no size-dependent branch, no cached masks), so one exported file serves
  any height and width.

`export_onnx` writes the file (opset 18, dynamic batch, height and width); `onnx_session` and `run_onnx` denoise
with ONNX Runtime. Both need the optional packages of `pip install 'nerd[onnx]'` and say so otherwise.

Memory: the attention's key/value halos take 2 * 4 * C * ((b + 2R) / b)^2 bytes a pixel (3.5 KB with the shipped
weights: C = 48, r = R = b = 16) and its scores are computed in CHUNKS groups of tile rows; the Broyden history is
held twice (the slots and their stacked copy). The graph solves the whole image: no tiles, and no history
shortened for large images as `nerd.tiling.fit_memory` does for `nerd denoise` (from about 0.7 megapixels with
the shipped weights), so beyond that size its result differs from `nerd denoise`'s.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nerd.errors import NerdError

INSTALL_HINT = "pip install 'nerd[onnx]'"
OPSET = 18
CHUNKS = 16  # groups of tile rows of the exported attention, one after the other: bounds the scores held at once
TILE = 16  # query tile side of the exported attention (8: the same ORT time, 3x the halos' memory)
_EPS = 1e-12  # as nerd.deq.solvers._EPS


class ExportError(NerdError):
    """An ONNX export or ONNX Runtime run that cannot go as asked (a missing optional package, a bad option)."""


def require(*modules: str) -> None:
    """ExportError (one line, with the install hint) unless every module in `modules` imports."""
    import importlib

    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"ONNX export needs the optional package(s) {', '.join(missing)}: {INSTALL_HINT}")


def tiled_attention(
    q: Tensor, k: Tensor, v: Tensor, window: int, tile: int = TILE, scale: float | None = None, chunks: int = CHUNKS
) -> Tensor:
    """Exact q x q neighbourhood attention on b x b query tiles, with no branch on the image size (exportable).

    Each query tile attends to its key halo of (b + 2R)^2 pixels, R = r rounded up to whole tiles (r = window // 2),
    through an additive mask built from the pixels' coordinates: a key is allowed when it lies in the query's
    window and inside the image. The mask is separable (rows x columns), so it is added by broadcasting and never
    materialised at full size. Queries in the padding (cropped at the end) see their whole window, so no softmax
    row is empty. The scores are computed for `chunks` consecutive groups of tile rows, one after the other (a
    fixed count, so their bounds follow the image size; a group may be empty): the scores held at once are
    1/chunks of the image's.
    Equal to `nerd.models.attention.neighbourhood_attention` up to float rounding.

    Args:
        q, k, v: (B, heads, H, W, d) float.
        window: odd neighbourhood size q.
        tile: query tile side b (memory and speed only).
        scale: score scale, default 1/sqrt(d) (pass it when tracing: d is then a traced size).
        chunks: groups of tile rows computed one after the other (memory and speed only).

    Returns:
        (B, heads, H, W, d).
    """
    b, n, h, w, d = q.shape
    r = window // 2
    t = tile
    big_r = -(-r // t) * t  # the halo, in whole tiles
    nh, nw = (h + t - 1) // t, (w + t - 1) // t
    hp, wp = nh * t, nw * t
    q = F.pad(q, (0, 0, 0, wp - w, 0, hp - h))
    k = F.pad(k, (0, 0, big_r, big_r + wp - w, big_r, big_r + hp - h))  # (B, n, hp + 2R, wp + 2R, d)
    v = F.pad(v, (0, 0, big_r, big_r + wp - w, big_r, big_r + hp - h))
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    p = 2 * big_r // t + 1  # tiles along one side of a halo
    s = p * t  # halo side in pixels

    def halos(x: Tensor) -> Tensor:
        # Halo rows of tile i are the padded tiles i .. i + p - 1: p shifted slices, each cut into tiles.
        wk = wp + 2 * big_r
        rows = torch.stack([x[:, :, a * t : a * t + hp].reshape(b, n, nh, t, wk, d) for a in range(p)], dim=3)
        rows = rows.reshape(b, n, nh, s, wk, d)
        cols = torch.stack([rows[:, :, :, :, c * t : c * t + wp].reshape(b, n, nh, s, nw, t, d) for c in range(p)],
                           dim=5)
        cols = cols.reshape(b, n, nh, s, nw, s, d)
        return cols.permute(0, 2, 4, 1, 3, 5, 6).reshape(b, nh, nw, n, s * s, d)  # (B, nh, nw, n, s*s, d)

    qt = (q * scale).reshape(b, n, nh, t, nw, t, d).permute(0, 2, 4, 1, 3, 5, 6).reshape(b, nh, nw, n, t * t, d)
    kt, vt = halos(k).transpose(-1, -2), halos(v)
    bias_y = _axis_bias(nh, t, r, big_r, h, q)[None, :, None, None, :, None, :, None]  # (1, nh, 1, 1, t, 1, s, 1)
    bias_x = _axis_bias(nw, t, r, big_r, w, q)[None, None, :, None, None, :, None, :]  # (1, 1, nw, 1, 1, t, 1, s)
    parts = []
    for c in range(chunks):  # rows of tiles [i0, i1): their scores only are held at once
        i0, i1 = c * nh // chunks, (c + 1) * nh // chunks
        scores = (qt[:, i0:i1] @ kt[:, i0:i1]).reshape(b, i1 - i0, nw, n, t, t, s, s)
        scores = scores + bias_y[:, i0:i1] + bias_x
        attn = scores.reshape(b, i1 - i0, nw, n, t * t, s * s).softmax(-1)
        parts.append(attn @ vt[:, i0:i1])  # (B, i1 - i0, nw, n, t*t, d)
    out = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    out = out.reshape(b, nh, nw, n, t, t, d).permute(0, 3, 1, 4, 2, 5, 6).reshape(b, n, hp, wp, d)
    return out[:, :, :h, :w]


def _axis_bias(n_tiles: Any, t: int, r: int, big_r: int, size: Any, like: Tensor) -> Tensor:
    """Additive mask along one axis: (n_tiles, t, s), s = t + 2R, 0 where halo key ky of tile i is allowed for
    query qy, -inf elsewhere.

    Query qy of tile i sits at i t + qy, key ky at i t - R + ky: allowed when |qy + R - ky| <= r and the key is
    inside the image (0 <= i t - R + ky < size); a query in the padding (i t + qy >= size) sees its whole window."""
    i = torch.arange(n_tiles, device=like.device)[:, None, None]
    qy = torch.arange(t, device=like.device)[None, :, None]
    ky = torch.arange(t + 2 * big_r, device=like.device)[None, None, :]
    band = (qy + big_r - ky).abs() <= r
    key = i * t - big_r + ky
    inside = (key >= 0) & (key < size)
    pad = i * t + qy >= size
    allowed = band & (inside | pad)
    zero = torch.zeros((), dtype=like.dtype, device=like.device)
    return torch.where(allowed, zero, torch.full((), float("-inf"), dtype=like.dtype, device=like.device))


class _ExportMSA(nn.Module):
    """`NeighbourhoodMSA` with `tiled_attention`: the same projections, (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, msa: nn.Module, tile: int) -> None:
        super().__init__()
        self.heads, self.window, self.tile = msa.heads, msa.window, tile
        self.qkv, self.proj = msa.qkv, msa.proj
        self.scale = 1.0 / math.sqrt(msa.qkv.in_features // msa.heads)

    def forward(self, u: Tensor) -> Tensor:
        b, c, h, w = u.shape
        n = self.heads
        qkv = self.qkv(u.permute(0, 2, 3, 1)).reshape(b, h, w, 3, n, c // n).permute(3, 0, 4, 1, 2, 5)
        out = tiled_attention(qkv[0], qkv[1], qkv[2], self.window, self.tile, self.scale)  # (B, n, H, W, d)
        out = out.permute(0, 2, 3, 1, 4).reshape(b, h, w, c)
        return self.proj(out).permute(0, 3, 1, 2)


def fold_weight_norm(model: nn.Module) -> nn.Module:
    """A new `DEQDenoiser` equal to `model` with its weight normalisation folded into plain weights (`model` itself
    is left as it is: removing the parametrizations of a deep copy would strip them from the original's class)."""
    import dataclasses
    import functools

    from nerd.models import DEQDenoiser

    plain = DEQDenoiser(dataclasses.replace(model.cfg, weight_norm=False), solver=model.solver, grad=model.grad)
    with torch.no_grad():
        # Attribute access on a parametrized module computes the normalised weight.
        state = {key: functools.reduce(getattr, key.split("."), model).detach().clone()
                 for key in plain.state_dict()}
    plain.load_state_dict(state)
    return plain.to(next(model.parameters()).device)


class FixedBroyden(nn.Module):
    """NERD with exactly `iters` Broyden f-evaluations: noisy (B, C_in, H, W) on [0, 1] -> denoised (B, C_in, H, W).

    Computes what `model.equilibrium(y, solver=model.solver.override(max_iter=iters, tol=tol, memory=memory))`
    computes (see the module docstring), from a folded copy of `model` in eval mode; the output is clamped to
    [0, 1] unless `clamp` is False.
    """

    def __init__(
        self, model: nn.Module, iters: int, *, tol: float | None = None, memory: int | None = None,
        tile: int = TILE, clamp: bool = True,
    ) -> None:
        super().__init__()
        if model.solver.name != "broyden":  # type: ignore[union-attr]
            raise ExportError(f"ONNX export unrolls the Broyden solver; these weights use {model.solver.name!r}")
        solver = model.solver.override(max_iter=iters, tol=tol, memory=memory)  # validates (ConfigError)
        folded = fold_weight_norm(model).eval()
        if folded.layer.use_nl:
            folded.layer.msa = _ExportMSA(folded.layer.msa, tile)
        self.inject, self.layer, self.decode = folded.inject, folded.layer, folded.decode
        self.iters, self.tol = int(solver.max_iter), float(solver.tol)
        self.memory = max(1, min(int(solver.memory), self.iters - 1))  # as broyden: no more pairs than steps
        self.noise = folded.cfg.equilibrium == "noise"
        self.clamp = clamp

    def forward(self, y: Tensor) -> Tensor:
        """y: (B, C_in, H, W) float32 -> (B, C_in, H, W)."""
        s = self.inject(y)
        z = self.solve(s)
        out = self.decode(z.to(s.dtype))
        x = y + out if self.noise else out
        return x.clamp(0.0, 1.0) if self.clamp else x

    def solve(self, s: Tensor) -> Tensor:
        """The equilibrium z* of f(z) = layer(z, s) from z = 0: (B, C, H, W) -> (B, C, H, W), as
        `nerd.deq.solvers.broyden` returns it (the lowest-residual iterate of each sample)."""
        shape = s.shape
        b = shape[0]

        def f(x: Tensor) -> Tensor:
            return self.layer(x.reshape(shape), s).reshape(b, -1)

        z = torch.zeros_like(s).reshape(b, -1)
        m = self.memory
        # The ring of secant pairs. Only filled slots are stacked (an empty slot is zero in broyden: it adds
        # nothing), once per update rather than at every product: (B, N, filled) and (B, filled, N).
        us: list[Tensor | None] = [None] * m
        vs: list[Tensor | None] = [None] * m
        ring: list[Tensor] = []  # [U, VT] of the filled slots, in slot order; empty before the first update

        def matvec(x: Tensor) -> Tensor:  # J^-1 x, x (B, N)
            return -x + (ring[0] @ (ring[1] @ x[:, :, None]))[:, :, 0] if ring else -x

        def rmatvec(x: Tensor) -> Tensor:  # x^T J^-1
            return -x + ((x[:, None, :] @ ring[0]) @ ring[1])[:, 0, :] if ring else -x

        # The tracker: best iterate, its relative residual, activity.
        best_z = z
        best_rel = torch.full((b,), float("inf"), dtype=torch.float32, device=z.device)
        active = torch.ones((b,), dtype=torch.bool, device=z.device)

        def observe(z: Tensor, fz: Tensor, best_z: Tensor, best_rel: Tensor, active: Tensor) -> tuple[Tensor, ...]:
            abs_res = (fz - z).norm(dim=1)
            f_norm = fz.norm(dim=1)
            finite = torch.isfinite(abs_res) & torch.isfinite(f_norm)
            rel = (abs_res / (f_norm + _EPS)).float()
            better = active & finite & (rel < best_rel)
            best_z = torch.where(better[:, None], z, best_z)
            best_rel = torch.where(better, rel, best_rel)
            active = active & finite & ~(rel < self.tol)
            return finite, best_z, best_rel, active

        fz = f(z)
        _, best_z, best_rel, active = observe(z, fz, best_z, best_rel, active)
        gz = fz - z
        update = gz
        for k in range(1, self.iters):
            was = active[:, None]
            dz = torch.where(was, update, 0.0)
            z = z + dz
            fz = f(z)
            finite, best_z, best_rel, active = observe(z, fz, best_z, best_rel, was[:, 0])
            gz_new = torch.where(finite[:, None], fz - z, gz)
            dg = gz_new - gz
            vt_new = rmatvec(dz)
            denom = (vt_new * dg).sum(1, keepdim=True)
            ok = was & finite[:, None] & (denom.abs() > _EPS)
            u_new = (dz - matvec(dg)) / torch.where(ok, denom, torch.ones_like(denom))
            slot = (k - 1) % m
            us[slot], vs[slot] = torch.where(ok, u_new, 0.0), torch.where(ok, vt_new, 0.0)
            filled = [i for i in range(m) if us[i] is not None]
            ring[:] = [torch.stack([us[i] for i in filled], dim=2), torch.stack([vs[i] for i in filled], dim=1)]
            gz = gz_new
            update = -matvec(gz)
            z = torch.where(finite[:, None], z, best_z)
        return best_z.reshape(shape)


def export_onnx(
    model: nn.Module, out: str | os.PathLike[str], *, iters: int, tol: float | None = None,
    memory: int | None = None, tile: int = TILE, metadata: dict[str, Any] | None = None,
    sample: tuple[int, int] = (37, 53), opset: int = OPSET, dynamo: bool = False,
) -> dict[str, Any]:
    """Write `model` (a `DEQDenoiser`) as an ONNX file: input "noisy" (B, C_in, H, W) float32 on [0, 1], output
    "denoised" (B, C_in, H, W) clamped to [0, 1]; batch, height and width are dynamic.

    The default exporter is torch's TorchScript-based one (`dynamo=False`): it traces sizes as tensors, so the
    tiles' arithmetic stays dynamic, and it exported 17 unrolled iterations in 47 s (2 CPU cores). The
    torch.export-based one (`dynamo=True`, needs onnxscript) gives the same graph up to rounding but took about 10x
    longer (symbolic-shape reasoning over the unrolled graph: 121 s for 6 iterations before the attention was cut
    into chunks, 66 s for 1 iteration after).

    Args:
        model: the denoiser (weights, solver config; not modified).
        out: destination .onnx file, written atomically (a temporary file, then renamed).
        iters: f-evaluations N of the unrolled Broyden solver.
        tol: relative-residual tolerance at which a sample freezes (default: the model's, as `nerd denoise`).
        memory: secant pairs kept (default: the model's).
        tile: query tile side of the exported attention.
        metadata: extra entries for the file's metadata_props (JSON-encoded unless strings).
        sample: (H, W) of the tracing input (odd sizes, so that no size is specialised).
        opset: ONNX opset (>= 17).
        dynamo: use torch's torch.export-based exporter.

    Returns:
        The metadata written (solver settings, opset, exporter).

    Raises:
        ExportError: onnx (or, with dynamo, onnxscript) missing, or the weights do not use Broyden.
        ConfigError: iters/tol/memory out of range.
    """
    require("onnx", *(["onnxscript"] if dynamo else []))
    import io
    import warnings

    import onnx

    wrapper = FixedBroyden(model, iters, tol=tol, memory=memory, tile=tile).eval()
    y = torch.rand(2, model.cfg.in_channels, *sample)
    names = {"input_names": ["noisy"], "output_names": ["denoised"]}
    with torch.no_grad(), warnings.catch_warnings():
        # The legacy exporter's deprecation notice, and group_norm's batch-size check (a Python bool, constant
        # False here) traced as a constant: neither concerns this graph.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module="torch.nn.functional")
        if dynamo:
            dim = torch.export.Dim.DYNAMIC
            program = torch.onnx.export(wrapper, (y,), dynamo=True, opset_version=opset, external_data=False,
                                        dynamic_shapes={"y": {0: dim, 2: dim, 3: dim}}, verbose=False, **names)
            proto = program.model_proto
        else:
            buf = io.BytesIO()
            axes = {0: "batch", 2: "height", 3: "width"}
            torch.onnx.export(wrapper, (y,), buf, dynamo=False, opset_version=opset,
                              dynamic_axes={"noisy": axes, "denoised": axes}, **names)
            proto = onnx.load_from_string(buf.getvalue())
    info = {"format": "nerd-onnx", "iters": wrapper.iters, "tol": wrapper.tol, "memory": wrapper.memory,
            "solver": "broyden", "attention_tile": tile, "opset": opset,
            "exporter": "dynamo" if dynamo else "torchscript", "torch": torch.__version__, **(metadata or {})}
    del proto.metadata_props[:]
    for key, value in info.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    out = Path(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        onnx.save_model(proto, tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return info


def read_onnx_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata_props of an exported file (iters, tol, weights, ...), as strings."""
    require("onnx")
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def onnx_session(path: str | os.PathLike[str], threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session for an exported file; `threads` sets its intra-op threads (None: ORT's default)."""
    require("onnxruntime")
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_onnx(session: Any, y: Any) -> Any:
    """Denoise y: float (H, W) on [0, 1] with an `onnx_session`; returns float32 (H, W) on [0, 1]."""
    import numpy as np

    x = np.ascontiguousarray(y, dtype=np.float32)[None, None]
    return session.run(["denoised"], {"noisy": x})[0][0, 0]
