"""Training NERD: random crops, AWGN, MSE (eq. 6), AdamW + cosine, checkpoints that survive being killed.

A run lives in a folder `runs/NAME/`:
    config.json      the resolved config
    machine.json     where it trained (device name, precision, torch), so its hours read as CPU or GPU time
    last.pt          the one resumable checkpoint (model, optimiser, RNG states, step, elapsed time; with
                     `train.ema`, the weights' moving average too): atomic, plain values only (`nerd.checkpoint`)
    best.safetensors the weights with the best validation PSNR so far (with their metadata)
    log.csv          one row per `log_every` steps: loss, lr, solver f-evaluations and residual, speed
    val.csv          one row per validation: PSNR on held-out training images, solver statistics
    curve.png        the learning curve, redrawn from the logs at every validation

`train(cfg, out=...)` runs or resumes it; under `torchrun` it uses DistributedDataParallel (NCCL on GPUs, gloo on
the CPU), each rank taking its slice of the same global batch. One invocation is a `_Run`: set up (everything that
can refuse the run, before any file is written), then `loop` over `train_step`, `log`, `after_step` (validation,
checkpoint, limits), ending in a checkpoint.
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
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from nerd import distributed
from nerd.checkpoint import kept_weights, load_checkpoint, restore, save_checkpoint
from nerd.config import Config, TrainConfig, config_from_dict, config_to_dict
from nerd.data.patches import PatchSampler, load_folder, validation_pairs
from nerd.errors import ConfigError, TrainError, WeightsError
from nerd.evaluate import ieee_fp32
from nerd.metrics import psnr_from_mse
from nerd.models import DEQDenoiser
from nerd.paths import data_root
from nerd.sigma import to_unit
from nerd.weights import save_weights

LOG_FIELDS = ["step", "lr", "loss", "train_psnr", "nfe", "rel_residual", "sec_per_step", "elapsed_s", "cpu_s"]
VAL_FIELDS = ["step", "elapsed_s", "cpu_s", "sigma", "val_psnr", "nfe", "rel_residual", "converged"]


class NonFiniteLoss(TrainError, RuntimeError):
    """The loss became NaN/inf: the run stops and the last good checkpoint is kept. A `TrainError` (the CLI reports
    it in one line), still a RuntimeError for callers that caught it as one."""


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
        eq = model.equilibrium(y.to(device), to_unit(sigma255))
        mse = (eq.x_hat.clamp(0, 1).double().cpu() - x.double()).pow(2).mean().item()
        psnrs.append(psnr_from_mse(mse))
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
    Raises `WeightsError` for an unreadable or damaged file, `TrainError` for another model.
    """
    moments = None
    if init.endswith(".pt"):
        state = load_checkpoint(init)  # read without running code from the file; its structure checked
        init_cfg = config_from_dict(state["config"]).model
        weights, moments = kept_weights(state), state["optimizer"]["state"]
    else:
        from nerd.weights import load_weights

        init_model, _ = load_weights(init)
        init_cfg, weights = init_model.cfg, init_model.state_dict()
    # Settings that leave the weights' shapes and meaning alone may change between stages (the attention has no
    # position bias, so q can); `expansion` may grow by an integer factor; anything else is another model.
    free = ("window", "dropout", "attn_block", "expansion")
    if init_cfg.in_channels == 1 and model.cfg.in_channels == 3 and moments is None:  # gray weights -> colour model
        from nerd.colour import colour_state_from_gray

        weights = colour_state_from_gray(weights, model.cfg.in_channels)
        init_cfg = replace(init_cfg, in_channels=model.cfg.in_channels)
    differ = [f.name for f in fields(init_cfg) if getattr(init_cfg, f.name) != getattr(model.cfg, f.name)]
    if [name for name in differ if name not in free] or model.cfg.expansion % init_cfg.expansion:
        raise TrainError(f"init {init}: its model differs from this run's in {', '.join(differ)} ({init_cfg} vs "
                         f"{model.cfg}); only {', '.join(free[:3])} may differ, and expansion by an integer factor "
                         "(the hidden layer is then widened)")
    if init_cfg.expansion != model.cfg.expansion:
        from nerd.models.grow import widen_hidden

        factor = model.cfg.expansion // init_cfg.expansion
        g = torch.Generator().manual_seed(seed)
        weights = widen_hidden(weights, init_cfg.groups, factor, noise=1e-2, generator=g)
        if moments is not None:
            moments = _widen_moments(moments, model, init_cfg.groups, factor)
    restore(model, weights, init, "model")
    if moments is not None:
        _check_moments(moments, model, init)
    return moments


