"""Keep glibc's malloc from handing large tensors back to the kernel (Linux CPU runs of the `nerd` command).

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh `mmap` and unmaps it on free.
A whole-image solve allocates many such tensors per f-evaluation (one 48-channel float map of a 1024x644 Urban100
image is 121 MiB), so every one of them is page-faulted in and zeroed by the kernel again. `tune()` turns mmap off
and trimming on free, so freed memory stays in the heap and is reused; CUDA memory is not affected
(PyTorch caches it). What this covers: the main thread's allocations, which is where the command's tensors are
made (glibc still mmaps blocks above 64 MiB that other threads ask for). Between images, `release()` hands the
free heap back to the kernel, so that a process that has denoised a large image does not hold its memory after.

Measured side by side in `scripts/ab_malloc.py` (results/bench/malloc-ab.json, in docs/performance.md): kernel
time and wall time per image, and the price, a higher peak resident size (freed memory is kept, and the heap
fragments). Set `NERD_MALLOC=system` to keep glibc's defaults. Nothing is changed either when a malloc library is
preloaded (tcmalloc, jemalloc, mimalloc: LD_PRELOAD names it) or when the user set glibc's own malloc variables.

Library imports never call this: only the command line (`nerd.cli.main`) does, since it changes the whole process.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings
from collections.abc import Mapping

# mallopt(3) parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

# Freed memory at the top of the heap is never handed back on free (-1: mallopt takes an int, glibc stores it as
# the largest size_t), so it stays for the next f-evaluation's tensors; `release()` hands it back between images.
# A 2 GiB threshold still trimmed the large temporaries of a 1 MP image (more kernel time and a higher peak).
TRIM_THRESHOLD = -1

ENV = "NERD_MALLOC"
# glibc's own ways to set what tune() sets: a user who chose them keeps them.
GLIBC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")
PRELOADED = ("malloc", "jemalloc")  # substrings of preloaded allocator libraries: tcmalloc, jemalloc, mimalloc

# What the last `tune()` did, for result files ("default" when it was not called: a library caller).
status = "default"


def tune(environ: Mapping[str, str] | None = None) -> str:
    """Apply the setting to this process, reading NERD_MALLOC and friends from `environ` (default: os.environ).

    Returns what was done: "tuned"; "system" (NERD_MALLOC=system asked for glibc's defaults); "preloaded" (another
    allocator is preloaded); "user" (glibc's malloc variables are set); "unavailable" (not Linux, no glibc, or
    mallopt refused). Calling it again is harmless, but "system" does not undo an earlier "tuned".
    """
    global status
    status = _tune(os.environ if environ is None else environ)
    return status


def _tune(environ: Mapping[str, str]) -> str:
    choice = environ.get(ENV, "").strip().lower()
    if choice == "system":
        return "system"
    if choice not in ("", "tuned"):
        warnings.warn(f"{ENV}={environ[ENV]!r} is not 'system' or 'tuned': tuning malloc", stacklevel=3)
    if not sys.platform.startswith("linux"):
        return "unavailable"
    if any(key in environ.get("LD_PRELOAD", "") for key in PRELOADED):
        return "preloaded"  # its mallopt is a no-op or glibc's, which would not govern malloc: nothing to do
    if any(key in environ for key in GLIBC_ENV) or "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return "user"
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


def release() -> None:
    """Hand the heap's free memory back to the kernel (`malloc_trim`), if `tune()` tuned this process.

    Called between images: it costs fresh pages for the next image once, not once per f-evaluation, and it keeps a
    long run's resident size at what the current image needs. A no-op in a process `tune()` did not tune.
    """
    if status == "tuned":
        ctypes.CDLL(None).malloc_trim(ctypes.c_size_t(0))
