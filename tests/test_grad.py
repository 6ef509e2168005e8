"""Gradients through the equilibrium: implicit = exact, phantom -> implicit as T grows, BPTT = plain autograd."""

from __future__ import annotations

from dataclasses import replace

import torch

from nerd.config import SolverConfig
from nerd.deq import anderson, implicit_grad, phantom_grad, unrolled

TIGHT = SolverConfig(name="anderson", max_iter=200, tol=1e-13, memory=8)


def problem(seed: int = 0, n: int = 12, b: int = 3):
    """f(z) = tanh(W z + U x): contractive (||W|| <= 0.6); parameters W, U in float64."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, n, generator=g, dtype=torch.float64)
    w = (0.6 * w / torch.linalg.matrix_norm(w, 2)).requires_grad_()
    u = (0.5 * torch.randn(n, n, generator=g, dtype=torch.float64)).requires_grad_()
    x = torch.randn(b, n, generator=g, dtype=torch.float64)
    c = torch.randn(b, n, generator=g, dtype=torch.float64)

    def f(z):
        return torch.tanh(z @ w.T + x @ u.T)

    return f, (w, u), c


def equilibrium(f, c):
    with torch.no_grad():
        z_star, stats = anderson(f, torch.zeros_like(c), max_iter=200, tol=1e-13, memory=8)
    assert stats.converged.all()
    return z_star


def grads(loss, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def reference_gradient(f, params, c):
    """Gradient of the loss through a long unrolled, converged iteration."""
    z = unrolled(f, torch.zeros_like(c), steps=120)
    return grads((z * c).sum(), params)


def test_implicit_gradient_matches_converged_unrolled_solve():
    f, params, c = problem()
    ref = reference_gradient(f, params, c)
    z, backward_stats = implicit_grad(f, equilibrium(f, c), backward=TIGHT)
    got = grads((z * c).sum(), params)
    assert backward_stats and backward_stats[0].converged.all()
    assert (got - ref).norm() / ref.norm() < 1e-4


def test_implicit_gradient_matches_finite_differences():
    f, (w, u), c = problem(seed=3, n=6, b=2)
    z, _ = implicit_grad(f, equilibrium(f, c), backward=TIGHT)
    (gw,) = torch.autograd.grad((z * c).sum(), [w])
    eps = 1e-6
    for i, j in [(0, 0), (2, 5), (4, 1)]:
        with torch.no_grad():
            w[i, j] += eps
            plus = (equilibrium(f, c) * c).sum()
            w[i, j] -= 2 * eps
            minus = (equilibrium(f, c) * c).sum()
            w[i, j] += eps
        fd = (plus - minus) / (2 * eps)
        assert abs(gw[i, j] - fd) / (abs(fd) + 1e-12) < 1e-4


def test_phantom_gradient_approaches_implicit_as_t_grows():
    f, params, c = problem(seed=1)
    z_star = equilibrium(f, c)
    z, _ = implicit_grad(f, z_star, backward=TIGHT)
    exact = grads((z * c).sum(), params)
    errors = []
    for steps in (1, 4, 16, 64):
        zt = phantom_grad(f, z_star, steps=steps, damping=0.8)
        errors.append(((grads((zt * c).sum(), params) - exact).norm() / exact.norm()).item())
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-4
    # even a short phantom gradient is a descent direction (positive cosine with the exact gradient)
    zt = phantom_grad(f, z_star, steps=4, damping=0.8)
    short = grads((zt * c).sum(), params)
    assert torch.nn.functional.cosine_similarity(short, exact, dim=0) > 0.9


def test_phantom_forward_value_is_the_equilibrium():
    f, _, c = problem(seed=2)
    z_star = equilibrium(f, c)
    torch.testing.assert_close(phantom_grad(f, z_star, steps=8, damping=0.8), z_star, rtol=0, atol=1e-10)


def test_unrolled_equals_autograd_through_the_same_steps():
    f, params, c = problem(seed=4)
    z = unrolled(f, torch.zeros_like(c), steps=5, damping=0.7)
    got = grads((z * c).sum(), params)
    zz = torch.zeros_like(c)
    for _ in range(5):
        zz = 0.7 * f(zz) + 0.3 * zz
    torch.testing.assert_close(got, grads((zz * c).sum(), params), rtol=0, atol=1e-14)


def test_forward_solve_keeps_no_graph():
    f, _, c = problem()
    z_star = equilibrium(f, c)
    assert z_star.grad_fn is None and not z_star.requires_grad
    zt = phantom_grad(f, z_star, steps=3, damping=0.8)
    # the graph holds only the phantom steps: walk it and count tanh nodes
    seen, stack, tanh = set(), [zt.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        tanh += "Tanh" in type(node).__name__
        stack.extend(fn for fn, _ in node.next_functions)
    assert tanh == 3


def test_model_implicit_gradient_matches_finite_differences_on_shipped_weights():
    """The whole DEQDenoiser (injection, weight norm, GroupNorm, attention, decoder; no dropout: the shipped file has
    none) wired through the implicit gradient: its directional derivative over every parameter equals a central
    difference of the converged solve (measured 2e-9 apart), and the paper's phantom gradient (T 8, lambda 0.8)
    lies within 5 % of it (measured 0.1-0.5 %). Float64, a 12x13 crop, the shipped sigma-25 weights: trained, so the
    layer is a contraction there."""
    from nerd.config import GradConfig
    from nerd.weights import load_weights

    model, _ = load_weights("nerd-s25")
    model = model.double()
    model.solver = TIGHT
    model.grad = GradConfig(mode="implicit", backward=SolverConfig(name="anderson", max_iter=300, tol=1e-12))
    g = torch.Generator().manual_seed(0)
    y = 0.5 + 0.3 * torch.rand(1, 1, 12, 13, generator=g, dtype=torch.float64)
    w = torch.randn(y.shape, generator=g, dtype=torch.float64)
    params = list(model.parameters())
    direction = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]

    def loss_at(h: float) -> float:
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.add_(h * d)
            eq = model.equilibrium(y, 25 / 255)
            for p, d in zip(params, direction, strict=True):
                p.sub_(h * d)
        assert eq.stats.converged.all()
        return float((eq.x_hat * w).sum())

    def derivative(mode: str) -> float:
        model.grad = replace(model.grad, mode=mode)
        eq = model.equilibrium(y, 25 / 255)
        grad = torch.autograd.grad((eq.x_hat * w).sum(), params)
        if mode == "implicit":
            assert eq.backward_stats and eq.backward_stats[0].converged.all()
        return float(sum((a * d).sum() for a, d in zip(grad, direction, strict=True)))

    h = 1e-6  # small enough that no ReLU kink lies within h along this direction (1e-5 is off by 0.5 %, 1e-4 by 1-5 %)
    reference = (loss_at(h) - loss_at(-h)) / (2 * h)
    implicit = derivative("implicit")
    assert abs(implicit - reference) <= 1e-6 * abs(reference)
    assert abs(derivative("phantom") - implicit) <= 0.05 * abs(implicit)
