"""Solvers reach their tolerance on known problems, per sample, and never return NaN."""

from __future__ import annotations

import pytest
import torch

from nerd.config import SolverConfig
from nerd.deq import anderson, broyden, fixed_point, solve


def affine_contraction(n: int, b: int, top: float, seed: int = 0):
    """f(z) = A z + c with symmetric A of eigenvalues in [0, top]; returns f and the exact fixed points (b, n)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.linspace(0, top, n, dtype=torch.float64)) @ q.T
    c = torch.randn(b, n, generator=g, dtype=torch.float64)
    z_star = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - a, c.T).T
    return (lambda z: z @ a.T + c), z_star


SOLVER_CALLS = {
    "fixed_point": lambda f, z0, tol: fixed_point(f, z0, max_iter=400, tol=tol),
    "anderson": lambda f, z0, tol: anderson(f, z0, max_iter=100, tol=tol, memory=6),
    "broyden": lambda f, z0, tol: broyden(f, z0, max_iter=100, tol=tol, memory=40),
}


@pytest.mark.parametrize("name", list(SOLVER_CALLS))
def test_reaches_tolerance_and_fixed_point(name):
    f, z_star = affine_contraction(40, 3, 0.8)
    z, stats = SOLVER_CALLS[name](f, torch.zeros_like(z_star), 1e-8)
    assert stats.converged.all()
    assert (stats.rel_residual < 1e-8).all()
    torch.testing.assert_close(z, z_star, rtol=0, atol=1e-6)
    assert stats.nfe.shape == (3,) and stats.trace.shape[0] == 3
    # each sample's trace holds nfe residuals, then NaN; its last entry is the final residual
    for b in range(3):
        n = int(stats.nfe[b])
        assert not stats.trace[b, :n].isnan().any() and stats.trace[b, n:].isnan().all()
        assert stats.trace[b, n - 1] == stats.rel_residual[b]
    assert_residuals_at(f, z, stats)


def assert_residuals_at(f, z, stats):
    """The statistics describe the returned z: its residuals recomputed, and the lowest of the trace."""
    fz = f(z)
    abs_res = (fz - z).reshape(len(z), -1).norm(dim=1)
    rel_res = abs_res / fz.reshape(len(z), -1).norm(dim=1)
    torch.testing.assert_close(stats.abs_residual, abs_res.float(), rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(stats.rel_residual, rel_res.float(), rtol=1e-4, atol=1e-12)
    lowest = torch.where(stats.trace.isnan(), torch.inf, stats.trace).min(dim=1).values
    assert torch.equal(stats.rel_residual, lowest)


def test_accelerated_solvers_need_fewer_evaluations_on_ill_conditioned_map():
    f, z_star = affine_contraction(60, 2, 0.95)
    z0 = torch.zeros_like(z_star)
    _, plain = fixed_point(f, z0, max_iter=2000, tol=1e-6)
    _, acc = anderson(f, z0, max_iter=200, tol=1e-6, memory=8)
    _, broy = broyden(f, z0, max_iter=200, tol=1e-6, memory=60)
    assert plain.converged.all() and acc.converged.all() and broy.converged.all()
    assert acc.nfe.max() < plain.nfe.min() / 3
    assert broy.nfe.max() < plain.nfe.min() / 3


@pytest.mark.parametrize("name", list(SOLVER_CALLS))
def test_per_sample_stopping(name):
    """An easy and a hard sample in one batch: different f-evaluations; the easy one stops changing."""
    n = 30
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    scales = torch.tensor([0.1, 0.9], dtype=torch.float64)  # sample 0 contracts fast, sample 1 slowly
    a = q @ torch.diag(torch.linspace(0.5, 1.0, n, dtype=torch.float64)) @ q.T
    c = torch.randn(2, n, generator=g, dtype=torch.float64)
    calls = []

    def f(z):
        calls.append(z.clone())
        return scales[:, None] * (z @ a.T) + c

    z, stats = SOLVER_CALLS[name](f, torch.zeros(2, n, dtype=torch.float64), 1e-7)
    assert stats.converged.all()
    assert stats.nfe[0] < stats.nfe[1]
    # the stopping rule: each sample stops at the first evaluation whose residual is below tol
    for b in range(2):
        below = (stats.trace[b] < 1e-7).nonzero()
        assert int(stats.nfe[b]) == int(below[0]) + 1
    assert_residuals_at(f, z, stats)
    # after sample 0 stopped, the states passed to f for it no longer change
    stopped = int(stats.nfe[0])
    later = [c_[0] for c_ in calls[stopped:]]
    assert all(torch.equal(later[0], t) for t in later)


@pytest.mark.parametrize("name", list(SOLVER_CALLS))
def test_no_fixed_point_reported_not_converged_and_finite(name):
    z, stats = SOLVER_CALLS[name](lambda z: z + 1.0, torch.zeros(2, 5, dtype=torch.float64), 1e-4)
    assert not stats.converged.any()
    assert torch.isfinite(z).all()
    cap = {"fixed_point": 400, "anderson": 100, "broyden": 100}[name]
    assert stats.nfe.tolist() == [cap, cap] and stats.trace.shape == (2, cap)
    assert_residuals_at(lambda z: z + 1.0, z, stats)


@pytest.mark.parametrize("name", list(SOLVER_CALLS))
def test_divergence_to_inf_returns_best_finite_iterate(name):
    z, stats = SOLVER_CALLS[name](lambda z: 10 * torch.exp(z), torch.zeros(2, 5, dtype=torch.float64), 1e-4)
    assert not stats.converged.any()
    assert torch.isfinite(z).all()
    assert torch.isfinite(stats.rel_residual).all()
    assert_residuals_at(lambda z: 10 * torch.exp(z), z, stats)  # the best finite iterate, not the last


def test_solve_dispatch_and_unknown_name():
    f, z_star = affine_contraction(10, 1, 0.5)
    for name in ("broyden", "anderson", "fixed_point"):
        z, stats = solve(f, torch.zeros_like(z_star), SolverConfig(name=name, max_iter=200, tol=1e-9, memory=10))
        torch.testing.assert_close(z, z_star, rtol=0, atol=1e-7)
    with pytest.raises(ValueError):
        SolverConfig(name="newton")


def test_solve_passes_every_setting():
    """solve() hands non-default memory, ridge and damping to the solver it names."""
    f, z_star = affine_contraction(30, 2, 0.9)
    z0 = torch.zeros_like(z_star)
    direct = {
        "broyden": broyden(f, z0, max_iter=9, tol=1e-12, memory=3),
        "anderson": anderson(f, z0, max_iter=9, tol=1e-12, memory=3, ridge=0.3, damping=0.6),
        "fixed_point": fixed_point(f, z0, max_iter=9, tol=1e-12, damping=0.6),
    }
    for name, (z_ref, stats_ref) in direct.items():
        cfg = SolverConfig(name=name, max_iter=9, tol=1e-12, memory=3, ridge=0.3, damping=0.6)
        z, stats = solve(f, z0, cfg)
        assert torch.equal(z, z_ref) and torch.equal(stats.trace, stats_ref.trace)
    # and the settings matter, so the comparison above can fail
    assert not torch.equal(direct["broyden"][0], broyden(f, z0, max_iter=9, tol=1e-12, memory=8)[0])
    assert not torch.equal(direct["anderson"][0], anderson(f, z0, max_iter=9, tol=1e-12, memory=3)[0])


def test_shapes_beyond_two_dimensions():
    f, z_star = affine_contraction(2 * 3 * 4, 2, 0.5)
    g = lambda z: f(z.reshape(2, -1)).reshape(2, 2, 3, 4)  # noqa: E731
    z, stats = broyden(g, torch.zeros(2, 2, 3, 4, dtype=torch.float64), max_iter=60, tol=1e-9, memory=30)
    assert z.shape == (2, 2, 3, 4)
    torch.testing.assert_close(z.reshape(2, -1), z_star, rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", list(SOLVER_CALLS))
def test_mixed_batch_one_sample_converges_one_diverges(name):
    """Sample 0 is a contraction, sample 1 blows up to inf: each gets its own outcome, nothing is NaN."""

    def f(z):
        return torch.stack([0.5 * z[0] + 1.0, 10 * torch.exp(z[1])])

    z, stats = SOLVER_CALLS[name](f, torch.zeros(2, 4, dtype=torch.float64), 1e-8)
    assert stats.converged.tolist() == [True, False]
    torch.testing.assert_close(z[0], torch.full((4,), 2.0, dtype=torch.float64), rtol=0, atol=1e-6)
    assert torch.isfinite(z).all() and torch.isfinite(stats.rel_residual).all()
