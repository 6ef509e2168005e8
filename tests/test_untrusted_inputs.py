"""Issue 35, "Untrusted files and hard failures": files `nerd` reads back or is given are checked, not trusted.

`nerd eval`: cached rows of an interrupted run (the ``.partial`` file) and earlier reports are reused only when
their figures are sane and were measured under this run's key; reports are strict JSON, written atomically.
`nerd denoise`: an alpha channel is kept, `--gray --sigma` on a colour image is converted to the luminance's noise
level, and every unusable input of a batch is named in one line.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from nerd.cli import main

H, W = 37, 31


def _write_set(folder: Path, n: int = 3, size: tuple[int, int] = (23, 19)) -> list[Path]:
    """n smooth noisy 8-bit grayscale PNGs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        base = np.add.outer(np.linspace(0, 1, size[0]), np.linspace(0, 1, size[1])) / 2
        img = np.clip(base + 0.1 * rng.standard_normal(size), 0, 1)
        paths.append(folder / f"{i:02d}.png")
        Image.fromarray((img * 255).round().astype(np.uint8), mode="L").save(paths[-1])
    return paths


def _cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# --- nerd eval: cached rows, earlier reports, strict and atomic reports


@pytest.fixture()
def eval_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """A `nerd eval --method noisy` run on a 3-image set interrupted after its first image (its .partial file kept),
    and the rows of the same run done at once (in another folder)."""
    import nerd.evaluate

    _write_set(tmp_path / "data" / "S")
    common = ["eval", "--method", "noisy", "--sets", "S", "--data", tmp_path / "data", "--no-progress"]
    rc, _, err = _cli(capsys, *common, "--out", tmp_path / "whole")
    assert rc == 0, err
    whole = json.loads((tmp_path / "whole" / "eval-noisy-S-s25.json").read_text())

    real_ssim, calls = nerd.evaluate.ssim, []

    def stop_at_the_second(x_hat: Any, x: Any) -> float:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_ssim(x_hat, x)

    with monkeypatch.context() as m:
        m.setattr(nerd.evaluate, "ssim", stop_at_the_second)
        assert _cli(capsys, *common, "--out", tmp_path / "out")[0] == 130
    partial = tmp_path / "out" / "eval-noisy-S-s25.json.partial"
    assert [r["name"] for r in json.loads(partial.read_text())["rows"]] == ["00.png"]
    return {"argv": [*common, "--out", tmp_path / "out"], "partial": partial, "whole": whole,
            "report": tmp_path / "out" / "eval-noisy-S-s25.json"}


def _figures(report: dict[str, Any]) -> list[tuple[str, float, float]]:
    return [(r["name"], r["psnr"], r["ssim"]) for r in report["rows"]]


@pytest.mark.parametrize("edit", [
    {"psnr": 99.0}, {"psnr": math.nan}, {"psnr": math.inf}, {"ssim": 1.5}, {"seconds": -1.0}, {"psnr": "30"},
    {"nfe": 5}, {"name": "zz.png"}, {"psnr": -3.0}, {"extra": 1},
])
def test_a_cached_row_that_fails_checks_is_recomputed(capsys, eval_run, edit):
    """An edited or damaged row of the .partial file (99 dB, NaN, SSIM 1.5, an image not in the set, solver
    statistics for a method without a solver...) is measured again, with one note; the report equals a fresh run."""
    data = json.loads(eval_run["partial"].read_text())
    data["rows"][0].update(edit)
    eval_run["partial"].write_text(json.dumps(data))
    rc, _, err = _cli(capsys, *eval_run["argv"])
    assert rc == 0, err
    assert err.count("1 cached rows failed checks and are recomputed") == 1, err
    text = eval_run["report"].read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert _figures(json.loads(text)) == pytest.approx(_figures(eval_run["whole"]))


def test_sane_cached_rows_are_reused_without_a_note(capsys, eval_run):
    rc, _, err = _cli(capsys, *eval_run["argv"])
    assert rc == 0 and "failed checks" not in err and "1 image(s) reused" in err
    assert _figures(json.loads(eval_run["report"].read_text())) == pytest.approx(_figures(eval_run["whole"]))


