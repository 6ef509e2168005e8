"""nerd.allocator: the command line's malloc tuning keeps large tensors out of fresh mmaps and in the heap."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from nerd import allocator

# Runs in a fresh interpreter, so that the heap holds nothing from other tests. Prints, for a 64 MiB tensor: the
# mmapped bytes it adds under glibc's defaults; the heap bytes given back when it is freed with mmap off but glibc's
# initial trim threshold; then, after tune(), the mmapped bytes it adds, the heap bytes given back on free, and the
# heap growth of a second tensor half its size; last, the resident bytes that release() hands back.
PROBE = r"""
import ctypes, json, os, sys
import torch
from nerd import allocator

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                                "uordblks", "fordblks", "keepcost")]
class InfoOld(ctypes.Structure):  # glibc < 2.33: int fields, enough for a few hundred MiB
    _fields_ = [(n, ctypes.c_int) for n, _ in Info._fields_]

libc = ctypes.CDLL(None)
if hasattr(libc, "mallinfo2"):
    libc.mallinfo2.restype = Info
    info = libc.mallinfo2
elif hasattr(libc, "mallinfo"):
    libc.mallinfo.restype = InfoOld
    info = libc.mallinfo
else:
    print(json.dumps(None)); sys.exit()
libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
N = 64 << 20

def probe(n=N, plain=False):
    # A tensor, or (plain) a bare malloc block: nothing else is allocated between its malloc and its free, so it
    # sits at the top of the heap, where glibc trims (a tensor's own small blocks may land above its storage).
    before = info()
    t = libc.malloc(n) if plain else torch.ones(n, dtype=torch.uint8)
    during = info()
    libc.free(t) if plain else None
    del t
    after = info()
    return {"mmapped": during.hblkhd - before.hblkhd, "grown": during.arena - before.arena,
            "given_back": during.arena - after.arena}

out = {"defaults": probe()}
libc.mallopt(allocator.M_MMAP_MAX, 0)
libc.mallopt(allocator.M_TRIM_THRESHOLD, 128 * 1024)  # glibc's initial value (the first free may have raised it)
out["mmap_off"] = probe(plain=True)
out["status"] = allocator.tune({})
out["tuned"] = probe()
out["tuned_plain"] = probe(2 * N, plain=True)  # larger than any hole: on top of the heap
out["tuned_again"] = probe(N // 2)
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
before = rss()
allocator.release()
out["released"] = before - rss()
print(json.dumps(out))
"""


def test_tune_serves_large_tensors_from_the_heap_and_keeps_them() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc malloc is Linux-only")
    if any(key in os.environ.get("LD_PRELOAD", "") for key in allocator.PRELOADED):
        pytest.skip("another allocator is preloaded")
    env = {k: v for k, v in os.environ.items() if k not in allocator.GLIBC_ENV and k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    out = json.loads(done.stdout)
    if out is None:
        pytest.skip("no mallinfo in this C library")
    n = 64 << 20
    assert out["defaults"]["mmapped"] >= n  # the probe sees the mmap glibc makes by default
    assert out["mmap_off"]["mmapped"] == 0 and out["mmap_off"]["given_back"] >= n  # ...and the trim on free
    assert out["status"] == "tuned"
    assert out["tuned"]["mmapped"] == 0  # in the heap...
    assert out["tuned_plain"]["grown"] > 0 and out["tuned_plain"]["given_back"] == 0  # ...and kept when freed
    # A later, smaller tensor reuses that memory: no new pages from the kernel. (One of the same size may not: torch
    # asks for 64-byte-aligned blocks, and glibc 2.36's memalign asks for more than the freed block holds.)
    assert out["tuned_again"]["grown"] == 0
    assert out["released"] >= n  # release(), between images, hands the kept memory back to the kernel


def test_tune_leaves_other_choices_alone() -> None:
    try:
        assert allocator.tune({"NERD_MALLOC": " System "}) == "system" and allocator.status == "system"
        if sys.platform.startswith("linux"):
            preload = {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"}
            assert allocator.tune(preload) == "preloaded"
            assert allocator.tune({"MALLOC_MMAP_MAX_": "0"}) == "user"
            assert allocator.tune({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}) == "user"
        with pytest.warns(UserWarning, match="NERD_MALLOC"):
            allocator.tune({"NERD_MALLOC": "sytem"})  # a typo tunes, with a warning
    finally:
        allocator.tune({})  # what every CLI test in this process gets anyway
