"""On a CUDA GPU the model, the tiled denoiser, training and the CLI give what they give on the CPU.

Every test here carries the `gpu` marker: tests/conftest.py skips them, saying so, where `torch.cuda.is_available()`
is false, and runs them where it is true (`python -m pytest -q -m gpu` runs only these).
Scores are IEEE float32 on both devices (`nerd.evaluate.ieee_fp32`: no TF32), so the devices differ only in
rounding order; a solve that stops at max_iter amplifies that (on the CPU a relative 1e-6 perturbation of crop 0's
input moves its output by up to 1.9e-4, its PSNR by 1e-5 dB), hence the tolerances below.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from nerd.evaluate import ieee_fp32
from nerd.metrics import psnr

pytestmark = pytest.mark.gpu

CROPS = ((slice(0, 64), slice(0, 64)), (slice(100, 164), slice(90, 154)))  # as in test_quality


@pytest.fixture(scope="module")
def sample():
    from nerd.denoise import SAMPLE_CLEAN, SAMPLE_NOISY
    from nerd.io import read_image

    y, _ = read_image(SAMPLE_NOISY)
    x, _ = read_image(SAMPLE_CLEAN)
    return x.astype(np.float64), y


def test_shipped_model_on_cuda_agrees_with_cpu(sample):
    from nerd.weights import load_weights

    x, y = sample
    model, _ = load_weights("nerd-s25")
    batch = torch.from_numpy(np.stack([y[c] for c in CROPS]))[:, None]
    with torch.inference_mode(), ieee_fp32():
        cpu = model.equilibrium(batch, 25 / 255)
        model.to("cuda")
        gpu = model.equilibrium(batch.to("cuda"), 25 / 255)
    assert gpu.x_hat.device.type == "cuda"
    out_cpu, out_gpu = cpu.x_hat.clamp(0, 1).double(), gpu.x_hat.clamp(0, 1).double().cpu()
    assert (out_gpu - out_cpu).abs().max() < 5e-3
    assert (out_gpu - out_cpu).abs().mean() < 5e-4
    for i, c in enumerate(CROPS):
        assert abs(psnr(out_gpu[i, 0].numpy(), x[c]) - psnr(out_cpu[i, 0].numpy(), x[c])) < 0.02
        assert abs(int(gpu.stats.nfe[i]) - int(cpu.stats.nfe[i])) <= 1


def test_tiled_denoise_on_cuda_agrees_with_cpu(sample):
    from nerd.denoise import denoise_image
    from nerd.weights import load_weights

    x, y = sample
    model, _ = load_weights("nerd-s25")
    solver = replace(model.solver, max_iter=6)
    crop = np.ascontiguousarray(y[:96, :112])
    with ieee_fp32():
        on_cpu, s_cpu = denoise_image(model, crop, 25, solver=solver, device="cpu", tile=64, overlap=16)
        on_gpu, s_gpu = denoise_image(model, crop, 25, solver=solver, device="cuda", tile=64, overlap=16)
    device = s_gpu.device if hasattr(s_gpu, "device") else s_gpu["device"]  # a DenoiseSummary (or an older dict)
    assert device.startswith("cuda")
    assert on_gpu.shape == crop.shape and on_gpu.dtype == np.float32
    assert np.abs(on_gpu - on_cpu).max() < 5e-3
    assert abs(psnr(on_gpu.astype(np.float64), x[:96, :112]) - psnr(on_cpu.astype(np.float64), x[:96, :112])) < 0.02


def test_training_steps_on_cuda(image_folder, tmp_path):
    """A few steps on the GPU (bf16 autocast, the default there): finite losses, a checkpoint, weights that load."""
    import csv
    import json

    from nerd.config import Config, GradConfig, SolverConfig, TrainConfig
    from nerd.models import preset_config
    from nerd.train import train
    from nerd.weights import load_weights

    cfg = Config(model=preset_config("tiny"), solver=SolverConfig(max_iter=4), grad=GradConfig(steps=2),
                 train=TrainConfig(data=str(image_folder), sigma=(25.0,), crop=16, batch=2, steps=4, val_images=2,
                                   val_every=2, log_every=1, checkpoint_minutes=1e9))
    run = train(cfg, out=tmp_path / "run", device="cuda", progress=False)
    machine = json.loads((run / "machine.json").read_text())
    assert machine["device"] == "cuda" and machine["precision"] == "bf16 autocast"
    losses = [float(r["loss"]) for r in csv.DictReader(open(run / "log.csv"))]
    assert len(losses) == 4 and all(np.isfinite(losses))
    model, _ = load_weights(run / "best.safetensors")
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())


def test_cli_denoise_sample_on_cuda(tmp_path, capsys):
    from nerd.cli import main

    assert main(["denoise", "--sample", "-o", str(tmp_path / "s.png"), "--device", "cuda", "--iters", "4"]) == 0
    assert (tmp_path / "s.png").is_file()
    assert "PSNR" in capsys.readouterr().out
