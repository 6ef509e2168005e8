"""The generated tables of README.md and docs/*.md match the committed results files (no number is typed by hand),
and the pages' links resolve."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
from tools import readme

from nerd.weights import read_metadata, shipped


def test_every_pages_tables_are_generated_from_the_results_files():
    for page in readme.pages():
        text = page.read_text()
        assert readme.render(text, page.parent) == text, f"{page.name} is out of date: run `python tools/readme.py`"


def test_every_block_is_in_exactly_one_page():
    texts = {page: page.read_text() for page in readme.pages()}
    for name, where in readme.placement(texts).items():
        assert len(where) == 1, (name, where)
    for page, text in texts.items():  # no stray or unknown markers
        for marker in re.findall(r"<!-- (?:BEGIN|END) ([\w-]+) -->", text):
            assert marker in readme.BLOCKS, (page.name, marker)
            assert text.count(f"<!-- BEGIN {marker} -->") == text.count(f"<!-- END {marker} -->") == 1, marker


def test_every_relative_link_resolves():
    link = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
    broken = []
    for page in readme.pages():
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold commands, not links
        for target in link.findall(text):
            if target.startswith(("http://", "https://", "mailto:", "#")):
                continue
            path = target.split("#", 1)[0]
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(readme.ROOT)}: {target}")
    assert not broken, broken


def test_readme_stays_short():
    assert (readme.ROOT / "README.md").stat().st_size <= 20 * 1024


def test_docs_pages_exist():
    names = {page.name for page in readme.pages()}
    assert "README.md" in names and len(names) > 1


def test_generated_links_follow_the_page(tmp_path, monkeypatch):
    """A block's links are relative to the page that shows it: the experiments' figures from docs/ go up a folder."""
    pytest.importorskip("nerd.lab.experiments")
    docs = readme.ROOT / "docs"
    from_docs, from_root = readme.BLOCKS["experiments"](docs), readme.BLOCKS["experiments"](readme.ROOT)
    if "](results/experiments/" in from_root:
        assert "](../results/experiments/" in from_docs
    assert readme.BLOCKS["speed"](docs).count("](../results/bench/") == readme.BLOCKS["speed"](readme.ROOT).count(
        "](results/bench/")


def test_last_doubling_gain_interpolates_at_half_the_cpu_time():
    from tools.readme import last_doubling_gain

    curve = [{"cpu_s": 100.0, "val_psnr": 26.0}, {"cpu_s": 300.0, "val_psnr": 27.0}, {"cpu_s": 400.0, "val_psnr": 27.2}]
    # half of 400 s is 200 s, halfway between the first two validations: 26.5 dB
    assert abs(last_doubling_gain(curve) - 0.7) < 1e-9
    assert last_doubling_gain(curve[1:]) is None  # the first validation lies after the half
    assert last_doubling_gain(curve[:1]) is None


def _shipped_cap() -> int:
    return json.loads(read_metadata(shipped()["nerd-s25"])["solver"])["max_iter"]


def test_results_table_leaves_out_records_of_replaced_weights(tmp_path, monkeypatch):
    sha = read_metadata(shipped()["nerd-s25"])["sha256"]
    (tmp_path / "eval").mkdir()
    for name, record_sha in (("now", sha), ("stale", "0" * 64)):
        record = {"method": "nerd", "set": f"Set-{name}", "sigma": 25.0, "limit": None,
                  "meta": {"weights": "nerd-s25", "sha256": record_sha, "solver": {"max_iter": _shipped_cap()}}}
        (tmp_path / "eval" / f"eval-nerd-{name}.json").write_text(json.dumps(record))
    # an interrupted run's progress file (named as `nerd eval` names it) sits beside them and is not a result
    (tmp_path / "eval" / "eval-nerd-next-Set-s25.json.partial").write_text(json.dumps({"key": "", "rows": []}))
    monkeypatch.setattr(readme, "RESULTS", tmp_path)
    assert set(readme._load_evals()) == {("nerd", "Set-now", 25)}


def test_earlier_default_is_the_same_tensors_at_17_iterations(tmp_path, monkeypatch):
    """A report of the shipped tensors with the earlier solver (17 iterations, tolerance 1e-3) fills the table's
    17-iteration column and not the shipped one; the shipped solver (its own tolerance, also at most 17 iterations)
    fills the shipped column only; a run with another cap (`--iters 4`) and a report of other weights fill neither."""
    from safetensors.torch import load_file

    from nerd.config import SolverConfig, dumps
    from nerd.weights import _header, tensors_sha256

    path = shipped()["nerd-s25"]
    meta = read_metadata(path)
    own = json.loads(meta["solver"])
    assert own["max_iter"] == 17 and own["tol"] != 1e-3  # else the two settings could not be told apart
    earlier = {**own, "max_iter": 17, "tol": 1e-3}
    sha17 = tensors_sha256(load_file(str(path)), _header({**meta, "solver": dumps(SolverConfig(**earlier))}))
    (tmp_path / "eval" / "earlier-17it").mkdir(parents=True)
    for name, sha, solver in (("then", sha17, earlier), ("now", meta["sha256"], own),
                              ("short", meta["sha256"], {**own, "max_iter": 4}), ("other", "0" * 64, earlier)):
        record = {"method": "nerd", "set": f"Set-{name}", "sigma": 25.0, "limit": None,
                  "meta": {"sha256": sha, "solver": solver}}
        (tmp_path / "eval" / "earlier-17it" / f"eval-nerd-{name}.json").write_text(json.dumps(record))
    monkeypatch.setattr(readme, "RESULTS", tmp_path)
    assert set(readme._load_evals(which="earlier")) == {("nerd", "Set-then", 25)}
    assert set(readme._load_evals()) == {("nerd", "Set-now", 25)}


def test_results_table_marks_seconds_measured_on_a_gpu(tmp_path, monkeypatch):
    sha = read_metadata(shipped()["nerd-s25"])["sha256"]
    (tmp_path / "eval").mkdir()
    for set_name, device in (("Set12", "cpu"), ("Urban100", "cuda:0")):
        record = {"method": "nerd", "set": set_name, "sigma": 25.0, "limit": None,
                  "means": {"psnr": 30.0, "ssim": 0.9, "seconds": 2.0, "nfe": 17.0},
                  "meta": {"device": device, "sha256": sha, "solver": {"max_iter": _shipped_cap()}}}
        (tmp_path / "eval" / f"eval-nerd-{set_name}.json").write_text(json.dumps(record))
    monkeypatch.setattr(readme, "RESULTS", tmp_path)
    rows = {r.split(" | ")[0].strip("| "): r for r in readme.results_table().splitlines() if "| 25 |" in r}
    assert "| 2.0 (GPU) |" in rows["Urban100"] and "| 2.0 |" in rows["Set12"]


def test_a_cell_not_measured_says_how_far_its_resumable_run_came(tmp_path, monkeypatch):
    sha = read_metadata(shipped()["nerd-s25"])["sha256"]
    (tmp_path / "eval").mkdir()
    rows = [{"name": f"img_{i:03d}.png"} for i in range(3)]
    for set_name, key_sha, iters in (("Urban100", sha, _shipped_cap()), ("BSD68", "0" * 64, 17), ("Set12", sha, 4)):
        key = json.dumps({"method": "nerd", "set": set_name, "sigma": 25.0, "sha256": key_sha,
                          "solver": {"max_iter": iters}})
        (tmp_path / "eval" / f"eval-nerd-nerd-s25-{set_name}-s25.json.partial").write_text(
            json.dumps({"key": key, "rows": rows}))
    monkeypatch.setattr(readme, "RESULTS", tmp_path)
    cells = {r.split(" | ")[0].strip("| "): r.split(" | ")[2] for r in readme.results_table().splitlines()
             if "| 25 |" in r}
    assert cells["Urban100"] == "not measured (3 images done, resumable)"
    assert cells["BSD68"] == cells["Set12"] == "not measured"  # replaced weights; a reduced-iteration run


def test_stage_plot_chains_the_sigma25_stages(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    (tmp_path / "training").mkdir()
    for name, cpu_h in (("nerd-s25", 1.0), ("nerd-s25b", 2.0), ("nerd-s15b", 0.5)):
        val = [{"cpu_s": 1800.0 * cpu_h, "val_psnr": 27.0}, {"cpu_s": 3600.0 * cpu_h, "val_psnr": 27.1}]
        (tmp_path / "training" / f"{name}.json").write_text(json.dumps({"validation": val, "cpu_hours": cpu_h}))
    runs = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "training").glob("*.json")}
    curves = readme.chained(runs, ("cpu-B-s25", "nerd-s25", "nerd-s25b"))
    assert list(curves) == ["nerd-s25", "nerd-s25b"]  # a stage not collected is skipped
    assert curves["nerd-s25b"] == ([2.0, 3.0], [27.0, 27.1])  # counted from the end of nerd-s25 (1 CPU-hour)
    monkeypatch.setattr(readme, "RESULTS", tmp_path)
    out = readme.plot_stages()
    assert out == tmp_path / "training" / "nerd-stages.png" and out.stat().st_size > 1000


def test_gpu_runs_count_gpu_minutes_not_cpu_hours(tmp_path, monkeypatch):
    gpu = {"machine": {"device": "cuda", "name": "NVIDIA H100 80GB HBM3"}, "wall_hours": 0.1, "cpu_hours": 0.25,
           "validation": [{"cpu_s": 450.0, "elapsed_s": 180.0, "val_psnr": 27.4},
                          {"cpu_s": 900.0, "elapsed_s": 360.0, "val_psnr": 27.5}]}
    cpu = {"wall_hours": 3.0, "cpu_hours": 2.0,
           "validation": [{"cpu_s": 3600.0, "elapsed_s": 5400.0, "val_psnr": 27.0}]}
    assert readme.compute_label(gpu) == "6.0 H100-min" and readme.compute_label(cpu) == "2.00 CPU-h"
    # the GPU stage's own clock is its wall-clock time: 3 and 6 minutes, chained after a 6-minute stage
    curves = readme.chained({"a": gpu, "b": gpu}, ("a", "b"), gpu=True)
    assert curves["b"] == ([9.0, 12.0], [27.4, 27.5])
    assert readme.last_doubling_gain(gpu["validation"], "elapsed_s") == pytest.approx(0.1)
    pytest.importorskip("matplotlib")
    (tmp_path / "training").mkdir()
    for name, summary in (("nerd-s25", cpu), ("nerd-s25-gpu", gpu)):
        (tmp_path / "training" / f"{name}.json").write_text(json.dumps(summary))
    monkeypatch.setattr(readme, "RESULTS", tmp_path)
    assert readme.plot_stages().stat().st_size > 1000  # a second row for the GPU runs


def test_a_stages_step_0_validation_is_its_start_not_its_result(tmp_path, monkeypatch):
    run = tmp_path / "runs" / "nerd-x"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"train": {"batch": 4}}))
    (run / "val.csv").write_text("step,elapsed_s,cpu_s,sigma,val_psnr\n0,0,0,25,27.5\n50,60,60,25,27.3\n"
                                 "100,120,120,25,27.4\n")
    (run / "log.csv").write_text("step,cpu_s,elapsed_s\n100,120,120\n")
    monkeypatch.setattr(readme, "RESULTS", tmp_path)
    summary = json.loads(readme.collect_run(run).read_text())
    assert summary["init_val_psnr"] == 27.5 and summary["best_val_psnr"] == 27.4  # the init is not the best
    assert [r["step"] for r in summary["validation"]] == [50, 100]


def test_a_run_stopped_by_its_budget_counts_to_its_final_validation_not_its_last_log_row(tmp_path, monkeypatch):
    """A time budget ends a run between log rows; its closing validation row is where training stopped."""
    run = tmp_path / "runs" / "nerd-y"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"train": {"batch": 4}}))
    (run / "val.csv").write_text("step,elapsed_s,cpu_s,sigma,val_psnr\n0,0,0,25,27.5\n295,4512,9000,25,27.49\n")
    (run / "log.csv").write_text("step,cpu_s,elapsed_s\n290,8843,4437\n")
    monkeypatch.setattr(readme, "RESULTS", tmp_path)
    summary = json.loads(readme.collect_run(run).read_text())
    assert summary["steps"] == 295 and summary["crops"] == 295 * 4
    assert summary["cpu_hours"] == pytest.approx(9000 / 3600) and summary["wall_hours"] == pytest.approx(4512 / 3600)


def test_a_side_by_side_file_written_by_the_scripts_helper_renders(tmp_path, monkeypatch):
    """scripts/tiling_check.py (and the A/B scripts) write through nerd.lab.bench.write_side_by_side; the README's
    table reads that file back: command, conditions, one row a case."""
    from nerd.lab.bench import write_side_by_side

    monkeypatch.setattr(readme, "RESULTS", tmp_path)
    row = {"image": "Set12/01.png", "width": 256, "height": 256, "tile": 128, "tile_shape": [107, 107], "tiles": 9,
           "nfe": 17, "converged_tiles": 6, "seconds": 23.9, "speed": 0.5, "peak_mib": 237.0, "estimate_mib": 413.0,
           "psnr": 29.62, "delta_psnr": 0.04, "ssim": 0.85, "weights": "e85b277b705a"}
    assert "not measured yet" in readme.tiling_table()
    write_side_by_side(tmp_path / "bench" / "tiling.json", "tiling_check.py", ["--tiles", "128"], [row], 0.5,
                       repeats=1, threads=2, cores=2, sigma=25.0)
    table = readme.tiling_table()
    assert table.startswith("`python scripts/tiling_check.py --tiles 128` (")
    assert "one process each" in table and "σ 25, weights e85b277b705a" in table
    assert "| Set12/01.png (256×256) | --tile 128: 9 tiles of 107×107 | 17 | 6/9 | 23.9 | 2.00× | 237 | 413 |" in table


def test_vs_bm3d_compares_the_same_images(tmp_path, monkeypatch):
    sha = read_metadata(shipped()["nerd-s25"])["sha256"]
    (tmp_path / "eval").mkdir()
    nerd = [("a.png", 30.0), ("b.png", 28.0), ("c.png", 31.0)]
    bm3d = [("a.png", 29.5), ("b.png", 29.0), ("c.png", 30.9), ("x.png", 10.0)]  # x: an image NERD did not score
    for method, rows in (("nerd", nerd), ("bm3d", bm3d)):
        record = {"method": method, "set": "Set12", "sigma": 25.0, "limit": None,
                  "rows": [{"name": n, "psnr": p} for n, p in rows],
                  "meta": {"sha256": sha, "solver": {"max_iter": _shipped_cap()}}}
        (tmp_path / "eval" / f"eval-{method}-Set12-s25.json").write_text(json.dumps(record))
    monkeypatch.setattr(readme, "RESULTS", tmp_path)
    rows = readme.vs_bm3d_table().splitlines()[2:]
    assert rows == [f"| Set12 | 25 | {_shipped_cap()} | 3 | -0.13 | 2 of 3 | +0.10 | -1.00 (b.png) | +0.50 (a.png) |"]


def test_a_self_ensemble_is_reported_apart_from_the_single_solves(tmp_path, monkeypatch):
    sha = read_metadata(shipped()["nerd-s25"])["sha256"]
    (tmp_path / "eval").mkdir()

    def record(method: str, psnrs: list[float], ensemble: int = 1) -> dict:
        meta = {"sha256": sha, "solver": {"max_iter": _shipped_cap()},
                **({"ensemble": ensemble} if ensemble > 1 else {})}
        return {"method": method, "set": "Set12", "sigma": 25.0, "limit": None, "meta": meta,
                "rows": [{"name": f"{i}.png", "psnr": p} for i, p in enumerate(psnrs)],
                "means": {"psnr": sum(psnrs) / len(psnrs), "ssim": 0.8, "seconds": 4.0, "nfe": 17.0}}

    files = {"eval-bm3d-Set12-s25.json": record("bm3d", [30.0, 29.0]),
             "eval-nerd-nerd-s25-Set12-s25.json": record("nerd", [29.8, 29.0]),
             "eval-nerd-nerd-s25-x8-Set12-s25.json": record("nerd", [30.3, 28.9], ensemble=8)}
    for name, data in files.items():
        (tmp_path / "eval" / name).write_text(json.dumps(data))
    # a run under way at sigma 50: its partial file (key as `nerd eval --ensemble 4` writes it)
    key = json.dumps({"method": "nerd", "set": "BSD68", "sigma": 50.0, "ensemble": 4,
                      "sha256": read_metadata(shipped()["nerd-s50"])["sha256"],
                      "solver": json.loads(read_metadata(shipped()["nerd-s50"])["solver"])})
    (tmp_path / "eval" / "eval-nerd-nerd-s50-x4-BSD68-s50.json.partial").write_text(
        json.dumps({"key": key, "rows": [{"name": "a.png"}]}))
    monkeypatch.setattr(readme, "RESULTS", tmp_path)
    main = [r for r in readme.results_table().splitlines() if r.startswith(("| Set12 | 25 |", "| BSD68 | 50 |"))]
    assert main[0].split(" | ")[2] == "29.40 / 0.8000"  # the single solves, not the ensemble's 29.60
    assert main[1].split(" | ")[2] == "not measured"  # an ensemble under way is not the single-solve run
    rows = readme.ensemble_eval_table().splitlines()[2:]
    assert rows[0] == (f"| Set12 | 25 | 8 | {_shipped_cap()} | 29.40 / 0.8000 | 29.60 / 0.8000 | +0.20 "
                       "| 29.50 / 0.8000 | +0.10 | 1 of 2 | 4.0 |")
    assert rows[1].startswith("| BSD68 | 50 | 4 | – | not measured | under way (1 images done, resumable) |")


def test_a_run_validated_on_whole_images_is_marked_with_its_own_reference(tmp_path, monkeypatch):
    """Whole held-out images score ~0.3 dB above the 96² crops: such a run's row says so, the whole-image reference
    row appears only beside it, and the stage plot (on the crops' scale) leaves it out."""
    (tmp_path / "training").mkdir()
    model = {"channels": 48, "heads": 3, "window": 33}
    for crop, suffix in ((96, ""), (0, "-whole")):
        (tmp_path / "training" / f"val-reference-s25{suffix}.json").write_text(json.dumps(
            {"sigma": 25.0, "crop": crop, "images": 8, "val_psnr": {"bm3d": 27.6 - crop / 300, "dncnn": 28.0}}))

    def write_run(name: str, val_crop: int) -> None:
        config = {"model": model, "grad": {"steps": 3}, "solver": {"max_iter": 17},
                  "train": {"crop": 64, "batch": 12, "val_crop": val_crop}}
        (tmp_path / "training" / f"{name}.json").write_text(json.dumps(
            {"run": name, "config": config, "crops": 12, "cpu_hours": 1.0, "wall_hours": 1.0,
             "best_val_psnr": 27.5, "validation": [{"cpu_s": 3600.0, "val_psnr": 27.5}]}))

    monkeypatch.setattr(readme, "RESULTS", tmp_path)
    write_run("nerd-s25", 96)
    table = readme.training_table("nerd-")
    assert "same validation crops" in table and "whole held-out images" not in table and "(val: whole" not in table
    write_run("nerd-s25e", 0)
    table = readme.training_table("nerd-").splitlines()
    assert any(r.startswith("| nerd-s25e (val: whole images) |") for r in table)
    assert table[-1].startswith("| _reference, σ 25_ | whole held-out images |")  # after the crops' references
    if importlib.util.find_spec("matplotlib"):
        original = readme.chained
        seen: list[str] = []
        monkeypatch.setattr(readme, "chained", lambda runs, *a, **k: seen.extend(runs) or original(runs, *a, **k))
        readme.plot_stages()
        assert seen == ["nerd-s25"]
