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
import torch
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
