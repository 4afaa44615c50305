#!/usr/bin/env bash
# One launcher per node, no ssh: run this on every node with its own NODE_RANK.
#   launchers/per_node.sh HOSTFILE NODE_RANK MASTER_ADDR [RECIPE] [section.key=value ...]
# HOSTFILE lists every node in node-rank order ("host slots=N", see hostfile.example) and must be
# the same file on all nodes; MASTER_ADDR is node 0's address, reachable from every node, and
# MASTER_PORT (default 29500) must be the same on all nodes and free on node 0.
# Checks first (launchers/preflight.py: the hostfile, NODE_RANK, the recipe and overrides at the
# hostfile's world size, MASTER_ADDR resolves, the port free on node 0 / a warning when node K > 0
# cannot connect yet); prints the command it starts; DRY_RUN=1 prints it and starts nothing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
HOSTFILE=${1:?usage: per_node.sh HOSTFILE NODE_RANK MASTER_ADDR [RECIPE] [overrides...]}
NODE_RANK=${2:?node rank}; MASTER_ADDR=${3:?master addr}; shift 3
RECIPE=${1:-default}; [ $# -gt 0 ] && shift
[[ $NODE_RANK =~ ^[0-9]+$ ]] || die "NODE_RANK must be a whole number >= 0, got '$NODE_RANK'"
PORT=${MASTER_PORT:-29500}
preflight --hostfile "$HOSTFILE" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" \
  --master-port "$PORT" "$RECIPE" "$@"
split_cores "$LOCAL_SLOTS"
start deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" --master_port "$PORT" \
  --module dsvit train --config "$RECIPE" "$@"