def test_a_partial_file_written_before_row_checksums_still_resumes(capsys, eval_run):
    """A file from before the protocol and per-row checksums entered partial files (as committed interrupted runs
    are) is continued, not thrown away; an edited figure in it is still refused by its range checks."""
    data = json.loads(eval_run["partial"].read_text())
    key = json.loads(data["key"])
    key.pop("protocol")
    data["key"] = json.dumps(key)
    for row in data["rows"]:
        row.pop("sha256")
    eval_run["partial"].write_text(json.dumps(data))
    rc, _, err = _cli(capsys, *eval_run["argv"])
    assert rc == 0 and "failed checks" not in err and "1 image(s) reused" in err, err
    data["rows"][0]["psnr"] = float("nan")
    eval_run["partial"].write_text(json.dumps(data))
    rc, _, err = _cli(capsys, *eval_run["argv"])
    assert rc == 0 and "1 cached rows failed checks" in err, err
    assert _figures(json.loads(eval_run["report"].read_text())) == pytest.approx(_figures(eval_run["whole"]))


def test_rows_cached_under_another_key_are_recomputed(capsys, eval_run):
    """Rows written for other weights (another checksum), solver or sigma are not mixed in."""
    data = json.loads(eval_run["partial"].read_text())
    key = json.loads(data["key"])
    key["sha256"] = "0" * 64
    data["key"] = json.dumps(key)
    eval_run["partial"].write_text(json.dumps(data))
    rc, _, err = _cli(capsys, *eval_run["argv"])
    assert rc == 0 and "1 cached rows failed checks" in err and "sha256" in err, err
    assert _figures(json.loads(eval_run["report"].read_text())) == pytest.approx(_figures(eval_run["whole"]))


@pytest.mark.parametrize("content", ["{not json", "[]", '{"key": 5, "rows": {}}', '{"key": "{}", "rows": 3}',
                                     "\xff\xfe garbage"])
def test_a_garbage_partial_file_is_measured_from_scratch_with_a_note(capsys, eval_run, content):
    eval_run["partial"].write_bytes(content.encode("latin-1"))
    rc, _, err = _cli(capsys, *eval_run["argv"])
    assert rc == 0, err
    assert "measured from scratch" in err and err.count("note:") == 1, err
    assert _figures(json.loads(eval_run["report"].read_text())) == pytest.approx(_figures(eval_run["whole"]))


@pytest.mark.parametrize("where", ["partial", "report"])
def test_a_folder_in_the_way_of_a_report_is_one_line_exit_2(capsys, eval_run, where):
    """A folder at the .partial (or .json) path fails before any image is measured, not with a traceback after."""
    eval_run["partial"].unlink()
    eval_run[where].mkdir()
    rc, _, err = _cli(capsys, *eval_run["argv"])
    assert rc == 2 and err.count("\n") == 1 and "in the way" in err and "Traceback" not in err, err


def test_an_earlier_report_with_edited_figures_is_left_out_of_the_summary(capsys, tmp_path):
    for name in ("SetA", "SetB"):
        _write_set(tmp_path / "data" / name, n=1)
    common = ["eval", "--method", "noisy", "--data", tmp_path / "data", "--out", tmp_path / "out", "--no-progress"]
    assert _cli(capsys, *common, "--sets", "SetA")[0] == 0
    report = tmp_path / "out" / "eval-noisy-SetA-s25.json"
    data = json.loads(report.read_text())
    data["rows"][0]["psnr"] = 99.0
    report.write_text(json.dumps(data))
    rc, _, err = _cli(capsys, *common, "--sets", "SetB")
    assert rc == 0 and "failed checks" in err and "SetA" in err, err
    summary = (tmp_path / "out" / "eval-noisy.md").read_text()
    assert "| noisy | SetB |" in summary and "SetA" not in summary and "99.000" not in summary


def test_a_non_finite_score_is_an_error_and_reports_are_strict_json(tmp_path):
    """A method whose output is NaN has no score: EvalError (exit 2 from the CLI), never a report with bare NaN."""
    from nerd.errors import EvalError
    from nerd.evaluate import Report, Row, evaluate

    images = _write_set(tmp_path / "S", n=2)
    with pytest.raises(EvalError, match="non-finite"):
        evaluate(lambda y, sigma: y * math.nan, images, 25, set_name="S", progress=False, method_name="m")
    report = Report("m", "S", 25.0, [Row("00.png", math.nan, 0.5, 1.0)])
    with pytest.raises(EvalError, match=r"psnr = nan is not finite"):
        report.to_json()


def test_report_files_are_written_atomically(tmp_path, monkeypatch):
    """A write that fails at the rename leaves the previous file whole and no temporary file behind."""
    import nerd.evaluate
    from nerd.errors import EvalError

    target = tmp_path / "r.json"
    nerd.evaluate.write_text_atomic(target, "old\n")

    def fail(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nerd.evaluate.os, "replace", fail)
    with pytest.raises(EvalError, match="No space left"):
        nerd.evaluate.write_text_atomic(target, "new\n")
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["r.json"]


# --- nerd denoise: alpha kept, --gray --sigma converted, every bad input named