def _widen_moments(moments: dict, model: DEQDenoiser, groups: int, factor: int) -> dict:
    """AdamW's moments of a narrower model, widened like their parameters (first moments as values, second as
    squares). AdamW numbers its parameters; widening keeps their names and order."""
    from nerd.models.grow import widen_hidden

    names = [n for group in _param_groups(model) for n in group]
    moments = {i: dict(m) for i, m in moments.items()}
    for power, key in ((1, "exp_avg"), (2, "exp_avg_sq")):
        held = {names[i]: m[key] for i, m in moments.items() if key in m}
        wide = widen_hidden(held, groups, factor, moment=power)
        for i, m in moments.items():
            if key in m:
                m[key] = wide[names[i]]
    return moments


def _check_moments(moments: dict, model: DEQDenoiser, path: str) -> None:
    """WeightsError unless every carried moment has its parameter's shape (AdamW itself checks none of it)."""
    shapes = [model.get_parameter(n).shape for group in _param_groups(model) for n in group]
    for i, m in moments.items():
        if not (isinstance(i, int) and 0 <= i < len(shapes) and isinstance(m, dict)):
            raise WeightsError(f"{path}: its optimizer state numbers parameter {i!r}; this model has {len(shapes)}")
        for key in ("exp_avg", "exp_avg_sq"):
            if key in m and (not isinstance(m[key], Tensor) or m[key].shape != shapes[i]):
                raise WeightsError(f"{path}: its optimizer's {key} of parameter {i} does not fit this model")


def _load_data(t: TrainConfig, channels: int = 1) -> tuple[list[Tensor], list[Tensor]]:
    """(training images, held-out validation images) of the run's folder, each (channels, H, W) in [0, 1];
    DataError when the folder is missing or too small."""
    train_images, val_images, _ = load_folder(t.data or data_root() / "Train400", t.val_images, channels)
    return train_images, val_images


def _checkpoint_to_resume(run: Path, resume: bool) -> dict | None:
    """The checkpoint `--resume` continues (read safely and checked), or None for a fresh run; TrainError when
    there is none to resume, or when a fresh run would overwrite one."""
    path = run / "last.pt"
    if resume:
        if not path.exists():
            raise TrainError(f"--resume: no checkpoint at {path}")
        return load_checkpoint(path)
    if path.exists():
        raise TrainError(f"{run} already holds a run: pass --resume to continue it, or choose another --out")
    return None


@dataclass(frozen=True)
class _Limits:
    """Where this invocation stops early, with a checkpoint, as if killed there: a step, wall-clock minutes of this
    invocation, process CPU minutes of the whole run (comparable across machine loads, unlike wall-clock)."""

    stop_after: int | None = None
    max_minutes: float | None = None
    max_cpu_minutes: float | None = None

    def spent(self, started: float, cpu: float) -> bool:
        """A time budget is spent (`started`: this invocation's monotonic start, `cpu`: the run's CPU seconds)."""
        return (self.max_minutes is not None and time.monotonic() - started > 60 * self.max_minutes) or (
            self.max_cpu_minutes is not None and cpu > 60 * self.max_cpu_minutes
        )


