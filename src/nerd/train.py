"""Training NERD: random crops, AWGN, MSE (eq. 6), AdamW + cosine, checkpoints that survive being killed.

A run lives in a folder `runs/NAME/`:
    config.json      the resolved config
    machine.json     where it trained (device name, precision, torch), so its hours read as CPU or GPU time
    last.pt          the one resumable checkpoint (model, optimiser, RNG states, step, elapsed time; with
                     `train.ema`, the weights' moving average too), atomic
    best.safetensors the weights with the best validation PSNR so far (with their metadata)
    log.csv          one row per `log_every` steps: loss, lr, solver f-evaluations and residual, speed
    val.csv          one row per validation: PSNR on held-out training images, solver statistics
    curve.png        the learning curve, redrawn from the logs at every validation

`train(cfg, out=...)` runs or resumes it; under `torchrun` it uses DistributedDataParallel (NCCL on GPUs, gloo on
the CPU), each rank taking its slice of the same global batch.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from nerd import distributed
from nerd.config import Config, config_from_dict, config_to_dict
from nerd.data.patches import PatchSampler, load_folder, validation_pairs
from nerd.evaluate import default_data_root, ieee_fp32
from nerd.models import DEQDenoiser
from nerd.weights import save_weights

LOG_FIELDS = ["step", "lr", "loss", "train_psnr", "nfe", "rel_residual", "sec_per_step", "elapsed_s", "cpu_s"]
VAL_FIELDS = ["step", "elapsed_s", "cpu_s", "sigma", "val_psnr", "nfe", "rel_residual", "converged"]


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf: the run stops and the last good checkpoint is kept."""


def lr_at(step: int, total: int, cfg: Config, elapsed_s: float = 0.0) -> float:
    """Linear warm-up, then cosine decay from lr to lr_min over the remaining steps (or, for a run with a time
    budget `train.minutes`, over the budget's elapsed fraction, whichever is further on)."""
    t = cfg.train
    if step < t.warmup:
        return t.lr * (step + 1) / t.warmup
    progress = (step - t.warmup) / max(1, total - t.warmup)
    if t.minutes > 0:
        progress = max(progress, elapsed_s / (60 * t.minutes))
    progress = min(1.0, progress)
    return t.lr_min + 0.5 * (t.lr - t.lr_min) * (1 + math.cos(math.pi * progress))


def machine(dev: torch.device, amp: bool) -> dict:
    """Where a run trains: the device in words, its precision and the torch version (hours mean nothing without)."""
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {"device": dev.type, "name": name, "precision": "bf16 autocast" if amp else "float32",
            "threads": torch.get_num_threads() if dev.type == "cpu" else None, "torch": torch.__version__}


def atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _append_csv(path: Path, fields: list[str], row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerow(row)


def _truncate_csv(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint we resume from (they will be logged again)."""
    if not path.exists():
        return
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
        fields = list(rows[0].keys()) if rows else None
    if fields is None:
        return
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(r for r in rows if int(r["step"]) <= step)


@torch.no_grad()
@ieee_fp32()
def validate(model: DEQDenoiser, pairs: list[tuple[Tensor, Tensor]], sigma255: float, device: torch.device) -> dict:
    """Mean PSNR (clipped output, float64) and solver statistics over fixed validation pairs (IEEE float32 on a GPU
    too: the figure decides which weights are kept)."""
    was_training = model.training
    model.eval()
    psnrs, nfes, res, conv = [], [], [], []
    for x, y in pairs:
        eq = model.equilibrium(y.to(device), sigma255 / 255.0)
        mse = (eq.x_hat.clamp(0, 1).double().cpu() - x.double()).pow(2).mean().item()
        psnrs.append(10 * math.log10(1 / max(mse, 1e-20)))
        nfes.append(eq.stats.nfe.float().mean().item())
        res.append(eq.stats.rel_residual.mean().item())
        conv.append(float(eq.stats.converged.float().mean()))
    model.train(was_training)
    n = len(pairs)
    return {
        "val_psnr": sum(psnrs) / n,
        "nfe": sum(nfes) / n,
        "rel_residual": sum(res) / n,
        "converged": sum(conv) / n,
    }


def plot_curve(run: Path) -> Path | None:
    """Redraw `curve.png` from log.csv and val.csv (needs matplotlib; skipped without it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, ax, key in (("log.csv", axes[0], "train_psnr"), ("val.csv", axes[1], "val_psnr")):
        path = run / name
        if not path.exists():
            continue
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        if not rows:
            continue
        hours = [float(r.get("cpu_s") or r["elapsed_s"]) / 3600 for r in rows]
        vals = [float(r[key]) for r in rows]
        if key == "train_psnr" and len(vals) > 10:  # moving average: single batches are noisy
            k = max(1, len(vals) // 30)
            vals = [sum(vals[max(0, i - k) : i + 1]) / len(vals[max(0, i - k) : i + 1]) for i in range(len(vals))]
        ax.plot(hours, vals, marker="o" if key == "val_psnr" else None, ms=3)
        ax.set_xlabel("training CPU-hours (process CPU time)")
        ax.set_ylabel(f"{key.replace('_', ' ')} (dB)")
        ax.grid(alpha=0.3)
    axes[0].set_title("training batches (moving average)")
    axes[1].set_title("held-out validation images")
    fig.suptitle(run.name)
    fig.tight_layout()
    out = run / "curve.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def kept_weights(ckpt: dict) -> dict[str, Tensor]:
    """The model state a training checkpoint stands for: its weights' moving average where the run kept one
    (`train.ema`: those are the weights it validated and keeps), else the trained weights."""
    if ckpt.get("ema") is None:
        return ckpt["model"]
    prefix = "module."  # AveragedModel holds the model as `.module`, beside its `n_averaged` counter
    return {k[len(prefix):]: v for k, v in ckpt["ema"].items() if k.startswith(prefix)}


def _param_groups(model: DEQDenoiser) -> tuple[list[str], list[str]]:
    """Parameter names with weight decay and without (biases, norms, weight norm's magnitudes), in the order
    AdamW numbers them. Weight norm's directions (`original1`) are decayed: w does not depend on their length, so
    decay only shortens them and so raises their effective step size, as for weights followed by a norm layer."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or "original0" in name else decay).append(name)
    return decay, no_decay


def _load_init(model: DEQDenoiser, init: str, seed: int = 0) -> dict | None:
    """Load the weights a new stage starts from; returns the optimiser moments to carry over, if any.

    `init` is a weights file (shipped name or .safetensors: a fresh AdamW) or a run's checkpoint `last.pt` (its
    kept weights: the moving average where it had one), whose AdamW moments come along: a fresh AdamW's first steps
    move every weight by about lr regardless of its gradient's size, which costs a trained model validation PSNR
    that the next few hundred steps only win back.
    A model whose config differs from this run's only by an integer multiple of `expansion` is widened on the way
    in (`nerd.models.grow`: same function, copies made distinct by a 1e-2 noise drawn from `seed`).
    """
    moments = None
    if init.endswith(".pt"):
        state = torch.load(init, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or not {"model", "optimizer"} <= set(state):
            raise ValueError(f"init {init}: not a training checkpoint (no model or optimizer state)")
        init_cfg = config_from_dict(state["config"]).model
        weights, moments = kept_weights(state), state["optimizer"]["state"]
    else:
        from nerd.weights import load_weights

        init_model, _ = load_weights(init)
        init_cfg, weights = init_model.cfg, init_model.state_dict()
    # Settings that leave the weights' shapes and meaning alone may change between stages (the attention has no
    # position bias, so q can); `expansion` may grow by an integer factor; anything else is another model.
    free = ("window", "dropout", "attn_block", "expansion")
    differ = [f.name for f in fields(init_cfg) if getattr(init_cfg, f.name) != getattr(model.cfg, f.name)]
    if [name for name in differ if name not in free] or model.cfg.expansion % init_cfg.expansion:
        raise ValueError(f"init {init}: its model differs from this run's in {', '.join(differ)} ({init_cfg} vs "
                         f"{model.cfg}); only {', '.join(free[:3])} may differ, and expansion by an integer factor "
                         "(the hidden layer is then widened)")
    if init_cfg.expansion != model.cfg.expansion:
        factor = model.cfg.expansion // init_cfg.expansion
        from nerd.models.grow import widen_hidden

        g = torch.Generator().manual_seed(seed)
        weights = widen_hidden(weights, init_cfg.groups, factor, noise=1e-2, generator=g)
        if moments is not None:  # AdamW numbers its parameters; widening keeps their names and order
            names = [n for group in _param_groups(model) for n in group]
            moments = {i: dict(m) for i, m in moments.items()}
            for power, key in ((1, "exp_avg"), (2, "exp_avg_sq")):
                held = {names[i]: m[key] for i, m in moments.items() if key in m}
                wide = widen_hidden(held, init_cfg.groups, factor, moment=power)
                for i, m in moments.items():
                    if key in m:
                        m[key] = wide[names[i]]
    model.load_state_dict(weights)
    return moments


def train(
    cfg: Config,
    *,
    out: str | os.PathLike[str],
    resume: bool = False,
    device: str | None = None,
    stop_after: int | None = None,
    max_minutes: float | None = None,
    max_cpu_minutes: float | None = None,
    progress: bool = True,
) -> Path:
    """Train (or resume) the run in folder `out`; returns the folder.

    Args:
        stop_after: stop (with a checkpoint) once this step is reached, as if the run had been killed there.
        max_minutes: stop (with a checkpoint) after this much wall-clock time in this invocation.
        max_cpu_minutes: stop (with a checkpoint) once the run's total process CPU time (all invocations) reaches
            this; CPU time, unlike wall-clock time, hardly depends on what else the machine is running, so runs
            compared at equal CPU budgets are comparable.
    """
    rank, world, dist_device = distributed.setup()
    run = Path(out)
    t = cfg.train
    dev = dist_device or torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if t.threads and dev.type == "cpu":
        torch.set_num_threads(t.threads)
    if t.batch % world:
        raise ValueError(f"batch {t.batch} is not divisible by the {world} processes")
    ckpt_path = run / "last.pt"
    ckpt = None
    if resume:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        cfg = config_from_dict(ckpt["config"])
        t = cfg.train
    elif ckpt_path.exists():
        raise FileExistsError(f"{run} already holds a run: pass --resume to continue it, or choose another --out")
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
        if ckpt is None:  # a fresh run: logs left by an earlier attempt that never checkpointed are stale
            for name in ("log.csv", "val.csv"):
                (run / name).unlink(missing_ok=True)

    torch.manual_seed(t.seed + rank)  # init: DDP broadcasts rank 0's; dropout masks: independent per rank
    data_root = Path(t.data) if t.data else default_data_root() / "Train400"
    train_images, val_images, _ = load_folder(data_root, t.val_images)
    total = t.total_steps(len(train_images))
    generator = torch.Generator().manual_seed(t.seed)
    sampler = PatchSampler(train_images, t.crop, t.sigma, generator)
    val_sets = {s: validation_pairs(val_images, s, t.val_crop) for s in t.sigma}

    model = DEQDenoiser(cfg.model, solver=cfg.solver, grad=cfg.grad)
    init_moments = None
    if t.init and ckpt is None:  # a new stage from earlier weights (e.g. sigma 25 -> 15/50, or a longer run)
        init_moments = _load_init(model, t.init, t.seed)
    model.to(dev).train()
    if world > 1:  # before the optimiser is built: the CPU variant replaces the BatchNorm modules
        distributed.sync_batchnorm(model, dev)
    ema = None
    if t.ema > 0:  # a copy made before compiling; updated after every step, BatchNorm's running statistics too
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(t.ema), use_buffers=True)
    kept = ema.module if ema is not None else model  # the weights validated, kept and exported
    params = dict(model.named_parameters())
    decay, no_decay = ([params[n] for n in names] for names in _param_groups(model))
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr,
        betas=t.betas,
    )
    if init_moments is not None:  # the moments only: this stage's lr, betas and weight decay are its own
        optimizer.load_state_dict({"state": init_moments, "param_groups": optimizer.state_dict()["param_groups"]})
    step, elapsed, cpu, best = 0, 0.0, 0.0, -math.inf
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        generator.set_state(ckpt["rng"]["data"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if dev.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], dev)
        if rank > 0:  # the checkpoint holds rank 0's streams; the others keep dropout masks of their own
            torch.manual_seed(t.seed + rank + 1_000_003 * ckpt["step"])
        step, elapsed, cpu, best = ckpt["step"], ckpt["elapsed_s"], ckpt.get("cpu_s", 0.0), ckpt["best_val"]
        if rank == 0:
            _truncate_csv(run / "log.csv", step)
            _truncate_csv(run / "val.csv", step)
    net: torch.nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if t.compile:
        model.layer.compile()  # in place: state-dict keys (checkpoints, exported weights) stay the same
    amp = t.amp == "on" or (t.amp == "auto" and dev.type == "cuda")
    where = machine(dev, amp)
    if rank == 0:
        (run / "machine.json").write_text(json.dumps(where, indent=2))
    train_solver = replace(cfg.solver, max_iter=t.train_iters) if t.train_iters else cfg.solver

    def checkpoint() -> None:
        if rank != 0:
            return
        atomic_save(
            {
                "config": config_to_dict(cfg),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "rng": {"data": generator.get_state(), "torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None},
                "step": step,
                "elapsed_s": elapsed,
                "cpu_s": cpu,
                "best_val": best,
            },
            ckpt_path,
        )

    def run_validation() -> None:
        nonlocal best
        if rank != 0:
            return
        rows = []
        for s, pairs in val_sets.items():
            stats = validate(kept, pairs, s, dev)  # full precision: it selects the best weights
            rows.append(stats)
            if ema is not None:  # the same run's control: the weights the optimiser holds
                stats = {**stats, "val_psnr_raw": validate(model, pairs, s, dev)["val_psnr"]}
            _append_csv(run / "val.csv", VAL_FIELDS + ["val_psnr_raw"] * (ema is not None),
                        {"step": step, "elapsed_s": round(elapsed, 1), "cpu_s": round(cpu, 1), "sigma": s,
                         **{k: round(v, 5) for k, v in stats.items()}})
        mean = sum(r["val_psnr"] for r in rows) / len(rows)
        if mean > best:
            best = mean
            save_weights(kept, run / "best.safetensors", sigma255=t.sigma[0],
                         scores={"val_psnr": round(mean, 4), "val_images": t.val_images},
                         train={"run": run.name, "step": step, "hours": round(elapsed / 3600, 3),
                                "cpu_hours": round(cpu / 3600, 3), "crops": step * t.batch, "machine": where,
                                "config": config_to_dict(cfg)})
        plot_curve(run)
        checkpoint()  # so that best.safetensors is never ahead of the resumable state

    # SIGTERM / SIGINT finish the current step, write the checkpoint and return: nothing is lost.
    stop = {"signal": None}

    def request_stop(signum: int, _frame: object) -> None:
        stop["signal"] = signum

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}

    def time_up() -> bool:  # a run whose length is a time budget (train.minutes); all ranks agree
        return t.minutes > 0 and distributed.any_rank(elapsed >= 60 * t.minutes, dev)

    ended = step >= total or time_up()  # the run's length is reached: steps, or its time budget
    finished_before = ended  # resuming a finished run changes nothing
    bar = None
    by_time = t.minutes > 0  # a time budget: the bar follows it (steps, if also set, may end the run first)
    if progress and rank == 0:
        from tqdm import tqdm

        if by_time:  # a bar over the steps would show an epoch count the run never reaches
            bar = tqdm(total=t.minutes, initial=min(elapsed, 60 * t.minutes) / 60, desc=run.name, unit="min",
                       dynamic_ncols=True, bar_format="{l_bar}{bar}| {n:.2f}/{total:.2f} min [{postfix}]")
        else:
            bar = tqdm(total=total, initial=step, desc=run.name, unit="step", dynamic_ncols=True)
    if t.init and ckpt is None and t.val_every and not ended:
        run_validation()  # step 0 of a stage: where its init stands (best.safetensors must then beat it)
    started, last_ckpt = time.monotonic(), time.monotonic()
    t_step, c_step = time.monotonic(), time.process_time()
    try:
        while not ended:
            x, y, sigma = sampler.sample(t.batch)
            lo, hi = rank * t.batch // world, (rank + 1) * t.batch // world
            x, y, sigma = x[lo:hi].to(dev), y[lo:hi].to(dev), sigma[lo:hi].to(dev)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, cfg, elapsed)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                eq = model.equilibrium(y, sigma, solver=train_solver) if world == 1 else None
                x_hat = eq.x_hat if eq is not None else net(y, sigma, solver=train_solver)
            loss = F.mse_loss(x_hat.float(), x)  # eq. (6): ||n - n_hat||^2 = ||x - x_hat||^2
            if distributed.any_rank(not bool(torch.isfinite(loss)), dev):
                where = f"is {loss.item()}" if not torch.isfinite(loss) else "is not finite on another rank"
                kept = torch.load(ckpt_path, weights_only=False)["step"] if ckpt_path.exists() else 0
                raise NonFiniteLoss(f"loss {where} at step {step}; kept the checkpoint of step {kept}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            if ema is not None:
                ema.update_parameters(model)
            step += 1
            now = time.monotonic()
            elapsed += now - t_step
            sec, t_step = now - t_step, now
            cpu += time.process_time() - c_step
            c_step = time.process_time()
            if bar is not None:
                bar.update(min(elapsed / 60, t.minutes) - bar.n if by_time else 1)
            if rank == 0 and (step % t.log_every == 0 or step == total):
                stats = eq.stats if eq is not None else None
                row = {"step": step, "lr": f"{optimizer.param_groups[0]['lr']:.3e}", "loss": f"{loss.item():.4e}",
                       "train_psnr": round(10 * math.log10(1 / max(loss.item(), 1e-20)), 3),
                       "nfe": round(stats.nfe.float().mean().item(), 2) if stats else "",
                       "rel_residual": f"{stats.rel_residual.mean().item():.3e}" if stats else "",
                       "sec_per_step": round(sec, 3), "elapsed_s": round(elapsed, 1), "cpu_s": round(cpu, 1)}
                _append_csv(run / "log.csv", LOG_FIELDS, row)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss.item():.2e}", nfe=row["nfe"], res=row["rel_residual"])
            ended = step >= total or time_up()  # once a step: under DDP each time_up() is an all-reduce
            if t.val_every and step % t.val_every == 0 and not ended:
                run_validation()
                t_step, c_step = time.monotonic(), time.process_time()  # validation is not training time
            if time.monotonic() - last_ckpt > 60 * t.checkpoint_minutes:
                checkpoint()
                last_ckpt = time.monotonic()
            budget_spent = (max_minutes is not None and time.monotonic() - started > 60 * max_minutes) or (
                max_cpu_minutes is not None and cpu > 60 * max_cpu_minutes
            )
            budget_spent = distributed.any_rank(budget_spent, dev)
            if budget_spent and not ended and t.val_every and step % t.val_every:
                run_validation()  # a budgeted run ends with a validation figure (a comparison's end point)
            stop_now = stop["signal"] is not None or (stop_after is not None and step >= stop_after) or budget_spent
            if distributed.any_rank(stop_now, dev):
                break
        if ended and not finished_before:
            run_validation()
        checkpoint()
    finally:
        if bar is not None:
            bar.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stop["signal"] is not None and rank == 0:
        print(f"stopped by signal {stop['signal']} at step {step}; resume with --resume", file=sys.stderr)
    return run


def resolved_config(cfg: Config, **train_overrides: object) -> Config:
    """`cfg` with explicit overrides of its [train] section (explicit arguments win over the file)."""
    clean = {k: v for k, v in train_overrides.items() if v is not None}
    return replace(cfg, train=replace(cfg.train, **clean)) if clean else cfg
