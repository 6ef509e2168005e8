"""Training checkpoints (`last.pt`): written atomically, read without running any code from the file.

A checkpoint is a `torch.save`d dict of plain values only (tensors, dicts, lists, tuples, strings, numbers, None),
so it loads with `torch.load(weights_only=True)`: PyTorch's restricted unpickler, which builds those and refuses
everything else. A crafted `.pt` given to `nerd export FILE.pt`, `nerd train --resume` or `init = "FILE.pt"`
therefore cannot run code; it, like an empty, truncated or foreign file, is refused with one `WeightsError`.

    config      dict            `config_to_dict(cfg)`: the run's resolved config, dataclasses as plain dicts
    model       {str: Tensor}   the trained weights (`model.state_dict()`)
    optimizer   dict            `AdamW.state_dict()`: {"state": {int: {str: Tensor}}, "param_groups": [dict]}
    ema         {str: Tensor} | None   the weights' moving average (`AveragedModel.state_dict()`) with `train.ema`
                                (absent from runs older than `train.ema`: read as None)
    rng         dict            uint8 generator states {"data": Tensor, "torch": Tensor, "cuda": Tensor | None}
    step        int             optimiser steps done
    elapsed_s   float           training wall-clock seconds over all invocations
    cpu_s       float           process CPU seconds over all invocations (absent from early runs: read as 0)
    best_val    float           best mean validation PSNR so far, dB (-inf before the first validation)
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nerd.errors import WeightsError

# key: (accepted types, what the message calls them); optional keys may be missing (older runs)
_REQUIRED: dict[str, tuple[tuple[type, ...], str]] = {
    "config": ((dict,), "a dict"),
    "model": ((dict,), "a dict of tensors"),
    "optimizer": ((dict,), "a dict"),
    "rng": ((dict,), "a dict"),
    "step": ((int,), "an integer"),
    "elapsed_s": ((int, float), "a number"),
    "best_val": ((int, float), "a number"),
}
_OPTIONAL: dict[str, tuple[tuple[type, ...], str]] = {
    "ema": ((dict, type(None)), "a dict of tensors or None"),
    "cpu_s": ((int, float), "a number"),
}
_PLAIN = (Tensor, str, int, float, bool, type(None))  # leaves `weights_only=True` reads back


def atomic_save(obj: object, path: str | os.PathLike[str]) -> None:
    """`torch.save` to a temporary file beside `path`, then rename: a kill mid-write leaves the old file whole."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write a training checkpoint (the format above) atomically; TypeError if anything in it is not plain, since
    such a file could not be read back by `load_checkpoint`."""
    _check_plain(ckpt, "checkpoint")
    atomic_save(ckpt, path)


def load_plain(path: str | os.PathLike[str], what: str = "checkpoint") -> Any:
    """`torch.load` of a file of tensors and plain values, on the CPU, refusing anything else.

    Raises:
        WeightsError: one line naming the file, for a missing, unreadable, empty, truncated or garbage file, or
            one holding objects that only a full unpickler (one that may run code) could build.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{what} not found: {path}" if not path.exists() else f"{what} {path} is not a file")
    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 4": the refusal below is the one line we report
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 -- a damaged file raises anything from EOFError to KeyError
        raise WeightsError(f"cannot read {what} {path}: {_reason(err)}") from None


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A training checkpoint, read safely (`load_plain`) and checked: its keys, their types and its config.

    Returns the dict of the format above, with `ema` (None) and `cpu_s` (0.0) filled in where an older run lacks
    them. Raises `WeightsError` naming the file for anything else.
    """
    from nerd.config import config_from_dict

    ckpt = load_plain(path)
    problem = _structure_problem(ckpt)
    if problem is None:
        try:
            config_from_dict(ckpt["config"])
        except (ValueError, TypeError) as err:  # ConfigError included; a wrong type inside fails as TypeError
            problem = f"its config is invalid: {' '.join(str(err).split())}"
    if problem is not None:
        raise WeightsError(f"{path}: not a training checkpoint ({problem})")
    return {"ema": None, "cpu_s": 0.0, **ckpt}


def restore(target: Any, state: Mapping[str, Any], path: str | os.PathLike[str], what: str) -> None:
    """`target.load_state_dict(state)` (a module, optimiser or averaged model) from checkpoint `path`; a state
    that does not fit (other shapes, names or parameter groups) raises `WeightsError` naming the file."""
    try:
        target.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
        raise WeightsError(f"{path}: its {what} does not fit this run: {_first_line(err)}") from None


def kept_weights(ckpt: Mapping[str, Any]) -> dict[str, Tensor]:
    """The model state a training checkpoint stands for: its weights' moving average where the run kept one
    (`train.ema`: those are the weights it validated and keeps), else the trained weights."""
    if ckpt.get("ema") is None:
        return ckpt["model"]
    prefix = "module."  # AveragedModel holds the model as `.module`, beside its `n_averaged` counter
    return {k[len(prefix):]: v for k, v in ckpt["ema"].items() if k.startswith(prefix)}


def _structure_problem(ckpt: object) -> str | None:
    """What makes `ckpt` something other than a training checkpoint, in a few words; None when it is one."""
    if not isinstance(ckpt, dict):
        return f"it holds a {type(ckpt).__name__}, not a dict"
    missing = [k for k in _REQUIRED if k not in ckpt]
    if missing:
        return f"no {', '.join(missing)}"
    for key, (types, words) in {**_REQUIRED, **_OPTIONAL}.items():
        value = ckpt.get(key)
        if key in ckpt and (not isinstance(value, types) or isinstance(value, bool)):
            return f"{key} is a {type(value).__name__}, not {words}"
    tensor_maps = {"model": ckpt["model"], "ema": ckpt.get("ema") or {}}
    for key, state in tensor_maps.items():
        if not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
            return f"{key} is not a dict of named tensors"
    if not ckpt["model"]:
        return "model is empty"
    opt = ckpt["optimizer"]
    if not (isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list)
            and all(isinstance(g, dict) for g in opt["param_groups"])):
        return "optimizer is not an optimiser state (state, param_groups)"
    rng = ckpt["rng"]
    if not (isinstance(rng.get("data"), Tensor) and isinstance(rng.get("torch"), Tensor)
            and isinstance(rng.get("cuda"), (Tensor, type(None)))):
        return "rng is not a set of generator states (data, torch, cuda)"
    if ckpt["step"] < 0:
        return f"step is {ckpt['step']}"
    return None


def _check_plain(obj: object, where: str) -> None:
    """TypeError naming the first value under `obj` that `weights_only=True` could not read back."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, f"{where} key")
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN):
        raise TypeError(f"{where} is a {type(obj).__name__}: a checkpoint holds only tensors and plain values")


