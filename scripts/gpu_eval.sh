#!/usr/bin/env bash
# Score the shipped NERD weights on a benchmark set on a lent GPU, with the device time a training call left over
# (NERD on Urban100 takes 1 to 4 minutes an image on a 2-core CPU, 2 to 7 hours a sigma; not measured on a GPU yet).
#
# `nerd eval` scores in IEEE float32 on a GPU too (TF32 off), under the one protocol, so the figures stand beside the
# CPU's; the results table marks their seconds "(GPU)". Reports go straight into $OUT: a call stopped at its limit still
# returns the finished images (the .partial file, rewritten after every image), and the same command continues it
# (the script first copies the matching partial files of results/eval into $OUT). A set begun on one machine can be
# finished on another with the same settings: `nerd eval --method nerd --sets Urban100 --sigma 25` here (no
# --compile, which changes float32 rounding and so is part of a partial file's key).
#
# Prepare here (../shared does not travel; device_eval/ is git-ignored and carried; the tree and what is carried
# must stay under 64 MiB together, and Urban100 is 47 MB):
#   mkdir -p device_eval && cp -r ../shared/data/Urban100 device_eval/
# Then, through the device tool: `bash scripts/gpu_eval.sh` with carry ["device_eval"]. Every Urban100 sigma of
# today's shipped weights is measured (on this CPU), so the default is for the next weights: a new nerd-s50 file, or
# SIGMAS=25 after a new nerd-s25 (a report of the current file would be re-scored from the start).
# Back here (F: the reply's files_at): cp F/eval/eval-nerd-*.json F/eval/eval-nerd-*.json.partial results/eval/,
# then remove each results/eval/*.partial whose report (.json) now exists, and run `python tools/readme.py`.
# Test on the CPU first: mkdir -p device_eval && cp -r ../shared/data/Set12 device_eval/ &&
#   DEVICE=cpu SETS=Set12 LIMIT=1 SIGMAS=25 OUT=/tmp/gpu_eval bash scripts/gpu_eval.sh
set -u
OUT=${OUT:-gpu_out}
DEVICE=${DEVICE:-cuda}
SETS=${SETS:-Urban100}
SIGMAS=${SIGMAS:-50}  # the one to score after new weights; today's shipped files are all measured (results/eval)
LIMIT=${LIMIT:-}
mkdir -p "$OUT/eval"
. scripts/device_env.sh
log="$OUT/gpu_eval.log"
device_header >"$log"
for s in $SETS; do
  test -d "device_eval/$s" || { echo "device_eval/$s is missing: see the header of $0" | tee -a "$log"; exit 2; }
  for g in $SIGMAS; do  # continue what an earlier call (or this CPU, same settings) began
    f=results/eval/eval-nerd-nerd-s$g-$s-s$g.json.partial
    test -f "$f" && cp "$f" "$OUT/eval/"
  done
done
# shellcheck disable=SC2086  # SETS and SIGMAS are lists
python3 -c "$PY" eval --method nerd --sets $SETS --sigma $SIGMAS --data device_eval --device "$DEVICE" \
  --out "$OUT/eval" --no-progress ${LIMIT:+--limit "$LIMIT"} >>"$log" 2>&1
rc=$?
echo "rc $rc" >>"$log"
cat "$log"
exit $rc
