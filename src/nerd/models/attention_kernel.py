"""The CPU kernel of exact neighbourhood attention (csrc/neighbourhood_attention.cpp), compiled on first use.

The kernel visits exactly the keys of each query's window, where the blocked SDPA path computes every query tile
against its whole halo and masks the rest (2.1x the useful scores at q 33). It is compiled with the machine's C++
compiler the first time a process needs it (about a minute, then cached by PyTorch in ~/.cache/torch_extensions),
with the vector instructions that this CPU has (decided at run time: AVX-512, AVX2 or plain C++).

Where it cannot be used, `neighbourhood_attention` falls back to the SDPA path with the same result: no C++
compiler (one note on stderr), a GPU tensor, a dtype other than float32/float64, tracing for ONNX or
torch.compile, or ``NERD_ATTENTION=sdpa`` in the environment.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

SOURCE = Path(__file__).resolve().parent / "csrc" / "neighbourhood_attention.cpp"
_FLAGS = {  # torch.backends.cpu.get_cpu_capability() -> flags that let ATen's vector types use those instructions
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512",
               "-DCPU_CAPABILITY=AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
}


def enabled() -> bool:
    """False when the environment asks for the SDPA path (NERD_ATTENTION=sdpa)."""
    return os.environ.get("NERD_ATTENTION", "auto").lower() != "sdpa"


@functools.cache
def load() -> ModuleType | None:
    """The compiled kernel module, or None (and one note on stderr) when it cannot be built here."""
    from torch.utils import cpp_extension

    capability = torch.backends.cpu.get_cpu_capability()
    # -fopenmp: at::parallel_for is inlined into this extension and runs its loop on one thread without it
    flags = ["-O3", "-fopenmp", *_FLAGS.get(capability, [])]
    text = SOURCE.read_bytes()
    digest = hashlib.sha256(text + " ".join(flags).encode()).hexdigest()[:12]
    name = f"nerd_na_{capability.lower()}_{digest}"  # one build per source and flags, shared by every checkout
    build = Path(cpp_extension._get_build_directory(name, verbose=False))
    source = build / "neighbourhood_attention.cpp"  # a fixed path: a build is reused from any install's copy
    try:
        if not (build / f"{name}.so").exists():
            print("nerd: compiling the CPU attention kernel (once, about a minute)...", file=sys.stderr, flush=True)
        if not source.is_file() or source.read_bytes() != text:
            source.write_bytes(text)
        return cpp_extension.load(name=name, sources=[str(source)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                                   verbose=False)
    except Exception as err:  # no compiler, no headers, a failed build: the SDPA path gives the same result
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"nerd: the CPU attention kernel could not be built ({first}); using the slower SDPA path",
              file=sys.stderr, flush=True)
        return None


def usable(q: Tensor) -> bool:
    """Whether `neighbourhood_attention` may run the kernel on q: (B, heads, H, W, d)."""
    if not enabled() or q.device.type != "cpu" or q.dtype not in (torch.float32, torch.float64):
        return False
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
        return False
    return load() is not None


class _Attention(torch.autograd.Function):
    """o = softmax over each q x q window of (q k^T / sqrt(d)) v, exactly; gradients for q, k and v."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, r: int) -> Tensor:  # (P, H, W, d) each
        kernel = load()
        scale = 1.0 / math.sqrt(q.shape[-1])
        o, lse = kernel.forward(q, k, v, r, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.r, ctx.scale = r, scale
        return o

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        q, k, v, o, lse = ctx.saved_tensors
        dout = dout.contiguous()
        D = (dout * o).sum(-1)  # (P, H, W): the softmax's backward term, one per query
        dq, dk, dv = load().backward(q, k, v, dout, lse, D, ctx.r, ctx.scale)
        return dq, dk, dv, None


def attention(q: Tensor, k: Tensor, v: Tensor, window: int) -> Tensor:
    """Exact neighbourhood attention with the kernel: q, k, v (B, heads, H, W, d) -> (B, heads, H, W, d)."""
    b, n, h, w, d = q.shape
    flat = [t.reshape(b * n, h, w, d).contiguous() for t in (q, k, v)]
    return _Attention.apply(*flat, window // 2).reshape(b, n, h, w, d)
