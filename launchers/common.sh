# Sourced by the launchers: the checks before anything starts (launchers/preflight.py), the CPU
# thread split, and printing exactly what starts. DRY_RUN=1 prints the command and starts nothing.
LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python}

die() { echo "dsvit launch: error: $*" >&2; exit 2; }

# preflight ARGS...: validate (see preflight.py); sets WORLD NODES LOCAL_SLOTS PORT
preflight() {
  command -v "$PYTHON" >/dev/null || die "'$PYTHON' not found: activate the venv or set PYTHON"
  command -v deepspeed >/dev/null || die "deepspeed is not on PATH: activate the venv"
  local out
  out=$("$PYTHON" "$LAUNCH_DIR/preflight.py" "$@") || exit 2
  eval "$out"
}

# split_cores N: each of this node's N ranks gets nproc/N OpenMP threads, else every rank runs
# nproc threads and they oversubscribe the cores: the ranks' compute on the CPU accelerator, the
# host-side Adam step (DeepSpeedCPUAdam) of the offload configs on GPU nodes. An OMP_NUM_THREADS
# set by the user wins.
split_cores() {
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / $1 > 0 ? $(nproc) / $1 : 1 ))}
}

# start CMD...: print the command on stdout (with the variables that shape the run, as a line one
# can paste), then exec it -- or stop there when DRY_RUN=1.
start() {
  local v line=""
  for v in OMP_NUM_THREADS DS_ACCELERATOR NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME NCCL_DEBUG \
           TORCH_DISTRIBUTED_DEBUG; do
    if [ -n "${!v:-}" ]; then line+="$v=$(printf '%q' "${!v}") "; fi
  done
  line+=$(printf '%q ' "$@")
  echo "${line% }"
  if [ "${DRY_RUN:-0}" = 1 ]; then
    echo "dsvit launch: DRY_RUN=1: checks passed, nothing started" >&2
    exit 0
  fi
  exec "$@"
}
