#!/usr/bin/env bash
# Issue 6, step 6: train on a lent GPU for a fixed time, in one call of the device tool, and bring the runs back.
#
# Runs the time-budgeted recipes of configs/gpu/ named in RUNS (an earlier run's recipe: configs/history/gpu/) side by
# side on the one GPU (small models leave most of an H100 idle, so two processes share it better than one after the
# other), each with bf16 autocast. The default,
# RUNS=p25, trains the paper's model (preset "paper": 128 features, q 65) from scratch at sigma 25
# (configs/gpu/nerd-p25-gpu.toml; the attention runs flex_attention's block-sparse kernel on CUDA) and returns its
# checkpoint. RUNS=s25w is the small lineage's next step: configs/gpu/nerd-s25w-gpu.toml grows the shipped small
# model wider (hidden x8, nerd.models.grow) from runs/nerd-s25-gpu/last.pt, which is committed. The first call ran
# RUNS="s25 m25" (continue the CPU's nerd-s25d weights; the wider preset m from scratch).
# Each run ends by itself when its `train.minutes` are spent (the cosine schedule follows that budget); a hard
# deadline (SIGTERM: checkpoint, then stop) guards the call's time limit. A run that fails at once under bf16 is
# retried in float32. Each run comes back as one archive in $OUT (run folder with last.pt, best.safetensors, logs);
# the device returns at most 8 files of at most 16 MiB, so an archive above 15 MiB (a paper-size model's last.pt with
# its AdamW moments) comes back in parts: cat NAME.tgz.part-* > NAME.tgz.
#
# Prepare here (../shared does not travel to the device machine; device_data/ is git-ignored and carried):
#   mkdir -p device_data && cp -r ../shared/data/Train400 device_data/
# and each chosen config's `init` that is not in the tree (the script checks and names what is missing), e.g. for
# RUNS=s25: git show 867b858:runs/nerd-s25d/last.pt > /tmp/s25d.pt &&
#   nerd export /tmp/s25d.pt --last --out device_data/nerd-s25d.safetensors
# Then, through the device tool: `bash scripts/gpu_train.sh` with carry ["device_data"]. RUNS picks other recipes
# of configs/gpu/ (RUNS="s25b s15 s50" continued from the first call's sigma-25 result; RUNS=m25b continues the
# wider model m; see their headers).
# Test on the CPU first: DEVICE=cpu STEPS=2 OUT=/tmp/gpu_out bash scripts/gpu_train.sh
# Unpack what came back into runs/: tar xzf nerd-s25-gpu.tgz -C runs
#
# Training and scoring in one call (a second call may find the machine gone, and every start costs device time):
# MINUTES shortens each recipe's `train.minutes` (its cosine schedule follows it), and EVAL_ABOVE=dB scores every
# run whose best validation PSNR beats that figure (set it to the shipped file's, so that only a candidate for
# shipping is scored) with `nerd eval` on EVAL_SETS at its sigma, until EVAL_DEADLINE; copy the sets first:
#   cp -r ../shared/data/Set12 ../shared/data/BSD68 device_data/
# e.g. RUNS=s25w MINUTES=6.5 DEADLINE=450 EVAL_ABOVE=27.4942 EVAL_DEADLINE=570 (timeout_s 600). The reports come back
# as $OUT/eval-NAME.tgz (a set cut off at the deadline leaves its .partial file, which `nerd eval` continues).
set -u
OUT=${OUT:-gpu_out}
DEVICE=${DEVICE:-cuda}
DEADLINE=${DEADLINE:-480}   # seconds after the start at which every run still going gets SIGTERM
STEPS=${STEPS:-}            # an optimiser-step cap (for a CPU test of this script)
RUNS=${RUNS:-p25}
MINUTES=${MINUTES:-}        # override of train.minutes
EVAL_ABOVE=${EVAL_ABOVE:-}  # score runs whose best validation PSNR exceeds this (dB); empty: score nothing
EVAL_SETS=${EVAL_SETS:-"Set12 BSD68"}
EVAL_DEADLINE=${EVAL_DEADLINE:-585}
EVAL_LIMIT=${EVAL_LIMIT:-}  # only the first N images of each set (for a CPU test)
mkdir -p "$OUT" gpu_runs
. scripts/device_env.sh
start=$(date +%s)
log="$OUT/gpu_train.log"
device_header >"$log"
# Everything the chosen runs need must have travelled: Train400 and each config's warm start (`init = "..."`).
missing=""
test -d device_data/Train400 || missing="device_data/Train400"
if [ -n "$EVAL_ABOVE" ]; then for e in $EVAL_SETS; do test -d "device_data/$e" || missing="$missing device_data/$e"; done; fi
gpu_config() {  # gpu_config NAME: configs/gpu/nerd-NAME-gpu.toml, else an earlier run's in configs/history/gpu/
  local cfg=configs/gpu/nerd-$1-gpu.toml
  test -f "$cfg" || cfg=configs/history/gpu/nerd-$1-gpu.toml
  echo "$cfg"
}
for r in $RUNS; do
  cfg=$(gpu_config "$r")
  test -f "$cfg" || { missing="$missing configs/gpu/nerd-$r-gpu.toml"; continue; }
  init=$(sed -n 's/^init = "\(.*\)"$/\1/p' "$cfg")
  test -z "$init" || test -f "$init" || missing="$missing $init"
