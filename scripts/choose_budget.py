"""The inference budget of the shipped weights, chosen on the images held out of Train400 (never a test set).

    python scripts/choose_budget.py --threads 2      # about 10 minutes on 2 cores

For each shipped sigma, the 8 held-out Train400 images (whole, 180x180, the training runs' fixed validation noise)
are solved once with the weights' own solver for 17 iterations (tolerance 0: no early stop), recording every
iterate the solver evaluates. Broyden's trajectory does not depend on the cap (it stores at most N - 1 updates),
and a capped solve returns the iterate of lowest residual among its first N, so each cap N = 2 .. 17 is read off
that one trajectory exactly. Per cap: mean PSNR, its change from the full solve, the relative residual, and how
much x_hat still moves from N - 1 to N (the quantity a stopping rule on x_hat would watch).

The same trajectories give the stopping rules "stop at the first iterate whose relative residual is below tol, else
at 17" exactly (the solver stops a sample there and returns that iterate, the lowest so far): per tol, the mean and
largest number of f-evaluations, and the change of the mean PSNR and of the worst image's PSNR from the full solve.
Writes results/budget/budget.json, which `python tools/readme.py` renders into docs/performance.md, and from which
`scripts/apply_budget.py` takes each file's rule.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from nerd.data.patches import load_folder, validation_pairs
from nerd.metrics import psnr
from nerd.paths import data_folder
from nerd.sigma import to_unit
from nerd.weights import load_weights, read_metadata, shipped

ROOT = Path(__file__).resolve().parents[1]
CAPS = tuple(range(2, 18))
TOLS = (0.05, 0.04, 0.03, 0.025, 0.02, 0.015, 0.01)  # the stopping rules tried, cap max(CAPS)


def trajectory(model, y: torch.Tensor, sigma: float, iters: int) -> tuple[list[torch.Tensor], list[float]]:  # noqa: ANN001
    """Every iterate z_k the solver evaluates in an `iters`-step solve of y, and its relative residual."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = model.layer.register_forward_hook(lambda _m, args, out: seen.append((args[0].clone(), out.clone())))
    try:
        model.equilibrium(y, sigma, solver=model.solver.override(max_iter=iters, tol=0.0))
    finally:
        hook.remove()
    residuals = [float((fz - z).norm() / (fz.norm() + 1e-12)) for z, fz in seen]
    return [z for z, _ in seen], residuals


def measure(name: str, val: list[torch.Tensor]) -> dict:
    model, info = load_weights(name)
    sigma255 = info["sigma"]
    pairs = validation_pairs(val, sigma255)
    start = time.perf_counter()
    per_image = []  # per image, per cap: (psnr, residual of the returned iterate, x_hat)
    trajectories = []  # per image, the relative residual of every iterate
    with torch.inference_mode():
        for x, y in pairs:
            zs, residuals = trajectory(model, y, to_unit(sigma255), max(CAPS))
            caps = []
            for n in CAPS:
                best = min(range(n), key=lambda k: (residuals[k], k))  # the solver keeps the first lowest
                x_hat = (y + model.decode(zs[best])).clamp(0, 1) if model.cfg.equilibrium == "noise" \
                    else model.decode(zs[best]).clamp(0, 1)
                caps.append((psnr(x_hat[0, 0].double().numpy(), x[0, 0].double().numpy()), residuals[best], x_hat))
            per_image.append(caps)
            trajectories.append(residuals)
            if len(per_image) == 1:  # the read-off is the solver's own answer: check it on one image and cap
                direct = model.equilibrium(y, to_unit(sigma255), solver=model.solver.override(max_iter=5, tol=0.0))
                assert torch.allclose(direct.x_hat.clamp(0, 1), caps[CAPS.index(5)][2], atol=1e-5)
                tol = TOLS[len(TOLS) // 2]  # and one stopping rule
                ruled = model.equilibrium(y, to_unit(sigma255), solver=model.solver.override(max_iter=max(CAPS),
                                                                                             tol=tol))
                nfe = stopping_rule(tol, [[c[0] for c in caps]], [residuals], [caps[-1][0]])["nfe_max"]
                assert int(ruled.stats.nfe[0]) == nfe
                assert torch.allclose(ruled.x_hat.clamp(0, 1), caps[CAPS.index(nfe)][2], atol=1e-5)
    rows = []
    for i, n in enumerate(CAPS):
        psnrs = [img[i][0] for img in per_image]
        residuals = [img[i][1] for img in per_image]
        change = None if i == 0 else max(float((img[i][2] - img[i - 1][2]).norm() / img[i][2].norm())
                                         for img in per_image)
        rows.append({"iters": n, "psnr": sum(psnrs) / len(psnrs), "psnrs": psnrs,
                     "rel_residual_max": max(residuals), "rel_residual_median": sorted(residuals)[len(residuals) // 2],
                     "x_hat_change_max": change})
    full = rows[-1]["psnr"]
    for r in rows:
        r["delta_db"] = r["psnr"] - full
        print(f"{name} N={r['iters']:2d}: {r['psnr']:.4f} dB ({r['delta_db']:+.4f}), residual max "
              f"{r['rel_residual_max']:.2e}, x_hat change {r['x_hat_change_max']}", flush=True)
    full_psnrs = rows[-1]["psnrs"]
    rules = [stopping_rule(tol, [[c[0] for c in img] for img in per_image], trajectories, full_psnrs)
             for tol in TOLS]
    for r in rules:
        print(f"{name} tol {r['tol']}: {r['nfe_mean']:.2f} f-evaluations (max {r['nfe_max']}), "
              f"{r['delta_db']:+.4f} dB, worst image {r['worst_delta_db']:+.4f} dB", flush=True)
    return {"weights": name, "sha256": read_metadata(name)["sha256"][:12], "sigma": sigma255,
            "solver": {"name": model.solver.name, "memory": model.solver.memory, "max_iter": model.solver.max_iter,
                       "tol": model.solver.tol},
            "images": len(pairs), "seconds": time.perf_counter() - start, "rows": rows, "rules": rules,
            "residuals": trajectories}


def stopping_rule(tol: float, psnrs: list[list[float]], residuals: list[list[float]], full: list[float]) -> dict:
    """The rule "stop below tol, else at max(CAPS)" read off the trajectories: psnrs[image][cap index] (the capped
    solve's PSNR), residuals[image][iterate]; full: each image's PSNR at max(CAPS)."""
    nfes, deltas = [], []
    for image_psnrs, image_residuals, reference in zip(psnrs, residuals, full, strict=True):
        below = [k + 1 for k, res in enumerate(image_residuals[: max(CAPS)]) if res < tol]
        nfe = max(min(below, default=max(CAPS)), min(CAPS))  # the first iterate (z = 0) has residual 1
        nfes.append(nfe)
        deltas.append(image_psnrs[CAPS.index(nfe)] - reference)
    return {"tol": tol, "max_iter": max(CAPS), "nfe_mean": sum(nfes) / len(nfes), "nfe_max": max(nfes),
            "nfes": nfes, "delta_db": sum(deltas) / len(deltas), "worst_delta_db": min(deltas)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="folder holding Train400 (default: $NERD_DATA or ../shared/data)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "budget" / "budget.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    _, val, paths = load_folder(data_folder("Train400", args.data), 8)
    results = [measure(name, val) for name in sorted(shipped())]
    meta = {"script": "scripts/choose_budget.py", "images": [p.name for p in paths], "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "threads": args.threads}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1, allow_nan=False) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
