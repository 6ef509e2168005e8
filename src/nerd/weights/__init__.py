"""Shipped and exported weights: safetensors files whose metadata carries the config, scores and a checksum.

A file holds the model's state dict and these metadata entries (all strings, as safetensors requires):
``format`` ("nerd-2"), ``model`` and ``solver`` (config JSON), ``sigma`` (0-255 scale the weights were trained
for), ``scores`` (JSON of measured figures), ``train`` (JSON: recipe, steps, time), ``sha256`` (of the tensors and
of the entries that rebuild the model and give its outputs their meaning: format, model, solver, sigma; "nerd-1"
files, whose checksum covers the tensors only, still load). Loading rebuilds the architecture from the metadata,
checks the checksum and loads strictly.

Shipped files live next to this module as ``nerd-s<SIGMA>.safetensors``; `nerd denoise --sigma S` picks the one
whose training sigma is nearest S.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from nerd.errors import WeightsError

WEIGHTS_DIR = Path(__file__).resolve().parent
FORMAT = "nerd-2"  # nerd-1 files (checksum over the tensors only) still load
METADATA_KEYS = {"format", "model", "solver", "sigma", "scores", "train", "sha256"}


def tensors_sha256(tensors: dict[str, torch.Tensor], header: str = "") -> str:
    """Checksum of a state dict (names, dtypes, shapes and bytes, in sorted order) and of `header`, the canonical
    text of the metadata that decides the architecture (model, solver, sigma): editing either is detected."""
    h = hashlib.sha256(header.encode())
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def shipped() -> dict[str, Path]:
    """Shipped weights by name (file stem)."""
    return {p.stem: p for p in sorted(WEIGHTS_DIR.glob("*.safetensors"))}


def nearest(sigma255: float, trained: dict[str, float]) -> str:
    """The name in `trained` ({name: training sigma, 0-255}) nearest `sigma255`; on a tie the higher sigma (weights
    for a little more noise than there is cost less PSNR than the other way round)."""
    return min(trained, key=lambda name: (abs(trained[name] - sigma255), -trained[name]))


def default_name(sigma255: float) -> str:
    return f"nerd-s{round(sigma255)}"


def resolve(name_or_path: str | os.PathLike[str]) -> Path:
    """A shipped name ("nerd-s25") or a path to a .safetensors file."""
    text = str(name_or_path)
    names = shipped()
    if text in names:
        return names[text]
    path = Path(text)
    if path.suffix == ".safetensors" or os.sep in text or path.exists():
        if not path.is_file():
            raise WeightsError(f"weights file not found: {path}")
        return path
    raise WeightsError(f"unknown weights {text!r}; shipped: {', '.join(names) or 'none'}, or give a .safetensors path")


def save_weights(
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    *,
    sigma255: float,
    scores: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
) -> str:
    """Write `model` (a DEQDenoiser) with its metadata, atomically; returns the checksum."""
    from safetensors.torch import save_file

    from nerd.config import dumps

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "model": dumps(model.cfg),
        "solver": dumps(model.solver),
        "sigma": str(float(sigma255)),
        "scores": json.dumps(scores or {}, sort_keys=True),
        "train": json.dumps(train or {}, sort_keys=True),
    }
    digest = tensors_sha256(tensors, _header(meta))
    meta["sha256"] = digest
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; weights are meant to be shared and packaged
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return digest


def _header(meta: dict[str, str]) -> str:
    """The checksummed metadata: what rebuilds the model and what its outputs mean."""
    return "|".join(meta[k] for k in ("format", "model", "solver", "sigma"))


def read_metadata(name_or_path: str | os.PathLike[str]) -> dict[str, str]:
    from safetensors import safe_open

    path = resolve(name_or_path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as err:  # safetensors raises several error types for a damaged header
        raise WeightsError(f"cannot read weights {path}: {err}") from None
    if meta.get("format") not in (FORMAT, "nerd-1"):
        raise WeightsError(f"{path} is not a nerd weights file (format {meta.get('format')!r})")
    unknown = sorted(set(meta) - METADATA_KEYS)
    missing = sorted({"model", "solver", "sigma", "sha256"} - set(meta))
    if unknown or missing:
        what = [f"unknown keys {unknown}"] * bool(unknown) + [f"missing keys {missing}"] * bool(missing)
        raise WeightsError(f"{path}: metadata with {' and '.join(what)}")
    return meta


def _decoded(path: Path, meta: dict[str, str]) -> tuple[Any, Any, float, dict[str, Any], dict[str, Any]]:
    """(ModelConfig, SolverConfig, sigma255, scores, train) from a file's metadata, each checked like a user's
    input: the checksum proves integrity, not intent (anyone can recompute it), so every value is validated."""
    from nerd.config import model_config_from_json, solver_config_from_json
    from nerd.sigma import check_sigma255

    try:
        model_cfg = model_config_from_json(meta["model"])
        solver_cfg = solver_config_from_json(meta["solver"])
        sigma255 = check_sigma255(meta["sigma"], "sigma")
        scores, train = json.loads(meta.get("scores", "{}")), json.loads(meta.get("train", "{}"))
    except (ValueError, TypeError, AttributeError) as err:  # JSON, ConfigError (a ValueError), wrong JSON types
        raise WeightsError(f"{path}: bad metadata: {' '.join(str(err).split())}") from None
    if not isinstance(scores, dict) or not isinstance(train, dict):
        raise WeightsError(f"{path}: bad metadata: scores and train must be JSON objects")
    return model_cfg, solver_cfg, sigma255, scores, train


def _check_tensors(path: Path, model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """WeightsError unless `tensors` has exactly the model's keys and shapes, all finite (a single NaN weight
    denoises to almost the noisy input without any other sign)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise WeightsError(f"{path}: tensors do not match the model in its metadata ({len(missing)} missing, e.g. "
                           f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise WeightsError(f"{path}: tensor {key} has shape {tuple(tensors[key].shape)}, the model needs {shape}")
    for key in expected:
        if tensors[key].is_floating_point() and not bool(torch.isfinite(tensors[key]).all()):
            bad = int((~torch.isfinite(tensors[key])).sum())
            raise WeightsError(f"{path}: tensor {key} has {bad} NaN/inf value(s); these weights cannot denoise")


def load_weights(name_or_path: str | os.PathLike[str], *, device: str | torch.device = "cpu"):
    """Rebuild the DEQDenoiser stored in a weights file, verify its checksum, load strictly; eval mode.

    Returns:
        (model, metadata) with metadata's JSON entries decoded.
    """
    from safetensors.torch import load_file

    from nerd.models import DEQDenoiser

    path = resolve(name_or_path)
    meta = read_metadata(path)
    model_cfg, solver_cfg, sigma255, scores, train = _decoded(path, meta)
    try:
        tensors = load_file(str(path))
    except Exception as err:
        raise WeightsError(f"cannot read weights {path}: {' '.join(str(err).split())}") from None
    header = "" if meta["format"] == "nerd-1" else _header(meta)
    if tensors_sha256(tensors, header) != meta.get("sha256"):
        raise WeightsError(
            f"checksum mismatch: {path} is corrupt (tensors or model metadata do not match the recorded sha256)"
        )
    # Built on the CPU, not the meta device: weight norm's set-up on meta tensors imports torch._dynamo (about 1 s
    # of every process). The config's ranges bound what the build allocates (ModelConfig, MAX_CHANNELS).
    model = DEQDenoiser(model_cfg, solver=solver_cfg)
    _check_tensors(path, model, tensors)
    model.load_state_dict(tensors, strict=True)
    info: dict[str, Any] = {
        "path": str(path), "name": path.stem, "sigma": sigma255, "scores": scores, "train": train,
        "sha256": meta["sha256"],
    }
    return model.to(device).eval(), info


def list_weights() -> list[str]:
    """One line per shipped file: name, sigma, preset-like summary, recorded scores."""
    lines = []
    for name, path in shipped().items():
        try:
            meta = read_metadata(path)
        except WeightsError as err:
            lines.append(f"{name}: unreadable ({err})")
            continue
        cfg = json.loads(meta["model"])
        scores = json.loads(meta.get("scores", "{}"))
        score_text = ", ".join(f"{k} {v}" for k, v in scores.items() if not isinstance(v, dict))
        lines.append(
            f"{name}: sigma {float(meta['sigma']):g}, {cfg['channels']} channels, q {cfg['window']}"
            + (f"; {score_text}" if score_text else "")
        )
    return lines
