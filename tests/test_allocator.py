"""nerd.allocator: the command line's malloc tuning keeps large tensors out of fresh mmaps (glibc only)."""

from __future__ import annotations

import ctypes
import sys

import pytest
import torch

from nerd import allocator


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _glibc():  # noqa: ANN202 -- a ctypes library
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc malloc is Linux-only")
    libc = ctypes.CDLL(None)  # the C library the interpreter runs on
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("no mallinfo2 (glibc < 2.33 or another C library)")
    libc.mallinfo2.restype = _Mallinfo2
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc


def _mmapped_by_a_large_tensor(libc) -> int:  # noqa: ANN001
    """Bytes of mmapped chunks that a 64 MiB tensor adds while it lives."""
    before = libc.mallinfo2().hblkhd
    t = torch.ones(64 << 20, dtype=torch.uint8)
    during = libc.mallinfo2().hblkhd
    del t
    return during - before


def test_tune_serves_large_tensors_from_the_heap() -> None:
    libc = _glibc()
    libc.mallopt(allocator.M_MMAP_MAX, 65536)  # glibc's default: large blocks are mmapped
    try:
        assert _mmapped_by_a_large_tensor(libc) >= 64 << 20  # the probe sees an mmap when there is one
        assert allocator.tune({}) == "tuned" and allocator.status == "tuned"
        assert _mmapped_by_a_large_tensor(libc) == 0
    finally:
        allocator.tune({})  # what every CLI test in this process gets anyway


def test_tune_opt_out() -> None:
    try:
        assert allocator.tune({"NERD_MALLOC": " System "}) == "system"
        assert allocator.status == "system"
    finally:
        allocator.tune({})
