# Sourced by the scripts that run on a lent device machine (gpu_train.sh, gpu_eval.sh): the package comes from this
# checkout (nothing is installed there), `python3 -c "$PY" ARGS...` is the `nerd` CLI (a plain command, so that
# `timeout` can run it), and `device_header` prints what the machine is, for the run's log.
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY='import sys; from nerd.cli import main; sys.exit(main(sys.argv[1:]))'

device_header() {
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
}
