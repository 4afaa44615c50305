#!/usr/bin/env bash
# Loss traces of short fp32 CPU runs of the shipped recipes, written exactly (JSON floats round-trip),
# so that two checkouts can be compared bit for bit after a refactor:
#   tools/loss_traces.sh OUT_DIR            # in checkout A, then in checkout B with another OUT_DIR
#   diff OUT_A/traces.txt OUT_B/traces.txt  # empty: the same numbers
# Runs: stack (growth rebuilds + ToE + token level), trilevel (example level rounds, token and
# attention levels), autoprog (supernet growth, searches scored by FLOPs so nothing depends on time).
set -euo pipefail
out=${1:?usage: tools/loss_traces.sh OUT_DIR}
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$root/.venv/bin/python}"
mkdir -p "$out"
small="data.synthetic_train=2560 data.synthetic_val=500 log.every_steps=1 log.progress=false run.overwrite=true"
run() {  # name recipe overrides...
  local name=$1 recipe=$2; shift 2
  DS_ACCELERATOR=cpu PYTHONPATH="$root" OMP_NUM_THREADS=1 "$py" -m dsvit train --config "$recipe" \
      run.dir="$out/$name" $small "$@" > "$out/$name.log" 2>&1
  "$py" - "$out/$name" "$name" >> "$out/traces.txt" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/tb/metrics.jsonl")]
for r in rows:
    for k in ("train/loss", "eval/top1", "eval/loss"):
        if k in r:
            print(sys.argv[2], r["step"], k, repr(r[k]))
PY
}
: > "$out/traces.txt"
run stack stack train.epochs=2
run trilevel trilevel train.epochs=4
run autoprog autoprog train.epochs=4 plugins.growth.cost=flops plugins.growth.search_length=0.1
wc -l "$out/traces.txt"
