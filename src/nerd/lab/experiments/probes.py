"""Experiments on trained weights (shipped `nerd-s25` or `--weights`): convergence of the solver (Fig. 10) and the
features (Fig. 6: decode(z*) and decode(s); Fig. 9: the heads' attention maps)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nerd.config import SolverConfig
from nerd.lab.experiments.core import Context, ExperimentError, memo
from nerd.lab.experiments.equilibrium import load_figure_image
from nerd.lab.experiments.report import Outcome, Table, fmt
from nerd.lab.experiments.verdict import Expect, judge
from nerd.sigma import to_unit


def load_model(ctx: Context, default: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The weights named by --weights (else `default`), on the context's device."""
    from nerd.weights import WeightsError, load_weights

    try:
        return load_weights(ctx.weights or default, device=ctx.dev)
    except WeightsError as err:
        raise ExperimentError(f"{err} (pass --weights NAME|PATH)") from None


def noisy_input(x: np.ndarray, sigma: float, device: torch.device) -> torch.Tensor:
    """The protocol's noisy image as a (1, 1, H, W) float32 tensor."""
    from nerd.data.noise import protocol_noisy

    return torch.from_numpy(protocol_noisy(x, sigma)).float()[None, None].to(device)


def _psnr(model_out: torch.Tensor, x: np.ndarray) -> float:
    from nerd.metrics import psnr

    return psnr(model_out[0, 0].double().cpu().numpy(), x)


