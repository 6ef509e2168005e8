"""How gradients reach the parameters of f through an equilibrium z* = f(z*) (paper Sec. V-B).

The forward solve runs under `torch.no_grad()` and keeps no graph. These functions then re-attach z* to the
graph with only the gradient's own steps:

* `phantom_grad`: T damped steps z <- lam f(z) + (1 - lam) z from the detached z* (eq. 16); backprop through them.
* `implicit_grad`: one step z = f(z*) whose incoming gradient is replaced, in a backward hook, by the solution w of
  the linear fixed point w = v + J_f(z*)^T w (eq. 14-15), so dL/dtheta = w^T df/dtheta exactly.
* `unrolled`: the explicit baseline: `steps` damped iterations from z0 with the whole graph kept (BPTT).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from nerd.config import SolverConfig
from nerd.deq.solvers import SolverStats, solve

Map = Callable[[Tensor], Tensor]


def damped_steps(f: Map, z: Tensor, *, steps: int, damping: float) -> Tensor:
    """`steps` iterations of z <- damping * f(z) + (1 - damping) * z, in the caller's graph mode."""
    for _ in range(steps):
        z = damping * f(z) + (1 - damping) * z
    return z


def phantom_grad(f: Map, z_star: Tensor, *, steps: int = 8, damping: float = 0.8) -> Tensor:
    """Phantom gradient (eq. 16): damped steps from the detached equilibrium; returns z_T with its graph.

    At an exact equilibrium z_T = z*, so the forward value is unchanged; the gradient through the T steps
    approximates the implicit one and tends to it as T grows (for 0 < damping <= 1 and a contractive f).
    """
    return damped_steps(f, z_star.detach(), steps=steps, damping=damping)


def implicit_grad(f: Map, z_star: Tensor, *, backward: SolverConfig) -> tuple[Tensor, list[SolverStats]]:
    """Exact implicit differentiation (eq. 14-15) through the equilibrium.

    Returns z = f(z*) (equal to z* at the equilibrium) whose backward pass solves w = v + J_f(z*)^T w with the
    `backward` solver, and a list that receives that solve's statistics once backward has run.
    """
    # One f-evaluation serves both: backward reaches the parameters through z's graph, and the hook asks the same
    # graph for J^T w (inputs=z0 only, so those calls leave the parameters' .grad alone).
    z0 = z_star.detach().requires_grad_(torch.is_grad_enabled())
    z = f(z0)
    backward_stats: list[SolverStats] = []
    if not z.requires_grad:
        return z, backward_stats

    def hook(v: Tensor) -> Tensor:
        handle.remove()  # the J^T w calls below start from z too: without this the hook would call itself

        def vjp_map(w: Tensor) -> Tensor:
            (jtw,) = torch.autograd.grad(z, z0, w, retain_graph=True)
            return jtw + v

        with torch.enable_grad():
            w, stats = solve(vjp_map, torch.zeros_like(v), backward)
        backward_stats.append(stats)
        return w.detach()

    handle = z.register_hook(hook)
    return z, backward_stats


def unrolled(f: Map, z0: Tensor, *, steps: int, damping: float = 1.0) -> Tensor:
    """Backprop through time: `steps` damped iterations from z0, every intermediate kept for backward."""
    return damped_steps(f, z0, steps=steps, damping=damping)
