"""NERD as the paper describes it: shapes, gradients, determinism, dropout, per-sample solving, presets."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parametrize

from nerd.config import GradConfig, SolverConfig
from nerd.models import count_parameters, create_model

VARIANTS = [
    {},
    {"blocks": "nl"},
    {"blocks": "trans"},
    {"post_norm": False},
    {"equilibrium": "image"},
    {"weight_norm": False},
    {"dropout": 0.2},
]


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("mode", ["phantom", "implicit", "unrolled"])
def test_shape_and_every_parameter_gets_a_gradient(odd_image, overrides, mode):
    torch.manual_seed(0)
    grad = GradConfig(mode=mode, steps=3, backward=SolverConfig(name="anderson", max_iter=10, tol=1e-4))
    model = create_model("tiny", solver=SolverConfig(max_iter=5), grad=grad, **overrides).train()
    eq = model.equilibrium(odd_image, 0.1)
    x_hat = eq.x_hat
    assert x_hat.shape == odd_image.shape and torch.isfinite(x_hat).all()
    assert eq.backward_stats == []
    x_hat.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no gradient for {missing}"
    # the implicit gradient's backward solve reports itself once backward has run
    assert len(eq.backward_stats) == (mode == "implicit")
    if mode == "implicit":
        assert 1 <= int(eq.backward_stats[0].nfe.max()) <= 10


def test_eval_is_deterministic_and_batch_equals_singles(odd_image):
    torch.manual_seed(0)
    # float64: an untrained model is far from contractive, so float32 rounding would be amplified by the solve
    model = create_model("tiny", solver=SolverConfig(max_iter=12, tol=1e-4), dropout=0.3).eval().double()
    odd_image = odd_image.double()
    with torch.no_grad():
        a = model.equilibrium(odd_image, 0.1)
        b = model.equilibrium(odd_image, 0.1)
        singles = [model.equilibrium(odd_image[i : i + 1], 0.1) for i in range(2)]
    torch.testing.assert_close(a.x_hat, b.x_hat, rtol=0, atol=0)
    torch.testing.assert_close(a.x_hat, torch.cat([s.x_hat for s in singles]), rtol=0, atol=1e-9)
    assert a.stats.nfe.tolist() == [int(s.stats.nfe[0]) for s in singles]


def test_dropout_mask_is_shared_by_every_iteration_and_gradient_step(odd_image):
    torch.manual_seed(0)
    model = create_model("tiny", solver=SolverConfig(max_iter=4), grad=GradConfig(steps=3), dropout=0.5).train()
    masks = []
    original = model.layer.forward

    def spy(z, s, mask=None):
        masks.append(mask)
        return original(z, s, mask)

    model.layer.forward = spy
    model(odd_image, 0.1).sum().backward()
    assert len(masks) == 4 + 3 and masks[0] is not None
    assert all(m is masks[0] for m in masks)
    model.eval()
    masks.clear()
    with torch.no_grad():
        model(odd_image, 0.1)
    assert all(m is None for m in masks)


def test_weight_norm_computed_once_per_forward(odd_image, monkeypatch):
    model = create_model("tiny", solver=SolverConfig(max_iter=6), grad=GradConfig(steps=3)).train()
    calls = []
    for module in model.layer.weighted():
        param = module.parametrizations.weight[0]
        orig = param.forward
        monkeypatch.setattr(param, "forward", lambda *a, _o=orig: calls.append(1) or _o(*a))
    model(odd_image, 0.1).sum().backward()
    assert len(calls) == len(model.layer.weighted()) == 4
    assert not parametrize.is_parametrized(model.inject.body[1])  # only the implicit layer is normalised


def test_paper_preset_has_the_papers_parameter_count():
    n = count_parameters(create_model("paper"))
    assert abs(n - 1.40e6) / 1.40e6 < 0.02


def test_solver_statistics_have_one_entry_per_sample_and_respect_the_cap(odd_image):
    model = create_model("tiny", solver=SolverConfig(max_iter=7, tol=1e-12)).eval()
    with torch.no_grad():
        eq = model.equilibrium(odd_image, 0.1)
    assert eq.stats.nfe.tolist() == [7, 7]
    assert eq.stats.trace.shape == (2, 7)
    fewer = model.equilibrium(odd_image, 0.1, solver=SolverConfig(max_iter=3))
    assert fewer.stats.nfe.tolist() == [3, 3]


@pytest.mark.parametrize("name", ["broyden", "anderson", "fixed_point"])
def test_bf16_autocast_keeps_the_solver_state_in_fp32(odd_image, name):
    torch.manual_seed(0)
    model = create_model("tiny", solver=SolverConfig(name=name, max_iter=6)).eval()
    conv_dtypes = []
    convs = [m for m in model.layer.modules() if isinstance(m, torch.nn.Conv2d)]
    hooks = [c.register_forward_hook(lambda m, i, o: conv_dtypes.append(o.dtype)) for c in convs]
    with torch.no_grad():
        ref = model.equilibrium(odd_image, 0.1)
        assert set(conv_dtypes) == {torch.float32}
        conv_dtypes.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.equilibrium(odd_image, 0.1)
    for h in hooks:
        h.remove()
    assert set(conv_dtypes) == {torch.bfloat16}  # f really ran in bf16 ...
    assert low.z_star.dtype == torch.float32  # ... while the solver's arithmetic did not
    diff = (low.x_hat.float() - ref.x_hat).abs().mean()
    assert 0 < diff < 0.02


def test_training_after_inference_mode_at_the_same_size(odd_image):
    """Caches filled under torch.inference_mode() (e.g. by `nerd denoise`) must not break a later backward."""
    model = create_model("tiny", solver=SolverConfig(max_iter=3), window=65)
    with torch.inference_mode():
        model.eval()(odd_image, 0.1)
    model.train()(odd_image, 0.1).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_noise_vs_image_equilibrium_decoding(odd_image):
    torch.manual_seed(0)
    noise = create_model("tiny", solver=SolverConfig(max_iter=3)).eval()
    image = create_model("tiny", solver=SolverConfig(max_iter=3), equilibrium="image").eval()
    image.load_state_dict(noise.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(noise(odd_image, 0.1) - odd_image, image(odd_image, 0.1))


@pytest.mark.parametrize("blocks", ["both", "nl", "trans"])
def test_every_block_variant_ends_in_the_post_norm_so_its_equilibrium_is_bounded(odd_image, blocks):
    """A bounded f has a bounded fixed point. The NL-only layer once lacked the post-norm: f(z) = z + s + MSA(...)
    then has no fixed point, and Broyden met its *relative* tolerance by driving |z*| to ~1e6 |s| (blocks
    experiment, quick preset: 20.8 dB, no denoising)."""
    torch.manual_seed(0)
    model = create_model("tiny", blocks=blocks).eval()
    with torch.no_grad():
        s = model.inject(odd_image)
        for scale in (1.0, 1e6):
            fz = model.layer(scale * torch.randn_like(s), s)
            # GroupNorm with its initial affine (1, 0): unit variance per group, so |f|^2 / numel is about 1
            assert fz.square().mean() < 1.5, (blocks, scale)
        eq = model.equilibrium(odd_image, 0.1, solver=SolverConfig(max_iter=12))
    assert eq.z_star.square().mean() < 1.5  # an untrained layer need not converge, but it cannot run away
