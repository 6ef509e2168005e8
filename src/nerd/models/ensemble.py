"""Self-ensemble: the mean of a denoiser's outputs on the square's symmetries of y, each turned back.

The "x8" test mode of KAIR and SwinIR, as a composable wrapper (deepinv calls it `EquivariantDenoiser`): n times
the time, the memory of one solve. The first n of the 8 symmetries are used: quarter turns, then flips.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from nerd.config import check_ensemble
from nerd.data.patches import dihedral, undo_dihedral
from nerd.deq.solvers import SolverStats
from nerd.models.base import Denoiser


def ensemble_solve(
    model: Denoiser, y: Tensor, sigma: float, n: int, *, solver: object = None,
    after_each: Callable[[], None] | None = None,
) -> tuple[Tensor, list[SolverStats]]:
    """Mean of `model` on the first n symmetries of y: (B, C, H, W) -> (float32 (B, C, H, W), statistics).

    A model with `equilibrium` (NERD) is solved with `solver` (None: its own) and its per-solve statistics are
    returned, one per symmetry; any other denoiser is called as `model(y, sigma)` and returns no statistics.
    `after_each` runs after each solve (e.g. to return freed memory to the system).
    """
    check_ensemble(n)
    x_sum, stats = None, []
    for k in range(n):
        y_k = dihedral(y, k)
        if hasattr(model, "equilibrium"):
            eq = model.equilibrium(y_k, sigma, solver=solver)  # type: ignore[operator]
            x_k = eq.x_hat
            stats.append(eq.stats)
            del eq  # before the next solve: the memory of one solve
        else:
            x_k = model(y_k, sigma)
        x_k = undo_dihedral(x_k, k).float()
        x_sum = x_k if x_sum is None else x_sum + x_k
        del x_k
        if after_each is not None:
            after_each()
    return x_sum / n, stats  # type: ignore[operator]


class SelfEnsemble(Denoiser):
    """`forward(y, sigma)` of `model`, averaged over the first `n` symmetries of the square."""

    def __init__(self, model: Denoiser, n: int = 8) -> None:
        super().__init__()
        self.model, self.n = model, check_ensemble(n)

    def forward(self, y: Tensor, sigma: float | Tensor) -> Tensor:
        return ensemble_solve(self.model, y, sigma, self.n)[0]  # type: ignore[arg-type]
