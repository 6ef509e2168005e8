"""Fixed-point solvers for z = f(z), batched, with per-sample stopping and statistics.

The engine knows nothing about images: `f` maps a tensor of shape (B, ...) to the same shape, and every
sample b of the batch is an independent problem (f must not mix samples). Each solver

* starts from `z0` (zeros by default, as the paper does),
* stops a sample once its relative residual ||f(z) - z|| / ||f(z)|| falls below `tol`, or at `max_iter`
  f-evaluations; a stopped sample no longer changes,
* detects non-finite values and returns, for every sample, the iterate with the lowest residual it saw,
  flagged as not converged, so it never hands back NaN silently,
* returns `(z, SolverStats)`.

Solvers run on whatever graph mode the caller chose; the models call them under `torch.no_grad()`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from nerd.config import SOLVER_NAMES, SolverConfig

Map = Callable[[Tensor], Tensor]
_EPS = 1e-12
_D = SolverConfig()  # the one source of defaults: a keyword left out below takes SolverConfig's value


@dataclass(frozen=True)
class SolverStats:
    """Per-sample outcome of a solve; every tensor has the batch as its first dimension.

    Attributes:
        nfe: (B,) int64, f-evaluations spent on each sample until it stopped.
        abs_residual: (B,) ||f(z) - z|| at the returned z.
        rel_residual: (B,) ||f(z) - z|| / ||f(z)|| at the returned z.
        trace: (B, K) relative residual after each of the K f-evaluations of the run; NaN once a sample stopped.
        converged: (B,) bool, rel_residual < tol.
        finite: (B,) bool, every f-evaluation of the sample was finite (None: not recorded, taken as all finite).
            A sample that met NaN/inf stops on its best finite iterate, which may be far from an equilibrium.
    """

    nfe: Tensor
    abs_residual: Tensor
    rel_residual: Tensor
    trace: Tensor
    converged: Tensor
    finite: Tensor | None = None

    @property
    def all_finite(self) -> bool:
        return self.finite is None or bool(self.finite.all())

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())

    def summary(self) -> str:
        """One line for logs: mean f-evaluations, worst relative residual, converged count."""
        n = self.converged.numel()
        return (
            f"nfe {self.nfe.float().mean().item():.1f}, rel residual max {self.rel_residual.max().item():.2e}, "
            f"converged {int(self.converged.sum())}/{n}"
        )


def _pick(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """torch.where(mask, a, b) with mask (B,) or (B, 1) broadcast, without a full pass when the mask is uniform
    (the common case: every sample active). May return `a` or `b` itself; the solvers never modify states in place."""
    if bool(mask.all()):
        return a
    if not bool(mask.any()):
        return b
    return torch.where(mask.reshape(mask.shape[0], *([1] * (a.dim() - 1))), a, b)


class _Tracker:
    """Residual bookkeeping shared by the solvers: best iterate, activity, trace, f-evaluation counts."""

    def __init__(self, z: Tensor, max_iter: int, tol: float) -> None:
        b = z.shape[0]
        self.tol = tol
        self.best_z = z
        self.best_abs = z.new_full((b,), float("inf"), dtype=torch.float32)
        self.best_rel = z.new_full((b,), float("inf"), dtype=torch.float32)
        self.active = torch.ones(b, dtype=torch.bool, device=z.device)
        self.nfe = torch.zeros(b, dtype=torch.int64, device=z.device)
        self.finite = torch.ones(b, dtype=torch.bool, device=z.device)
        self.trace = z.new_full((b, max_iter), float("nan"), dtype=torch.float32)
        self.k = 0

    def observe(self, z: Tensor, fz: Tensor) -> tuple[Tensor, Tensor]:
        """Record an evaluation fz = f(z) (both (B, N)); returns (finite, rel residual) per sample."""
        # Norms in the state's own dtype: a float32 cast of a float64 state could overflow to inf.
        abs_res = (fz - z).norm(dim=1)
        f_norm = fz.norm(dim=1)
        finite = torch.isfinite(abs_res) & torch.isfinite(f_norm)
        rel_res = (abs_res / (f_norm + _EPS)).float()
        abs_res = abs_res.float()
        was_active = self.active.clone()
        self.nfe += was_active.long()
        self.finite &= finite | ~was_active
        self.trace[:, self.k] = torch.where(was_active, rel_res, torch.full_like(rel_res, float("nan")))
        self.k += 1
        better = was_active & finite & (rel_res < self.best_rel)
        self.best_z = _pick(better, z, self.best_z)
        self.best_abs = torch.where(better, abs_res, self.best_abs)
        self.best_rel = torch.where(better, rel_res, self.best_rel)
        # A sample stops when it converged or produced non-finite values (then its best iterate is returned).
        self.active = was_active & finite & ~(rel_res < self.tol)
        return finite, rel_res

    def result(self, shape: torch.Size) -> tuple[Tensor, SolverStats]:
        # A sample whose very first evaluation was non-finite has no finite iterate but z0 itself.
        best_abs = torch.nan_to_num(self.best_abs, nan=float("inf"))
        stats = SolverStats(
            nfe=self.nfe,
            abs_residual=best_abs,
            rel_residual=torch.nan_to_num(self.best_rel, nan=float("inf")),
            trace=self.trace[:, : self.k],
            converged=self.best_rel < self.tol,
            finite=self.finite,
        )
        return self.best_z.reshape(shape), stats


def _flat(f: Map, shape: torch.Size) -> Callable[[Tensor], Tensor]:
    b = shape[0]

    def f_flat(z: Tensor) -> Tensor:
        return f(z.reshape(shape)).reshape(b, -1).to(z.dtype)

    return f_flat


def fixed_point(
    f: Map, z0: Tensor, *, max_iter: int = _D.max_iter, tol: float = _D.tol, damping: float = _D.damping
) -> tuple[Tensor, SolverStats]:
    """Damped fixed-point iteration z <- (1 - damping) z + damping f(z); damping = 1 is plain iteration.

    Args:
        f: the map, (B, ...) -> (B, ...).
        z0: initial state (B, ...).
    """
    shape, g = z0.shape, _flat(f, z0.shape)
    z = z0.reshape(shape[0], -1)
    track = _Tracker(z, max_iter, tol)
    for _ in range(max_iter):
        fz = g(z)
        track.observe(z, fz)
        if not track.active.any():
            break
        z = _pick(track.active, (1 - damping) * z + damping * fz, z)
    return track.result(shape)


def anderson(
    f: Map,
    z0: Tensor,
    *,
    max_iter: int = _D.max_iter,
    tol: float = _D.tol,
    memory: int = _D.memory,
    ridge: float = _D.ridge,
    damping: float = _D.damping,
) -> tuple[Tensor, SolverStats]:
    """Anderson acceleration (type II) with a ring of `memory` past iterates.

    Each step solves, per sample, min_alpha ||sum_i alpha_i (f(x_i) - x_i)||^2 + ridge ||alpha||^2 with
    sum_i alpha_i = 1 and mixes x <- damping * sum alpha_i f(x_i) + (1 - damping) * sum alpha_i x_i.
    """
    shape, g = z0.shape, _flat(f, z0.shape)
    b = shape[0]
    z = z0.reshape(b, -1)
    n = z.shape[1]
    m = max(1, memory)
    X = z.new_zeros(b, m, n)
    F = z.new_zeros(b, m, n)
    track = _Tracker(z, max_iter, tol)
    x = z
    for k in range(max_iter):
        fx = g(x)
        track.observe(x, fx)
        slot = k % m
        X[:, slot], F[:, slot] = x, fx
        if not track.active.any() or k == max_iter - 1:
            break
        h = min(k + 1, m)
        G = (F[:, :h] - X[:, :h]).double()  # (B, h, N) residuals of the stored iterates
        A = G @ G.transpose(1, 2)  # (B, h, h)
        # Ridge relative to the residuals' scale, so the solver behaves the same at any tolerance.
        scale = A.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-30)[:, None, None]
        A = A + ridge * scale * torch.eye(h, dtype=A.dtype, device=A.device)
        # Solve [[0, 1^T], [1, A]] [nu; alpha] = [1; 0] for alpha (sum alpha = 1).
        H = A.new_zeros(b, h + 1, h + 1)
        H[:, 0, 1:] = 1
        H[:, 1:, 0] = 1
        H[:, 1:, 1:] = A
        rhs = A.new_zeros(b, h + 1, 1)
        rhs[:, 0] = 1
        alpha = torch.linalg.solve(H, rhs)[:, 1:, 0]  # (B, h)
        alpha = torch.nan_to_num(alpha).to(z.dtype)
        x_new = damping * torch.einsum("bh,bhn->bn", alpha, F[:, :h]) + (1 - damping) * torch.einsum(
            "bh,bhn->bn", alpha, X[:, :h]
        )
        # Stopped samples stay at their last iterate (their result is the best one recorded anyway).
        x = _pick(track.active, x_new, x)
    return track.result(shape)


def broyden(
    f: Map,
    z0: Tensor,
    *,
    max_iter: int = _D.max_iter,
    tol: float = _D.tol,
    memory: int = _D.memory,
) -> tuple[Tensor, SolverStats]:
    """Limited-memory ("good") Broyden on g(z) = f(z) - z, the paper's forward solver (Sec. V-A).

    The inverse Jacobian of g is approximated by -I + sum_k u_k v_k^T (Sherman-Morrison updates); only the latest
    `memory` pairs are kept. The step is z <- z - J^-1 g(z), without line search (step size 1).
    """
    shape, f_flat = z0.shape, _flat(f, z0.shape)
    b = shape[0]
    z = z0.reshape(b, -1)
    m = max(1, min(memory, max_iter - 1))  # no more updates than steps: keeps large images' state small
    U = z.new_zeros(b, z.shape[1], m)
    VT = z.new_zeros(b, m, z.shape[1])

    def matvec(x: Tensor) -> Tensor:  # J^-1 x
        return -x + torch.einsum("bnm,bm->bn", U, torch.einsum("bmn,bn->bm", VT, x))

    def rmatvec(x: Tensor) -> Tensor:  # x^T J^-1
        return -x + torch.einsum("bm,bmn->bn", torch.einsum("bn,bnm->bm", x, U), VT)

    track = _Tracker(z, max_iter, tol)
    fz = f_flat(z)
    track.observe(z, fz)
    gz = fz - z
    update = gz  # -J0^-1 g with J0^-1 = -I
    for k in range(1, max_iter):
        if not track.active.any():
            break
        active = track.active[:, None]
        dz = update if bool(active.all()) else torch.where(active, update, 0.0)
        z = z + dz
        fz = f_flat(z)
        finite, _ = track.observe(z, fz)
        gz_new = _pick(finite, fz - z, gz)
        dg = gz_new - gz
        vT = rmatvec(dz)
        denom = (vT * dg).sum(1, keepdim=True)
        ok = active & finite[:, None] & (denom.abs() > _EPS)
        u = (dz - matvec(dg)) / torch.where(ok, denom, torch.ones_like(denom))
        slot = (k - 1) % m
        if not bool(ok.all()):  # no update for stopped samples or a degenerate secant
            u, vT = torch.where(ok, u, 0.0), torch.where(ok, vT, 0.0)
        U[:, :, slot] = u
        VT[:, slot] = vT
        gz = gz_new
        update = -matvec(gz)
        # A sample that produced non-finite values is put back on its best iterate and stops there.
        z = _pick(finite, z, track.best_z)
    return track.result(shape)


@dataclass(frozen=True)
class Solver:
    """A registered forward solver.

    Attributes:
        run: (f, z0, cfg) -> (z, stats), reading the fields of `cfg` it uses.
        history: (cfg, memory) -> how many state-sized vectors the solver keeps at its peak with `memory` stored
            updates (what memory planners such as `nerd.tiling` budget for).
    """

    run: Callable[[Map, Tensor, SolverConfig], tuple[Tensor, SolverStats]]
    history: Callable[[SolverConfig, int], int]


SOLVERS: dict[str, Solver] = {
    # Broyden keeps 2 vectors (u, v) per secant pair, and never more pairs than steps.
    "broyden": Solver(
        run=lambda f, z0, c: broyden(f, z0, max_iter=c.max_iter, tol=c.tol, memory=c.memory),
        history=lambda c, m: 2 * min(m, max(1, c.max_iter - 1)),
    ),
    # Anderson keeps 5 per stored iterate: the iterates, their f-values, the residuals and their float64 copy.
    "anderson": Solver(
        run=lambda f, z0, c: anderson(f, z0, max_iter=c.max_iter, tol=c.tol, memory=c.memory, ridge=c.ridge,
                                      damping=c.damping),
        history=lambda c, m: 5 * m,
    ),
    "fixed_point": Solver(
        run=lambda f, z0, c: fixed_point(f, z0, max_iter=c.max_iter, tol=c.tol, damping=c.damping),
        history=lambda c, m: 0,
    ),
}
assert tuple(SOLVERS) == SOLVER_NAMES, "every solver name of SolverConfig is registered here, in the same order"


def solve(f: Map, z0: Tensor, cfg: SolverConfig) -> tuple[Tensor, SolverStats]:
    """Run the solver that `cfg.name` registers in `SOLVERS` (configs select solvers by name)."""
    return SOLVERS[cfg.name].run(f, z0, cfg)