done
test -z "$missing" || { echo "missing:$missing (see the header of $0)" | tee -a "$log"; exit 2; }

run_one() {  # run_one NAME: train configs/gpu/nerd-NAME-gpu.toml, retrying in float32 if bf16 fails at once
  local name=nerd-$1-gpu cfg rc
  cfg=$(gpu_config "$1")
  if [ -n "$MINUTES" ]; then
    sed "s/^minutes = .*/minutes = $MINUTES/" "$cfg" >"gpu_runs/$name-minutes.toml"
    cfg=gpu_runs/$name-minutes.toml
  fi
  local left=$((DEADLINE - ($(date +%s) - start)))
  [ "$left" -gt 10 ] || { echo "$name: no time left to start it" >>"$log"; return; }
  timeout -k 30 -s TERM "$left" python3 -c "$PY" train --config "$cfg" --out "gpu_runs/$name" --data device_data/Train400 \
    --device "$DEVICE" --no-progress ${STEPS:+--steps "$STEPS"} >"gpu_runs/$name.log" 2>&1
  rc=$?
  # No training row logged: it failed at its first steps (a stage that starts from an init has a last.pt from its
  # step-0 validation already, so that file cannot tell).
  if [ $rc -ne 0 ] && { [ ! -s "gpu_runs/$name/log.csv" ] || [ "$(wc -l <"gpu_runs/$name/log.csv")" -le 1 ]; }; then
    echo "$name failed (rc $rc) before its first logged step; retrying with amp off" >>"gpu_runs/$name.log"
    sed 's/^\[train\]$/[train]\namp = "off"/' "$cfg" >"gpu_runs/$name-fp32.toml"
    rm -rf "gpu_runs/$name"
    left=$((DEADLINE - ($(date +%s) - start)))
    [ "$left" -gt 10 ] || { echo "$name: no time left to retry it" >>"$log"; return; }
    timeout -k 30 -s TERM "$left" python3 -c "$PY" train --config "gpu_runs/$name-fp32.toml" --out "gpu_runs/$name" \
      --data device_data/Train400 --device "$DEVICE" --no-progress ${STEPS:+--steps "$STEPS"} >>"gpu_runs/$name.log" 2>&1
    rc=$?
  fi
  echo "$name: rc $rc after $(($(date +%s) - start)) s" >>"$log"
}

# A run folder left by an earlier call on the same warm machine would refuse a new run (and block the fp32 retry);
# each call already returned its runs as archives, so start clean.
for r in $RUNS; do
  rm -rf "gpu_runs/nerd-$r-gpu" "gpu_runs/nerd-$r-gpu.log" "gpu_runs/nerd-$r-gpu-fp32.toml" "gpu_runs/nerd-$r-gpu-minutes.toml" \
    "gpu_runs/eval-nerd-$r-gpu"
