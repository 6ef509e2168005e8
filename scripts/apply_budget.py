"""Write the stopping rule chosen on held-out images into the shipped weights files.

    python scripts/apply_budget.py     # reads results/budget/budget.json, rewrites src/nerd/weights/*.safetensors

For each shipped file, the rule is the one `scripts/choose_budget.py` measured on the images held out of Train400:
stop once the relative residual is below tol, else at 17 iterations, with the largest tol that keeps the mean PSNR
and every image's PSNR within 0.01 dB of the 17-iteration solve (`tools/readme.py`'s `chosen_rule`). The
tensors are unchanged; the solver's `tol` and `max_iter` become the rule's (its memory and the rest stay), and the
file's validation score is measured again with that solver by the same routine and crops as `nerd validate`
(printed beside the previous score). Files already on their rule are left alone. The checksum covers the solver, so
evaluation reports made with an earlier setting stay recognisable as such.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from readme import chosen_rule  # noqa: E402

from nerd.data.patches import load_folder, validation_pairs  # noqa: E402
from nerd.paths import data_root  # noqa: E402
from nerd.train import validate  # noqa: E402
from nerd.weights import load_weights, save_weights, shipped  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", default=str(ROOT / "results" / "budget" / "budget.json"))
    args = parser.parse_args(argv)
    rules = {r["weights"]: chosen_rule(r["rules"]) for r in json.loads(Path(args.budget).read_text())["results"]}
    files = shipped()
    _, val_images, _ = load_folder(data_root() / "Train400", 8)
    for name, rule in rules.items():
        model, info = load_weights(files[name])
        new = replace(model.solver, max_iter=rule["max_iter"], tol=rule["tol"])
        if model.solver == new:
            print(f"{name}: already on its rule (tol {new.tol:g}, at most {new.max_iter} iterations)")
            continue
        sigma, old = float(info["sigma"]), model.solver
        pairs = validation_pairs(val_images, sigma, 96)
        with torch.no_grad():
            before = validate(model, pairs, sigma, torch.device("cpu"))["val_psnr"]
            model.solver = new
            after = validate(model, pairs, sigma, torch.device("cpu"))["val_psnr"]
        scores = {"val_images": 8, "val_psnr": round(after, 4)}
        digest = save_weights(model, files[name], sigma255=sigma, scores=scores, train=info.get("train") or {})
        print(f"{name}: max_iter {old.max_iter} -> {new.max_iter}, tol {old.tol:g} -> {new.tol:g}; val PSNR "
              f"{before:.4f} -> {after:.4f} dB (stored before: {info['scores'].get('val_psnr')}); "
              f"sha256 {digest[:12]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
