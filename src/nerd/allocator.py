"""Keep glibc's malloc from handing large tensors back to the kernel (Linux CPU runs of the `nerd` command).

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh `mmap` and unmaps it on free.
A whole-image solve allocates many such tensors per f-evaluation (one 48-channel float map of a 1024x644 Urban100
image is 127 MiB), so every one of them is page-faulted in and zeroed by the kernel again: on 2 cores about a third
of a large image's denoise time went to the kernel. `tune()` turns mmap off for the process and raises the trim
threshold, so freed memory stays in the heap and is reused; CUDA memory is not affected (PyTorch caches it).

Measured side by side in `scripts/ab_malloc.py` (results/bench/malloc-ab.json, rendered into the README). The price
is a higher peak resident size (freed memory is kept, and the heap fragments a little). Set `NERD_MALLOC=system`
to keep glibc's defaults, e.g. when tcmalloc or jemalloc is preloaded instead.

Library imports never call this: only the command line (`nerd.cli.main`) does, since it changes the whole process.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping

# mallopt(3) parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

# mallopt takes an int: the largest trim threshold it accepts. Freed memory at the top of the heap is returned
# to the kernel only beyond 2 GiB, so it stays available for the next f-evaluation's tensors.
TRIM_THRESHOLD = 2**31 - 1

ENV = "NERD_MALLOC"

# What the last `tune()` did, for result files ("default" when it was not called: a library caller).
status = "default"


def tune(environ: Mapping[str, str] | None = None) -> str:
    """Apply the setting to this process (idempotent).

    Returns what was done: "tuned", "system" (NERD_MALLOC=system asked for glibc's defaults) or "unavailable"
    (not Linux, no glibc, or mallopt refused).
    """
    global status
    status = _tune(os.environ if environ is None else environ)
    return status


def _tune(environ: Mapping[str, str]) -> str:
    if environ.get(ENV, "").strip().lower() == "system":
        return "system"
    if not sys.platform.startswith("linux"):
        return "unavailable"
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on (no ldconfig lookup)
    except (OSError, AttributeError):  # musl and other C libraries without mallopt
        return "unavailable"
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return "unavailable"
    return "tuned"
