#!/usr/bin/env bash
# Several nodes from one: the launcher ssh-es into every host of HOSTFILE (passwordless ssh,
# same paths and venv on all nodes) and starts their processes with pdsh (the default; install
# pdsh) -- or pass DS_LAUNCHER=openmpi|mvapich|mpich|impi.
#   launchers/hostfile_multi_node.sh HOSTFILE MASTER_ADDR [RECIPE] [section.key=value ...]
# Variables to forward to the other nodes (NCCL_*, OMP_NUM_THREADS, PYTHONPATH ...) go in a
# ./.deepspeed_env file, one VAR=value per line.
set -euo pipefail
HOSTFILE=${1:?usage: hostfile_multi_node.sh HOSTFILE MASTER_ADDR [RECIPE] [overrides...]}
MASTER_ADDR=${2:?master addr (first host, reachable from all)}; shift 2
RECIPE=${1:-default}; [ $# -gt 0 ] && shift
exec deepspeed --hostfile "$HOSTFILE" --launcher "${DS_LAUNCHER:-pdsh}" \
  --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
  --module dsvit train --config "$RECIPE" "$@"
