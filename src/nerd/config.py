"""Typed configuration: the model, the equilibrium solver, the gradient and the training recipe.

Every config is a frozen dataclass with the paper's values as defaults where the paper states one. Configs are
read from TOML files (sections ``[model]``, ``[solver]``, ``[grad]``, ``[train]``) and travel as JSON inside
checkpoints and shipped weights, so an artefact always carries the settings that made it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

from nerd.errors import ConfigError
from nerd.sigma import check_sigma255

T = TypeVar("T")

Blocks = Literal["both", "nl", "trans"]
EquilibriumKind = Literal["noise", "image"]
SolverName = Literal["broyden", "anderson", "fixed_point"]
GradMode = Literal["phantom", "implicit", "unrolled"]
SOLVER_NAMES: tuple[str, ...] = get_args(SolverName)  # the one list: `nerd.deq.solvers.SOLVERS` registers each
GRAD_MODES: tuple[str, ...] = get_args(GradMode)


ENSEMBLES = (1, 2, 4, 8)  # self-ensemble sizes: the first n of the square's 8 symmetries (nerd.models.ensemble)


def check_ensemble(n: object, what: str = "ensemble") -> int:
    """`n` when it is one of 1, 2, 4, 8; ConfigError naming `what` otherwise."""
    if n not in ENSEMBLES:
        raise ConfigError(f"{what} must be one of {', '.join(map(str, ENSEMBLES))}, got {n!r}")
    return int(n)  # type: ignore[call-overload]


# Defaults at the command-line boundary, one owner each: the image-size limit of `nerd denoise` and `nerd serve`
# (pixels, read from a file's header before decoding), where `nerd serve` listens and how large an upload it takes.
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_SERVE_HOST = "127.0.0.1"
DEFAULT_MAX_UPLOAD_MB = 50.0

MAX_CHANNELS = 1024  # 8x the paper's model (128): a bound for configs read from files (a few hundred MB at most)
MAX_WINDOW = 1023
MAX_ITER = 100_000


def _check_range(cfg: Any, name: str, low: int, high: int) -> None:
    """ConfigError unless field `name` of `cfg` is an int (not a bool) in [low, high]."""
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{type(cfg).__name__}.{name} must be an integer in [{low}, {high}], got {value!r}")


def _check_number(cfg: Any, name: str) -> None:
    """ConfigError unless field `name` of `cfg` is a finite int or float (not a bool)."""
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{type(cfg).__name__}.{name} must be a finite number, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of NERD (paper Sec. III-IV); the defaults are the paper's model (1.40M parameters).

    Attributes:
        channels: feature width of injection, implicit layer and decoder (paper: 128).
        heads: attention heads H of the non-local block (paper: 4, Table VI).
        window: neighbourhood size q: each pixel attends to the q x q window centred on it (paper: 65, Table VIII).
        expansion: width factor of the first 3x3 conv of the transformation block (paper: 4).
        groups: groups of every GroupNorm in the implicit layer (paper: 4).
        blocks: implicit layer = "both" (NL then Trans, eq. 11), "nl" only or "trans" only (Table VII).
        post_norm: end the implicit layer in a GroupNorm (eq. 10: the transformation block's last; Table V); every
            `blocks` variant keeps it, since the NL-only layer has no bounded fixed point without it.
        equilibrium: "noise" decodes x_hat = y + decode(z*) (eq. 5); "image" decodes x_hat = decode(z*) (Table IV).
        weight_norm: weight normalisation of the implicit layer's weights.
        dropout: variational dropout rate in the implicit layer (one mask per forward; off in eval).
        attn_block: side of the query tiles of the exact blocked neighbourhood attention (speed/memory only).
        in_channels: image channels (1: grayscale).
    """

    channels: int = 128
    heads: int = 4
    window: int = 65
    expansion: int = 4
    groups: int = 4
    blocks: Blocks = "both"
    post_norm: bool = True
    equilibrium: EquilibriumKind = "noise"
    weight_norm: bool = True
    dropout: float = 0.0
    attn_block: int = 16
    in_channels: int = 1

    def __post_init__(self) -> None:
        # Ranges first: a config also arrives from files (TOML, weights metadata), and a huge width or window from a
        # hostile file must end in one line, not in an allocation of terabytes.
        for name, low, high in (("channels", 1, MAX_CHANNELS), ("heads", 1, MAX_CHANNELS), ("window", 1, MAX_WINDOW),
                                ("expansion", 1, 8), ("groups", 1, MAX_CHANNELS), ("attn_block", 1, 1024),
                                ("in_channels", 1, 4)):
            _check_range(self, name, low, high)
        _check_number(self, "dropout")
        for name in ("post_norm", "weight_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"ModelConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.channels % self.heads:
            raise ConfigError(f"channels ({self.channels}) must be divisible by heads ({self.heads})")
        if self.channels % self.groups or (self.channels * self.expansion) % self.groups:
            raise ConfigError(f"channels ({self.channels}) must be divisible by groups ({self.groups})")
        if self.window < 1 or self.window % 2 == 0:
            raise ConfigError(f"window q must be odd and >= 1 (centred on the pixel), got {self.window}")
        if self.blocks not in ("both", "nl", "trans"):
            raise ConfigError(f"blocks must be 'both', 'nl' or 'trans', got {self.blocks!r}")
        if self.equilibrium not in ("noise", "image"):
            raise ConfigError(f"equilibrium must be 'noise' or 'image', got {self.equilibrium!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")


# Named model presets: the paper's model, smaller ones sized for CPU training, and a tiny one for tests.
PRESETS: dict[str, ModelConfig] = {
    # The paper's model (Sec. VII-A): 128 features, 4 heads, q = 65; 1.40M parameters.
    "paper": ModelConfig(channels=128, heads=4, window=65),
    # CPU-sized: narrower features and a neighbourhood matched to small training crops.
    "m": ModelConfig(channels=64, heads=4, window=41),
    "s": ModelConfig(channels=48, heads=3, window=33),
    # "s" for RGB images (3 channels in and out): the shipped gray weights' shapes except the image-facing ends, so
    # it trains from them (`nerd.colour.colour_state_from_gray`; configs/gpu/nerd-c25-gpu.toml).
    "s-colour": ModelConfig(channels=48, heads=3, window=33, in_channels=3),
    "xs": ModelConfig(channels=32, heads=2, window=25),
    # For tests: a few thousand parameters.
    "tiny": ModelConfig(channels=8, heads=2, window=7, expansion=2),
}


def preset_config(name: str, **overrides: Any) -> ModelConfig:
    """The ModelConfig of preset `name`, with `overrides` applied (explicit arguments win)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


@dataclass(frozen=True)
class SolverConfig:
    """Forward equilibrium solver (paper Sec. V-A: limited-memory Broyden from z = 0, at most 17 steps).

    Attributes:
        name: "broyden", "anderson" or "fixed_point".
        max_iter: cap on f-evaluations per sample.
        tol: stop a sample once its relative residual ||f(z) - z|| / ||f(z)|| falls below this.
        memory: low-rank updates (Broyden) or past iterates (Anderson) kept; older ones are discarded.
        ridge: Tikhonov term of Anderson's least-squares problem, relative to the mean squared residual.
        damping: Anderson mixing beta, or the step of damped fixed-point iteration (1 = plain iteration).
    """

    name: SolverName = "broyden"
    max_iter: int = 17
    tol: float = 1e-3
    memory: int = 8
    ridge: float = 1e-4
    damping: float = 1.0

    def __post_init__(self) -> None:
        _check_range(self, "max_iter", 1, MAX_ITER)
        _check_range(self, "memory", 1, MAX_ITER)
        for name in ("tol", "ridge", "damping"):
            _check_number(self, name)
        if self.name not in SOLVER_NAMES:
            raise ConfigError(f"unknown solver {self.name!r}: choose {', '.join(SOLVER_NAMES)}")
        if self.max_iter < 1:
            raise ConfigError(f"max_iter must be >= 1, got {self.max_iter}")
        if self.memory < 1:
            raise ConfigError(f"memory must be >= 1, got {self.memory}")
        if not self.tol >= 0:
            raise ConfigError(f"tol must be >= 0 (0: always run max_iter steps), got {self.tol}")
        if not 0 < self.damping <= 1:
            raise ConfigError(f"damping must be in (0, 1], got {self.damping}")
        # Anderson's Gram matrix turns singular once a sample stops and its stored iterates repeat.
        if not (self.ridge > 0 if self.name == "anderson" else self.ridge >= 0):
            raise ConfigError(f"ridge must be {'> 0 for anderson' if self.name == 'anderson' else '>= 0'}, "
                             f"got {self.ridge}")

    def override(self, **changes: Any) -> SolverConfig:
        """This config with the given fields replaced, skipping those given as None (an option not set on a
        command line): the one way settings from a user reach a solver, validated like any SolverConfig."""
        given = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **given) if given else self


@dataclass(frozen=True)
class GradConfig:
    """How gradients re-enter the graph after the no-grad solve (paper Sec. V-B).

    Attributes:
        mode: "phantom" (eq. 16: `steps` damped steps from the detached z*), "implicit" (eq. 14-15: the backward
            linear fixed point solved by `backward`), or "unrolled" (backprop through `steps` damped iterations
            from z = 0: the explicit weight-tied baseline).
        steps: T of the phantom gradient (paper: 8), or the unrolled iterations.
        damping: lambda of eq. (16) (paper: 0.8); also the damping of the unrolled iterations.
        backward: solver of the implicit gradient's linear fixed point.
    """

    mode: GradMode = "phantom"
    steps: int = 8
    damping: float = 0.8
    backward: SolverConfig = field(default_factory=lambda: SolverConfig(name="anderson", max_iter=30, tol=1e-6))

    def __post_init__(self) -> None:
        if self.mode not in GRAD_MODES:
            raise ConfigError(f"unknown gradient mode {self.mode!r}: choose {', '.join(GRAD_MODES)}")
        _check_range(self, "steps", 1, MAX_ITER)
        _check_number(self, "damping")
        if not 0 < self.damping <= 1:  # 0 would give the implicit layer no gradient at all
            raise ConfigError(f"damping (lambda) must be in (0, 1], got {self.damping}")


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe (paper Sec. VII-A; defaults are the paper's where it states them).

    Attributes:
        sigma: noise level(s) on the 0-255 scale; a crop draws one of them uniformly.
        crop: side of the random training crops (paper: 64).
        batch: crops per optimiser step (paper: 4).
        epochs: passes over the data (paper: 100); ignored when `steps` > 0.
        crops_per_image: crops drawn from each image per epoch (paper: 128).
        steps: total optimiser steps; 0 means epochs * images * crops_per_image / batch.
        lr, weight_decay, betas: AdamW (paper: lr 1e-3, betas (0.9, 0.999)); cosine schedule to `lr_min`.
        warmup: linear warm-up steps before the cosine decay.
        grad_clip: max gradient norm (0 disables).
        val_images: images held out of the training folder for validation (the last ones by sorted name).
        val_every: optimiser steps between validations (0: only at the end).
        val_crop: validation images are centre-cropped to this side (0: whole image) to keep validation cheap.
        checkpoint_minutes: wall-clock minutes between atomic checkpoints.
        seed: seeds crops, augmentation, noise and initialisation.
        amp: bf16 autocast ("auto": on CUDA only).
        compile: torch.compile the implicit layer.
        threads: torch threads on the CPU (0: leave PyTorch's default).
        train_iters: solver iterations during training steps (0: the [solver] max_iter, which validation and
            the exported weights use).
        init: weights (name or .safetensors path) to start from, e.g. sigma 25 weights to fine-tune for 15/50,
            or a run's checkpoint (`runs/<name>/last.pt`), whose AdamW moments are carried over as well.
        minutes: when > 0, the run's length is this much training time (validation excluded) rather than a step
            count: the cosine schedule follows the elapsed fraction of it, so a run on an unknown machine still
            decays to `lr_min` when its time is up; `steps` (if > 0) stays an upper bound.
        ema: when > 0, the decay of an exponential moving average of the weights and BatchNorm statistics
            (`torch.optim.swa_utils.AveragedModel`; KAIR keeps one at 0.999): the averaged weights are the ones
            validated, kept as best.safetensors and exported, so the noise of small batches averages out;
            val.csv then also reports the raw weights (`val_psnr_raw`), the same run's control.
    """

    data: str = ""
    sigma: tuple[float, ...] = (25.0,)
    crop: int = 64
    batch: int = 4
    epochs: int = 100
    crops_per_image: int = 128
    steps: int = 0
    lr: float = 1e-3
    lr_min: float = 1e-6
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: int = 0
    grad_clip: float = 0.0
    val_images: int = 8
    val_every: int = 500
    val_crop: int = 0
    checkpoint_minutes: float = 5.0
    log_every: int = 10
    seed: int = 0
    amp: Literal["auto", "on", "off"] = "auto"
    compile: bool = False
    threads: int = 0
    train_iters: int = 0
    init: str = ""
    minutes: float = 0.0
    ema: float = 0.0

    def __post_init__(self) -> None:
        sigma = self.sigma if isinstance(self.sigma, (tuple, list)) else (self.sigma,)  # `sigma = 25` in a TOML
        object.__setattr__(self, "sigma", tuple(float(s) for s in sigma))
        if not self.sigma:
            raise ConfigError("sigma must be one or more noise levels in (0, 255]")
        for s in self.sigma:
            check_sigma255(s, "train.sigma")
        for name, low, high in (("crop", 1, 1 << 15), ("batch", 1, 1 << 16), ("epochs", 0, 1 << 30),
                                ("crops_per_image", 1, 1 << 30), ("steps", 0, 1 << 40), ("warmup", 0, 1 << 40),
                                ("val_images", 0, 1 << 20), ("val_every", 0, 1 << 40), ("val_crop", 0, 1 << 15),
                                ("log_every", 1, 1 << 40), ("seed", 0, 2**63 - 1), ("threads", 0, 4096),
                                ("train_iters", 0, MAX_ITER)):
            _check_range(self, name, low, high)
        for name in ("lr", "lr_min", "weight_decay", "grad_clip", "checkpoint_minutes", "minutes", "ema"):
            _check_number(self, name)
            if getattr(self, name) < 0:
                raise ConfigError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.amp not in ("auto", "on", "off"):
            raise ConfigError(f"amp must be 'auto', 'on' or 'off', got {self.amp!r}")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"ema is a decay in [0, 1) (0: off), got {self.ema}")

    def total_steps(self, n_images: int) -> int:
        """Optimiser steps of the whole run for a training folder of `n_images` images."""
        if self.steps > 0:
            return self.steps
        return max(1, self.epochs * n_images * self.crops_per_image // self.batch)


@dataclass(frozen=True)
class Config:
    """Everything a run needs; `solver` is the forward solver of training (inference may override it)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    grad: GradConfig = field(default_factory=GradConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = "nerd"


def _build(cls: type[T], data: dict[str, Any] | None) -> T:
    """Build dataclass `cls` from a dict, refusing unknown keys (a typo must not pass silently)."""
    data = dict(data or {})
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys {unknown}; known: {sorted(known)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if cls is GradConfig and name == "backward":
            value = _build(SolverConfig, value) if isinstance(value, dict) else value
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Inverse of `config_to_dict`; missing sections take their defaults."""
    unknown = sorted(set(data) - {"model", "solver", "grad", "train", "name"})
    if unknown:
        raise ConfigError(f"unknown config sections {unknown}")
    return Config(
        model=_build(ModelConfig, data.get("model")),
        solver=_build(SolverConfig, data.get("solver")),
        grad=_build(GradConfig, data.get("grad")),
        train=_build(TrainConfig, data.get("train")),
        name=data.get("name", "nerd"),
    )


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of any config dataclass."""
    return dataclasses.asdict(cfg)


def load_config(path: str | Path) -> Config:
    """Read a TOML recipe; `preset = "NAME"` in [model] starts from a named model preset. ConfigError (one line,
    naming the file) when it cannot be read, parsed or validated."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
        model = dict(data.get("model", {}))
        preset = model.pop("preset", None)
        if preset is not None:
            model = {**dataclasses.asdict(preset_config(preset)), **model}
        data["model"] = model
        data.setdefault("name", Path(path).stem)
        return config_from_dict(data)
    except (OSError, ValueError, TypeError, AttributeError) as err:  # TOML syntax: ValueError; wrong types: TypeError
        raise ConfigError(f"bad config {path}: {' '.join(str(err).split())}") from None


def dumps(cfg: Any) -> str:
    """Canonical JSON of a config (sorted keys) for metadata and checkpoints."""
    return json.dumps(config_to_dict(cfg), sort_keys=True)


def model_config_from_json(text: str) -> ModelConfig:
    return _build(ModelConfig, json.loads(text))


def solver_config_from_json(text: str) -> SolverConfig:
    return _build(SolverConfig, json.loads(text))
