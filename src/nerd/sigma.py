"""The noise level σ: one convention at each boundary, one validator.

Users, the CLI, TOML recipes, file metadata and reports speak σ on the 0-255 scale (`sigma255`: σ 25 is a
standard deviation of 25/255 on [0, 1], whatever the image's bit depth). The models speak the images' own [0, 1]
scale (`sigma`). Every conversion goes through `to_unit` / `to_255`, every check through `check_sigma255`.
"""

from __future__ import annotations

import math

from nerd.errors import ConfigError

MAX_SIGMA255 = 255.0


def check_sigma255(sigma255: object, what: str = "sigma") -> float:
    """`sigma255` as a float when finite and 0 < σ ≤ 255; ConfigError (a NerdError) naming `what` otherwise."""
    try:
        value = float(sigma255)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number on the 0-255 scale, got {sigma255!r}") from None
    if not math.isfinite(value) or not 0 < value <= MAX_SIGMA255:
        raise ConfigError(f"{what} must be in (0, {MAX_SIGMA255:g}] on the 0-255 scale, got {sigma255!r}")
    return value


def to_unit(sigma255: float) -> float:
    """σ on the 0-255 scale -> σ on the images' [0, 1] scale (what `Denoiser.forward(y, sigma)` takes)."""
    return float(sigma255) / MAX_SIGMA255


def to_255(sigma: float) -> float:
    """σ on the [0, 1] scale -> the 0-255 scale."""
    return float(sigma) * MAX_SIGMA255


__all__ = ["MAX_SIGMA255", "check_sigma255", "to_255", "to_unit"]
