"""Denoisers: NERD (`DEQDenoiser`) and the baselines, all with `forward(y, sigma)`."""

from __future__ import annotations

from dataclasses import replace

import torch

from nerd.config import GradConfig, ModelConfig, SolverConfig
from nerd.models.base import Denoiser
from nerd.models.nerd import DEQDenoiser, Equilibrium
from nerd.models.presets import PRESETS, preset_config


def create_model(
    preset: str | ModelConfig = "paper",
    *,
    solver: SolverConfig | None = None,
    grad: GradConfig | None = None,
    **overrides: object,
) -> DEQDenoiser:
    """Build NERD from a preset name (or a ModelConfig) with `overrides` of its fields."""
    cfg = preset_config(preset, **overrides) if isinstance(preset, str) else replace(preset, **overrides)  # type: ignore[arg-type]
    return DEQDenoiser(cfg, solver=solver, grad=grad)


def count_parameters(model: torch.nn.Module) -> int:  # noqa: F821
    return sum(p.numel() for p in model.parameters())


__all__ = ["PRESETS", "DEQDenoiser", "Denoiser", "Equilibrium", "count_parameters", "create_model", "preset_config"]
