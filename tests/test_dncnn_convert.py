"""DnCNN-S from the authors' published files (cszn/DnCNN), converted at load time.

Files are built here in the published layouts from a known random network: the MatConvNet SimpleNN ``net`` of
``model/specifics/sigma=XX.mat`` (BatchNorm merged, as published, or still separate) and the state dict of
TrainingCodes/dncnn_pytorch (bias-free convs + BatchNorm2d(eps=1e-4)). The converted DnCNN must give the original's
outputs; a .pth holding pickled objects must be refused without running anything in it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nerd.cli import main
from nerd.errors import WeightsError
from nerd.models.dncnn import DnCNN, dncnn_from_mat, dncnn_from_pth, find_dncnn_file, load_dncnn

from .conftest import ANCHORS

scipy_io = pytest.importorskip("scipy.io")

TOL = 1e-5


class AuthorsDnCNN(nn.Module):
    """The network of cszn/DnCNN TrainingCodes/dncnn_pytorch (written here from its layout): conv(bias), ReLU,
    15 x (conv without bias, BatchNorm2d(eps=1e-4), ReLU), conv without bias; x_hat = y - body(y)."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, 64, 3, padding=1, bias=True), nn.ReLU()]
        for _ in range(15):
            layers += [nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64, eps=1e-4), nn.ReLU()]
        layers.append(nn.Conv2d(64, 1, 3, padding=1, bias=False))
        self.dncnn = nn.Sequential(*layers)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y - self.dncnn(y)


def _he(conv: nn.Conv2d, g: torch.Generator) -> None:
    """He-normal weights, so that the body's output is of the image's scale (a vanishing body would make any
    comparison of y - body(y) pass)."""
    fan_in = conv.weight[0].numel()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2 / fan_in) ** 0.5)
        if conv.bias is not None:
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.05)


