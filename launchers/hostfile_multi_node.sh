#!/usr/bin/env bash
# Several nodes from one: the launcher ssh-es into every host of HOSTFILE (passwordless ssh,
# same paths and venv on all nodes) and starts their processes with pdsh (the default; install
# pdsh) -- or pass DS_LAUNCHER=openmpi|mvapich|mpich|impi.
#   launchers/hostfile_multi_node.sh HOSTFILE MASTER_ADDR [RECIPE] [section.key=value ...]
# Variables to forward to the other nodes (OMP_NUM_THREADS, GLOO_SOCKET_IFNAME, DS_ACCELERATOR ...;
# NCCL_* and PYTHON* go on their own) go in a ./.deepspeed_env file, one VAR=value per line.
# Checks first (launchers/preflight.py: the hostfile, the recipe and overrides at the hostfile's
# world size, MASTER_ADDR resolves, the hosts resolve, .deepspeed_env lines, pdsh installed);
# prints the command it starts; DRY_RUN=1 prints it and starts nothing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
HOSTFILE=${1:?usage: hostfile_multi_node.sh HOSTFILE MASTER_ADDR [RECIPE] [overrides...]}
MASTER_ADDR=${2:?master addr (first host, reachable from all)}; shift 2
RECIPE=${1:-default}; [ $# -gt 0 ] && shift
LAUNCHER=${DS_LAUNCHER:-pdsh}
if [ "$LAUNCHER" = pdsh ]; then
  command -v pdsh >/dev/null ||
    die "pdsh is not installed (DeepSpeed's default ssh launcher): install it or set DS_LAUNCHER=openmpi|mvapich|mpich|impi"
fi
PORT=${MASTER_PORT:-29500}
preflight --ssh --hostfile "$HOSTFILE" --master-addr "$MASTER_ADDR" --master-port "$PORT" \
  "$RECIPE" "$@"
start deepspeed --hostfile "$HOSTFILE" --launcher "$LAUNCHER" \
  --master_addr "$MASTER_ADDR" --master_port "$PORT" \
  --module dsvit train --config "$RECIPE" "$@"
