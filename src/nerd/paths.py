"""Where the data sets and the baseline weights are: the one place that resolves those folders.

Nothing here looks for a repository layout: an installed package finds its folders from the user's word (an
option such as `--data` / `--anchors`), the environment (`$NERD_DATA`, `$NERD_ANCHORS`), or `../shared/...` from
the working folder (where a checkout of this project keeps them beside it). Denoising needs none of them.
"""

from __future__ import annotations

import os
from pathlib import Path

from nerd.errors import NerdError

DATA_HELP = (
    "the test sets (Set12, BSD68, Urban100; Train400 for training) are public: download them (see "
    "docs/evaluation.md, 'Data') into one folder of set folders, then give --data DIR or set NERD_DATA=DIR"
)


def _resolve(given: str | os.PathLike[str] | None, env: str, shared: str) -> Path:
    if given:
        return Path(given)
    if os.environ.get(env):
        return Path(os.environ[env])
    return (Path.cwd() / ".." / "shared" / shared).resolve()


def data_root(given: str | os.PathLike[str] | None = None) -> Path:
    """The folder of data sets: `given` (--data), else $NERD_DATA, else ../shared/data from the working folder.
    It may not exist: `data_folder` checks a set inside it."""
    return _resolve(given, "NERD_DATA", "data")


def anchors_root(given: str | os.PathLike[str] | None = None) -> Path:
    """The folder of baseline weights: `given` (--anchors), else $NERD_ANCHORS, else ../shared/anchors."""
    return _resolve(given, "NERD_ANCHORS", "anchors")


def data_folder(name: str, given: str | os.PathLike[str] | None = None) -> Path:
    """The set folder `name` (e.g. "Train400") inside `data_root(given)`; NerdError saying how to get it if absent."""
    folder = data_root(given) / name
    if not folder.is_dir():
        raise NerdError(f"data set {name} not found at {folder}: {DATA_HELP}")
    return folder


__all__ = ["DATA_HELP", "anchors_root", "data_folder", "data_root"]