done
for r in $RUNS; do run_one "$r" & done
ticks=0
while [ -n "$(jobs -r)" ]; do  # poll often (the archives must be written before the call's limit); a GPU snapshot a minute
  sleep 5
  ticks=$((ticks + 1))
  [ $((ticks % 12)) -eq 0 ] && { nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader >>"$log" 2>&1 || true; }
done
wait
pack() {  # pack ARCHIVE DIR NAME...: tar NAMEs (in DIR) into $OUT/ARCHIVE, in 15 MiB parts when larger
  tar czf "$OUT/$1" -C "$2" "${@:3}"  # a warning (exit 1) still leaves an archive worth returning
  [ -s "$OUT/$1" ] || return
  if [ "$(stat -c %s "$OUT/$1")" -gt $((15 * 1024 * 1024)) ]; then
    split -b 15M -d "$OUT/$1" "$OUT/$1.part-" && rm "$OUT/$1"
    echo "$1: larger than 15 MiB, returned in parts (cat $1.part-* > $1)" >>"$log"
  fi
}
for r in $RUNS; do
  name=nerd-$r-gpu
  tail -n 3 "gpu_runs/$name/val.csv" >>"$log" 2>/dev/null
  [ -d "gpu_runs/$name" ] || { echo "$name: no run folder (never started)" >>"$log"; continue; }
  pack "$name.tgz" gpu_runs "$name" "$name.log"
done
# Score the candidates: best.safetensors holds the best validation row (val.csv's 5th column), step 0 included (a
# stage that starts from an init validates it at step 0 and writes best.safetensors from it, replaced only by a
# strictly better step). Score it only when that best row is after step 0 (trained weights, not the init) and its
# PSNR is above EVAL_ABOVE.
for r in ${EVAL_ABOVE:+$RUNS}; do
  name=nerd-$r-gpu
  row=$(tail -n +2 "gpu_runs/$name/val.csv" 2>/dev/null | sort -t, -k5,5gr -s | head -n 1)  # ties: the earliest, as kept
  best=$(echo "$row" | cut -d, -f5)
  step=$(echo "$row" | cut -d, -f1)
  sigma=$(tail -n +2 "gpu_runs/$name/val.csv" 2>/dev/null | head -n 1 | cut -d, -f4)
  left=$((EVAL_DEADLINE - ($(date +%s) - start)))
  if [ ! -f "gpu_runs/$name/best.safetensors" ] || [ "${step:-0}" = 0 ] \
    || ! awk -v b="${best:-0}" -v a="$EVAL_ABOVE" 'BEGIN{exit !(b > a)}'; then
    echo "$name: best validation ${best:-none} dB at step ${step:-none}: not a trained step above $EVAL_ABOVE," \
      "not scored" >>"$log"
  elif [ "$left" -le 10 ]; then
    echo "$name: best validation $best dB, no time left to score it" >>"$log"
  else
    echo "$name: best validation $best dB > $EVAL_ABOVE: nerd eval on $EVAL_SETS at sigma $sigma" >>"$log"
    # shellcheck disable=SC2086  # EVAL_SETS is a list
    timeout -k 5 -s TERM "$left" python3 -c "$PY" eval --method nerd --weights "gpu_runs/$name/best.safetensors" \
      --sets $EVAL_SETS --sigma "$sigma" --data device_data --device "$DEVICE" --out "gpu_runs/eval-$name" \
      --no-progress ${EVAL_LIMIT:+--limit "$EVAL_LIMIT"} >>"$log" 2>&1
    echo "$name: eval rc $? after $(($(date +%s) - start)) s" >>"$log"
    pack "eval-$name.tgz" gpu_runs "eval-$name"  # one file a run: the device returns at most 8
  fi
done
echo "done after $(($(date +%s) - start)) s" >>"$log"
cat "$log"
