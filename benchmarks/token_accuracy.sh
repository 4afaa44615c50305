#!/usr/bin/env bash
# Accuracy at equal epochs on CIFAR-10 (cifar10-bench recipe): baseline vs ToE vs PSS vs ToE+PSS,
# one after the other on an otherwise idle machine, then the curves and the table.
#   benchmarks/token_accuracy.sh [WORKDIR]       (runs go to WORKDIR/runs/*)
set -euo pipefail
work=${1:-/tmp/dsvit-cifar}
here=$(cd "$(dirname "$0")" && pwd)
run() { local name=$1; shift; [ -f "$work/runs/$name/checkpoints/latest" ] ||
        "$here/cifar10_bench.sh" "$work" run.dir="$work/runs/$name" "$@"; }
run baseline
run toe plugins.toe.enabled=true
run pss plugins.pss.enabled=true
run toe_pss plugins.pss.enabled=true plugins.pss.drop_start=0.6 plugins.toe.enabled=true
python "$here/plot_curves.py" "$here/token_accuracy.png" baseline="$work/runs/baseline" \
    toe="$work/runs/toe" pss="$work/runs/pss" toe+pss="$work/runs/toe_pss"
