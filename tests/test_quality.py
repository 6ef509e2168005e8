"""Quality floor (slow): the shipped weights still score what their committed results file recorded.

The recorded figure comes from `nerd eval --method nerd --sets Set12 --sigma S --limit 3 --out results/eval`, which
writes results/eval/eval-nerd-nerd-sS-first3-Set12-sS.json with the weights' sha256; a new weights file must come
with a new record, and a code change that costs more than 0.05 dB fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nerd.weights import load_weights, shipped

RESULTS = Path(__file__).resolve().parents[1] / "results" / "eval"


@pytest.mark.slow
@pytest.mark.parametrize("sigma", [15, 25, 50])
def test_shipped_weights_hold_their_recorded_psnr(sigma, data_root):
    from nerd.evaluate import evaluate, resolve_sets

    name = f"nerd-s{sigma}"
    if name not in shipped():
        pytest.skip(f"{name} is not shipped")
    records = [json.loads(p.read_text()) for p in RESULTS.glob(f"eval-nerd-{name}-first3-Set12-s{sigma}.json")]
    records = [r for r in records if r.get("limit") == 3]
    assert records, f"no recorded 3-image Set12 result for {name}: run nerd eval ... --limit 3"
    record = records[0]
    model, info = load_weights(name)
    assert record["meta"]["sha256"] == info["sha256"], "the record was measured on other weights: re-record it"
    images = resolve_sets(data_root, ["Set12"])["Set12"][:3]
    report = evaluate(model, images, sigma, set_name="Set12", progress=False)
    assert report.means["psnr"] >= record["means"]["psnr"] - 0.05
