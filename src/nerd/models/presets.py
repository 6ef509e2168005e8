"""Named model presets (defined with the configs in `nerd.config`, re-exported here beside the models)."""

from __future__ import annotations

from nerd.config import PRESETS, preset_config

__all__ = ["PRESETS", "preset_config"]
