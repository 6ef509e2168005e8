"""Two gloo ranks on the CPU train exactly like one process on the same global batch."""

from __future__ import annotations

import os
import shutil
import socket

import torch
import torch.multiprocessing as mp

from nerd.checkpoint import load_checkpoint
from nerd.train import train
from tests.test_train import tiny_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, folder: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        train(tiny_config(folder, steps=3), out=out, progress=False, device="cpu")
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process(image_folder, tmp_path):
    single = train(tiny_config(image_folder, steps=3), out=tmp_path / "single", progress=False)
    for attempt in range(3):
        # _free_port's port is free when chosen but not reserved: another process may take it before rank 0's
        # store binds it. Only that failure is retried, on a new port.
        try:
            mp.spawn(_rank, args=(2, _free_port(), str(image_folder), str(tmp_path / "ddp")), nprocs=2, join=True)
            break
        except Exception as err:  # noqa: BLE001 -- re-raised unless it is the port race
            if attempt == 2 or "address already in use" not in str(err).lower():
                raise
            shutil.rmtree(tmp_path / "ddp", ignore_errors=True)
    a = load_checkpoint(single / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "ddp" / "last.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        x, y = b[k], a[k]
        if k == "layer.msa.qkv.bias":
            # The key bias cannot change any output (softmax is shift-invariant), so its gradient is rounding
            # noise, which Adam's normalisation turns into lr-sized steps: compare the query and value parts only.
            c = x.numel() // 3
            x, y = torch.cat([x[:c], x[2 * c :]]), torch.cat([y[:c], y[2 * c :]])
        torch.testing.assert_close(x, y, rtol=1e-4, atol=2e-5, msg=k)


# --- the gradient all-reduce averages: plain SGD in place of AdamW, whose normalisation hides a constant scale


def _sgd(params, lr, betas):  # noqa: ARG001 -- AdamW's signature, as nerd.train calls it
    return torch.optim.SGD(params, lr=lr)


def _sgd_config(folder, init):
    from nerd.config import Config, GradConfig, SolverConfig, TrainConfig
    from nerd.models import preset_config

    return Config(
        model=preset_config("tiny"),
        solver=SolverConfig(max_iter=4, tol=1e-3),
        grad=GradConfig(steps=2),
        train=TrainConfig(data=str(folder), sigma=(25.0,), crop=16, batch=4, steps=3, lr=0.05, weight_decay=0.0,
                          val_images=2, val_every=0, log_every=1, checkpoint_minutes=1e9, threads=2, init=str(init)),
    )


def _sgd_rank(rank: int, world: int, port: int, folder: str, init: str, out: str) -> None:
    torch.optim.AdamW = _sgd  # this spawned process only
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        train(_sgd_config(folder, init), out=out, progress=False, device="cpu")
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_gloo_ranks_average_gradients_like_one_process(image_folder, tmp_path, monkeypatch):
    """With SGD an update is lr x the gradient, so ranks that summed their gradients instead of averaging them
    would move the weights twice as far as one process on the global batch. Measured: 1.0000 x as far, the moves
    1.4e-6 apart (relative); with the loss multiplied by the world size (summed gradients) 1.72 x."""
    from nerd.models import DEQDenoiser
    from nerd.weights import save_weights

    init = tmp_path / "init.safetensors"
    torch.manual_seed(0)
    cfg = _sgd_config(image_folder, init)
    save_weights(DEQDenoiser(cfg.model, solver=cfg.solver, grad=cfg.grad), init, sigma255=25)
    monkeypatch.setattr(torch.optim, "AdamW", _sgd)
    single = train(cfg, out=tmp_path / "single", progress=False, device="cpu")
    for attempt in range(3):  # the port race of test_two_gloo_ranks_match_one_process
        try:
            mp.spawn(_sgd_rank, args=(2, _free_port(), str(image_folder), str(init), str(tmp_path / "ddp")),
                     nprocs=2, join=True)
            break
        except Exception as err:  # noqa: BLE001 -- re-raised unless it is the port race
            if attempt == 2 or "address already in use" not in str(err).lower():
                raise
            shutil.rmtree(tmp_path / "ddp", ignore_errors=True)
    from nerd.weights import load_weights

    w0 = load_weights(init)[0].state_dict()
    a = torch.load(single / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "ddp" / "last.pt", weights_only=False)["model"]
    keys = [k for k in a if a[k].is_floating_point() and "running" not in k]
    moved_single = torch.cat([(a[k] - w0[k]).flatten() for k in keys]).double()
    moved_ddp = torch.cat([(b[k] - w0[k]).flatten() for k in keys]).double()
    assert moved_single.norm() > 1e-3  # the weights moved: the comparison below means something
    ratio = float(moved_ddp.norm() / moved_single.norm())
    assert abs(ratio - 1) < 1e-3, f"DDP moved the weights {ratio:.3f} x as far as one process (2 = summed gradients)"
    assert float((moved_ddp - moved_single).norm() / moved_single.norm()) < 1e-3
