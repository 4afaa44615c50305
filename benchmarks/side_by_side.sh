#!/usr/bin/env bash
# Train two cifar10-bench variants at the same time, each pinned to its own CPU core, so that both
# see the same machine conditions for their whole run (this box's speed drifts within the hour:
# 0.73-1.15 s/step in one 18-minute run, benchmarks/RESULTS.md; back-to-back runs are not comparable
# at the few-percent level).
#   benchmarks/side_by_side.sh WORKDIR LABEL_A "OVERRIDES_A" LABEL_B "OVERRIDES_B" [COMMON_OVERRIDES...]
# e.g. benchmarks/side_by_side.sh /tmp/dsvit-cifar baseline "" toe "plugins.toe.enabled=true" train.epochs=6
# Runs land in WORKDIR/runs/side_<LABEL>; logs in WORKDIR/side_<LABEL>.log. Each run gets one core and
# one torch thread; its loader worker shares that core. Prints plot_curves.py's table at the end.
set -euo pipefail
work=$1 la=$2 oa=$3 lb=$4 ob=$5; shift 5
here=$(cd "$(dirname "$0")" && pwd)
[ "$(nproc)" -ge 2 ] || { echo "needs 2 cores"; exit 1; }
"$here/cifar10_prepare.sh" "$work"
run() {  # core label overrides
  rm -rf "$work/runs/side_$2"
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=1 taskset -c "$1" dsvit train --config cifar10-bench data.root="$work/shards" \
    run.dir="$work/runs/side_$2" $3 "${@:4}" > "$work/side_$2.log" 2>&1
}
run 0 "$la" "$oa" "$@" & pa=$!
run 1 "$lb" "$ob" "$@" & pb=$!
wait $pa; wait $pb
python "$here/plot_curves.py" "$work/side_by_side.png" "$la=$work/runs/side_$la" "$lb=$work/runs/side_$lb"
