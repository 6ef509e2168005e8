"""`nerd.NERD`: the shipped weights behind deepinv's denoiser contract, tested without deepinv.

The shipped weights are faked with tiny untrained models (one per sigma, each its own seed, so that a sample sent
to the wrong file gives another output) through a monkeypatched `nerd.weights.shipped`.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import nerd
import nerd.weights
from nerd.config import SolverConfig
from nerd.denoise import denoise_image
from nerd.errors import ConfigError, ImageError, WeightsError
from nerd.models import create_model
from nerd.models.nerd import DEQDenoiser
from nerd.models.pretrained import NERD, nearest
from nerd.weights import load_weights, save_weights

SIGMAS = (15, 25, 50)
TOL = 1e-5


@pytest.fixture(scope="module")
def tiny_shipped(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("shipped")
    files = {}
    for seed, s in enumerate(SIGMAS):
        torch.manual_seed(seed)
        files[f"nerd-s{s}"] = folder / f"nerd-s{s}.safetensors"
        save_weights(create_model("tiny"), files[f"nerd-s{s}"], sigma255=s)
    return files


@pytest.fixture
def shipped(tiny_shipped: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    monkeypatch.setattr(nerd.weights, "shipped", lambda: dict(tiny_shipped))
    return tiny_shipped


def _x(b: int, c: int, seed: int = 0) -> torch.Tensor:
    """(b, c, 20, 17): a smooth image plus noise, on ~[0, 1]."""
    g = torch.Generator().manual_seed(seed)
    base = torch.linspace(0.2, 0.8, 17)[None, None, None, :].expand(b, c, 20, 17)
    return base + 0.1 * torch.randn(b, c, 20, 17, generator=g)


def test_lazy_export_and_base_class() -> None:
    from nerd.models import pretrained

    assert nerd.NERD is NERD and "NERD" in nerd.__all__
    assert issubclass(NERD, nn.Module)
    try:
        import deepinv  # noqa: F401
    except ImportError:
        assert not pretrained.DEEPINV and NERD.__bases__ == (nn.Module,)
    else:  # pragma: no cover - where deepinv is installed
        assert pretrained.DEEPINV == issubclass(NERD, sys.modules["deepinv"].models.Denoiser)


def _load_pretrained_as(name: str) -> types.ModuleType:
    """A fresh copy of nerd.models.pretrained under another name (the real one and its class stay untouched)."""
    from nerd.models import pretrained

    spec = importlib.util.spec_from_file_location(name, pretrained.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_subclasses_deepinv_denoiser_when_deepinv_imports(shipped: dict[str, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeDenoiser(nn.Module):  # deepinv.models.Denoiser's constructor: device="cpu", then self.to(device)
        def __init__(self, device: str = "cpu") -> None:
            super().__init__()
            self.to(device)

    fake, fake_models = types.ModuleType("deepinv"), types.ModuleType("deepinv.models")
    fake_models.Denoiser = FakeDenoiser  # type: ignore[attr-defined]
    fake.models = fake_models  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "deepinv", fake)
    monkeypatch.setitem(sys.modules, "deepinv.models", fake_models)
    module = _load_pretrained_as("_nerd_pretrained_with_deepinv")
    assert module.DEEPINV and issubclass(module.NERD, FakeDenoiser)
    with torch.no_grad():
        assert module.NERD(solver=2)(_x(1, 1), 25 / 255).shape == (1, 1, 20, 17)

    class Broken(types.ModuleType):  # a deepinv whose torchvision does not load raises RuntimeError on import
        def __getattr__(self, name: str) -> object:
            raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.setitem(sys.modules, "deepinv.models", Broken("deepinv.models"))
    module = _load_pretrained_as("_nerd_pretrained_broken_deepinv")
    assert not module.DEEPINV and module.NERD.__bases__ == (nn.Module,) and "torchvision" in module.DEEPINV_ERROR


def test_contract_shapes_sigma_forms_and_errors(shipped: dict[str, Path]) -> None:
    model = NERD(solver=3)
    for c in (1, 3):
        x = _x(2, c)
        with torch.no_grad():
            out = model(x, 25 / 255)
            assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
            for same in (torch.tensor([25 / 255, 25 / 255]), torch.full((2, 1, 1, 1), 25 / 255),
                         torch.tensor(25 / 255)):
                assert torch.allclose(model(x, same), out, atol=TOL, rtol=0)
            as64 = model(x.double(), 25 / 255)
            assert as64.dtype == torch.float64 and torch.allclose(as64.float(), out, atol=TOL, rtol=0)
    x = _x(2, 1)
    for bad_x in (torch.rand(2, 2, 8, 8), torch.rand(1, 8, 8), torch.zeros(1, 1, 8, 8, dtype=torch.int64)):
        with pytest.raises(ImageError, match="B, 1 or 3, H, W"):
            model(bad_x, 0.1)
    for bad_sigma in (0.0, -0.1, 1.5, float("nan"), torch.tensor([0.1, 0.0]), torch.tensor([0.1, 0.1, 0.1]), "0.1"):
        with pytest.raises(ConfigError, match="sigma"):
            model(x, bad_sigma)
    for bad_solver in (True, 0, "broyden"):
        with pytest.raises(ConfigError):
            NERD(solver=bad_solver)  # type: ignore[arg-type]


def test_each_sample_gets_the_nearest_weights_each_file_read_once(
    shipped: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[str] = []

    def spy(name_or_path, **kwargs):  # noqa: ANN001, ANN202
        loads.append(Path(str(name_or_path)).stem)
        return load_weights(name_or_path, **kwargs)

    monkeypatch.setattr(nerd.weights, "load_weights", spy)
    model = NERD(solver=3)
    sigma255 = torch.tensor([10.0, 20.0, 40.0, 200.0, 25.0])  # 20: a tie between 15 and 25 goes to 25
    expected = ["nerd-s15", "nerd-s25", "nerd-s50", "nerd-s50", "nerd-s25"]
    assert model.weights_for(sigma255 / 255, 5) == expected
    assert loads == []  # choosing reads only the metadata
    x = _x(5, 1)
    with torch.no_grad():
        out = model(x, sigma255 / 255)
        assert sorted(loads) == ["nerd-s15", "nerd-s25", "nerd-s50"]  # each file read once for the batch
        model(x, sigma255 / 255)
        assert len(loads) == 3  # ...and not again
        for i, name in enumerate(expected):  # each sample equals a solve with its file alone
            alone = NERD(solver=3, weights=[str(shipped[name])])
            assert torch.allclose(out[i:i + 1], alone(x[i:i + 1], float(sigma255[i]) / 255), atol=TOL, rtol=0)
        others = [n for n in shipped if n != expected[0]]
        wrong = NERD(solver=3, weights=[str(shipped[others[0]])])(x[:1], 10 / 255)
    assert not torch.allclose(out[:1], wrong, atol=1e-3), "the fake files must differ for this test to mean much"
    assert nearest(20.0, {"a": 15.0, "b": 25.0}) == "b"


def test_colour_is_the_gray_model_on_each_channel_in_one_solve(
    shipped: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[tuple[int, ...]] = []
    real_forward = DEQDenoiser.forward

    def spy(self, y, sigma=None, *, solver=None):  # noqa: ANN001, ANN202
        batches.append(tuple(y.shape))
        return real_forward(self, y, sigma, solver=solver)

    monkeypatch.setattr(DEQDenoiser, "forward", spy)
    model = NERD(solver=4)
    x = _x(2, 3, seed=1)
    sigma = torch.tensor([25 / 255, 50 / 255])
    with torch.no_grad():
        colour = model(x, sigma)
        assert sorted(batches) == [(3, 1, 20, 17), (3, 1, 20, 17)]  # one solve per file: 3 channels, batched
        for ch in range(3):
            gray = model(x[:, ch:ch + 1], sigma)
            assert torch.allclose(colour[:, ch:ch + 1], gray, atol=TOL, rtol=0), float((colour[:, ch:ch + 1]
                                                                                       - gray).abs().max())


@pytest.mark.parametrize("channels", [1, 3])
def test_output_matches_denoise_image(shipped: dict[str, Path], channels: int) -> None:
    x = _x(1, channels, seed=2)
    model = NERD()  # the file's own solver, as denoise_image uses it
    with torch.no_grad():
        out = model(x, 25 / 255).clamp(0, 1)[0]  # denoise_image clips; the denoiser contract does not
    weights, _ = load_weights(shipped["nerd-s25"])
    y = x[0, 0].numpy() if channels == 1 else x[0].permute(1, 2, 0).numpy()
    expected, _ = denoise_image(weights, np.ascontiguousarray(y), 25, device="cpu")
    expected_t = torch.from_numpy(expected if channels == 1 else expected.transpose(2, 0, 1)).reshape(out.shape)
    assert torch.allclose(out, expected_t, atol=TOL, rtol=0), float((out - expected_t).abs().max())


def test_solver_override(shipped: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[SolverConfig] = []
    real_forward = DEQDenoiser.forward

    def spy(self, y, sigma=None, *, solver=None):  # noqa: ANN001, ANN202
        seen.append(solver)
        return real_forward(self, y, sigma, solver=solver)

    monkeypatch.setattr(DEQDenoiser, "forward", spy)
    x = _x(1, 1)
    own = load_weights(shipped["nerd-s25"])[0].solver
    with torch.no_grad():
        NERD()(x, 25 / 255)
        NERD(solver=2)(x, 25 / 255)
        custom = SolverConfig(name="anderson", max_iter=3, tol=1e-4)
        NERD(solver=custom)(x, 25 / 255)
    assert seen == [own, own.override(max_iter=2), custom]


def test_no_weights_to_choose_from(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nerd.weights, "shipped", lambda: {})
    with pytest.raises(WeightsError, match="no shipped weights"):
        NERD()(_x(1, 1), 0.1)
    with pytest.raises(WeightsError):
        NERD(weights=[])