def convergence(ctx: Context) -> Outcome:
    """Fig. 10: relative residual per f-evaluation, Broyden vs plain iteration, on the figure image."""
    model, info = load_model(ctx, "nerd-s25")
    x = load_figure_image(ctx)
    sigma = info["sigma"]
    n = ctx.budget.trace_iters
    y = noisy_input(x, sigma, next(model.parameters()).device)
    solvers = {"broyden": SolverConfig(name="broyden", max_iter=n, tol=0.0, memory=model.solver.memory),
               "plain": SolverConfig(name="fixed_point", max_iter=n, tol=0.0, damping=1.0)}

    def trace(cfg: SolverConfig) -> dict[str, Any]:
        with torch.no_grad():
            eq = model.equilibrium(y, to_unit(sigma), solver=cfg)
        tr = [float(v) for v in eq.stats.trace[0]]
        return {"trace": tr, "psnr": _psnr(eq.x_hat, x), "min_residual": min(tr),
                "reach_1e-3": next((i + 1 for i, v in enumerate(tr) if v < 1e-3), None),
                "increases": sum(b > a for a, b in zip(tr, tr[1:], strict=False))}

    stamp = f"{info['sha256']}-{ctx.figure_image().name}-{x.shape}-{sigma:g}-{n}"
    out = {k: memo(ctx.out / "convergence" / "cache.json", k, stamp, lambda c=c: trace(c)) for k, c in
           solvers.items()}
    at = min(17, n)
    log_res = None if ctx.res is None else math.log10(2)
    claims = [
        judge(f"Broyden reaches a lower residual than plain iteration within {n} evaluations",
              [Expect("broyden", "plain", ">")], {k: math.log10(v["min_residual"]) for k, v in out.items()},
              resolution=log_res, higher_is_better=False, metric="log10 lowest relative residual, resolution x2"),
        judge(f"... and within the paper's solver budget ({at} evaluations)", [Expect("broyden", "plain", ">")],
              {k: math.log10(min(v["trace"][:at])) for k, v in out.items()}, resolution=log_res,
              higher_is_better=False, metric="log10 lowest relative residual, resolution x2", primary=False),
    ]
    rows = [[k, f"{min(v['trace'][:at]):.2e}", f"{v['min_residual']:.2e}", str(v["reach_1e-3"] or "-"),
             str(v["increases"]), fmt(v["psnr"])] for k, v in out.items()]
    header = ["solver", f"lowest residual, {at} evals", f"lowest residual, {n} evals", "evals to 1e-3",
              "residual increases", "PSNR (dB)"]

    def plot(plt: Any) -> Any:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for k, v in out.items():
            ax.semilogy(range(1, len(v["trace"]) + 1), v["trace"], "o-", ms=3,
                        label="NERD (Broyden)" if k == "broyden" else "plain iteration z <- f(z)")
        ax.axhline(1e-3, color="k", ls=":", lw=1)
        ax.set_xlabel("f-evaluations")
        ax.set_ylabel("relative residual ||f(z) - z|| / ||f(z)||")
        ax.set_title(f"convergence on {ctx.figure_image().name}, sigma {sigma:g} (Fig. 10)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        return fig

    notes = [f"weights {info['name']} ({info['sha256'][:12]}), image {ctx.figure_image().name} "
             f"{x.shape[0]}x{x.shape[1]}, sigma {sigma:g}, tol 0 (every evaluation runs).",
             "Residual: ||f(z) - z|| / ||f(z)|| at the evaluated z (the paper's ||z[i+1] - z[i]|| / ||z[i]|| for "
             "plain iteration, up to the denominator)."]
    return Outcome("convergence", "Fig. 10", "relative residual per f-evaluation: Broyden vs plain iteration",
                   [Table("", header, rows)], claims, {"weights": info["name"], "sigma": sigma, "solvers": out},
                   notes, plot, trains=False)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else 0.0


def _normalise(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def pick_points(x: np.ndarray, margin: int) -> dict[str, tuple[int, int]]:
    """A flat pixel (weakest smoothed gradient) and an edge pixel (strongest), away from the border."""
    from scipy.ndimage import gaussian_filter

    g = np.hypot(*np.gradient(gaussian_filter(x, 2.0)))
    h, w = x.shape
    m = max(0, min(margin, h // 2 - 1, w // 2 - 1))
    inner = g[m : h - m, m : w - m]
    out = {}
    for name, idx in (("flat", int(np.argmin(inner))), ("edge", int(np.argmax(inner)))):
        yy, xx = np.unravel_index(idx, inner.shape)
        out[name] = (int(yy) + m, int(xx) + m)
    return out


def features(ctx: Context) -> Outcome:
    """Fig. 6: decode(z*) (should look like noise) and decode(s) (like the image); Fig. 9: each head's attention
    map of a flat and an edge pixel, from GN(s + z*)."""
    model, info = load_model(ctx, "nerd-s25")
    x = load_figure_image(ctx)
    sigma = info["sigma"]
    dev = next(model.parameters()).device
    y = noisy_input(x, sigma, dev)
    solver = SolverConfig(name=model.solver.name, max_iter=ctx.budget.infer_iters or model.solver.max_iter,
                          tol=model.solver.tol, memory=model.solver.memory)
    with torch.no_grad():
        eq = model.equilibrium(y, to_unit(sigma), solver=solver)
        dz = model.decode(eq.z_star.to(eq.s.dtype))[0, 0].double().cpu().numpy()
        ds = model.decode(eq.s)[0, 0].double().cpu().numpy()
    yn = y[0, 0].double().cpu().numpy()
    noise = yn - x
    corr = {"decode(z*)": {"noise": abs(_corr(dz, noise)), "image": abs(_corr(dz, x))},
            "decode(s)": {"noise": abs(_corr(ds, noise)), "image": abs(_corr(ds, x))}}
    folder = ctx.out / "features"
    folder.mkdir(parents=True, exist_ok=True)
    images = {"clean": x, "noisy": np.clip(yn, 0, 1), "denoised": np.clip(eq.x_hat[0, 0].double().cpu().numpy(), 0, 1),
              "decode_zstar": _normalise(dz), "decode_s": _normalise(ds)}
    from nerd.io import write_image

    for name, img in images.items():
        write_image(folder / f"{name}.png", img)
    attention: dict[str, Any] = {}
    maps: dict[str, np.ndarray] = {}
    q = model.cfg.window
    if model.layer.use_nl:
        points = pick_points(x, q // 2)
        with torch.no_grad():
            u = model.layer.nl_norm(eq.s + eq.z_star.to(eq.s.dtype))
            for name, (py, px) in points.items():
                a = model.layer.msa.attention_map(u, py, px)[0].double().cpu().numpy()  # (heads, H, W)
                maps[name] = a
                yy, xx = np.mgrid[0 : a.shape[1], 0 : a.shape[2]]
                dist = np.hypot(yy - py, xx - px)
                heads = []
                for h in range(a.shape[0]):
                    p = a[h]
                    ent = float(-(p[p > 0] * np.log(p[p > 0])).sum())
                    heads.append({"mean_distance": float((p * dist).sum()), "entropy": ent, "max": float(p.max())})
                    write_image(folder / f"attention_{name}_head{h + 1}.png", _normalise(p))
                tv = [0.5 * float(np.abs(a[i] - a[j]).sum()) for i in range(len(a)) for j in range(i + 1, len(a))]
                attention[name] = {"pixel": [py, px], "heads": heads, "mean_pairwise_tv": float(np.mean(tv)) if tv
                                   else 0.0}
    res = None if ctx.res is None else 0.05
    claims = [
        judge("Fig. 6: decode(z*) looks like the noise", [Expect("noise", "image", ">")], corr["decode(z*)"],
              resolution=res, metric="|correlation| with the true noise / the clean image"),
        judge("Fig. 6: decode(s) looks like the image", [Expect("image", "noise", ">")], corr["decode(s)"],
              resolution=res, metric="|correlation| with the clean image / the true noise"),
    ]
    rows = [[k, fmt(v["noise"], 3), fmt(v["image"], 3)] for k, v in corr.items()]
    tables = [Table("Fig. 6: what the decoded features correlate with", ["feature", "abs. correlation with y - x",
                                                                         "abs. correlation with x"], rows)]
    if attention:
        arows = [[p, str(h + 1), fmt(hd["mean_distance"], 1), fmt(hd["entropy"], 2), fmt(hd["max"], 3)]
                 for p, d in attention.items() for h, hd in enumerate(d["heads"])]
        tables.append(Table("Fig. 9: attention of a flat and an edge pixel, per head (qualitative, not judged)",
                            ["pixel", "head", "mean distance (px)", "entropy (nats)", "max weight"], arows))

    def plot(plt: Any) -> Any:
        nh = maps[next(iter(maps))].shape[0] if maps else 0
        cols = max(5, 1 + nh)
        nrows = 1 + len(maps)
        fig, axes = plt.subplots(nrows, cols, figsize=(2.4 * cols, 2.5 * nrows), squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        for ax, (name, img) in zip(axes[0], images.items(), strict=False):
            ax.imshow(img, cmap="gray")
            ax.set_title(name.replace("_", " ").replace("zstar", "z*"), fontsize=9)
        for row, (name, a) in enumerate(maps.items(), start=1):
            py, px = attention[name]["pixel"]
            r = q // 2
            box = (slice(max(0, py - r), py + r + 1), slice(max(0, px - r), px + r + 1))
            axes[row, 0].imshow(x[box], cmap="gray")
            axes[row, 0].plot(px - box[1].start, py - box[0].start, "r.", ms=8)
            axes[row, 0].set_title(f"{name} pixel, q x q window", fontsize=9)
            for h in range(a.shape[0]):
                axes[row, 1 + h].imshow(a[h][box], cmap="viridis")
                axes[row, 1 + h].set_title(f"head {h + 1}", fontsize=9)
        fig.suptitle(f"features of {ctx.figure_image().name}, sigma {sigma:g} (Fig. 6, Fig. 9)")
        return fig

    notes = [f"weights {info['name']} ({info['sha256'][:12]}), image {ctx.figure_image().name} "
             f"{x.shape[0]}x{x.shape[1]}, sigma {sigma:g}; images in {Path(folder).name}/ (decoded features "
             "min-max scaled).",
             "decode(z*) is the noise estimate with the model's sign (x_hat = y + decode(z*) ≈ y - n), so the "
             "correlations are taken in absolute value."]
    data = {"weights": info["name"], "sigma": sigma, "correlations": corr, "attention": attention,
            "pngs": sorted(str(p.name) for p in folder.glob("*.png"))}
    return Outcome("features", "Fig. 6, Fig. 9", "decoded equilibrium and injection; multi-head attention maps",
                   tables, claims, data, notes, plot, trains=False)