@pytest.fixture(scope="module")
def weights(tiny_weights: Path) -> Path:
    return tiny_weights


def _noisy_pixels(seed: int, channels: int = 0) -> np.ndarray:
    """uint8 (H, W) or (H, W, channels): a ramp plus noise."""
    rng = np.random.RandomState(seed)
    shape = (H, W, channels) if channels else (H, W)
    ramp = 128 + 40 * np.sin(np.arange(W) / 4)[None, :, None] if channels else 128 + 40 * np.sin(np.arange(W) / 4)
    return np.clip(ramp + 25 * rng.randn(*shape), 0, 255).astype(np.uint8)


def _alpha() -> np.ndarray:
    """uint8 (H, W) alpha with every kind of pixel: transparent, partly and fully opaque."""
    return (np.arange(H * W).reshape(H, W) * 7 % 256).astype(np.uint8)


def _denoised(weights: Path, y: np.ndarray, sigma255: float = 25.0) -> np.ndarray:
    """What the library makes of y ((H, W) or (H, W, 3) on [0, 1]) with 2 iterations, as 8-bit pixels."""
    from dataclasses import replace

    from nerd.denoise import denoise_image
    from nerd.io import to_pixels
    from nerd.weights import load_weights

    model, _ = load_weights(weights)
    x_hat, _ = denoise_image(model, y, sigma255, solver=replace(model.solver, max_iter=2), device="cpu")
    return to_pixels(x_hat, 8)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_gray_with_alpha_keeps_its_alpha(capsys, tmp_path, weights, suffix):
    """LA in, LA out: the alpha bytes unchanged, the gray channel denoised (as the library denoises it alone)."""
    gray, alpha = _noisy_pixels(0), _alpha()
    Image.fromarray(np.dstack([gray, alpha])).save(tmp_path / f"la{suffix}")
    rc, _, err = _cli(capsys, "denoise", tmp_path / f"la{suffix}", "-o", tmp_path / f"o{suffix}", "--weights",
                      weights, "--iters", 2)
    assert rc == 0, err
    with Image.open(tmp_path / f"o{suffix}") as im:
        assert im.mode == "LA" and im.size == (W, H)
        out = np.asarray(im)
    assert np.array_equal(out[..., 1], alpha)
    assert np.array_equal(out[..., 0], _denoised(weights, gray / np.float32(255))) and not np.array_equal(
        out[..., 0], gray)


def test_rgba_keeps_its_alpha_with_colour_and_with_gray(capsys, tmp_path, weights):
    """RGBA --colour: RGBA out (each channel denoised, alpha unchanged); RGBA --gray: luminance + the same alpha."""
    rgb, alpha = _noisy_pixels(1, 3), _alpha()
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "c.png")
    base = ["denoise", tmp_path / "c.png", "--weights", weights, "--iters", 2, "--sigma", 25]
    rc, _, err = _cli(capsys, *base, "--colour", "-o", tmp_path / "colour.png")
    assert rc == 0, err  # transparent pixels were refused before: the output could not keep them
    with Image.open(tmp_path / "colour.png") as im:
        assert im.mode == "RGBA"
        out = np.asarray(im)
    assert np.array_equal(out[..., 3], alpha)
    assert np.array_equal(out[..., :3], _denoised(weights, rgb / np.float32(255)))
    rc, _, err = _cli(capsys, *base, "--gray", "-o", tmp_path / "gray.tif")
    assert rc == 0, err
    with Image.open(tmp_path / "gray.tif") as im:
        assert im.mode == "LA" and np.array_equal(np.asarray(im)[..., 1], alpha)


def test_a_palette_colour_key_is_kept_as_alpha(capsys, tmp_path, weights):
    gray = _noisy_pixels(2)
    key = int(gray[0, 0])
    Image.fromarray(gray).save(tmp_path / "key.png", transparency=key)  # PNG tRNS: pixels of this value are clear
    rc, _, err = _cli(capsys, "denoise", tmp_path / "key.png", "-o", tmp_path / "o.png", "--weights", weights,
                      "--iters", 2)
    assert rc == 0, err
    with Image.open(tmp_path / "o.png") as im:
        assert im.mode == "LA" and np.array_equal(np.asarray(im)[..., 1], np.where(gray == key, 0, 255))


