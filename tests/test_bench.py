"""`nerd bench`: the analytic FLOP count against torch's FlopCounterMode, and a tiny run writing every section."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from nerd.cli import main
from nerd.lab.bench import SECTIONS, attention_flops_computed, implicit_layer_flops, markdown_tables
from nerd.models import create_model, preset_config
from nerd.models.attention import _window_mask


def counted_flops(cfg, b: int, h: int, w: int) -> int:
    """FlopCounterMode's total for one f-evaluation through the reference (explicit matmul) attention.

    FlopCounterMode does not count the fused CPU SDPA kernel, so the reference path is the one it can see;
    it computes dense (h w)^2 attention with a mask.
    """
    model = create_model(cfg)
    layer = model.layer.eval()
    if layer.use_nl:
        layer.msa.fused = False
    z, s = torch.randn(b, cfg.channels, h, w), torch.randn(b, cfg.channels, h, w)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        layer(z, s)
    return counter.get_total_flops()


def test_flops_match_flop_counter_when_the_window_covers_the_image():
    cfg = preset_config("tiny")  # q 7: on a 4 x 4 image every (truncated) window is the whole image
    flops = implicit_layer_flops(cfg, 4, 4, batch=2)
    assert flops["total"] == counted_flops(cfg, 2, 4, 4)
    assert flops["attention"] == 2 * 2 * 2 * cfg.channels * 16 * 16


@pytest.mark.parametrize("blocks", ["both", "nl", "trans"])
def test_flops_truncated_windows(blocks):
    cfg = preset_config("tiny", window=5, blocks=blocks)
    b, h, w = 2, 9, 7
    flops = implicit_layer_flops(cfg, h, w, batch=b)
    c = cfg.channels
    # The reference computes every (query, key) pair: the count differs from ours by the masked pairs only.
    dense = 4 * c * (h * w) ** 2 * b if blocks != "trans" else 0
    assert counted_flops(cfg, b, h, w) == flops["convs"] + flops["projections"] + dense
    needed = int(_window_mask(h, w, 2, torch.device("cpu")).sum())  # pairs inside the truncated windows
    assert flops["attention"] == (4 * c * needed * b if blocks != "trans" else 0)
    assert (flops["convs"] == 0) == (blocks == "nl")
    assert flops["total"] == flops["convs"] + flops["projections"] + flops["attention"]


def test_computed_attention_flops_cover_the_useful_ones():
    cfg = preset_config("tiny", attn_block=8)
    small = attention_flops_computed(cfg, 6, 6)  # one masked attention over all tokens
    assert small == 4 * cfg.channels * 36**2
    big = attention_flops_computed(cfg, 40, 33)  # tiled: 8 x 8 queries against 14 x 14 halos
    assert big == 4 * cfg.channels * 5 * 5 * 64 * 14**2
    assert big >= implicit_layer_flops(cfg, 40, 33)["attention"]


def _png(path: Path, h: int, w: int, seed: int) -> None:
    from PIL import Image

    r = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = 0.5 + 0.3 * np.sin(xx / (3 + seed)) * np.cos(yy / 4) + 0.05 * r.randn(h, w)
    Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory) -> Path:
    """One tiny `nerd bench --quick` on synthetic Set12 / BSD68 / Train400 folders; returns the JSON path."""
    root = tmp_path_factory.mktemp("data")
    for name, n, (h, w) in (("Set12", 1, (32, 32)), ("BSD68", 1, (30, 26)), ("Train400", 10, (28, 28))):
        (root / name).mkdir()
        for i in range(n):
            _png(root / name / f"{i:03d}.png", h, w, i)
    out = tmp_path_factory.mktemp("bench")
    rc = main(["bench", "--quick", "--preset", "tiny", "--crop", "24", "--repeats", "1", "--threads", "1",
               "--data", str(root), "--out", str(out)])
    assert rc == 0
    return out / "bench-cpu-quick.json"


def test_bench_writes_every_section(bench_run):
    res = json.loads(bench_run.read_text())
    for key in ("device", "device_name", "torch", "threads", "quick"):
        assert key in res["meta"]
    for section in SECTIONS:
        assert res.get(section), f"section {section} missing"
    assert res["machine"]["fp32"]["gflops"] > 0 and res["machine"]["bf16"]["gflops"] > 0
    assert {(r["case"], r["dtype"]) for r in res["feval"]} == {(c, d) for c in ("patch", "image")
                                                                for d in ("fp32", "bf16")}
    labels = [r["label"] for r in res["inference"][0]["rows"]]
    assert labels[:4] == ["nerd 4 it", "nerd 8 it", "nerd 17 it", f"nerd tol {res['meta']['tol']:g}"]
    assert "bm3d" in labels
    fixed = [r for r in res["inference"][0]["rows"] if r.get("tol") == 0.0]
    assert [r["nfe"] for r in fixed] == [4, 8, 17]
    runs = res["solvers"]["images"][0]["runs"]
    assert [r["solver"] for r in runs] == ["broyden", "anderson", "fixed_point"]
    assert all(len(r["trace"]) == r["nfe"] for r in runs)
    assert (bench_run.parent / res["solvers"]["plot"]).is_file()
    cases = res["memory"]["cases"]
    assert len(cases) == 5 and all(c["peak_mib"] >= 0 and c["seconds"] > 0 for c in cases)
    assert len(res["adaptive"]["images"]) == 8
    options = {(r["case"], r["option"]) for r in res["options"]}
    assert ("patch", "bf16 autocast") in options and ("image", "attention tiles 8² (default 16²)") in options
    for r in res["options"]:  # every option computes the same f: fp32 ones to rounding, bf16 to its precision
        assert r["error"] is None, r
        assert r["max_rel_diff"] < (5e-2 if r["option"] == "bf16 autocast" else 1e-4), r
    assert len(res["targets"]) == 5 and all(t["met"] in (True, False, None) for t in res["targets"])


def test_markdown_tables_render_the_results(bench_run):
    text = markdown_tables(bench_run)
    for head in ("The machine's limit", "f-evaluation", "Optimisations tried", "Inference", "Solvers", "Peak memory",
                 "Adaptive stopping", "Targets"):
        assert head in text
    assert "| nerd 17 it | 17 |" in text
    assert main(["bench", "--render", str(bench_run)]) == 0


def test_bad_input_is_a_user_error(tmp_path, capsys):
    assert main(["bench", "--repeats", "0"]) == 2
    assert main(["bench", "--render", str(tmp_path / "missing.json")]) == 2
    assert main(["bench", "--weights", str(tmp_path / "none.safetensors"), "--sections", "machine"]) == 2
    assert "error" in capsys.readouterr().err


def test_partial_run_renders_nested_headings_and_names_unmeasured_targets(tmp_path):
    meta = {"quick": True, "device_name": "cpu", "device": "cpu", "torch": "x", "threads": 1, "model_name": "tiny",
            "repeats": 1, "warmup": 0}
    targets = [{"target": "fast", "met": False, "detail": "slow"}, {"target": "small", "met": None, "detail": ""}]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"meta": meta, "targets": targets}))
    text = markdown_tables(path, level=4)
    assert "#### Targets" in text and "\n### " not in "\n" + text
    assert "| fast | not met | slow |" in text and "| small |" not in text
    assert "Not measured by this run: small." in text
