"""Large images: a decompression bomb is refused from its header, a long run says up front how long it will take,
and a tiled run shows its progress over tiles."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

import nerd.cli.denoise
import nerd.tiling
from nerd.cli import main
from nerd.models import create_model
from nerd.weights import save_weights


@pytest.fixture
def weights(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "w.safetensors"
    save_weights(create_model("tiny"), path, sigma255=25)
    return path


def test_a_decompression_bomb_is_refused_from_its_header_in_one_line(tmp_path, weights, capsys):
    bomb = tmp_path / "bomb.png"
    Image.new("L", (9000, 9000)).save(bomb)  # 81 megapixels in about 80 KB
    assert bomb.stat().st_size < 200_000
    start = time.perf_counter()
    rc = main(["denoise", str(bomb), "-o", str(tmp_path / "out.png"), "--weights", str(weights)])
    err = capsys.readouterr().err
    assert rc == 2 and "81.0 megapixels" in err and "--max-pixels" in err and err.count("\n") == 1, err
    assert time.perf_counter() - start < 5  # the header decides: nothing was decoded
    assert not (tmp_path / "out.png").exists()


def test_max_pixels_is_a_limit_the_user_sets(tmp_path, weights, capsys):
    noisy = tmp_path / "n.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (30, 40), dtype=np.uint8)).save(noisy)
    common = [str(noisy), "-o", str(tmp_path / "o.png"), "--weights", str(weights), "--iters", "2", "--no-progress"]
    assert main(["denoise", *common, "--max-pixels", "1000"]) == 2
    assert "1200 is" not in capsys.readouterr().err  # (the size is 40x30)
    assert main(["denoise", *common, "--max-pixels", "1200"]) == 0
    assert main(["denoise", *common, "--max-pixels", "0"]) == 0
    assert main(["denoise", *common, "--max-pixels", "-1"]) == 2


def test_a_long_run_says_so_up_front_and_shows_its_tiles(tmp_path, weights, capsys, monkeypatch):
    noisy = tmp_path / "n.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (150, 170), dtype=np.uint8)).save(noisy)
    asked = {}

    def forecast(model, pixels, solves, solver, device, probe=96):
        asked.update(pixels=pixels, solves=solves, iters=solver.max_iter)
        return 7200.0

    monkeypatch.setattr(nerd.tiling, "forecast_seconds", forecast)
    monkeypatch.setattr(nerd.cli.denoise, "FORECAST_MIN_WORK", 0)
    rc = main(["denoise", str(noisy), "-o", str(tmp_path / "o.png"), "--weights", str(weights), "--iters", "2",
               "--tile", "100"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "about 2.0 h on this machine" in err and "6 tiles" in err, err
    assert asked["solves"] == 6 and asked["iters"] == 2 and asked["pixels"] < 150 * 170
    assert err.index("about 2.0 h") < err.index("f-eval")  # before the run starts
    assert "tile 6/6" in err  # the bar says which tile it is on


def test_a_short_run_predicts_nothing(tmp_path, weights, capsys):
    noisy = tmp_path / "n.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (30, 40), dtype=np.uint8)).save(noisy)
    assert main(["denoise", str(noisy), "-o", str(tmp_path / "o.png"), "--weights", str(weights), "--iters", "2"]) == 0
    assert "on this machine" not in capsys.readouterr().err


def test_the_forecast_is_one_timed_f_evaluation_scaled_by_pixels_solves_and_iterations(monkeypatch):
    model = create_model("tiny").eval()
    calls = {"layer": 0}
    real = model.layer.forward

    def counted(*args, **kwargs):
        calls["layer"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(model.layer, "forward", counted)
    clock = iter([10.0, 12.0])  # the timed f-evaluation takes 2 s by this clock
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    seconds = nerd.tiling.forecast_seconds(model, 40_000, 3, model.solver.override(max_iter=8), "cpu", probe=50)
    assert seconds == pytest.approx(2.0 / (50 * 50) * 40_000 * 3 * 8)
    assert calls["layer"] == 2  # a warm-up and the timed one
