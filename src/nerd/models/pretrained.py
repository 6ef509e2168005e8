"""`nerd.NERD`: the shipped NERD weights behind deepinv's denoiser contract, `forward(x, sigma)`.

    >>> import nerd
    >>> denoiser = nerd.NERD()                       # doctest: +SKIP
    >>> x_hat = denoiser(y, 25 / 255)                # doctest: +SKIP  y: (B, 1 or 3, H, W) on [0, 1]

It is a `deepinv.models.Denoiser` when deepinv imports (so it drops into deepinv's plug-and-play and unrolled
algorithms), else a plain `torch.nn.Module` with the same call; which one is decided once, when this module is first
imported (`DEEPINV`). Each sample is denoised by the weights trained for the noise level nearest its sigma (on a tie
the higher: weights for a little more noise than there is cost less than the other way round, as `nerd denoise`
chooses); each weights file is read once, when a sample first needs it. NERD is a grayscale model: a colour batch
goes through it as 3B grayscale images in one solve (the same noise level in every channel); `NERD(colour=True)`
uses `nerd.colour.SHIPPED` instead, the method of `nerd denoise --colour`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nerd.config import SolverConfig
from nerd.errors import ConfigError, ImageError, WeightsError
from nerd.sigma import check_sigma255, to_255
from nerd.weights import nearest

try:  # deepinv is optional (pip install 'nerd[deepinv]'); a deepinv that cannot load is treated as absent
    from deepinv.models import Denoiser as _Base

    DEEPINV = True
    DEEPINV_ERROR: str | None = None
except (ImportError, RuntimeError, OSError) as _err:  # RuntimeError / OSError: a torchvision built for another torch
    _Base = nn.Module  # type: ignore[assignment,misc]
    DEEPINV = False
    DEEPINV_ERROR = f"{type(_err).__name__}: {_err}"


class NERD(_Base):  # type: ignore[misc,valid-type]
    """The shipped NERD weights as one denoiser: `forward(x, sigma) -> x_hat`.

    Args:
        solver: the equilibrium solver for every solve: a `SolverConfig`, or an int that replaces only the
            `max_iter` of each weights file's own solver (e.g. the budgets measured in docs/performance.md); None
            (default): each file's own solver.
        device: where the models run ("cpu", "cuda", a `torch.device`); the input is moved there and the output
            returned on the input's device. None (default): where the input is.
        weights: the weights to choose from, shipped names or .safetensors paths (`nerd.load_weights`); None
            (default): every shipped file (`nerd.weights.shipped`), read when first needed.
        colour: how a 3-channel batch goes through the gray weights: False (default) R, G, B each on its own,
            one solve; True: `nerd.colour.SHIPPED`, the method of `nerd denoise --colour` (the luminance solved by
            the weights for its own noise level, the colour planes by a guided filter led by it); or a
            `nerd.colour.METHODS` name.

    Call:
        x: (B, C, H, W) float tensor, C = 1 (grayscale) or 3 (colour, each channel with the grayscale model),
            on the [0, 1] scale, noisy (not clipped).
        sigma: the noise standard deviation on the same [0, 1] scale (sigma255 / 255): a float, or a tensor of B
            values (one per sample; any shape with B elements, e.g. (B,) or (B, 1, 1, 1)) or of one.

    Returns:
        x_hat: (B, C, H, W) of x's dtype and device, not clipped. Under `torch.no_grad()` it is decoded straight
        from the equilibrium; with autograd on, gradients follow the weights' own gradient settings (phantom
        gradient), as in training.

    Raises:
        ImageError: x is not a (B, 1 or 3, H, W) floating tensor.
        ConfigError: a sigma outside (0, 1], or not one per sample; a bad solver.
        WeightsError: no weights to choose from, or a file that does not load.
    """

    def __init__(
        self,
        *,
        solver: SolverConfig | int | None = None,
        device: str | torch.device | None = None,
        weights: Sequence[str | os.PathLike[str]] | None = None,
        colour: bool | str = False,
    ) -> None:
        super().__init__()  # deepinv's Denoiser: device "cpu", where a new module already is
        if colour is not False:
            from nerd import colour as nerd_colour

            nerd_colour.method(None if colour is True else colour)  # ConfigError now for an unknown name
        self.colour = colour
        if isinstance(solver, bool) or not (solver is None or isinstance(solver, (int, SolverConfig))):
            raise ConfigError(f"solver must be a SolverConfig or a max_iter int, got {solver!r}")
        if isinstance(solver, int):
            SolverConfig().override(max_iter=solver)  # ConfigError now, not at the first call
        self.solver = solver
        self.run_device = torch.device(device) if device is not None else None
        self._given = [str(w) for w in weights] if weights is not None else None
        if self._given is not None and not self._given:
            raise WeightsError("weights: an empty list; give shipped names or .safetensors paths, or None")
        self._trained: dict[str, float] | None = None  # {name: training sigma255}, read at the first call
        self._paths: dict[str, str] = {}
        self.models = nn.ModuleDict()  # loaded on first need; a module, so .to() / .eval() reach them
        self.eval()

    # --- which weights

    def trained_sigmas(self) -> dict[str, float]:
        """{weights name: the sigma (0-255 scale) it was trained for}, read from the files' metadata once."""
        if self._trained is None:
            from nerd import weights as nerd_weights

            if self._given is None:
                files = {name: str(path) for name, path in nerd_weights.shipped().items()}
            else:
                files = {Path(w).stem if w.endswith(".safetensors") else w: w for w in self._given}
            trained = {}
            for name, where in files.items():
                trained[name] = check_sigma255(nerd_weights.read_metadata(where)["sigma"], f"{name}: sigma")
            if not trained:
                raise WeightsError("no shipped weights are installed to choose from; pass weights=[NAME|PATH, ...]")
            self._paths, self._trained = files, trained
        return self._trained

    def weights_for(self, sigma: float | Tensor, batch: int = 1) -> list[str]:
        """The weights name each of `batch` samples with noise level `sigma` ([0, 1] scale) is denoised with."""
        trained = self.trained_sigmas()
        return [nearest(s, trained) for s in self._sigma255(sigma, batch).tolist()]

    def _model(self, name: str, device: torch.device) -> Any:
        """The DEQDenoiser of weights `name` on `device`, read from its file the first time."""
        key = re.sub(r"[^0-9A-Za-z_-]", "_", name)  # ModuleDict keys: no dots
        if key not in self.models:
            from nerd import weights as nerd_weights

            model, _ = nerd_weights.load_weights(self._paths[name], device=device)
            self.models[key] = model.train(self.training)
        model = self.models[key]
        if next(model.parameters()).device != device:
            model.to(device)
        return model

    # --- the call

    @staticmethod
    def _sigma255(sigma: float | Tensor, batch: int) -> Tensor:
        """(batch,) float64 sigma on the 0-255 scale, each checked: 0 < sigma <= 1 on the [0, 1] scale."""
        if isinstance(sigma, Tensor):
            flat = sigma.detach().reshape(-1).to("cpu", torch.float64)
            if flat.numel() == 1:
                flat = flat.expand(batch)
            elif flat.numel() != batch:
                raise ConfigError(f"sigma has {flat.numel()} values for a batch of {batch}; give one, or one each")
            values = flat.tolist()
        else:
            if not _number(sigma):
                raise ConfigError(f"sigma must be a number or a tensor on the [0, 1] scale, got {sigma!r}")
            values = [float(sigma)] * batch
        for s in values:
            if not 0 < s <= 1:  # also NaN
                raise ConfigError(f"sigma must be in (0, 1] (the images' scale: sigma255 / 255), got {s:g}")
        return torch.tensor([to_255(s) for s in values], dtype=torch.float64)

    def forward(self, x: Tensor, sigma: float | Tensor, **kwargs: Any) -> Tensor:
        """Denoise x: (B, 1 or 3, H, W) on [0, 1] with noise std `sigma` (same scale; float or one per sample)."""
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] not in (1, 3) or not x.is_floating_point():
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ImageError(f"NERD takes a (B, 1 or 3, H, W) floating tensor on [0, 1], got {shape}")
        b, c, h, w = x.shape
        sigma255 = self._sigma255(sigma, b)
        trained = self.trained_sigmas()
        names = [nearest(s, trained) for s in sigma255.tolist()]
        device = self.run_device or x.device
        y = x.to(device, torch.float32)
        if c == 3 and self.colour is not False:  # nerd.colour's method: planes by weights file, one solve each
            from nerd.colour import denoise_colour_batch

            out = denoise_colour_batch(y, sigma255, trained, lambda name: self._model(name, device),
                                       self._solver_for, None if self.colour is True else self.colour)
            return out.to(x.device, x.dtype)
        out = torch.empty_like(y)
        for name in dict.fromkeys(names):  # each weights file once, in order of first use
            idx = [i for i, n in enumerate(names) if n == name]
            model = self._model(name, device)
            part = y[idx]
            gray = c != model.cfg.in_channels
            if gray:  # a colour batch through the grayscale model: (n, 3, H, W) -> (3n, 1, H, W), one solve
                part = part.reshape(len(idx) * c, 1, h, w)
            s = (sigma255[idx] / 255.0).to(device, torch.float32)
            s = s.repeat_interleave(c) if gray else s
            out[idx] = model(part, s, solver=self._solver_for(model, part)).reshape(len(idx), c, h, w).to(out.dtype)
        return out.to(x.device, x.dtype)

    def _solver_for(self, model: Any, y: Tensor) -> SolverConfig:
        """The solver of one batched solve: the override or the file's own, its history bounded for this state's
        size as `nerd.denoise.denoise_image` bounds it."""
        from nerd.tiling import fit_memory

        if isinstance(self.solver, SolverConfig):
            solver = self.solver
        elif isinstance(self.solver, int):
            solver = model.solver.override(max_iter=self.solver)
        else:
            solver = model.solver
        return fit_memory(solver, model.cfg.channels * y[:1].numel())  # per image, as denoise_image

    def extra_repr(self) -> str:
        known = ", ".join(f"{n} (sigma {s:g})" for n, s in (self._trained or {}).items()) or "read at first call"
        return f"weights: {known}; solver: {self.solver!r}; deepinv: {DEEPINV}"


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


__all__ = ["DEEPINV", "NERD", "nearest"]
