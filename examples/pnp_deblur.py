"""Plug-and-play deblurring with NERD as the prior, beside DnCNN-S and no prior at all, on the same degraded images.

    python examples/pnp_deblur.py --images 6            # Set12's first 6 images: ~2.5 min an image on one thread
    python examples/pnp_deblur.py --sample --out /tmp/pnp.json   # the bundled 256x256 sample: needs no data set

Each clean image x (Set12 from `--data` / $NERD_DATA, files by name) is blurred by a 25x25 Gaussian kernel
(σ_blur 1.6 px) with a circular boundary, then y = k ⊛ x + σ n with n = RandomState(0).randn (the evaluation
protocol's noise; σ = 7.65/255 by default). Every prior restores the same y:

* ``wiener``: no prior, the Wiener filter with a flat signal spectrum (alpha = σ² / (var y - σ²), towards mean y);
* ``tikhonov-oracle``: no prior, Tikhonov with the alpha of a 33-point grid (1e-4 .. 1) that scores best on this
  image, chosen with the clean image (an upper bound for any single-alpha deconvolution);
* ``dncnn``: HQS (`nerd.lab.pnp.hqs`, DPIR's 8 iterations, denoiser level 49/255 -> σ, log-spaced) with DnCNN-S,
  the authors' weights of σ 15, 25 or 50 nearest each level (`--anchors` / $NERD_ANCHORS);
* ``nerd``: the same HQS with `nerd.NERD` (the shipped weights nearest each level, `--nerd-iters` solver
  iterations a call);
* where deepinv imports (a torch with its matching torchvision, `pip install torch torchvision deepinv`):
  ``deepinv-dpir-nerd``, deepinv's own `deepinv.optim.DPIR` with `nerd.NERD` as its denoiser, and
  ``deepinv-dpir-drunet``, DPIR with its pretrained DRUNet (downloaded by deepinv). Where it does not import, the
  results file says so and why.

PSNR as the evaluation protocol's (`nerd.metrics.psnr`: clipped to [0, 1], float64, whole image; the blurred input
is scored the same way, as `nerd eval` scores the noisy input); per image and prior the wall-clock seconds and
the process's CPU seconds (one thread by default: the compute, whatever else the machine runs). Writes a
strict JSON file atomically (default results/pnp/deblur.json), which `python tools/readme.py` shows in
docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
ORACLE_ALPHAS = np.logspace(-4, 0, 33).tolist()


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def clean_images(args: argparse.Namespace) -> list[tuple[str, np.ndarray]]:
    """[(name, float64 (H, W) on [0, 1])]: the bundled sample, or the first --images files of --set by name."""
    from nerd.io import list_images, load_gray

    if args.sample:
        from nerd.denoise import SAMPLE_CLEAN

        return [(Path(SAMPLE_CLEAN).name, load_gray(SAMPLE_CLEAN).astype(np.float64))]
    from nerd.paths import data_folder

    files = list_images(data_folder(args.set, args.data))
    files = files[: args.images] if args.images else files
    return [(f.name, load_gray(f).astype(np.float64)) for f in files]


def deepinv_priors(nerd_model: Any, noise: float, device: str) -> tuple[dict[str, tuple[str, Any]], dict[str, Any]]:
    """deepinv's own DPIR with NERD (and with its DRUNet) where deepinv imports: ({key: (label, DPIR model)}, info)."""
    from nerd.models.pretrained import DEEPINV, DEEPINV_ERROR

    if not DEEPINV:
        return {}, {"ran": False, "reason": f"deepinv does not import here ({DEEPINV_ERROR}); install a torch with "
                                             "its matching torchvision and deepinv (README) to run this part"}
    import deepinv as dinv

    info: dict[str, Any] = {"ran": True, "version": getattr(dinv, "__version__", "?"), "skipped": {}}
    runners = {"deepinv-dpir-nerd": ("deepinv DPIR + NERD (deepinv.optim.DPIR, nerd.NERD as its denoiser)",
                                     dinv.optim.DPIR(sigma=noise, denoiser=nerd_model, device=device))}
    try:  # DRUNet's pretrained weights are downloaded by deepinv: no network, no DRUNet row
        runners["deepinv-dpir-drunet"] = ("deepinv DPIR + DRUNet (its pretrained weights)",
                                          dinv.optim.DPIR(sigma=noise, device=device))
    except Exception as err:  # noqa: BLE001 -- any failure to build it is reported, not fatal
        info["skipped"]["deepinv-dpir-drunet"] = f"{type(err).__name__}: {err}"
    return runners, info


def deepinv_physics(kernel: Tensor, shape: tuple[int, int], device: str) -> Any:
    import deepinv as dinv

    return dinv.physics.BlurFFT(img_size=(1, *shape), filter=kernel[None, None].float(), device=device)


