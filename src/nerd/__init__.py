"""nerd: the Noise Equilibrium Reaching Denoiser (Chen et al.), an implicit (deep-equilibrium) image denoiser.

`import nerd` is cheap: torch and the rest load when a name below is first used.

    >>> import nerd
    >>> model = nerd.create_model("tiny")            # doctest: +SKIP
    >>> model, info = nerd.load_weights("nerd-s25")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "create_model": "nerd.models",
    "DEQDenoiser": "nerd.models",
    "Denoiser": "nerd.models",
    "load_weights": "nerd.weights",
    "save_weights": "nerd.weights",
    "ModelConfig": "nerd.config",
    "SolverConfig": "nerd.config",
    "GradConfig": "nerd.config",
    "TrainConfig": "nerd.config",
    "load_config": "nerd.config",
    "NERD": "nerd.models.pretrained",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nerd' has no attribute {name!r}")