def authors_net(seed: int = 0) -> AuthorsDnCNN:
    """A random AuthorsDnCNN in eval mode with random BatchNorm statistics and affine terms."""
    g = torch.Generator().manual_seed(seed)
    net = AuthorsDnCNN()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                _he(m, g)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(64, generator=g))
                m.bias.copy_(0.1 * torch.randn(64, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(64, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(64, generator=g))
    return net.eval()


def plain_net(seed: int = 0) -> DnCNN:
    """A random DnCNN (BatchNorm already merged: the published specifics' layout)."""
    g = torch.Generator().manual_seed(seed)
    net = DnCNN()
    for conv in net.convs:
        _he(conv, g)
    return net.eval()


def _image(seed: int = 1) -> torch.Tensor:
    return torch.rand(2, 1, 23, 19, generator=torch.Generator().manual_seed(seed))


def _same_outputs(original: nn.Module, converted: DnCNN, forward_original=None) -> None:
    y = _image()
    with torch.no_grad():
        want = forward_original(y) if forward_original else original(y)
        got = converted(y, 25 / 255)
    assert (want - y).abs().max() > 0.05, "the test network's body must not vanish"
    assert torch.allclose(got, want, atol=TOL, rtol=0), float((got - want).abs().max())


# --- writing files in the published layouts


def _cell(*arrays: np.ndarray) -> np.ndarray:
    cell = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        cell[i] = a
    return cell


def _conv_layer(weight: torch.Tensor, bias: torch.Tensor | None, old_fields: bool = False) -> dict:
    """A MatConvNet conv layer: filters (H, W, Cin, Cout) single, biases (Cout, 1); MATLAB drops a trailing
    singleton, so a one-filter conv is stored (3, 3, Cin)."""
    f = weight.detach().permute(2, 3, 1, 0).numpy().astype(np.float32)
    if f.shape[3] == 1:
        f = f[..., 0]
    b = (bias.detach().numpy() if bias is not None else np.zeros(weight.shape[0])).astype(np.float32)[:, None]
    layer = {"type": "conv", "stride": np.array([[1.0, 1.0]]), "pad": np.array([[1.0, 1.0, 1.0, 1.0]]),
             "dilate": 1.0, "learningRate": np.array([[1.0, 1.0]])}
    if old_fields:  # MatConvNet before beta18
        layer.update(filters=f, biases=b)
    else:
        layer["weights"] = _cell(f, b)
    return layer


def _write_mat(path: Path, layers: list[dict]) -> Path:
    scipy_io.savemat(str(path), {"net": {"layers": _cell(*layers)}})
    return path


def mat_from_plain(net: DnCNN, path: Path, old_fields: bool = False) -> Path:
    """The published specifics' layout: conv, relu, ..., conv (BatchNorm merged into the convs)."""
    layers: list[dict] = []
    for k, conv in enumerate(net.convs):
        layers.append(_conv_layer(conv.weight, conv.bias, old_fields))
        if k < len(net.convs) - 1:
            layers.append({"type": "relu", "leak": 0.0})
    return _write_mat(path, layers)


def mat_from_authors(net: AuthorsDnCNN, path: Path) -> Path:
    """A training net before vl_simplenn_mergebnorm: conv, bnorm (multipliers, biases, moments = [mean, sqrt(var +
    eps)]), relu, ..., conv, loss."""
    layers: list[dict] = []
    for m in net.dncnn:
        if isinstance(m, nn.Conv2d):
            layers.append(_conv_layer(m.weight, m.bias))
        elif isinstance(m, nn.BatchNorm2d):
            std = torch.sqrt(m.running_var + m.eps)
            moments = torch.stack([m.running_mean, std], dim=1).numpy().astype(np.float32)
            layers.append({"type": "bnorm", "weights": _cell(m.weight.detach().numpy()[:, None].astype(np.float32),
                                                             m.bias.detach().numpy()[:, None].astype(np.float32),
                                                             moments)})
        else:
            layers.append({"type": "relu", "leak": 0.0})
    layers.append({"type": "loss"})
    return _write_mat(path, layers)


# --- .mat


@pytest.mark.parametrize("old_fields", [False, True], ids=["weights", "filters-biases"])
def test_mat_specifics_layout_gives_the_same_network(tmp_path: Path, old_fields: bool) -> None:
    net = plain_net()
    converted = dncnn_from_mat(mat_from_plain(net, tmp_path / "sigma=25.mat", old_fields))
    _same_outputs(net, converted)
    for a, b in zip(net.state_dict().values(), converted.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # no BatchNorm: a transposition, nothing rounded


def test_mat_with_batchnorm_is_folded(tmp_path: Path) -> None:
    net = authors_net()
    converted = dncnn_from_mat(mat_from_authors(net, tmp_path / "sigma=25.mat"))
    assert not converted.training
    _same_outputs(net, converted)


def test_mat_that_is_not_dncnn_is_refused(tmp_path: Path) -> None:
    net = plain_net()
    good = [_conv_layer(c.weight, c.bias) for c in net.convs]

    def with_relus(convs: list[dict]) -> list[dict]:
        out: list[dict] = []
        for k, c in enumerate(convs):
            out += [c] + ([{"type": "relu", "leak": 0.0}] if k < len(convs) - 1 else [])
        return out

    cases = {
        "pool": with_relus(good[:8]) + [{"type": "pool"}] + with_relus(good[8:]),
        "not DnCNN-S": with_relus(good[:-2] + good[-1:]),  # 16 convs
        "leaky": [good[0], {"type": "relu", "leak": 0.1}] + with_relus(good[1:]),
        "stride": with_relus([{**good[0], "stride": np.array([[2.0, 2.0]])}] + good[1:]),
        "followed by": [good[0]] + with_relus(good[1:]),  # no ReLU after the first conv
        "NaN": with_relus([_conv_layer(net.convs[0].weight * float("nan"), net.convs[0].bias)] + good[1:]),
    }
    for match, layers in cases.items():
        with pytest.raises(WeightsError, match=match):
            dncnn_from_mat(_write_mat(tmp_path / "bad.mat", layers))
    scipy_io.savemat(str(tmp_path / "other.mat"), {"x": np.ones(3)})
    with pytest.raises(WeightsError, match="no variable 'net'"):
        dncnn_from_mat(tmp_path / "other.mat")
    (tmp_path / "text.mat").write_text("not a MATLAB file\n")
    with pytest.raises(WeightsError, match="cannot read"):
        dncnn_from_mat(tmp_path / "text.mat")


# --- .pth


def test_pth_state_dict_of_the_pytorch_training_code(tmp_path: Path) -> None:
    net = authors_net()
    state = net.state_dict()
    assert {"dncnn.0.bias", "dncnn.2.weight", "dncnn.3.running_var", "dncnn.47.weight"} <= set(state)
    assert "dncnn.2.bias" not in state and "dncnn.47.bias" not in state
    for name, saved in (("plain", state), ("dataparallel", {f"module.{k}": v for k, v in state.items()}),
                        ("checkpoint", {"epoch": 50, "state_dict": state})):
        torch.save(saved, tmp_path / f"{name}.pth")
        _same_outputs(net, dncnn_from_pth(tmp_path / f"{name}.pth"))
    converted = dncnn_from_pth(tmp_path / "plain.pth")
    assert not converted.training


def test_pth_that_is_not_a_dncnn_state_dict_is_refused(tmp_path: Path) -> None:
    state = authors_net().state_dict()
    cases = {
        "not a state dict": [1, 2, 3],
        "not DnCNN-S": {k: v for k, v in state.items() if not k.startswith("dncnn.47.")},
        "running_var": {k: v for k, v in state.items() if k != "dncnn.3.running_var"},
        "layer sequences": {**state, "head.0.weight": torch.zeros(1, 1, 3, 3)},
        "NaN": {**state, "dncnn.0.bias": torch.full((64,), float("nan"))},
    }
    for match, saved in cases.items():
        torch.save(saved, tmp_path / "bad.pth")
        with pytest.raises(WeightsError, match=match):
            dncnn_from_pth(tmp_path / "bad.pth")
    good = tmp_path / "good.pth"
    torch.save(state, good)
    (tmp_path / "cut.pth").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(WeightsError, match="cannot read"):
        dncnn_from_pth(tmp_path / "cut.pth")


def _touch(path: str) -> str:
    """What a hostile pickle calls while it is unpickled (here: leaves a file behind)."""
    Path(path).write_text("ran")
    return path


class _Hostile:
    """An object whose unpickling calls `_touch`: the `__reduce__` marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204 - pickle's protocol
        return (_touch, (self.marker,))


def test_pickled_objects_are_refused_without_running_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    from .test_eval import _write_set

    _write_set(tmp_path / "data" / "Tiny", n=1)
    marker = tmp_path / "ran.txt"
    hostile = tmp_path / "dncnn_sigma25.pth"
    torch.save({"dncnn.0.weight": _Hostile(marker)}, hostile)
    with pytest.raises(WeightsError, match=r"pickled Python objects.*state_dict") as err:
        dncnn_from_pth(hostile)
    assert "\n" not in str(err.value)
    assert not marker.exists(), "the file's code ran"
    # the CLI: one line, exit 2, and still nothing ran
    rc = main(["eval", "--method", "dncnn", "--anchors", str(tmp_path), "--data", str(tmp_path / "data"),
               "--sets", "Tiny", "--sigma", "25", "--out", str(tmp_path / "out"), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 2 and len(captured.err.strip().splitlines()) == 1 and "state_dict" in captured.err, captured.err
    assert not marker.exists()
    # a whole model saved with torch.save(model), as the repository's model.pth is: refused the same way
    torch.save(authors_net(), tmp_path / "whole.pth")
    with pytest.raises(WeightsError, match="whole model"):
        dncnn_from_pth(tmp_path / "whole.pth")
    # the marker is live: unpickling the file for real runs it
    torch.load(hostile, weights_only=False)
    assert marker.read_text() == "ran"


# --- finding the files, and nerd eval


def test_anchor_folder_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import save_file

    with pytest.raises(WeightsError, match=r"dncnn_sigma15\.safetensors, sigma=15\.mat, dncnn_sigma15\.pth"):
        find_dncnn_file(15, tmp_path)
    with pytest.raises(WeightsError, match="only for sigma"):
        find_dncnn_file(30, tmp_path)
    torch.save(authors_net(seed=2).state_dict(), tmp_path / "sigma=25.pth")
    assert find_dncnn_file(25, tmp_path).name == "sigma=25.pth"
    torch.save(authors_net(seed=3).state_dict(), tmp_path / "dncnn_sigma25.pth")
    assert find_dncnn_file(25, tmp_path).name == "dncnn_sigma25.pth"
    plain = plain_net(seed=4)
    mat_from_plain(plain, tmp_path / "sigma=25.mat")
    assert find_dncnn_file(25, tmp_path).name == "sigma=25.mat"
    _same_outputs(plain, load_dncnn(25, tmp_path))
    other = plain_net(seed=5)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "dncnn_sigma25.safetensors"))
    assert find_dncnn_file(25, tmp_path).name == "dncnn_sigma25.safetensors"
    _same_outputs(other, load_dncnn(25, tmp_path))
    monkeypatch.setenv("NERD_ANCHORS", str(tmp_path))
    assert find_dncnn_file(25).parent == tmp_path  # no --anchors: $NERD_ANCHORS


def test_cli_eval_dncnn_from_the_published_mat(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from .test_eval import _write_set

    _write_set(tmp_path / "data" / "Tiny", n=1)
    anchors = tmp_path / "anchors"
    anchors.mkdir()
    mat_from_authors(authors_net(), anchors / "sigma=25.mat")
    out = tmp_path / "out"
    rc = main(["eval", "--method", "dncnn", "--anchors", str(anchors), "--data", str(tmp_path / "data"),
               "--sets", "Tiny", "--sigma", "25", "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "eval-dncnn-Tiny-s25.json").read_text())
    assert report["meta"]["weights_file"] == "sigma=25.mat" and len(report["rows"]) == 1


# --- the real anchors (skipped without ../shared/anchors)


@pytest.mark.parametrize("sigma", [15, 25, 50])
def test_real_anchor_weights_survive_a_mat_and_pth_round_trip(tmp_path: Path, sigma: int) -> None:
    """The anchors' weights written as the published .mat (merged) and as a .pth state dict load back to a network
    with the same outputs: the converter reads what the published files hold without changing it."""
    source = ANCHORS / f"dncnn_sigma{sigma}.safetensors"
    if not source.is_file():
        pytest.skip(f"{source} is absent")
    reference = load_dncnn(sigma, ANCHORS)
    from_mat = dncnn_from_mat(mat_from_plain(reference, tmp_path / f"sigma={sigma}.mat"))
    state = {f"model.{2 * k}.{name}": t for k, conv in enumerate(reference.convs)
             for name, t in conv.state_dict().items()}  # KAIR's layout: every conv with its bias, ReLUs between
    torch.save(state, tmp_path / f"dncnn_sigma{sigma}.pth")
    from_pth = dncnn_from_pth(tmp_path / f"dncnn_sigma{sigma}.pth")
    y = _image(seed=sigma)
    with torch.no_grad():
        want = reference(y)
        for converted in (from_mat, from_pth):
            assert torch.allclose(converted(y), want, atol=TOL, rtol=0)