def restore(x: np.ndarray, y: Tensor, blur: Any, kernel: Tensor, noise: float, priors: dict[str, str],
            denoisers: dict[str, Any], runners: dict[str, tuple[str, Any]], sigmas: list[float], alphas: list[float],
            device: str) -> dict[str, dict[str, float]]:
    """{prior key: {psnr, seconds, ...}} of every prior on one degraded image y (1, 1, H, W) of clean x (H, W)."""
    from nerd.lab.pnp import hqs
    from nerd.metrics import psnr

    results: dict[str, dict[str, float]] = {}
    clock: list[float] = []

    def start() -> None:
        clock[:] = [time.perf_counter(), time.process_time()]

    def score(key: str, x_hat: Tensor | None, best: float | None = None, **extra: Any) -> None:
        wall, cpu = time.perf_counter() - clock[0], time.process_time() - clock[1]
        value = best if x_hat is None else psnr(x_hat[0, 0].double().cpu().numpy(), x)
        results[key] = {"psnr": value, "seconds": wall, "cpu_seconds": cpu, **extra}

    var_y = float(y.double().var())
    mean_y = float(y.double().mean())
    if "wiener" in priors:
        start()
        alpha = noise**2 / max(var_y - noise**2, 1e-6)
        score("wiener", blur.solve(y, mean_y, alpha), alpha=alpha)
    if "tikhonov-oracle" in priors:
        start()
        scored = [(psnr(blur.solve(y, mean_y, a)[0, 0].double().cpu().numpy(), x), a) for a in ORACLE_ALPHAS]
        best, alpha = max(scored)
        score("tikhonov-oracle", None, best, alpha=alpha)
    for key in ("dncnn", "nerd"):
        if key in denoisers:
            start()
            score(key, hqs(y, blur, denoisers[key], sigmas, alphas))
    xt = torch.from_numpy(x)[None, None]
    for key, (_, model) in runners.items():
        physics = deepinv_physics(kernel, tuple(x.shape), device)
        aligned = float((physics.A(xt.float().to(device)) - blur(xt).float().to(device)).abs().max())
        start()
        with torch.no_grad():
            x_hat = model(y, physics)
        score(key, x_hat, blur_max_abs_diff=aligned)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", default="Set12", help="the data set's folder under --data (default Set12)")
    parser.add_argument("--data", help="the folder of data sets (default $NERD_DATA, else ../shared/data)")
    parser.add_argument("--anchors", help="DnCNN-S's weights folder (default $NERD_ANCHORS, else ../shared/anchors)")
    parser.add_argument("--images", type=int, default=0, help="only the first N images by name (default all)")
    parser.add_argument("--sample", action="store_true", help="the bundled 256x256 sample instead of a data set")
    parser.add_argument("--noise", type=float, default=7.65, help="noise sigma, 0-255 scale (default 7.65)")
    parser.add_argument("--blur-sigma", type=float, default=1.6, help="Gaussian blur sigma in pixels (default 1.6)")
    parser.add_argument("--kernel", type=int, default=25, help="the blur kernel's odd side (default 25)")
    parser.add_argument("--iters", type=int, default=8, help="HQS iterations (DPIR: 8)")
    parser.add_argument("--nerd-iters", type=int, default=8, help="NERD's solver iterations a call (default 8)")
    parser.add_argument("--priors", nargs="+", default=["wiener", "tikhonov-oracle", "dncnn", "nerd"],
                        choices=["wiener", "tikhonov-oracle", "dncnn", "nerd"], help="which priors (default all)")
    parser.add_argument("--no-deepinv", action="store_true", help="skip deepinv's DPIR even where deepinv imports")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--device", default="cpu", help="where the denoisers run (default cpu)")
    parser.add_argument("--out", default=str(ROOT / "results" / "pnp" / "deblur.json"), help="the results file")
    args = parser.parse_args(argv)

    import nerd
    from nerd.data.noise import protocol_noisy
    from nerd.errors import NerdError
    from nerd.evaluate import strict_json, write_text_atomic
    from nerd.lab.bench import device_name
    from nerd.lab.pnp import CircularBlur, NearestLevel, check_results, dpir_schedule, gaussian_kernel, means
    from nerd.metrics import psnr
    from nerd.weights import read_metadata, resolve

    torch.set_num_threads(args.threads)
    device = args.device
    try:
        images = clean_images(args)
        kernel = gaussian_kernel(args.blur_sigma, args.kernel)
        noise = args.noise / 255.0
        sigmas, alphas = dpir_schedule(noise, args.iters)
    except NerdError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    priors: dict[str, str] = {}
    denoisers: dict[str, Callable[[Tensor, float], Tensor]] = {}
    meta_extra: dict[str, Any] = {"skipped": {}}
    if "wiener" in args.priors:
        priors["wiener"] = "no prior: Wiener, flat spectrum (α = σ²/(var y − σ²), towards mean y)"
    if "tikhonov-oracle" in args.priors:
        priors["tikhonov-oracle"] = "no prior: Tikhonov, best α per image (oracle: chosen with the clean image)"
    if "dncnn" in args.priors:
        from nerd.models.dncnn import SIGMAS, find_dncnn_file, load_dncnn_file

        try:
            files = {s: find_dncnn_file(s, args.anchors) for s in SIGMAS}
            dncnn = NearestLevel({s: load_dncnn_file(f).to(device) for s, f in files.items()})
            denoisers["dncnn"] = dncnn
            priors["dncnn"] = "HQS + DnCNN-S (authors' weights, nearest of σ 15/25/50)"
            meta_extra["dncnn"] = {str(s): {"file": f.name, "sha256": sha256_file(f)} for s, f in files.items()}
        except NerdError as err:
            meta_extra["skipped"]["dncnn"] = str(err)
            print(f"note: DnCNN-S skipped: {err}", file=sys.stderr)
    nerd_model = nerd.NERD(solver=args.nerd_iters, device=device)
    if "nerd" in args.priors:
        denoisers["nerd"] = nerd_model
        priors["nerd"] = f"HQS + NERD (shipped weights, nearest σ; {args.nerd_iters} solver iterations a call)"
        names = list(dict.fromkeys(nerd_model.weights_for(torch.tensor(sigmas, dtype=torch.float64), len(sigmas))))
        meta_extra["nerd"] = {"solver_max_iter": args.nerd_iters,
                              "weights": {n: {"sigma": nerd_model.trained_sigmas()[n],
                                              "sha256": read_metadata(resolve(n))["sha256"]} for n in names},
                              "per_iteration": nerd_model.weights_for(torch.tensor(sigmas, dtype=torch.float64),
                                                                      len(sigmas))}
    runners: dict[str, tuple[str, Any]] = {}
    if args.no_deepinv:
        meta_extra["deepinv"] = {"ran": False, "reason": "--no-deepinv"}
    else:
        runners, meta_extra["deepinv"] = deepinv_priors(nerd_model, noise, device)
        priors.update({k: label for k, (label, _) in runners.items()})
    if not meta_extra["deepinv"]["ran"]:
        print(f"note: deepinv's DPIR skipped: {meta_extra['deepinv']['reason']}", file=sys.stderr)
    if not priors:
        print("error: no prior to run", file=sys.stderr)
        return 2

    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows = []
    for name, x in images:
        h, w = x.shape
        blur = CircularBlur(kernel, (h, w))
        xt = torch.from_numpy(x)[None, None]
        y64 = protocol_noisy(blur(xt)[0, 0].numpy(), args.noise)
        y = torch.from_numpy(y64).to(device, torch.float32)[None, None]
        results = restore(x, y, blur, kernel, noise, priors, denoisers, runners, sigmas, alphas, device)
        row = {"image": name, "height": h, "width": w, "blurred_psnr": psnr(y64, x), "results": results}
        rows.append(row)
        cells = " | ".join(f"{k} {r['psnr']:.2f} dB ({r['cpu_seconds']:.1f} CPU s)" for k, r in results.items())
        print(f"{name} {w}x{h}: blurred {row['blurred_psnr']:.2f} dB | {cells}", flush=True)

    keys = list(priors)
    meta = {
        "command": " ".join(["python", "examples/pnp_deblur.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
        "device": device, "device_name": device_name(torch.device(device)), "cores": os.cpu_count(),
        "loadavg_start": load_start, "loadavg_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "set": "sample" if args.sample else args.set, "images": [n for n, _ in images],
        "all_images": bool(args.sample or not args.images), "noise_sigma255": args.noise,
        "noise": "y = k ⊛ x + sigma * RandomState(0).randn(H, W) per image (the evaluation protocol's draw)",
        "blur": {"kernel": "gaussian", "sigma": args.blur_sigma, "size": args.kernel, "boundary": "circular"},
        "schedule": {"method": "HQS, DPIR's parameters (deepinv get_DPIR_params)", "iters": args.iters,
                     "start255": 49.0, "lambda": 0.23, "sigmas255": [s * 255 for s in sigmas], "alphas": alphas},
        "psnr": "nerd.metrics.psnr: clipped to [0, 1] (the blurred input too, as nerd eval scores its noisy input), "
                "float64, whole image",
        **meta_extra,
    }
    data = {"meta": meta, "priors": [{"key": k, "label": priors[k]} for k in keys], "rows": rows,
            "means": means(rows, keys)}
    check_results(data, args.out)
    write_text_atomic(args.out, strict_json(data, args.out, indent=1, ensure_ascii=False) + "\n")
    m = data["means"]
    print(f"mean over {len(rows)} image(s): blurred {m['blurred_psnr']:.2f} dB; "
          + "; ".join(f"{k} {m[k]['psnr']:.2f} dB, {m[k]['cpu_seconds']:.1f} CPU s" for k in keys))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