def _reason(err: Exception) -> str:
    """Why `torch.load(weights_only=True)` failed, in a few words (torch's own messages run to paragraphs)."""
    import pickle

    text = str(err)
    refused = re.search(r"GLOBAL ([\w.]+)", text)
    if refused:  # the restricted unpickler stopped at an object it will not build: that is what it is for
        return (f"refused to build {refused.group(1)}: a checkpoint holds only tensors and plain values (building "
                "other objects could run code)")
    if isinstance(err, EOFError):
        return "the file is empty or cut short"
    if isinstance(err, PermissionError):
        return "permission denied"
    if isinstance(err, OSError) or "zip archive" in text:  # a cut zip fails as a bad seek or a missing directory
        return f"not a complete checkpoint (truncated or damaged: {_first_line(err, 80)})"
    if isinstance(err, pickle.UnpicklingError | KeyError | ValueError):
        return "not a PyTorch checkpoint (unreadable contents)"
    return _first_line(err)


def _first_line(err: BaseException, limit: int = 200) -> str:
    """An error message's first line, at most `limit` characters; for load_state_dict's "Error(s) in loading
    state_dict for X:" header, the first error under it."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        lines = [f"{lines[0]} {lines[1]}"]
    line = lines[0] if lines else type(err).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


__all__ = ["atomic_save", "kept_weights", "load_checkpoint", "load_plain", "restore", "save_checkpoint"]
