"""DnCNN-S (Zhang et al., TIP 2017), the 17-layer baseline, with the authors' published weights.

    body   = Conv(64->1)(ReLU(Conv(64->64)) x 15 (ReLU(Conv(1->64)(y))))   3x3 convs, zero padding 1, bias
    x_hat  = y - body(y)                                                   body predicts the noise

BatchNorm of the original is folded into the convs (weights and biases), so the state dict is only ``convs.0..16``.

Weights files, looked for per sigma S (15, 25 or 50) in the anchors folder (`--anchors DIR`, else $NERD_ANCHORS,
else ../shared/anchors), the first that exists is used (`find_dncnn_file`):

1. ``dncnn_sigma<S>.safetensors``: this module's state dict (BatchNorm folded), loaded strictly.
2. ``sigma=<S>.mat``: the authors' MatConvNet model as published in the public repository cszn/DnCNN,
   ``model/specifics/sigma=15.mat``, ``sigma=25.mat``, ``sigma=50.mat`` (https://github.com/cszn/DnCNN, folder
   model/specifics), read with `scipy.io.loadmat` (MATLAB v5/v7 files; scipy comes with scikit-image) and converted
   at load time (`dncnn_from_mat`): ``net.layers`` is a cell array of ``conv`` layers (``weights`` = {filters
   (3, 3, Cin, Cout), biases (Cout, 1)}; older MatConvNet: ``filters`` / ``biases``), ``relu`` layers and, in
   models whose BatchNorm was not merged, ``bnorm`` layers (``weights`` = {multipliers, biases, moments (C, 2):
   mean and standard deviation}), which are folded into the conv before them; a trailing ``loss`` layer is ignored.
3. ``dncnn_sigma<S>.pth`` or ``sigma=<S>.pth``: a PyTorch *state dict* in the layout of cszn/DnCNN's
   TrainingCodes/dncnn_pytorch (``dncnn.0.weight/bias``, then per block a bias-free conv ``dncnn.k.weight`` and a
   BatchNorm2d ``dncnn.k+1.weight/bias/running_mean/running_var`` (eps 1e-4, as that code builds it), a last
   bias-free conv), or any ``<prefix>.<index>.<name>`` sequence of convs (with or without bias) and BatchNorms, a
   ``module.`` prefix (DataParallel) allowed. Read with ``torch.load(weights_only=True)`` only: a file holding
   pickled Python objects (the repository's ``models/DnCNN_sigma25/model.pth`` is a whole pickled model) is
   refused without unpickling it; save ``model.state_dict()`` where the file is trusted instead.

Every conversion checks what it reads: the layer sequence (conv, optional BatchNorm, ReLU, ..., conv), 3x3 kernels,
stride 1 and padding 1 where the file says, channels that chain, 17 convs of width 64 on one channel, finite values.
Any other file is a `WeightsError` (one line at the CLI).
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nerd.errors import NerdError, WeightsError
from nerd.models.base import Denoiser

SIGMAS = (15, 25, 50)
DEPTH, WIDTH = 17, 64  # DnCNN-S
TORCH_BN_EPS = 1e-4  # cszn/DnCNN's dncnn_pytorch builds BatchNorm2d(64, eps=0.0001)


def file_names(sigma255: int) -> tuple[str, ...]:
    """The file names `find_dncnn_file` tries for one sigma, in order."""
    s = int(sigma255)
    return (f"dncnn_sigma{s}.safetensors", f"sigma={s}.mat", f"dncnn_sigma{s}.pth", f"sigma={s}.pth")


ANCHORS_HELP = (
    "give --anchors DIR or set NERD_ANCHORS=DIR to a folder holding, per sigma S, dncnn_sigmaS.safetensors, or the "
    "authors' sigma=S.mat from github.com/cszn/DnCNN (model/specifics), or a state dict dncnn_sigmaS.pth "
    "(docs/evaluation.md)"
)


class DnCNN(Denoiser):
    """DnCNN-S: `forward(y, sigma) -> x_hat`, (B, 1, H, W) on the [0, 1] scale; sigma unused (one per level).

    Args:
        depth: number of convolutions (17 for DnCNN-S).
        channels: feature width (64).
        in_channels: image channels (1: grayscale).
    """

    def __init__(self, depth: int = DEPTH, channels: int = WIDTH, in_channels: int = 1) -> None:
        super().__init__()
        widths = [in_channels] + [channels] * (depth - 1) + [in_channels]
        self.convs = nn.ModuleList(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=True)
            for c_in, c_out in zip(widths[:-1], widths[1:], strict=True)
        )

    def forward(self, y: Tensor, sigma: float | Tensor | None = None) -> Tensor:
        h = y
        for k, conv in enumerate(self.convs):
            h = conv(h)
            if k < len(self.convs) - 1:
                h = F.relu(h)
        return y - h


def anchors_dir(anchors: str | os.PathLike[str] | None = None) -> Path:
    """The anchors folder: `anchors`, else $NERD_ANCHORS, else ../shared/anchors (`nerd.paths.anchors_root`)."""
    from nerd.paths import anchors_root

    return anchors_root(anchors)


# --- conversion: a file's layers -> folded convs -> DnCNN


@dataclass
class _Conv:
    weight: Tensor  # float64 (Cout, Cin, 3, 3), PyTorch layout
    bias: Tensor  # float64 (Cout,) (zeros when the file has none)


@dataclass
class _Norm:
    """Inference-time BatchNorm: gain * (x - mean) / std + shift, per channel (float64 (C,) each)."""

    gain: Tensor
    shift: Tensor
    mean: Tensor
    std: Tensor  # sqrt(running_var + eps) (MatConvNet stores it so)


def _fold(layers: list[_Conv | _Norm], source: str) -> list[_Conv]:
    """The convs with each BatchNorm that follows one folded in: W' = W g/s, b' = (b - m) g/s + beta."""
    convs: list[_Conv] = []
    for layer in layers:
        if isinstance(layer, _Conv):
            convs.append(_Conv(layer.weight.clone(), layer.bias.clone()))
            continue
        if not convs or len(layer.gain) != len(convs[-1].bias):
            where = "does not follow a conv" if not convs else (
                f"has {len(layer.gain)} channels, the conv before it {len(convs[-1].bias)}")
            raise WeightsError(f"{source}: a BatchNorm layer {where}; not a DnCNN")
        if not bool((layer.std > 0).all()):
            raise WeightsError(f"{source}: a BatchNorm layer has a non-positive standard deviation")
        scale = layer.gain / layer.std
        last = convs[-1]
        last.weight = last.weight * scale[:, None, None, None]
        last.bias = (last.bias - layer.mean) * scale + layer.shift
    return convs


def _build(layers: list[_Conv | _Norm], source: str) -> DnCNN:
    """DnCNN-S (eval mode) from a file's conv / BatchNorm sequence (ReLUs implied after every conv but the last).

    Raises:
        WeightsError: not 17 chained 3x3 convs 1 -> 64 -> ... -> 64 -> 1 with finite values.
    """
    for layer in layers:
        for name, t in vars(layer).items():
            if not bool(torch.isfinite(t).all()):
                raise WeightsError(f"{source}: {type(layer).__name__.strip('_').lower()} {name} has NaN/inf values")
    convs = _fold(layers, source)
    shapes = [tuple(c.weight.shape) for c in convs]
    expected = [(WIDTH if k < DEPTH - 1 else 1, 1 if k == 0 else WIDTH, 3, 3) for k in range(DEPTH)]
    if shapes != expected:
        first_bad = next((k for k, (a, b) in enumerate(zip(shapes, expected, strict=False)) if a != b),
                         min(len(shapes), len(expected)))
        got = shapes[first_bad] if first_bad < len(shapes) else "none"
        raise WeightsError(f"{source}: not DnCNN-S ({len(shapes)} convs; conv {first_bad} is {got}, DnCNN-S needs "
                           f"{len(expected)} 3x3 convs 1 -> {WIDTH} -> ... -> 1, conv {first_bad} "
                           f"{expected[first_bad] if first_bad < len(expected) else 'none'})")
    model = DnCNN()
    state = {}
    for k, conv in enumerate(convs):
        state[f"convs.{k}.weight"] = conv.weight.to(torch.float32).contiguous()
        state[f"convs.{k}.bias"] = conv.bias.to(torch.float32).contiguous()
    for key, t in state.items():  # folding can overflow float32 (a tiny std): checked after the cast
        if not bool(torch.isfinite(t).all()):
            raise WeightsError(f"{source}: {key} is not finite after folding BatchNorm in")
    model.load_state_dict(state, strict=True)
    return model.eval()


# --- MatConvNet (.mat)


def _one(x: Any) -> Any:
    """Unwrap the 1x1 object arrays that scipy.io.loadmat puts around MATLAB structs and cells."""
    import numpy as np

    while isinstance(x, np.ndarray) and x.dtype == object and x.size == 1:
        x = x.flat[0]
    return x


def _text(x: Any) -> str:
    import numpy as np

    x = _one(x)
    if isinstance(x, np.ndarray) and x.dtype.kind == "U" and x.size == 1:
        return str(x.flat[0])
    return x if isinstance(x, str) else ""


def _numbers(x: Any, source: str, what: str) -> Tensor:
    """A numeric MATLAB array as a float64 tensor (its MATLAB index order kept)."""
    import numpy as np

    x = _one(x)
    if not isinstance(x, np.ndarray) or x.dtype.kind not in "fiu":
        raise WeightsError(f"{source}: {what} is not a numeric array")
    return torch.from_numpy(np.array(x, dtype=np.float64))


def _mat_layers(net: Any, source: str) -> list[_Conv | _Norm]:
    """Convs and BatchNorms of a MatConvNet SimpleNN ``net``, checked: conv ([bnorm]) relu ... conv [loss]."""
    import numpy as np

    cells = getattr(net, "layers", None)
    if not isinstance(cells, np.ndarray) or cells.dtype != object:
        raise WeightsError(f"{source}: 'net' has no 'layers' cell array; not a MatConvNet SimpleNN model")
    items = [_one(c) for c in cells.flat]
    types = [_text(getattr(c, "type", None)) for c in items]
    while types and types[-1] in ("loss", "pdist", "euclideanloss"):  # a training net's loss layer
        items, types = items[:-1], types[:-1]
    layers: list[_Conv | _Norm] = []
    for i, (layer, kind) in enumerate(zip(items, types, strict=True)):
        where = f"{source}: layer {i + 1} ({kind or 'no type'})"
        nxt = types[i + 1] if i + 1 < len(types) else None
        if kind == "conv":
            fields = getattr(layer, "_fieldnames", [])
            if "weights" in fields:
                w = [_one(p) for p in np.asarray(layer.weights, dtype=object).flat]
            else:
                w = [getattr(layer, "filters", None), getattr(layer, "biases", None)]
            if not w or w[0] is None:
                raise WeightsError(f"{where}: no filters")
            f = _numbers(w[0], source, f"layer {i + 1} filters")
            if f.ndim == 3:  # MATLAB drops a trailing singleton: (3, 3, Cin) is one output channel
                f = f[..., None]
            if f.ndim == 2:
                f = f[..., None, None]
            if f.ndim != 4:
                raise WeightsError(f"{where}: filters of shape {tuple(f.shape)}, expected (3, 3, Cin, Cout)")
            c_out = f.shape[3]
            has_bias = len(w) > 1 and w[1] is not None and _one(w[1]).size > 0
            b = _numbers(w[1], source, f"layer {i + 1} biases").reshape(-1) if has_bias else torch.zeros(c_out)
            if b.numel() != c_out:
                raise WeightsError(f"{where}: {b.numel()} biases for {c_out} filters")
            for name in ("stride", "dilate"):
                if name in fields and not bool((_numbers(getattr(layer, name), source, name) == 1).all()):
                    raise WeightsError(f"{where}: {name} is not 1; DnCNN convs have stride 1, no dilation")
            if "pad" in fields and not bool((_numbers(layer.pad, source, "pad") == (f.shape[0] - 1) // 2).all()):
                raise WeightsError(f"{where}: padding is not 'same'; DnCNN pads 3x3 convs by 1")
            # MatConvNet filters are (H, W, Cin, Cout) and correlate like PyTorch's Conv2d (Cout, Cin, H, W)
            layers.append(_Conv(f.permute(3, 2, 0, 1).contiguous(), b))
        elif kind == "bnorm":
            w = [_one(p) for p in np.asarray(getattr(layer, "weights", None), dtype=object).flat]
            if len(w) < 3:
                raise WeightsError(f"{where}: needs multipliers, biases and moments")
            gain = _numbers(w[0], source, "bnorm multipliers").reshape(-1)
            shift = _numbers(w[1], source, "bnorm biases").reshape(-1)
            moments = _numbers(w[2], source, "bnorm moments")
            if moments.ndim != 2 or moments.shape[1] != 2 or not moments.shape[0] == gain.numel() == shift.numel():
                raise WeightsError(f"{where}: moments of shape {tuple(moments.shape)} for {gain.numel()} channels, "
                                   "expected (C, 2): mean and standard deviation")
            layers.append(_Norm(gain, shift, moments[:, 0].clone(), moments[:, 1].clone()))
        elif kind == "relu":
            leak = getattr(layer, "leak", None)
            if leak is not None and _one(leak).size and float(_numbers(leak, source, "leak").reshape(-1)[0]) != 0:
                raise WeightsError(f"{where}: a leaky ReLU; DnCNN uses plain ReLU")
        else:
            raise WeightsError(f"{where}: layer type {kind!r} is not part of DnCNN (conv, bnorm, relu)")
        # the order DnCNN needs: a ReLU after every conv (or its BatchNorm) but the last
        if kind == "conv" and nxt not in ("bnorm", "relu", None):
            raise WeightsError(f"{where}: followed by {nxt!r}, expected bnorm or relu")
        if kind == "bnorm" and nxt != "relu":
            raise WeightsError(f"{where}: followed by {nxt!r}, expected relu")
        if kind == "relu" and nxt != "conv":
            raise WeightsError(f"{where}: followed by {nxt!r}, expected conv")
    if not types or types[-1] != "conv":
        raise WeightsError(f"{source}: the last layer must be a conv (the noise estimate), found {types[-1:]}")
    return layers


def dncnn_from_mat(path: str | os.PathLike[str]) -> DnCNN:
    """DnCNN-S from the authors' MatConvNet file (cszn/DnCNN ``model/specifics/sigma=<S>.mat``), BatchNorm folded.

    Raises:
        WeightsError: unreadable, a MATLAB v7.3 (HDF5) file, or not a DnCNN-S SimpleNN ``net``.
        NerdError: scipy is not installed.
    """
    try:
        from scipy.io import loadmat
    except ImportError:
        raise NerdError("reading .mat DnCNN files needs scipy: pip install 'nerd[dncnn]'") from None
    path = Path(path)
    try:
        data = loadmat(str(path), struct_as_record=False, squeeze_me=False)
    except NotImplementedError:  # scipy's answer to v7.3 files
        raise WeightsError(f"{path}: a MATLAB v7.3 (HDF5) file; save it with -v7 (or use the published file)") from None
    except Exception as err:  # loadmat raises many kinds for damaged files
        raise WeightsError(f"cannot read {path}: {' '.join(str(err).split()) or type(err).__name__}") from None
    net = _one(data.get("net"))
    if net is None:
        found = [k for k in data if not k.startswith("__")]
        raise WeightsError(f"{path}: no variable 'net' (has {found}); not a MatConvNet model")
    return _build(_mat_layers(net, str(path)), str(path))


# --- PyTorch state dict (.pth)


_KEY = re.compile(r"^(?P<prefix>.+)\.(?P<index>\d+)\.(?P<name>[A-Za-z_]+)$")


def _torch_layers(state: Mapping[str, Any], source: str, bn_eps: float) -> list[_Conv | _Norm]:
    """Convs and BatchNorms of a ``<prefix>.<index>.<name>`` state dict, in index order."""
    keys = list(state)
    if keys and all(k.startswith("module.") for k in keys):  # saved from DataParallel
        keys = [k[len("module."):] for k in keys]
        state = {k: state["module." + k] for k in keys}
    modules: dict[int, dict[str, Tensor]] = {}
    prefixes = set()
    for key in keys:
        m = _KEY.match(key)
        if m is None or not isinstance(state[key], Tensor):
            raise WeightsError(f"{source}: entry {key!r} is not a <layers>.<index>.<name> tensor of a DnCNN state dict")
        prefixes.add(m["prefix"])
        modules.setdefault(int(m["index"]), {})[m["name"]] = state[key].detach().to("cpu", torch.float64)
    if len(prefixes) != 1:
        raise WeightsError(f"{source}: entries of {len(prefixes)} layer sequences ({sorted(prefixes)[:3]}); "
                           "expected one (e.g. dncnn.0.weight, ...)")
    prefix = prefixes.pop()
    layers: list[_Conv | _Norm] = []
    for index in sorted(modules):
        p, where = modules[index], f"{source}: {prefix}.{index}"
        if "running_mean" in p or "running_var" in p:
            mean, var = p.get("running_mean"), p.get("running_var")
            if mean is None or var is None or mean.ndim != 1 or var.shape != mean.shape:
                raise WeightsError(f"{where}: a BatchNorm without matching running_mean and running_var")
            gain, shift = p.get("weight", torch.ones_like(mean)), p.get("bias", torch.zeros_like(mean))
            if gain.shape != mean.shape or shift.shape != mean.shape:
                raise WeightsError(f"{where}: BatchNorm weight/bias do not match its {mean.numel()} channels")
            if not bool((var >= 0).all()):
                raise WeightsError(f"{where}: BatchNorm running_var has negative values")
            layers.append(_Norm(gain, shift, mean, torch.sqrt(var + bn_eps)))
        elif "weight" in p and p["weight"].ndim == 4:
            w = p["weight"]
            b = p.get("bias", torch.zeros(w.shape[0], dtype=torch.float64))
            if b.shape != (w.shape[0],):
                raise WeightsError(f"{where}: bias of shape {tuple(b.shape)} for {w.shape[0]} filters")
            layers.append(_Conv(w, b))
        else:
            raise WeightsError(f"{where}: neither a conv (4-d weight) nor a BatchNorm ({sorted(p)})")
    return layers


def dncnn_from_state_dict(state: Mapping[str, Any], *, bn_eps: float = TORCH_BN_EPS, source: str = "state dict"
                          ) -> DnCNN:
    """DnCNN-S from a PyTorch state dict of convs and BatchNorms (cszn/DnCNN's ``dncnn.k.*``, or this module's
    ``convs.k.*``), BatchNorm folded with `bn_eps` (the eps the BatchNorms were built with; not in a state dict).

    Raises:
        WeightsError: not a DnCNN-S state dict.
    """
    if not isinstance(state, Mapping) or not state:
        raise WeightsError(f"{source}: not a state dict (a mapping of names to tensors), got {type(state).__name__}")
    return _build(_torch_layers(state, source, bn_eps), source)


def dncnn_from_pth(path: str | os.PathLike[str], *, bn_eps: float = TORCH_BN_EPS) -> DnCNN:
    """DnCNN-S from a ``.pth`` state dict, read with ``torch.load(weights_only=True)``: nothing in the file runs.

    A dict holding the state dict under "state_dict" or "model" (a training checkpoint) is accepted too.

    Raises:
        WeightsError: unreadable; pickled Python objects other than tensors and containers (e.g. a whole model
            saved with ``torch.save(model)``: refused, not unpickled); not a DnCNN-S state dict.
    """
    path = Path(path)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        what = " ".join(str(err).split())
        found = re.search(r"(GLOBAL|global) ([\w.]+)", what)
        obj = f" ({found.group(2)})" if found else ""
        raise WeightsError(
            f"{path} holds pickled Python objects{obj}, e.g. a whole model saved with torch.save(model); refused "
            "without unpickling (that would run code from the file): where you trust it, load it with the code "
            "that saved it and save a state_dict instead, torch.save(model.state_dict(), path)"
        ) from None
    except Exception as err:  # a damaged or non-torch file: zip, EOF and runtime errors
        raise WeightsError(f"cannot read {path}: {' '.join(str(err).split()) or type(err).__name__}") from None
    if isinstance(state, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    return dncnn_from_state_dict(state, bn_eps=bn_eps, source=str(path))


# --- finding and loading


def find_dncnn_file(sigma255: float, anchors: str | os.PathLike[str] | None = None) -> Path:
    """The first of `file_names(sigma255)` in the anchors folder.

    Raises:
        WeightsError: `sigma255` has no pretrained model, or no file is there.
    """
    s = float(sigma255)
    if round(s) not in SIGMAS or s != round(s):
        have = ", ".join(map(str, SIGMAS))
        raise WeightsError(f"DnCNN-S has pretrained weights only for sigma {have}, got {sigma255:g}")
    folder = anchors_dir(anchors)
    names = file_names(round(s))
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise WeightsError(f"DnCNN weights not found in {folder}: none of {', '.join(names)} ({ANCHORS_HELP})")


def load_dncnn_file(path: str | os.PathLike[str]) -> DnCNN:
    """DnCNN-S from one weights file, by its suffix: .safetensors, .mat or .pth (module docstring); eval mode."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".mat":
        return dncnn_from_mat(path)
    if suffix in (".pth", ".pt"):
        return dncnn_from_pth(path)
    if suffix != ".safetensors":
        raise WeightsError(f"{path}: unknown DnCNN weights format; give .safetensors, .mat or .pth")
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises several error types for a damaged header
        raise WeightsError(f"cannot read {path}: {' '.join(str(err).split())}") from None
    model = DnCNN()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        raise WeightsError(f"{path}: not this module's DnCNN-S state dict (convs.0..16 weights and biases)")
    if not all(bool(torch.isfinite(t).all()) for t in state.values()):
        raise WeightsError(f"{path}: NaN/inf weights")
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_dncnn(sigma255: float, anchors: str | os.PathLike[str] | None = None) -> DnCNN:
    """The authors' DnCNN-S for `sigma255` (15, 25 or 50) from the anchors folder (`find_dncnn_file`: this
    project's safetensors, else the published ``sigma=<S>.mat``, else a ``.pth`` state dict), in eval mode.

    Raises:
        WeightsError: no weights file, a file that is not DnCNN-S, or `sigma255` has no pretrained model.
    """
    return load_dncnn_file(find_dncnn_file(sigma255, anchors))


__all__ = ["ANCHORS_HELP", "DnCNN", "SIGMAS", "anchors_dir", "dncnn_from_mat", "dncnn_from_pth",
           "dncnn_from_state_dict", "file_names", "find_dncnn_file", "load_dncnn", "load_dncnn_file"]
