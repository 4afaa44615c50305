#!/usr/bin/env bash
# One node, N processes:  launchers/single_node.sh N [RECIPE] [section.key=value ...]
#   e.g. launchers/single_node.sh 2 default run.max_steps=3 run.dir=/tmp/x
# On GPUs N = GPUs to use. On the CPU accelerator the launcher's device count is the number of
# NUMA nodes (usually 1), but --num_gpus N still starts N processes; each gets its share of the
# cores through OMP_NUM_THREADS (--bind_cores_to_rank would do that too, but needs numactl).
set -euo pipefail
N=${1:?usage: single_node.sh NPROC [RECIPE] [overrides...]}; shift
RECIPE=${1:-default}; [ $# -gt 0 ] && shift
PORT=${MASTER_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("",0)); print(s.getsockname()[1])')}
if ! python -c 'import torch,sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / N > 0 ? $(nproc) / N : 1 ))}
fi
exec deepspeed --num_gpus "$N" --master_port "$PORT" --module dsvit train --config "$RECIPE" "$@"
