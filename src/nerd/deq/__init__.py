"""The DEQ engine: fixed-point solvers and gradients through equilibria. It knows nothing about images."""

from nerd.deq.core import DEQSolution, deq_solve
from nerd.deq.grad import damped_steps, implicit_grad, phantom_grad, unrolled
from nerd.deq.solvers import SOLVERS, Solver, SolverStats, anderson, broyden, fixed_point, solve

__all__ = [
    "DEQSolution",
    "SOLVERS",
    "Solver",
    "deq_solve",
    "SolverStats",
    "anderson",
    "broyden",
    "damped_steps",
    "fixed_point",
    "implicit_grad",
    "phantom_grad",
    "solve",
    "unrolled",
]
