"""Side-by-side timing of `nerd eval` under glibc's malloc defaults, under the command's own tuning, and (when
installed) with tcmalloc preloaded: whole processes, interleaved round robin, on the first image of each set.

    python scripts/ab_malloc.py --sets Set12 BSD68 Urban100 --repeats 2     # about 40 minutes on 2 cores

Each run is one `nerd eval --sets SET --limit 1` process (protocol noise, the shipped sigma-25 weights, 17 Broyden
iterations); its wall time, user and kernel CPU time and peak resident size come from `os.wait4`, its solver seconds,
PSNR and f-evaluations from the report it writes. The variants must give the same PSNR (the allocator changes no
arithmetic) and their reports must record the malloc setting asked for; the script stops if not. Inherited malloc
settings (NERD_MALLOC, LD_PRELOAD, glibc's variables) are cleared, so that each variant sets only its own. Writes
results/bench/malloc-ab.json, which `python tools/readme.py` renders into docs/performance.md.
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TCMALLOC = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")


def find_tcmalloc() -> str | None:
    """A tcmalloc shared library to preload (Debian: libtcmalloc-minimal4), or None."""
    for name in TCMALLOC:
        for folder in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib", "/usr/local/lib"):
            if (Path(folder) / name).is_file():
                return str(Path(folder) / name)
    return ctypes.util.find_library("tcmalloc_minimal")


def variants(tcmalloc: str | None) -> dict[str, tuple[dict[str, str], str]]:
    """Name -> (environment settings of the variant, the `malloc` its reports must record)."""
    out = {"glibc defaults (NERD_MALLOC=system)": ({"NERD_MALLOC": "system"}, "system"),
           "nerd's tuning (the default)": ({}, "tuned")}
    if tcmalloc:
        out["tcmalloc preloaded"] = ({"LD_PRELOAD": tcmalloc}, "preloaded")
    return out


# Inherited settings that would change what a variant measures: each variant sets its own.
CLEARED = ("NERD_MALLOC", "LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_",
           "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def run_once(set_name: str, env_changes: dict[str, str], extra: list[str]) -> dict[str, Any]:
    """One `nerd eval` process on the first image of `set_name`: its resources and its report's figures."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "nerd", "eval", "--sets", set_name, "--limit", "1", "--out", out,
               "--no-progress", *extra]
        env = {**{k: v for k, v in os.environ.items() if k not in CLEARED}, **env_changes}
        log = Path(out) / "log.txt"
        with log.open("w") as sink:
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)
            try:
                _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, unlike RUSAGE_CHILDREN
            except BaseException:  # Ctrl-C: do not leave a minutes-long child behind
                proc.kill()
                proc.wait()
                raise
            wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log.read_text()}")
        (report_file,) = Path(out).glob(f"eval-*-{set_name}-s*.json")
        report = json.loads(report_file.read_text())
    (row,) = report["rows"]
    return {"wall_s": wall, "user_s": usage.ru_utime, "sys_s": usage.ru_stime,
            "maxrss_mib": usage.ru_maxrss / 1024, "solver_s": row["seconds"], "psnr": row["psnr"],
            "nfe": row["nfe"], "image": row["name"], "malloc": report["meta"].get("malloc"),
            "threads": report["meta"].get("threads"), "weights": report["meta"].get("weights")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", nargs="+", default=["Set12", "BSD68", "Urban100"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-tcmalloc", action="store_true", help="skip the tcmalloc variant")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench" / "malloc-ab.json")
    parser.add_argument("extra", nargs="*", help="more `nerd eval` arguments, after --")
    args = parser.parse_args(argv)
    tcmalloc = None if args.no_tcmalloc else find_tcmalloc()
    names = variants(tcmalloc)
    load = os.getloadavg()[0]
    rows = []
    for set_name in args.sets:
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        order = list(names)
        for i in range(args.repeats):
            for name in order[i % len(order):] + order[:i % len(order)]:  # each round starts with another variant
                env, expected = names[name]
                r = run_once(set_name, env, args.extra)
                if r["malloc"] != expected:
                    raise SystemExit(f"{name}: the report says malloc {r['malloc']!r}, expected {expected!r}")
                runs[name].append(r)
                print(f"{set_name} {r['image']} #{i + 1} {name}: wall {r['wall_s']:.1f} s, "
                      f"solver {r['solver_s']:.1f} s, user {r['user_s']:.1f} s, sys {r['sys_s']:.1f} s, "
                      f"{r['maxrss_mib']:.0f} MiB, {r['psnr']:.4f} dB", flush=True)
        psnrs = {r["psnr"] for rs in runs.values() for r in rs}
        if len(psnrs) != 1:
            raise SystemExit(f"{set_name}: the variants disagree on PSNR: {sorted(psnrs)}")
        timed = ("wall_s", "solver_s", "user_s", "sys_s", "maxrss_mib")
        first = runs[order[0]]
        base = {k: statistics.median(r[k] for r in first) for k in ("wall_s", "solver_s")}
        for name, rs in runs.items():
            med = {k: statistics.median(r[k] for r in rs) for k in timed}
            rows.append({"set": set_name, "image": rs[0]["image"], "variant": name, "runs": len(rs), **med,
                         "speedup_wall": base["wall_s"] / med["wall_s"],
                         "speedup_solver": base["solver_s"] / med["solver_s"],
                         "each": {k: [r[k] for r in rs] for k in timed},  # every run, for the spread
                         **{k: rs[0][k] for k in ("psnr", "nfe", "malloc", "threads", "weights")}})
    from nerd.lab.bench import write_side_by_side  # imported only now (torch): the timed processes are separate
    write_side_by_side(args.out, "ab_malloc.py", argv, rows, load, repeats=args.repeats, threads=rows[0]["threads"],
                       cores=os.cpu_count(), tcmalloc=tcmalloc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
