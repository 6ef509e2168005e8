"""Write the inference budget chosen on held-out images into the shipped weights files.

    python scripts/apply_budget.py     # reads results/budget/budget.json, rewrites src/nerd/weights/*.safetensors

For each shipped file, the budget is the iteration cap that `scripts/choose_budget.py` measured on the images held out
of Train400 (the smallest cap from which every longer cap stays within 0.01 dB of the 17-iteration solve; the rule
is `tools/readme.py`'s `chosen_budget`). The tensors are unchanged; the solver's `max_iter` becomes the budget (its
memory, tolerance and the rest stay), and the file's validation score is measured again with that solver by the
same routine and crops as `nerd validate` (printed beside the previous score). Files already at their budget are
left alone. The checksum covers the solver, so evaluation reports made with the earlier setting stay recognisable
as such.
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

from readme import chosen_budget  # noqa: E402

from nerd.data.patches import load_folder, validation_pairs  # noqa: E402
from nerd.paths import data_root  # noqa: E402
from nerd.train import validate  # noqa: E402
from nerd.weights import load_weights, save_weights, shipped  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", default=str(ROOT / "results" / "budget" / "budget.json"))
    args = parser.parse_args(argv)
    budget = {r["weights"]: chosen_budget(r["rows"]) for r in json.loads(Path(args.budget).read_text())["results"]}
    files = shipped()
    _, val_images, _ = load_folder(data_root() / "Train400", 8)
    for name, n in budget.items():
        model, info = load_weights(files[name])
        if model.solver.max_iter == n:
            print(f"{name}: already at its budget of {n} iterations")
            continue
        sigma, old = float(info["sigma"]), model.solver.max_iter
        pairs = validation_pairs(val_images, sigma, 96)
        with torch.no_grad():
            before = validate(model, pairs, sigma, torch.device("cpu"))["val_psnr"]
            model.solver = replace(model.solver, max_iter=n)
            after = validate(model, pairs, sigma, torch.device("cpu"))["val_psnr"]
        scores = {"val_images": 8, "val_psnr": round(after, 4)}
        digest = save_weights(model, files[name], sigma255=sigma, scores=scores, train=info.get("train") or {})
        print(f"{name}: max_iter {old} -> {n}; val PSNR {before:.4f} -> {after:.4f} dB (stored before: "
              f"{info['scores'].get('val_psnr')}); sha256 {digest[:12]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
