"""The DEQ layer's policy: solve for the equilibrium without a graph, then let gradients in the configured way.

This is the one place that decides how a forward pass through an equilibrium runs; a model hands it its map
`f(z)` (a closure over its injection and weights) and a start `z0`, and decodes what comes back. Like the rest of
the engine it knows nothing about images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from nerd.config import GradConfig, SolverConfig
from nerd.deq.grad import implicit_grad, phantom_grad, unrolled
from nerd.deq.solvers import SolverStats, solve

Map = Callable[[Tensor], Tensor]


@dataclass
class DEQSolution:
    """What `deq_solve` returns.

    Attributes:
        z: the state to decode: z* itself under no_grad, else z* re-attached to the graph by the gradient's steps.
        z_star: the equilibrium found by the solver (detached).
        stats: the forward solve's per-sample statistics.
        backward_stats: the implicit gradient's backward solves, appended when backward runs (else empty).
    """

    z: Tensor
    z_star: Tensor
    stats: SolverStats
    backward_stats: list[SolverStats] = field(default_factory=list)


def deq_solve(f: Map, z0: Tensor, solver: SolverConfig, grad: GradConfig) -> DEQSolution:
    """Find z* = f(z*) from z0 (B, ...) with `solver`; with autograd on, attach gradients as `grad` says.

    Under autocast only `f` runs in low precision: the state (>= float32) and the solver's own arithmetic
    (Broyden's low-rank products, Anderson's mixing, the damped steps) stay in the state's dtype.
    """
    dev = z0.device.type
    amp, amp_dtype = torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)
    z0 = z0.to(torch.promote_types(z0.dtype, torch.float32))

    def f_amp(z: Tensor) -> Tensor:
        with torch.autocast(dev, dtype=amp_dtype, enabled=amp):
            return f(z).to(z.dtype)

    with torch.autocast(dev, enabled=False):
        return _solve(f_amp, z0, solver, grad, torch.is_grad_enabled())


def _solve(f: Map, z0: Tensor, solver: SolverConfig, grad: GradConfig, grad_on: bool) -> DEQSolution:
    if grad_on and grad.mode == "unrolled":  # the explicit baseline: the solver only measures where it ended
        z = unrolled(f, z0, steps=grad.steps, damping=grad.damping)
        with torch.no_grad():
            _, stats = solve(f, z.detach(), replace(solver, max_iter=1))
        return DEQSolution(z, z.detach(), stats)
    with torch.no_grad():
        z_star, stats = solve(f, z0, solver)
    if not grad_on:
        return DEQSolution(z_star, z_star, stats)
    if grad.mode == "phantom":
        return DEQSolution(phantom_grad(f, z_star, steps=grad.steps, damping=grad.damping), z_star, stats)
    z, backward_stats = implicit_grad(f, z_star, backward=grad.backward)
    return DEQSolution(z, z_star, stats, backward_stats)
