"""One base class for every error that `nerd` reports to a user.

`NerdError` marks a problem with input the user gave (a file, a setting, a folder): the CLI catches it once, prints
one line and exits 2, no traceback. Library callers may catch `NerdError` for all of them, or a subclass for one
kind. A `NerdError` is also a `ValueError`, so callers that caught ValueError before keep working.
"""

from __future__ import annotations


class NerdError(ValueError):
    """Bad input from the user: reported as one line (the CLI exits 2)."""


class ConfigError(NerdError):
    """A config value, TOML recipe or option out of range or unknown."""


class ImageError(NerdError):
    """An image file that cannot be read, written or used as given."""


class WeightsError(NerdError):
    """Unknown, unreadable, corrupt or hostile weights, or a damaged checkpoint."""


class DataError(NerdError):
    """A data folder that is missing or cannot serve as asked (too few images)."""


class DenoiseError(NerdError):
    """The model produced an unusable result (non-finite values): no output is written."""


class EvalError(NerdError):
    """An evaluation that cannot run as asked (missing set, unusable cached rows)."""


class TrainError(NerdError):
    """A training run that cannot start or continue as asked."""


class ExperimentError(NerdError):
    """An experiment that cannot run as asked."""


__all__ = ["ConfigError", "DataError", "DenoiseError", "EvalError", "ExperimentError", "ImageError", "NerdError",
           "TrainError", "WeightsError"]
