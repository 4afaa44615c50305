#!/usr/bin/env bash
# One node, N processes:  launchers/single_node.sh N [RECIPE] [section.key=value ...]
#   e.g. launchers/single_node.sh 2 default run.max_steps=3 run.dir=/tmp/x
# On GPUs N = GPUs to use. On the CPU accelerator the launcher's device count is the number of
# NUMA nodes (usually 1), but --num_gpus N still starts N processes. Each rank gets its share of
# the cores through OMP_NUM_THREADS (--bind_cores_to_rank would do that too, but needs numactl).
# Checks first (launchers/preflight.py: N, the recipe and overrides at world size N, the port);
# prints the command it starts; DRY_RUN=1 prints it and starts nothing. MASTER_PORT: default a
# free one.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
N=${1:?usage: single_node.sh NPROC [RECIPE] [overrides...]}; shift
RECIPE=${1:-default}; [ $# -gt 0 ] && shift
[[ $N =~ ^[1-9][0-9]*$ ]] || die "NPROC must be a whole number >= 1, got '$N'"
preflight --nproc "$N" --master-port "${MASTER_PORT:-0}" "$RECIPE" "$@"
split_cores "$N"
start deepspeed --num_gpus "$N" --master_port "$PORT" --module dsvit train --config "$RECIPE" "$@"