def test_alpha_into_a_format_without_it_is_refused_or_noted(capsys, tmp_path, weights):
    """JPEG (and BMP) hold no alpha: transparent pixels are refused (nothing written), an opaque alpha is dropped
    with a note."""
    gray = _noisy_pixels(3)
    Image.fromarray(np.dstack([gray, _alpha()])).save(tmp_path / "clear.png")
    Image.fromarray(np.dstack([gray, np.full((H, W), 255, np.uint8)])).save(tmp_path / "opaque.png")
    w = ["--weights", weights, "--iters", 2]
    rc, _, err = _cli(capsys, "denoise", tmp_path / "clear.png", "-o", tmp_path / "o.jpg", *w)
    assert rc == 2 and err.count("\n") == 1 and "transparent pixels" in err and ".png or .tif" in err, err
    assert not (tmp_path / "o.jpg").exists()
    rc, _, err = _cli(capsys, "denoise", tmp_path / "opaque.png", "-o", tmp_path / "o.bmp", *w)
    assert rc == 0 and "alpha channel (fully opaque) is dropped" in err, err
    with Image.open(tmp_path / "o.bmp") as im:
        assert im.mode == "L"


def test_gray_sigma_on_a_colour_image_is_converted_to_the_luminance(capsys, tmp_path, weights, monkeypatch):
    """--gray --sigma 25 on a colour photo: the luminance has noise 25 * sqrt(.299^2 + .587^2 + .114^2) = 16.7, and
    that is what reaches the model (and picks the shipped weights); a gray input keeps its sigma."""
    import nerd.denoise
    import nerd.weights
    from nerd.models import create_model
    from nerd.weights import save_weights

    seen: list[float] = []
    real = nerd.denoise.denoise_image

    def spy(model: Any, y: np.ndarray, sigma255: float, **kwargs: Any) -> Any:
        seen.append(sigma255)
        return real(model, y, sigma255, **kwargs)

    monkeypatch.setattr(nerd.denoise, "denoise_image", spy)
    Image.fromarray(_noisy_pixels(4, 3)).save(tmp_path / "colour.png")
    Image.fromarray(_noisy_pixels(5)).save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([_noisy_pixels(5)] * 3)).save(tmp_path / "gray-as-rgb.png")
    luma = 25 * math.sqrt(0.299**2 + 0.587**2 + 0.114**2)
    base = ["denoise", "--weights", weights, "--iters", 1, "--sigma", 25, "--gray"]
    rc, _, err = _cli(capsys, *base, tmp_path / "colour.png", "-o", tmp_path / "o.png")
    assert rc == 0 and seen == [pytest.approx(luma)], (seen, err)
    assert "sigma 25 per RGB channel -> 16.7 in the luminance" in err, err
    for name in ("gray.png", "gray-as-rgb.png"):
        seen.clear()
        rc, _, err = _cli(capsys, *base, tmp_path / name, "-o", tmp_path / "o.png")
        assert rc == 0 and "luminance" not in err and seen == [25.0], err

    # without --weights the luminance's sigma picks the shipped weights: 16.7 is nearer 15 than 25
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setattr(nerd.weights, "WEIGHTS_DIR", shipped)
    for s in (15, 25):
        save_weights(create_model("tiny"), shipped / f"nerd-s{s}.safetensors", sigma255=s)
    seen.clear()
    rc, _, err = _cli(capsys, "denoise", tmp_path / "colour.png", "-o", tmp_path / "o.png", "--sigma", 25, "--gray",
                      "--iters", 1)
    assert rc == 0 and "nerd-s15 (trained for sigma 15)" in err and seen == [pytest.approx(luma)], err


def test_every_unusable_input_of_a_batch_is_named_in_one_line(capsys, tmp_path, weights):
    """A folder with three bad files (and a good one): all three named in one line, exit 2, nothing written."""
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(_noisy_pixels(6)).save(folder / "good.png")
    (folder / "a.png").write_text("not an image\n")
    nan = np.full((H, W), 0.5, np.float32)
    nan[2, 3] = np.nan
    Image.fromarray(nan).save(folder / "b.tif")
    (folder / "c.png").write_bytes((folder / "good.png").read_bytes()[:60])
    rc, out, err = _cli(capsys, "denoise", folder, "-o", tmp_path / "out", "--weights", weights, "--iters", 1)
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "3 unusable inputs" in err and "good.png" not in err
    for name, why in (("a.png", "not an image"), ("b.tif", "NaN"), ("c.png", "truncated")):
        assert f"{folder / name} (" in err and why in err, err
    assert not (tmp_path / "out").exists()

    # several files given, two of them missing: both named
    rc, _, err = _cli(capsys, "denoise", folder / "good.png", tmp_path / "x.png", tmp_path / "y.png", "-o",
                      tmp_path / "out", "--weights", weights)
    assert rc == 2 and "2 unusable inputs" in err and "x.png" in err and "y.png" in err, err
    assert not (tmp_path / "out").exists()
