#!/usr/bin/env bash
# Baseline of the cifar10-bench recipe: unpack CIFAR-10 JPEGs, convert, train, print top-1 and time.
#   benchmarks/cifar10_bench.sh [WORKDIR] [extra overrides, e.g. plugins.toe.enabled=true run.dir=...]
set -euo pipefail
work=${1:-/tmp/dsvit-cifar}; shift || true
tarball=$(cd "$(dirname "$0")/.." && pwd)/../shared/data/cifar10-jpeg.tar.gz
[ -f "$tarball" ] || { echo "need $tarball (the shared CIFAR-10 JPEGs)"; exit 1; }
mkdir -p "$work"
[ -d "$work/cifar10" ] || tar xzf "$tarball" -C "$work"
[ -f "$work/shards/_info.json" ] || dsvit shards imagefolder "$work/cifar10" "$work/shards"
start=$(date +%s)
dsvit train --config cifar10-bench data.root="$work/shards" "$@"
echo "wall-clock: $(( $(date +%s) - start )) s"
