#!/usr/bin/env bash
# One launcher per node, no ssh: run this on every node with its own NODE_RANK.
#   launchers/per_node.sh HOSTFILE NODE_RANK MASTER_ADDR [RECIPE] [section.key=value ...]
# HOSTFILE lists every node in node-rank order ("host slots=N", see hostfile.example) and must be
# the same file on all nodes; MASTER_ADDR is node 0's address, reachable from every node, and
# MASTER_PORT (default 29500) must be the same on all nodes and free on node 0.
set -euo pipefail
HOSTFILE=${1:?usage: per_node.sh HOSTFILE NODE_RANK MASTER_ADDR [RECIPE] [overrides...]}
NODE_RANK=${2:?node rank}; MASTER_ADDR=${3:?master addr}; shift 3
RECIPE=${1:-default}; [ $# -gt 0 ] && shift
if ! python -c 'import torch,sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  SLOTS=$(awk -v k="$NODE_RANK" '!/^#/ && NF {if (n++ == k) {sub("slots=", "", $2); print $2}}' "$HOSTFILE")
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / SLOTS > 0 ? $(nproc) / SLOTS : 1 ))}
fi
exec deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
  --module dsvit train --config "$RECIPE" "$@"
