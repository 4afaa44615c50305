#!/usr/bin/env bash
# Unpack the shared CIFAR-10 JPEGs into WORKDIR/cifar10 and convert them to WORKDIR/shards (once).
#   benchmarks/cifar10_prepare.sh WORKDIR
set -euo pipefail
work=$1
tarball=$(cd "$(dirname "$0")/.." && pwd)/../shared/data/cifar10-jpeg.tar.gz
[ -f "$tarball" ] || { echo "need $tarball (the shared CIFAR-10 JPEGs)"; exit 1; }
mkdir -p "$work"
[ -d "$work/cifar10" ] || tar xzf "$tarball" -C "$work"
[ -f "$work/shards/_info.json" ] || dsvit shards imagefolder "$work/cifar10" "$work/shards"
