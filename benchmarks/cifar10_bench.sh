#!/usr/bin/env bash
# Baseline of the cifar10-bench recipe: unpack CIFAR-10 JPEGs, convert, train, print top-1 and time.
#   benchmarks/cifar10_bench.sh [WORKDIR] [extra overrides, e.g. plugins.toe.enabled=true run.dir=...]
set -euo pipefail
work=${1:-/tmp/dsvit-cifar}; shift || true
"$(dirname "$0")/cifar10_prepare.sh" "$work"
start=$(date +%s)
dsvit train --config cifar10-bench data.root="$work/shards" "$@"
echo "wall-clock: $(( $(date +%s) - start )) s"
