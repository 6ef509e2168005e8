#!/usr/bin/env bash
# Recipe comparison on a CPU: each candidate trains for the same CPU budget
# (process CPU time, which hardly depends on other load), then `python tools/readme.py --collect runs/cpu-*` tabulates
# validation PSNR per CPU-hour from the runs' val.csv into results/training/cpu-*-s25.json.
set -euo pipefail
cd "$(dirname "$0")/../../.."
budget=${1:-30}   # CPU-minutes per candidate
for c in A B C; do
  nice -n 5 nerd train --config configs/history/compare/cpu-$c.toml --out runs/cpu-$c-s25 \
    --max-cpu-minutes "$budget" --no-progress || true
done
echo COMPARE-DONE
