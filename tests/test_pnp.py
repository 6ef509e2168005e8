"""Plug-and-play deblurring (`nerd.lab.pnp`, `examples/pnp_deblur.py`): the FFT data step, HQS, NERD as its prior
(without deepinv), the results file and its table. Tiny images and tiny models: seconds."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import nerd
import nerd.weights
from nerd.errors import ConfigError, EvalError
from nerd.evaluate import strict_json, write_text_atomic
from nerd.lab import pnp
from nerd.lab.pnp import CircularBlur, NearestLevel, dpir_schedule, gaussian_kernel, hqs, wiener
from nerd.metrics import psnr
from nerd.models import create_model
from nerd.weights import save_weights

ROOT = Path(__file__).resolve().parents[1]
SIGMAS = (15, 25, 50)


def _direct_blur(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Circular convolution by its definition: sum_ab k[a, b] x[i - a + kh//2, j - b + kw//2] (indices mod H, W)."""
    h, w = x.shape
    kh, kw = k.shape
    out = torch.zeros(h, w, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            for a in range(kh):
                for b in range(kw):
                    out[i, j] += k[a, b] * x[(i - a + kh // 2) % h, (j - b + kw // 2) % w]
    return out


def _matrix(blur: CircularBlur) -> torch.Tensor:
    """The blur as an (HW, HW) matrix, column n = blur(e_n)."""
    h, w = blur.shape
    eye = torch.eye(h * w, dtype=torch.float64).reshape(h * w, h, w)
    return blur(eye).reshape(h * w, h * w).T


def _squares(h: int = 41, w: int = 35) -> torch.Tensor:
    """(h, w) float64 piecewise-constant test image on [0.1, 0.9]."""
    x = torch.full((h, w), 0.2, dtype=torch.float64)
    x[5:20, 4:18] = 0.8
    x[22:37, 15:31] = 0.55
    x[10:14, 22:33] = 0.9
    return x


def _waves(h: int = 41, w: int = 35) -> torch.Tensor:
    """(h, w) float64 smooth test image on ~[0.15, 0.85]: a few low-frequency waves (a Gaussian smoother's kind)."""
    i = torch.arange(h, dtype=torch.float64)[:, None] / h
    j = torch.arange(w, dtype=torch.float64)[None, :] / w
    waves = 0.2 * torch.sin(4 * math.pi * i) * torch.cos(6 * math.pi * j) + 0.15 * torch.cos(10 * math.pi * (i + j))
    return 0.5 + waves


def _degrade(x: torch.Tensor, blur: CircularBlur, sigma: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return blur(x) + sigma * torch.randn(x.shape, generator=g, dtype=torch.float64)


# --- the blur and its data step


def test_gaussian_kernel() -> None:
    k = gaussian_kernel(1.6, 25)
    assert k.shape == (25, 25) and abs(float(k.sum()) - 1) < 1e-12
    assert torch.allclose(k, k.T) and torch.allclose(k, k.flip(0)) and int(k.argmax()) == 12 * 25 + 12
    for bad in ((0.0, 25), (-1.0, 25), (float("nan"), 25), (1.6, 24), (1.6, 0)):
        with pytest.raises(ConfigError):
            gaussian_kernel(*bad)


@pytest.mark.parametrize("shape", [(7, 9), (3, 4)])  # (3, 4): the 3x5 kernel wraps around the image
def test_blur_is_the_circular_convolution_and_adjoint_its_transpose(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(1)
    k = torch.rand(3, 5, generator=g, dtype=torch.float64)  # not symmetric: convolution, not correlation
    x, y = (torch.rand(shape, generator=g, dtype=torch.float64) for _ in range(2))
    blur = CircularBlur(k, shape)
    assert torch.allclose(blur(x), _direct_blur(x, k), atol=1e-12)
    assert abs(float((blur(x) * y).sum() - (x * blur.adjoint(y)).sum())) < 1e-12
    assert blur(x.float()).dtype == torch.float32
    with pytest.raises(ConfigError):
        blur(torch.rand(shape[0] + 1, shape[1]))


def test_data_step_solves_its_normal_equations() -> None:
    """(KᵀK + αI) x = Kᵀy + αz, against a dense solve on a 5x6 image, for a kernel larger than the image too."""
    g = torch.Generator().manual_seed(2)
    for kernel in (torch.rand(3, 3, generator=g, dtype=torch.float64), gaussian_kernel(1.6, 25)):
        blur = CircularBlur(kernel, (5, 6))
        m = _matrix(blur)
        y, z = torch.rand(1, 1, 5, 6, generator=g, dtype=torch.float64), torch.rand(5, 6, generator=g).double()
        for alpha in (1e-3, 0.23, 5.0):
            direct = torch.linalg.solve(m.T @ m + alpha * torch.eye(30, dtype=torch.float64),
                                        m.T @ y.reshape(-1) + alpha * z.reshape(-1))
            assert torch.allclose(blur.solve(y, z, alpha).reshape(-1), direct, atol=1e-9)
            # a number for z: the same as a constant image
            assert torch.allclose(blur.solve(y, 0.3, alpha), blur.solve(y, torch.full((5, 6), 0.3).double(), alpha))
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ConfigError):
            blur.solve(y, z, bad)


# --- HQS


def test_dpir_schedule() -> None:
    sigmas, alphas = dpir_schedule(7.65 / 255)
    assert len(sigmas) == len(alphas) == 8
    assert math.isclose(sigmas[0], 49 / 255) and math.isclose(sigmas[-1], 7.65 / 255)
    ratios = [b / a for a, b in zip(sigmas, sigmas[1:], strict=False)]
    assert max(ratios) - min(ratios) < 1e-12 and ratios[0] < 1  # log-spaced, falling
    assert all(math.isclose(a, 0.23 * (7.65 / 255) ** 2 / s**2) for s, a in zip(sigmas, alphas, strict=True))
    assert math.isclose(dpir_schedule(1 / 255)[1][-1], 0.23 * 0.01**2 / (1 / 255) ** 2)  # deepinv's 0.01 floor
    assert dpir_schedule(0.1, 1)[0] == [0.1]
    for bad in ((0.0,), (1.5,), (0.03, 0)):
        with pytest.raises(ConfigError):
            dpir_schedule(*bad)


def test_hqs_with_the_identity_denoiser_is_the_wiener_filter_then_iterated_tikhonov() -> None:
    x = _squares(12, 11)
    blur = CircularBlur(gaussian_kernel(1.2, 7), x.shape)
    y = _degrade(x, blur, 0.02)[None, None]
    zero = torch.zeros_like(y)

    def identity(v: torch.Tensor, sigma: float) -> torch.Tensor:
        return v

    # one iteration from 0: the Wiener filter with noise-to-signal ratio alpha
    assert torch.allclose(hqs(y, blur, identity, [0.1], [0.05], x0=zero), wiener(y, blur, 0.05), atol=1e-12)
    # K iterations of a fixed alpha: X_K = sum_{j<K} r^j W Y, r = alpha / (|K|^2 + alpha), W the Wiener filter
    alpha, iters = 0.05, 4
    r = alpha / (blur.otf2 + alpha)
    expected = torch.fft.ifft2(sum(r**j for j in range(iters)) * torch.fft.fft2(wiener(y, blur, alpha))).real
    got = hqs(y, blur, identity, [0.1] * iters, [alpha] * iters, x0=zero)
    assert torch.allclose(got, expected, atol=1e-12)
    assert torch.allclose(hqs(y, blur, identity, [0.1] * iters, [alpha] * iters, x0=zero, denoise_last=False), got)
    with pytest.raises(ConfigError):
        hqs(y, blur, identity, [0.1, 0.1], [alpha])
    with pytest.raises(ConfigError):
        hqs(y[0], blur, identity, [0.1], [alpha])


def test_hqs_with_a_gaussian_smoother_beats_the_blurred_input_and_wiener() -> None:
    x = _waves()  # 41 x 35: odd sizes
    blur = CircularBlur(gaussian_kernel(1.6, 25), x.shape)
    noise = 7.65 / 255
    y = _degrade(x, blur, noise)[None, None].float()
    sigmas, alphas = dpir_schedule(noise)
    calls: list[float] = []

    def smoother(v: torch.Tensor, sigma: float) -> torch.Tensor:
        calls.append(sigma)
        return pnp.gaussian_smoother(0.5)(v, sigma)

    out = hqs(y, blur, smoother, sigmas, alphas)
    assert out.shape == y.shape and out.dtype == torch.float32 and calls == pytest.approx(sigmas)
    before = psnr(y[0, 0].numpy(), x.numpy())
    after = psnr(out[0, 0].numpy(), x.numpy())
    var_y = float(y.double().var())
    plain = psnr(wiener(y, blur, noise**2 / (var_y - noise**2), float(y.mean()))[0, 0].numpy(), x.numpy())
    assert after > before + 2 and after > plain, (before, plain, after)


# --- NERD as the prior (tiny untrained models standing in for the shipped weights; no deepinv needed)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pnp-weights")
    files = {}
    for seed, s in enumerate(SIGMAS):
        torch.manual_seed(seed)
        files[f"nerd-s{s}"] = folder / f"nerd-s{s}.safetensors"
        save_weights(create_model("tiny"), files[f"nerd-s{s}"], sigma255=s)
    return files


def test_nerd_is_an_hqs_prior_on_an_odd_image(tiny_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """`nerd.NERD` through HQS: each iteration's level goes to the nearest weights; the loop is exactly the data step
    then NERD's `forward(x, sigma)`, on a batch of two odd-size images, colour too."""
    monkeypatch.setattr(nerd.weights, "shipped", lambda: dict(tiny_files))
    prior = nerd.NERD(solver=3)
    sigmas, alphas = dpir_schedule(7.65 / 255, iters=4)
    assert prior.weights_for(torch.tensor(sigmas), len(sigmas)) == ["nerd-s50", "nerd-s25", "nerd-s15", "nerd-s15"]
    for channels in (1, 3):
        g = torch.Generator().manual_seed(channels)
        y = torch.rand(2, channels, 23, 19, generator=g)
        blur = CircularBlur(gaussian_kernel(1.6, 25), (23, 19))
        out = hqs(y, blur, prior, sigmas, alphas)
        assert out.shape == y.shape and bool(torch.isfinite(out).all())
        z = y
        with torch.no_grad():
            for s, a in zip(sigmas, alphas, strict=True):
                z = prior(blur.solve(y, z, a), s)
        assert torch.allclose(out, z, atol=1e-6)


def test_nearest_level_picks_like_nerd() -> None:
    seen: list[int] = []
    models = {s: (lambda v, sigma, s=s: seen.append(s) or v + s) for s in SIGMAS}
    prior = NearestLevel(models)
    x = torch.zeros(1, 1, 4, 4)
    for sigma255, level in ((49, 50), (37.5, 50), (37.4, 25), (20, 25), (20.0, 25), (7.65, 15), (100, 50)):
        assert prior.level(sigma255 / 255) == level
        assert float(prior(x, sigma255 / 255)[0, 0, 0, 0]) == level
    assert prior.used == {50.0: 3, 25.0: 3, 15.0: 1}
    with pytest.raises(ConfigError):
        NearestLevel({})


# --- the results file, its table and the example script


def _results(**change: object) -> dict:
    rows = [{"image": f"0{i}.png", "height": 8, "width": 8, "blurred_psnr": 22.0 + i,
             "results": {"wiener": {"psnr": 24.0 + i, "seconds": 0.01, "cpu_seconds": 0.01},
                         "nerd": {"psnr": 25.0 + i, "seconds": 12.0, "cpu_seconds": 9.0}}}
            for i in (1, 2)]
    data = {"meta": {"command": "python examples/pnp_deblur.py --images 2", "torch": "2.13.0+cpu", "threads": 1,
                     "noise_sigma255": 7.65, "blur": {"kernel": "gaussian", "sigma": 1.6, "size": 25},
                     "schedule": {"iters": 8}, "set": "Set12", "images": ["01.png", "02.png"], "all_images": False},
            "priors": [{"key": "wiener", "label": "no prior"}, {"key": "nerd", "label": "HQS + NERD"}],
            "rows": rows, "means": pnp.means(rows, ["wiener", "nerd"])}
    data.update(change)
    return data


def _write(path: Path, data: object, *, allow_nan: bool = False) -> Path:
    path.write_text(json.dumps(data, allow_nan=allow_nan))
    return path


def test_results_reader_accepts_a_whole_file_and_rejects_bad_ones(tmp_path: Path) -> None:
    good = _results()
    path = tmp_path / "deblur.json"
    write_text_atomic(path, strict_json(good, "test", indent=1))
    assert pnp.read_results(path) == good

    def rows_with(**row0: object) -> list[dict]:
        rows = json.loads(json.dumps(good["rows"]))
        rows[0].update(row0)
        return rows

    nan_rows = rows_with(results={"wiener": {"psnr": float("nan"), "seconds": 0.0, "cpu_seconds": 0.0},
                                  "nerd": {"psnr": 1, "seconds": 1, "cpu_seconds": 1}})
    bad = {
        "a list": [good],
        "no rows": _results(rows=[]),
        "no meta": {k: v for k, v in good.items() if k != "meta"},
        "a blur without its size": _results(meta={**good["meta"], "blur": {"sigma": 1.6}}),
        "meta without its command": _results(meta={k: v for k, v in good["meta"].items() if k != "command"}),
        "a prior missing in a row": _results(rows=rows_with(results={"wiener": good["rows"][0]["results"]["wiener"]})),
        "no CPU seconds": _results(rows=rows_with(results={"wiener": {"psnr": 24.0, "seconds": 0.0},
                                                           "nerd": good["rows"][0]["results"]["nerd"]})),
        "an image twice": _results(rows=rows_with(image="02.png")),
        "negative seconds": _results(rows=rows_with(results={
            "wiener": {"psnr": 24.0, "seconds": -1.0, "cpu_seconds": 0}, "nerd": good["rows"][0]["results"]["nerd"]})),
        "a PSNR that is a string": _results(rows=rows_with(blurred_psnr="23")),
        "means that are not the rows' means": _results(means={**good["means"],
                                                              "nerd": {**good["means"]["nerd"], "psnr": 30.0}}),
        "repeated prior keys": _results(priors=[{"key": "nerd", "label": "a"}, {"key": "nerd", "label": "b"}]),
    }
    for why, data in bad.items():
        with pytest.raises(EvalError):
            pnp.read_results(_write(tmp_path / "bad.json", data))
            pytest.fail(why)
    with pytest.raises(EvalError, match="not strict JSON"):
        pnp.read_results(_write(tmp_path / "nan.json", _results(rows=nan_rows), allow_nan=True))
    (tmp_path / "half.json").write_text(path.read_text()[:50])
    with pytest.raises(EvalError, match="not strict JSON"):
        pnp.read_results(tmp_path / "half.json")
    with pytest.raises(EvalError, match="cannot read"):
        pnp.read_results(tmp_path / "missing.json")


def test_the_table_is_rendered_from_the_results_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tools import readme

    monkeypatch.setattr(readme, "RESULTS", tmp_path)
    assert "not measured yet" in readme.pnp_table()
    write_text_atomic(tmp_path / "pnp" / "deblur.json", strict_json(_results(), "test"))
    table = readme.pnp_table()
    assert "`python examples/pnp_deblur.py --images 2`" in table and "first 2 images of Set12" in table
    assert "| HQS + NERD | 26.50 | +3.00 | 9.0 | 12.0 |" in table  # means: 26.5 dB, blurred 23.5, 9 CPU s, 12 s
    assert "| no prior | 25.50 | +2.00 | 0.01 | 0.01 |" in table
    assert "| 01.png | 8×8 | 23.00 | 25.00 | 26.00 |" in table
    _write(tmp_path / "pnp" / "deblur.json", _results(rows=[]))
    with pytest.raises(EvalError):  # a bad file stops the pages' regeneration instead of showing a wrong table
        readme.pnp_table()


def _example():  # noqa: ANN202 -- the example script as a module
    spec = importlib.util.spec_from_file_location("pnp_deblur", ROOT / "examples" / "pnp_deblur.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_writes_a_results_file_without_data_or_deepinv(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The example on the bundled sample, the no-prior baselines and an anchors folder without DnCNN-S (skipped, as
    deepinv is where it does not import): a whole, strict results file."""
    out = tmp_path / "pnp.json"
    rc = _example().main(["--sample", "--priors", "wiener", "tikhonov-oracle", "dncnn", "--anchors",
                          str(tmp_path / "none"), "--out", str(out)])
    assert rc == 0
    data = pnp.read_results(out)
    assert [p["key"] for p in data["priors"]][:2] == ["wiener", "tikhonov-oracle"]
    assert "dncnn" in data["meta"]["skipped"] and "deepinv" in data["meta"]
    if not data["meta"]["deepinv"]["ran"]:
        assert "does not import" in data["meta"]["deepinv"]["reason"]
    row = data["rows"][0]
    assert row["results"]["tikhonov-oracle"]["psnr"] >= row["results"]["wiener"]["psnr"] > row["blurred_psnr"]
    assert np.isfinite(row["results"]["wiener"]["alpha"])
    assert "wrote" in capsys.readouterr().out


def test_example_without_the_data_set_says_how_to_get_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = _example().main(["--data", str(tmp_path), "--priors", "wiener", "--out", str(tmp_path / "x.json")])
    assert rc == 2 and "data set Set12 not found" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
