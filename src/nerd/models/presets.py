"""Named model presets: the paper's model, smaller ones sized for CPU training, and a tiny one for tests."""

from __future__ import annotations

from nerd.config import ModelConfig

PRESETS: dict[str, ModelConfig] = {
    # The paper's model (Sec. VII-A): 128 features, 4 heads, q = 65; 1.40M parameters.
    "paper": ModelConfig(channels=128, heads=4, window=65),
    # CPU-sized: narrower features and a neighbourhood matched to small training crops.
    "m": ModelConfig(channels=64, heads=4, window=41),
    "s": ModelConfig(channels=48, heads=3, window=33),
    "xs": ModelConfig(channels=32, heads=2, window=25),
    # For tests: a few thousand parameters.
    "tiny": ModelConfig(channels=8, heads=2, window=7, expansion=2),
}


def preset_config(name: str, **overrides: object) -> ModelConfig:
    """The ModelConfig of preset `name`, with `overrides` applied (explicit arguments win)."""
    try:
        base = PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None
    from dataclasses import replace

    return replace(base, **overrides)  # type: ignore[arg-type]