class _Run:
    """One invocation of a training run, fresh or resumed: its model, optimiser, data streams and counters, and the
    pieces of its loop. Rank 0 alone writes files; every rank takes the same decisions (`distributed.any_rank`) in
    the same order, or the others would wait forever in DDP's next all-reduce.

    Everything that can refuse the run (data, init, checkpoint, config) happens in the constructor, before
    `prepare_folder` creates or touches anything on disk.
    """

    def __init__(self, cfg: Config, run: Path, ckpt: dict | None, *, rank: int, world: int,
                 dev: torch.device) -> None:
        t = cfg.train
        if t.batch % world:
            raise ConfigError(f"batch {t.batch} is not divisible by the {world} processes")
        self.cfg, self.t, self.run, self.rank, self.world, self.dev = cfg, t, run, rank, world, dev
        self.ckpt_path, self.resumed = run / "last.pt", ckpt is not None
        torch.manual_seed(t.seed + rank)  # init: DDP broadcasts rank 0's; dropout masks: independent per rank
        train_images, val_images = _load_data(t, cfg.model.in_channels)
        self.total = t.total_steps(len(train_images))
        self.generator = torch.Generator().manual_seed(t.seed)
        try:
            self.sampler = PatchSampler(train_images, t.crop, t.sigma, self.generator)
        except ValueError as err:  # a crop larger than some image
            raise TrainError(str(err)) from None
        self.val_sets = {s: validation_pairs(val_images, s, t.val_crop) for s in t.sigma}
        self.step, self.elapsed, self.cpu, self.best = 0, 0.0, 0.0, -math.inf
        self.saved_step: int | None = None  # the step that last.pt holds, once there is one
        self._build()
        if ckpt is not None:
            self._restore(ckpt)
        self.net = self._parallel()
        self.amp = t.amp == "on" or (t.amp == "auto" and dev.type == "cuda")
        self.where = machine(dev, self.amp)
        self.train_solver = replace(cfg.solver, max_iter=t.train_iters) if t.train_iters else cfg.solver
        self.signal: int | None = None  # SIGTERM / SIGINT received: stop after this step
        self.bar: Any = None  # tqdm, on rank 0 with progress
        # monotonic / process-time clock readings and the last step's seconds, set as the loop starts
        self.started = self.last_ckpt = self.t_step = self.c_step = self.sec = 0.0

    def _build(self) -> None:
        """The model (from `train.init` for a new stage), its moving average and AdamW, on the run's device."""
        cfg, t = self.cfg, self.t
        self.model = DEQDenoiser(cfg.model, solver=cfg.solver, grad=cfg.grad)
        moments = None
        if t.init and not self.resumed:  # a new stage from earlier weights (e.g. sigma 25 -> 15/50, a longer run)
            moments = _load_init(self.model, t.init, t.seed)
        self.model.to(self.dev).train()
        if self.world > 1:  # before the optimiser is built: the CPU variant replaces the BatchNorm modules
            distributed.sync_batchnorm(self.model, self.dev)
        self.ema = None
        if t.ema > 0:  # a copy made before compiling; updated after every step, BatchNorm's running statistics too
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(t.ema), use_buffers=True)
        self.kept = self.ema.module if self.ema is not None else self.model  # the weights validated, kept, exported
        params = dict(self.model.named_parameters())
        decay, no_decay = ([params[n] for n in names] for names in _param_groups(self.model))
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=t.lr,
            betas=t.betas,
        )
        if moments is not None:  # the moments only: this stage's lr, betas and weight decay are its own
            groups = self.optimizer.state_dict()["param_groups"]
            self.optimizer.load_state_dict({"state": moments, "param_groups": groups})

    def _restore(self, ckpt: dict) -> None:
        """Continue from checkpoint `ckpt`: weights, average, optimiser, both random streams, counters.
        WeightsError (naming last.pt) for a state that does not fit this run."""
        path = self.ckpt_path
        restore(self.model, ckpt["model"], path, "model")
        if self.ema is not None:
            restore(self.ema, ckpt["ema"], path, "moving average")
        state = ckpt["optimizer"].get("state") if isinstance(ckpt["optimizer"], dict) else None
        if isinstance(state, dict):  # AdamW would load mis-shaped moments and fail at its first step instead
            _check_moments(state, self.model, str(path))
        restore(self.optimizer, ckpt["optimizer"], path, "optimizer state")
        rng = ckpt["rng"]
        try:
            self.generator.set_state(rng["data"])
            torch.set_rng_state(rng["torch"])
            if self.dev.type == "cuda" and rng.get("cuda") is not None:
                torch.cuda.set_rng_state(rng["cuda"], self.dev)
        except (RuntimeError, TypeError, ValueError) as err:
            raise WeightsError(f"{path}: its random generator states are damaged ({err})") from None
        if self.rank > 0:  # the checkpoint holds rank 0's streams; the others keep dropout masks of their own
            torch.manual_seed(self.t.seed + self.rank + 1_000_003 * ckpt["step"])
        self.step, self.elapsed, self.cpu, self.best = ckpt["step"], ckpt["elapsed_s"], ckpt["cpu_s"], ckpt["best_val"]
        self.saved_step = self.step

    def _parallel(self) -> torch.nn.Module:
        """The module a DDP step calls (DistributedDataParallel under torchrun); `train.compile` compiles the
        implicit layer in place, so state-dict keys (checkpoints, exported weights) stay the same."""
        net: torch.nn.Module = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(self.model, device_ids=[self.dev.index] if self.dev.type == "cuda" else None)
        if self.t.compile:
            self.model.layer.compile()
        return net

    def prepare_folder(self) -> None:
        """Create (or update) the run folder: config.json, machine.json, logs cut back to the checkpoint (rank 0).
        Called once the run can no longer be refused, so a start that fails leaves no folder behind."""
        if self.rank != 0:
            return
        try:
            self.run.mkdir(parents=True, exist_ok=True)
            (self.run / "config.json").write_text(json.dumps(config_to_dict(self.cfg), indent=2))
            for name in ("log.csv", "val.csv"):
                if self.resumed:  # rows logged after the checkpoint are logged again
                    _truncate_csv(self.run / name, self.step)
                else:  # a fresh run: logs left by an earlier attempt that never checkpointed are stale
                    (self.run / name).unlink(missing_ok=True)
            (self.run / "machine.json").write_text(json.dumps(self.where, indent=2))
        except OSError as err:  # a read-only or full place: one line, not a traceback
            raise TrainError(f"cannot write the run folder {self.run}: {err.strerror or err}") from None

    def loop(self, limits: _Limits, progress: bool) -> None:
        """Train until the run's length (steps or `train.minutes`), a limit or a signal; then validate if the run
        just finished, and write the checkpoint (SIGTERM / SIGINT finish the step first: nothing is lost)."""
        previous = self._catch_signals()
        ended = self.step >= self.total or self._time_up()
        finished_before = ended  # resuming a finished run changes nothing
        self.bar = self._progress_bar() if progress and self.rank == 0 else None
        try:
            if self.t.init and not self.resumed and self.t.val_every and not ended:
                self.run_validation()  # step 0 of a stage: where its init stands (best.safetensors must beat it)
            self.started, self.last_ckpt = time.monotonic(), time.monotonic()
            self.t_step, self.c_step = time.monotonic(), time.process_time()
            while not ended:
                loss, eq = self.train_step()
                self.log(loss, eq)
                ended = self.step >= self.total or self._time_up()  # once a step: under DDP each is an all-reduce
                if self.after_step(ended, limits):
                    break
            if ended and not finished_before:
                self.run_validation()
            self.checkpoint()
        finally:
            if self.bar is not None:
                self.bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.signal is not None and self.rank == 0:
            print(f"stopped by signal {self.signal} at step {self.step}; last.pt holds it: resume with --resume",
                  file=sys.stderr)

    def train_step(self) -> tuple[Tensor, Any]:
        """One AdamW step on this rank's slice of a global batch; returns (loss, the equilibrium, None under DDP).
        NonFiniteLoss on every rank, the step not taken, when the loss is not finite on any rank."""
        t, dev = self.t, self.dev
        x, y, sigma = self.sampler.sample(t.batch)
        lo, hi = self.rank * t.batch // self.world, (self.rank + 1) * t.batch // self.world
        x, y, sigma = x[lo:hi].to(dev), y[lo:hi].to(dev), sigma[lo:hi].to(dev)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.total, self.cfg, self.elapsed)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.amp):
            eq = self.model.equilibrium(y, sigma, solver=self.train_solver) if self.world == 1 else None
            x_hat = eq.x_hat if eq is not None else self.net(y, sigma, solver=self.train_solver)
        loss = F.mse_loss(x_hat.float(), x)  # eq. (6): ||n - n_hat||^2 = ||x - x_hat||^2
        if distributed.any_rank(not bool(torch.isfinite(loss)), dev):
            where = f"is {loss.item()}" if not torch.isfinite(loss) else "is not finite on another rank"
            kept = (f"kept the checkpoint of step {self.saved_step}" if self.saved_step is not None
                    else "no checkpoint was written")
            raise NonFiniteLoss(f"loss {where} at step {self.step}; {kept}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.step += 1
        now = time.monotonic()  # the step's time; validations and checkpoints restart the clocks after them
        self.sec, self.t_step = now - self.t_step, now
        self.elapsed += self.sec
        self.cpu += time.process_time() - self.c_step
        self.c_step = time.process_time()
        return loss, eq

    def log(self, loss: Tensor, eq: Any) -> None:
        """Advance the progress bar; every `log_every` steps, and at the last, a row of log.csv (rank 0)."""
        t = self.t
        if self.bar is not None:
            self.bar.update(min(self.elapsed / 60, t.minutes) - self.bar.n if t.minutes > 0 else 1)
        if self.rank != 0 or not (self.step % t.log_every == 0 or self.step == self.total):
            return
        stats = eq.stats if eq is not None else None
        row = {"step": self.step, "lr": f"{self.optimizer.param_groups[0]['lr']:.3e}", "loss": f"{loss.item():.4e}",
               "train_psnr": round(psnr_from_mse(loss.item()), 3),
               "nfe": round(stats.nfe.float().mean().item(), 2) if stats else "",
               "rel_residual": f"{stats.rel_residual.mean().item():.3e}" if stats else "",
               "sec_per_step": round(self.sec, 3), "elapsed_s": round(self.elapsed, 1), "cpu_s": round(self.cpu, 1)}
        _append_csv(self.run / "log.csv", LOG_FIELDS, row)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss.item():.2e}", nfe=row["nfe"], res=row["rel_residual"])

    def after_step(self, ended: bool, limits: _Limits) -> bool:
        """Validate, checkpoint and check the limits after a step; True when every rank stops here."""
        t = self.t
        if t.val_every and self.step % t.val_every == 0 and not ended:
            self.run_validation()
            self.t_step, self.c_step = time.monotonic(), time.process_time()  # validation is not training time
        if time.monotonic() - self.last_ckpt > 60 * t.checkpoint_minutes:
            self.checkpoint()
            self.last_ckpt = time.monotonic()
        spent = distributed.any_rank(limits.spent(self.started, self.cpu), self.dev)
        if spent and not ended and t.val_every and self.step % t.val_every:
            self.run_validation()  # a budgeted run ends with a validation figure (a comparison's end point)
        stop = self.signal is not None or (limits.stop_after is not None and self.step >= limits.stop_after)
        return distributed.any_rank(stop or spent, self.dev)

    def run_validation(self) -> None:
        """Validate the kept weights at each sigma (rows of val.csv); a better mean PSNR replaces best.safetensors.
        Then a checkpoint, so that best.safetensors is never ahead of the resumable state (rank 0)."""
        if self.rank != 0:
            return
        rows = [self._validate_at(s, pairs) for s, pairs in self.val_sets.items()]
        mean = sum(r["val_psnr"] for r in rows) / len(rows)
        if mean > self.best:
            self.best = mean
            self._save_best(mean)
        plot_curve(self.run)
        self.checkpoint()

    def _validate_at(self, s: float, pairs: list[tuple[Tensor, Tensor]]) -> dict:
        """The kept weights' validation statistics at sigma `s` (0-255), appended to val.csv; with `train.ema`, the
        raw weights' PSNR beside them (the same run's control: the weights the optimiser holds)."""
        stats = validate(self.kept, pairs, s, self.dev)  # full precision: it selects the best weights
        raw = validate(self.model, pairs, s, self.dev)["val_psnr"] if self.ema is not None else None
        row = stats if raw is None else {**stats, "val_psnr_raw": raw}
        _append_csv(self.run / "val.csv", VAL_FIELDS + ["val_psnr_raw"] * (self.ema is not None),
                    {"step": self.step, "elapsed_s": round(self.elapsed, 1), "cpu_s": round(self.cpu, 1), "sigma": s,
                     **{k: round(v, 5) for k, v in row.items()}})
        return stats

    def _save_best(self, mean: float) -> None:
        """best.safetensors: the kept weights with their validation PSNR `mean` (dB) and the run's metadata."""
        t = self.t
        save_weights(self.kept, self.run / "best.safetensors", sigma255=t.sigma[0],
                     scores={"val_psnr": round(mean, 4), "val_images": t.val_images},
                     train={"run": self.run.name, "step": self.step, "hours": round(self.elapsed / 3600, 3),
                            "cpu_hours": round(self.cpu / 3600, 3), "crops": self.step * t.batch,
                            "machine": self.where, "config": config_to_dict(self.cfg)})

    def checkpoint(self) -> None:
        """Write last.pt atomically (rank 0; every rank notes the step it holds)."""
        self.saved_step = self.step
        if self.rank != 0:
            return
        rng = {"data": self.generator.get_state(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(self.dev) if self.dev.type == "cuda" else None}
        save_checkpoint({"config": config_to_dict(self.cfg), "model": self.model.state_dict(),
                         "optimizer": self.optimizer.state_dict(),
                         "ema": self.ema.state_dict() if self.ema is not None else None, "rng": rng,
                         "step": self.step, "elapsed_s": self.elapsed, "cpu_s": self.cpu, "best_val": self.best},
                        self.ckpt_path)

    def _catch_signals(self) -> dict:
        """SIGTERM / SIGINT set `self.signal` (the loop stops after the step); returns the handlers to put back
        (none outside the main thread, where Python cannot catch signals)."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _request_stop(self, signum: int, _frame: object) -> None:
        self.signal = signum

    def _time_up(self) -> bool:
        """A run whose length is a time budget (`train.minutes`) has spent it; all ranks agree."""
        return self.t.minutes > 0 and distributed.any_rank(self.elapsed >= 60 * self.t.minutes, self.dev)

    def _progress_bar(self) -> Any:
        """A tqdm bar over the run's steps, or over its minutes for a time budget (a bar over the steps would show
        an epoch count the run never reaches; steps, if also set, may end it first)."""
        from tqdm import tqdm

        t = self.t
        if t.minutes > 0:
            return tqdm(total=t.minutes, initial=min(self.elapsed, 60 * t.minutes) / 60, desc=self.run.name,
                        unit="min", dynamic_ncols=True, bar_format="{l_bar}{bar}| {n:.2f}/{total:.2f} min [{postfix}]")
        return tqdm(total=self.total, initial=self.step, desc=self.run.name, unit="step", dynamic_ncols=True)


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

    Raises:
        TrainError / ConfigError / WeightsError / ImageError (all `NerdError`): the run cannot start or resume as
            asked; a fresh run then leaves no folder behind. NonFiniteLoss: the loss diverged (last.pt is kept).
    """
    rank, world, dist_device = distributed.setup()
    run = Path(out)
    dev = dist_device or torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.train.threads and dev.type == "cpu":
        torch.set_num_threads(cfg.train.threads)
    ckpt = _checkpoint_to_resume(run, resume)
    if ckpt is not None:
        cfg = config_from_dict(ckpt["config"])  # a resumed run keeps the config it started with
    state = _Run(cfg, run, ckpt, rank=rank, world=world, dev=dev)
    del ckpt  # its tensors now live in the model and optimiser
    state.prepare_folder()
    state.loop(_Limits(stop_after, max_minutes, max_cpu_minutes), progress)
    return run


def load_recipe(path: str | os.PathLike[str], **train_overrides: object) -> Config:
    """The TOML recipe at `path` with explicit overrides of its [train] section (None: the file's value);
    ConfigError naming the file when it cannot be read, parsed or validated."""
    from nerd.config import load_config

    cfg = load_config(path)  # a ConfigError naming the file already
    try:
        return resolved_config(cfg, **train_overrides)
    except (ValueError, TypeError) as err:  # an override of the wrong type or range
        raise ConfigError(f"bad config {path}: {' '.join(str(err).split())}") from None


def resolved_config(cfg: Config, **train_overrides: object) -> Config:
    """`cfg` with explicit overrides of its [train] section (explicit arguments win over the file)."""
    clean = {k: v for k, v in train_overrides.items() if v is not None}
    return replace(cfg, train=replace(cfg.train, **clean)) if clean else cfg
