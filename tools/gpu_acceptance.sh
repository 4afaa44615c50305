#!/usr/bin/env bash
# GPU acceptance: does dsvit's hot path work on one NVIDIA GPU with ~16 cores, and how fast, in under
# 9 minutes. Every part runs under its own time limit; OUT_DIR/summary.md is written part by part.
#
#   tools/gpu_acceptance.sh OUT_DIR            # on the GPU machine (OUT_DIR new or empty)
#   tools/gpu_acceptance.sh --smoke OUT_DIR    # tiny sizes on CPU (or DSVIT_ACCEPTANCE_SMOKE=1);
#                                              # tests/test_gpu_acceptance.py runs it
# Parts (bf16 throughout; precision and ZeRO config are passed explicitly, never left to defaults):
#   1 `dsvit bench throughput`, ViT-S/16 and ViT-B/16 at 224, baseline and stack: images/s, MFU
#   2 DeepSpeed training of ViT-B/16, zero1-bf16, baseline and stack, on 224 px JPEG shards made
#     here: images/s, data-wait fraction, device memory after each engine rebuild
#   3 the stack under zero3-bf16: device memory across rebuilds         } side by side
#   4 an identity rebuild in bf16: losses within bf16 tolerance of none  }
#   5 CIFAR-10 (cifar10-bench recipe, CIFAR_EPOCHS=20), baseline and stack-et (the composition that
#     reached 3x on the 2-core CPU: growth's depth + EfficientTrain++ + tokens) side by side on the GPU:
#     top-1 and time each; JPEGs from shared/data or ../shared/data (the part is skipped without)
# Smoke mode: the same parts with tiny models and data (part 5 on the generated dataset), on CPU.
# Environment: PYTHON (default .venv/bin/python, else python3), WHEELS (below), ACCEPTANCE_WORK (the
# bulky files: shards, runs, checkpoints; default OUT_DIR/work), PEAK_TFLOPS (a GPU missing from bench
# throughput's peak table), BUDGET_S (default 525), CIFAR_EPOCHS. Exit 0 when every part is ok or skipped.
#
# Offline install: what the Python lacks comes from `pip install --no-index --find-links WHEELS`
# (WHEELS, else the first of wheels/, shared/wheels, ../wheels, ../shared/wheels); a Python that has
# everything installs nothing; one outside a venv gets a venv first (ACCEPTANCE_WORK/venv, with
# --system-site-packages: a system CUDA torch is kept). Make the folder on a machine with network:
#   pip download -d wheels --python-version 3.12 --platform manylinux2014_x86_64 --only-binary=:all: \
#       webdataset hjson pydantic   # for that machine's Python: what its `pip list` lacks besides the two below
#   pip wheel -w wheels --no-deps --no-build-isolation deepspeed==0.19.8 fairscale==0.4.13   # source-only on PyPI
# README.md ("On a GPU") has the whole recipe, torch and CUDA included.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF="$ROOT/tools/gpu_acceptance.sh"

sizes() {  # everything that differs between the GPU run and the smoke run
  BF16="run.ds_config=zero1-bf16 run.precision=bf16"
  if [ "$SMOKE" = 1 ]; then
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
    BENCH=(--model vit_small_patch16_224 --model vit_base_patch16_224 --img 32 --patch 4 --embed-dim 64
           --depth 4 --heads 2 --classes 10 --batch 2 --rounds 1 --device cpu --threads 1)
    MODEL="model.name=vit_tiny_patch16_224 model.img_size=32 model.patch_size=4 model.embed_dim=32"
    MODEL+=" model.depth=4 model.num_heads=2"
    IMG=32 N_TRAIN=256 N_VAL=64 BATCH=16 STEPS=8 Z3_STEPS=8 WORKERS=1 PREP_WORKERS=1
    PROBE="model.img_size=16 train.batch_size=16 run.max_steps=6" PROBE_AT=3
    CIFAR_MODEL="model.depth=4 model.embed_dim=32 model.num_heads=2" CIFAR_EPOCHS=${CIFAR_EPOCHS:-2}
    CIFAR_WORKERS=1 CIFAR_LOG=4 CIFAR_VAL=val
    LIM0=120 LIM1=120 LIM2=240 LIM3=240 LIM5=300 BUDGET_S=${BUDGET_S:-900}
  else
    export DS_ACCELERATOR=cuda
    BENCH=(--batch 128 --rounds 6 --device cuda)
    [ -z "${PEAK_TFLOPS:-}" ] || BENCH+=(--peak-tflops "$PEAK_TFLOPS")
    MODEL="model.name=vit_base_patch16_224 model.img_size=224 model.patch_size=16 model.embed_dim=768"
    MODEL+=" model.depth=12 model.num_heads=12"
    IMG=224 N_TRAIN=3072 N_VAL=512 BATCH=256 STEPS=120 Z3_STEPS=80 WORKERS=8 PREP_WORKERS=8
    PROBE="model.img_size=32 model.patch_size=4 model.embed_dim=384 model.depth=6 model.num_heads=6"
    PROBE+=" train.batch_size=64 run.max_steps=10" PROBE_AT=5
    CIFAR_MODEL="" CIFAR_EPOCHS=${CIFAR_EPOCHS:-20} CIFAR_WORKERS=4 CIFAR_LOG=50 CIFAR_VAL=test
    LIM0=150 LIM1=110 LIM2=170 LIM3=130 LIM5=400 BUDGET_S=${BUDGET_S:-525}
  fi
}

# ------------------------------------------------------------------ used inside the parts
say() { echo "$*" >> "$PART_OUT"; }
helper() { "$PY" "$WORK/helper.py" "$@"; }
last_line() { { grep -v '^[[:space:]]*$' "$1" 2>/dev/null || true; } | tail -n 1 | cut -c1-240; }
train() {  # NAME RECIPE overrides...: one `dsvit train` in WORK/runs/NAME, its log logs/NAME.log
  local name=$1 recipe=$2 t0=$SECONDS; shift 2
  if ! "$PY" -m dsvit train --config "$recipe" run.dir="$WORK/runs/$name" log.progress=false "$@" \
      > "$LOGS/$name.log" 2>&1; then
    say "run $name failed: $(last_line "$LOGS/$name.log") (logs/$name.log)"; return 1
  fi
  echo $((SECONDS - t0)) > "$WORK/runs/$name.wall_s"
}
await_prep() {  # NAME [MAX_S]: wait for a preparation started in the background (MAX_S: at most, quietly)
  local t0=$SECONDS
  while [ ! -e "$WORK/prep_$1.ok" ]; do
    if [ -e "$WORK/prep_$1.failed" ] || ! kill -0 "$(cat "$WORK/prep_$1.pid")" 2>/dev/null; then
      [ -n "${2:-}" ] || say "preparation '$1' failed: $(last_line "$LOGS/prep_$1.log") (logs/prep_$1.log)"
      return 1
    fi
    [ -z "${2:-}" ] || [ $((SECONDS - t0)) -lt "$2" ] || return 1
    sleep 1
  done
}
cifar_tarball() { local f; for f in "$ROOT"/{,../}shared/data/cifar10-jpeg.tar.gz; do
  [ -f "$f" ] && { echo "$f"; return 0; }; done; return 1; }
prep_images() {  # JPEG shards of generated images at the training size
  helper images "$WORK/img$IMG" "$N_TRAIN" "$N_VAL" "$IMG" "$PREP_WORKERS"
  "$PY" -m dsvit shards imagefolder "$WORK/img$IMG" "$WORK/shards$IMG" --workers "$PREP_WORKERS" --no-progress
}
prep_cifar() {  # CIFAR-10 JPEGs -> shards (smoke: the embedded generated dataset, 32 px, 10 classes)
  [ "$SMOKE" != 1 ] || { "$PY" -m dsvit shards synthetic "$WORK/cifar-shards" --num-train 512 --num-val 100; return; }
  local tarball; tarball=$(cifar_tarball) || { touch "$WORK/prep_cifar.failed"; return 1; }
  mkdir -p "$WORK/cifar" && tar xzf "$tarball" -C "$WORK/cifar"
  "$PY" -m dsvit shards imagefolder "$WORK/cifar/cifar10" "$WORK/cifar-shards" --workers "$PREP_WORKERS" --no-progress
}

# ------------------------------------------------------------------ the parts
part0() {  # a Python with every dependency (installed offline from wheels if need be), the device
  local need="torch:torch torchvision:torchvision deepspeed:deepspeed timm:timm webdataset:webdataset
    fairscale:fairscale tensorboard:tensorboard yaml:pyyaml tqdm:tqdm safetensors:safetensors
    numpy:numpy PIL:pillow psutil:psutil" py=${PYTHON:-} miss
  [ -n "$py" ] || { [ -x "$ROOT/.venv/bin/python" ] && py="$ROOT/.venv/bin/python"; } || py=$(command -v python3)
  missing() { "$1" -c 'import importlib.util as u, sys
print(" ".join(p for m, p in (x.split(":") for x in sys.argv[1:]) if u.find_spec(m) is None))' $need; }
  miss=$(missing "$py")
  if [ -z "$miss" ]; then
    say "python: $py (every dependency present: nothing installed)"
  else
    local wheels="" d cands=("$ROOT"/{,../}{,shared/}wheels)
    [ -z "${WHEELS:-}" ] || cands=("$WHEELS")
    for d in "${cands[@]}"; do [ -d "$d" ] && { wheels=$d; break; }; done
    if [ -z "$wheels" ]; then
      say "error: $py lacks $miss, and there is no wheels folder to install them from (looked in ${cands[*]}):"\
          "make one as tools/gpu_acceptance.sh's header says, or set WHEELS=DIR or PYTHON=a python that has them"
      return 1
    fi
    if [ "$("$py" -c 'import sys; print(sys.prefix != sys.base_prefix)')" != True ]; then
      "$py" -m venv --system-site-packages "$WORK/venv" && py="$WORK/venv/bin/python"
    fi
    say "python: $py; installing $miss from $wheels"
    "$py" -m pip install --no-index --find-links "$wheels" --no-build-isolation $miss
    miss=$(missing "$py")
    [ -z "$miss" ] || { say "error: still missing after the install: $miss (add their wheels to $wheels)"; return 1; }
  fi
  echo "PY='$py'" > "$WORK/env.sh"
  "$py" - "$SMOKE" >> "$PART_OUT" <<'PY'
import sys, torch
if sys.argv[1] != "1" and not torch.cuda.is_available():
    sys.exit(print(f"error: no GPU visible to torch {torch.__version__} (CUDA {torch.version.cuda}): use a CUDA "
                   "build of torch on a GPU machine, or run --smoke on a CPU one") or 1)
import deepspeed, timm
dev = ("cpu (smoke mode)" if sys.argv[1] == "1" else f"{torch.cuda.get_device_name(0)}, "
       f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
print(f"device: {dev}; torch {torch.__version__} (CUDA {torch.version.cuda}), deepspeed {deepspeed.__version__}, "
      f"timm {timm.__version__}, python {sys.version.split()[0]}")
PY
}

part1() {
  "$PY" -m dsvit bench throughput --methods baseline stack --dtype bf16 "${BENCH[@]}" \
      --out "$WORK/throughput.md" > "$LOGS/throughput.log" 2>&1 \
    || { say "bench throughput failed: $(last_line "$LOGS/throughput.log")"; return 1; }
  helper throughput "$WORK/throughput.md" >> "$PART_OUT"
}

vitb() {  # NAME RECIPE STEPS overrides...: a ViT-B/16 run on the 224 px shards
  local name=$1 recipe=$2 steps=$3; shift 3
  train "$name" "$recipe" $MODEL $BF16 data.root="$WORK/shards$IMG" data.workers=$WORKERS \
      train.batch_size=$BATCH train.eval_batch_size=$BATCH train.epochs=1 data.steps_per_epoch="$steps" \
      checkpoint.every_epochs=0 log.every_steps=5 "$@"
}
part2() {
  await_prep images
  if ! await_prep cifar 60 && kill -0 "$(cat "$WORK/prep_cifar.pid")" 2>/dev/null; then   # it competes for cores
    say "(the CIFAR-10 shards were still being written during this part: data-wait may read high)"
  fi
  vitb vitb-baseline default "$STEPS"
  vitb vitb-stack stack "$STEPS"
  helper train "baseline=$WORK/runs/vitb-baseline" "stack=$WORK/runs/vitb-stack" >> "$PART_OUT"
}

part3() {
  await_prep images
  vitb vitb-stack-zero3 stack "$Z3_STEPS" run.ds_config=zero3-bf16
  helper memory "$WORK/runs/vitb-stack-zero3" >> "$PART_OUT"
}

part4() {  # tests/scripts/train_memory.py: in-memory data, the rebuild_probe plugin's identity rebuild
  local name at probe=plugins.rebuild_probe pids=() rc=0
  for name in plain rebuilt; do
    at="[]"; [ $name = plain ] || at="[$PROBE_AT]"
    "$PY" "$ROOT/tests/scripts/train_memory.py" run.dir="$WORK/runs/probe-$name" $BF16 $PROBE \
        $probe.enabled=true "$probe.at_steps=$at" > "$LOGS/probe-$name.log" 2>&1 & pids+=($!)
  done
  wait "${pids[0]}" || rc=1; wait "${pids[1]}" || rc=1
  [ $rc = 0 ] || { say "a probe run failed: $(last_line "$LOGS/probe-rebuilt.log") (logs/probe-*.log)"; return 1; }
  helper trace "$WORK/runs/probe-plain" "$WORK/runs/probe-rebuilt" 1e-2 >> "$PART_OUT"
}

part5() {
  if [ "$SMOKE" != 1 ] && ! cifar_tarball > /dev/null; then
    say "skip: no cifar10-jpeg.tar.gz in shared/data or ../shared/data (the shared CIFAR-10 JPEGs)"; return 3
  fi
  await_prep cifar
  helper stack_recipe "$ROOT/dsvit/recipes/stack-et.yaml" "$WORK/cifar-stack-et.yaml"
  local a b rc=0 common="$BF16 data.root=$WORK/cifar-shards data.val_split=$CIFAR_VAL data.workers=$CIFAR_WORKERS"
  common+=" train.epochs=$CIFAR_EPOCHS checkpoint.every_epochs=0 log.every_steps=$CIFAR_LOG $CIFAR_MODEL"
  train cifar-baseline cifar10-bench $common & a=$!
  train cifar-stack-et "$WORK/cifar-stack-et.yaml" $common & b=$!
  wait $a || rc=1; wait $b || rc=1
  helper cifar "$CIFAR_EPOCHS" "baseline=$WORK/runs/cifar-baseline" "stack-et=$WORK/runs/cifar-stack-et" >> "$PART_OUT"
  return $rc
}

# ------------------------------------------------------------------ internal entry points
if [ "${1:-}" = __part ] || [ "${1:-}" = __prep ]; then
  sizes
  [ ! -e "$WORK/env.sh" ] || source "$WORK/env.sh"
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  if [ "$1" = __prep ]; then
    trap '[ -e "$WORK/prep_$2.ok" ] || touch "$WORK/prep_$2.failed"' EXIT
    "prep_$2"; touch "$WORK/prep_$2.ok"; exit 0
  fi
  PART_OUT="$OUT/parts/$2.md"
  "part$2"
  exit 0
fi

# ------------------------------------------------------------------ main
SMOKE=${DSVIT_ACCEPTANCE_SMOKE:-0}
[ "${1:-}" != --smoke ] || { SMOKE=1; shift; }
[ $# = 1 ] || { echo "usage: tools/gpu_acceptance.sh [--smoke] OUT_DIR" >&2; exit 2; }
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
[ -z "$(ls -A "$OUT")" ] || { echo "error: $OUT is not empty (an earlier acceptance run?): give a new OUT_DIR" >&2; exit 2; }
WORK=${ACCEPTANCE_WORK:-$OUT/work} LOGS="$OUT/logs" SUMMARY="$OUT/summary.md"
[ ! -d "$WORK" ] || [ -z "$(ls -A "$WORK")" ] || { echo "error: ACCEPTANCE_WORK=$WORK is not empty: give a new one" >&2; exit 2; }
mkdir -p "$WORK" "$LOGS" "$OUT/parts"
export SMOKE OUT WORK LOGS ROOT
sizes
cat > "$WORK/helper.py" <<'PYHELPER'
"""tools/gpu_acceptance.sh's helper: generated images; the summary's lines from runs' metrics."""
import json, sys
from pathlib import Path

def rows(run, key=None):
    path = Path(run) / "tb" / "metrics.jsonl"
    got = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    return [r for r in got if key is None or key in r]

def fail(msg):
    sys.exit(print(f"error: {msg}") or 1)

def _image(job):   # a smooth random pattern; the class sets its base colour and frequency
    import numpy as np
    from PIL import Image
    path, c, size, seed = job
    rng, n = np.random.default_rng(seed), 3 + c % 4
    low = 0.6 * rng.random((n, n, 3)) + 0.2 * np.array([c % 3, c // 3 % 3, c % 2])
    arr = np.asarray(Image.fromarray((255 * low).astype(np.uint8)).resize((size, size), Image.BICUBIC))
    arr = arr.astype(np.int16) + rng.integers(-12, 13, (size, size, 3))
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=90)

def images(out, n_train, n_val, size, workers):
    """OUT/{train,val}/class_K/N.jpg, 10 classes, SIZE px."""
    from multiprocessing import Pool
    jobs = []
    for split, n, seed in (("train", int(n_train), 0), ("val", int(n_val), 10**6)):
        for c in range(10):
            Path(out, split, f"class_{c}").mkdir(parents=True, exist_ok=True)
        jobs += [(f"{out}/{split}/class_{i % 10}/{i:06d}.jpg", i % 10, int(size), seed + i) for i in range(n)]
    with Pool(int(workers)) as pool:
        pool.map(_image, jobs, chunksize=64)

def throughput(md):
    print("| model | method | images/s | MFU | device |\n|---|---|---|---|---|")
    for block in Path(md).read_text().split("### ")[1:]:
        lines = block.splitlines()
        cols = [c.strip() for c in next(x for x in lines if x.startswith("| method")).strip("|").split("|")]
        for r in (dict(zip(cols, (c.strip() for c in x.strip().strip("|").split("|")))) for x in lines):
            if (r.get("method"), r.get("stage")) in (("baseline", "full model"), ("stack", "**whole run**")):
                mfu = next((v for k, v in r.items() if k.startswith("MFU")), "n/a")
                print(f"| {lines[0].split()[0]} | {'stack (whole run)' if r['method'] == 'stack' else 'baseline'} | "
                      f"{float(r['images/s']):.1f} | {mfu} | {lines[1].removeprefix('device: ')} |")

def rates(run):
    """(images/s, data-wait fraction, steps) over the logged intervals after the first (warm-up)."""
    tr = rows(run, "train/images_per_s")
    if not tr:
        fail(f"{run}: no train/images_per_s in tb/metrics.jsonl (did the run train?)")
    prev, imgs, t, wait = (tr.pop(0)["step"] if len(tr) > 1 else 0), 0.0, 0.0, 0.0
    for r in tr:
        n, prev = r["step"] - prev, r["step"]
        dt = n * r["train/step_time_s"]
        t, wait, imgs = t + dt, wait + n * r["train/data_wait_s"], imgs + dt * r["train/images_per_s"]
    return imgs / t, wait / t, tr[-1]["step"]

def train(*labelled):
    print("| run | images/s (after the first interval) | data-wait fraction | steps | device MiB after "
          "each rebuild (step: depth) | eval top-1 |\n|---|---|---|---|---|---|")
    rate = {}
    for label, run in (a.split("=", 1) for a in labelled):
        rate[label], wait, steps = rates(run)
        mem = ", ".join(f"{r['engine/device_mem_mib']:.0f} (step {r['step']}: depth {r['model/depth']:.0f})"
                        for r in rows(run, "engine/rebuild_s")) or "no rebuilds"
        top1 = [f"{r['eval/top1']:.2f} %" for r in rows(run, "eval/top1")] or ["n/a"]
        print(f"| {label} | {rate[label]:.1f} | {wait:.3f} | {steps} | {mem} | {top1[-1]} |")
    if {"baseline", "stack"} <= set(rate):
        print(f"\nstack / baseline images/s: {rate['stack'] / rate['baseline']:.2f}x")

def memory(run):
    rb = rows(run, "engine/rebuild_s")
    if not rb:
        fail(f"{run}: no engine rebuild was logged (the stack's growth rebuilds the engine)")
    print("| rebuild at step | depth | device MiB | host RSS MiB | rebuild s |\n|---|---|---|---|---|")
    for r in rb:
        print(f"| {r['step']} | {r['model/depth']:.0f} | {r['engine/device_mem_mib']:.0f} | "
              f"{r['engine/host_rss_mib']:.0f} | {r['engine/rebuild_s']:.2f} |")
    a, b = rb[0], rb[-1]
    ratio = b["engine/device_mem_mib"] / a["engine/device_mem_mib"]
    print(f"\ndevice memory after the last rebuild / after the first: {ratio:.2f}x (depth {a['model/depth']:.0f} "
          f"-> {b['model/depth']:.0f}: growth adds blocks; a leak shows as more than their share)")

def trace(plain, rebuilt, tol):
    loss = [{r["step"]: r["train/loss"] for r in rows(run, "train/loss")} for run in (plain, rebuilt)]
    at = [r["step"] for r in rows(rebuilt, "engine/rebuild_s")]
    if not at or not loss[0] or sorted(loss[0]) != sorted(loss[1]):
        fail(f"not comparable: rebuilds at steps {at}; steps logged {sorted(loss[0])} and {sorted(loss[1])}")
    print("| step | loss, no rebuild | loss, identity rebuild | relative difference |\n|---|---|---|---|")
    diff = {s: abs(loss[1][s] - loss[0][s]) / abs(loss[0][s]) for s in sorted(loss[0])}
    for s, d in diff.items():
        print(f"| {s}{' (after it)' if s > at[0] else ''} | {loss[0][s]:.6f} | {loss[1][s]:.6f} | {d:.2e} |")
    ok = max(diff.values()) <= float(tol)
    print(f"\nidentity rebuild after step {at[0]}: max relative loss difference {max(diff.values()):.2e}, "
          f"tolerance {tol}: {'within' if ok else 'OUTSIDE'} bf16 tolerance")
    sys.exit(0 if ok else 1)

def cifar(epochs, *labelled):
    print("| run | top-1 | epochs evaluated | training loop s | end to end s |\n|---|---|---|---|---|")
    missing = []
    for label, run in (a.split("=", 1) for a in labelled):
        # every evaluation: the intermediate ones on part of the split (train.eval_samples), the last whole
        ev = [r for r in rows(run) if "eval/top1" in r or "eval_part/top1" in r]
        wall = Path(f"{run}.wall_s")
        top1, loop = ((f"{ev[-1]['eval/top1']:.2f} %", f"{ev[-1]['time/wall_s']:.0f}")
                      if ev and "eval/top1" in ev[-1] else ("n/a", "n/a"))
        missing += [] if top1 != "n/a" else [label]
        print(f"| {label} | {top1} | {len(ev)} / {epochs} | {loop} | "
              f"{wall.read_text().strip() if wall.exists() else 'n/a (the run did not finish)'} |")
    if missing:
        fail(f"no top-1 for {', '.join(missing)}")

def stack_recipe(stack_yaml, out):
    """cifar10-bench with a recipe's plugins (as benchmarks/stack_bench.yaml's plugins_from does)."""
    import yaml
    plugins = yaml.safe_load(Path(stack_yaml).read_text())["plugins"]
    Path(out).write_text(yaml.safe_dump({"base": "cifar10-bench", "plugins": plugins}, sort_keys=False))

if __name__ == "__main__":
    globals()[sys.argv[1]](*sys.argv[2:])
PYHELPER
T0=$SECONDS PY="" BAD=0
declare -A PID START LIMIT

cleanup() { local p; for p in "${PID[@]}"; do [ -z "$p" ] || kill -TERM -- "-$p" 2>/dev/null || true; done; }
trap 'cleanup; echo "interrupted" >> "$SUMMARY"; exit 130' INT TERM
limit() {  # NOMINAL: a part's limit, cut to what is left of the budget (10 s kept for the summary)
  local left=$((BUDGET_S - (SECONDS - T0) - 10))
  echo $(($1 < left ? $1 : left))
}
start() {  # N NOMINAL_LIMIT: part N in the background, in its own process group (timeout's)
  local n=$1 lim; lim=$(limit "$2")
  : > "$OUT/parts/$n.md"
  START[$n]=$SECONDS LIMIT[$n]=$lim PID[$n]=""
  [ "$lim" -lt 15 ] && return
  timeout -k 10 "$lim" "$SELF" __part "$n" > "$LOGS/part$n.log" 2>&1 &
  PID[$n]=$!
}
finish() {  # N TITLE: wait for part N; add its section and status line to the summary
  local n=$1 rc=0 dt status ll
  if [ -z "${PID[$n]}" ]; then rc=99; else wait "${PID[$n]}" || rc=$?; fi
  PID[$n]="" dt=$((SECONDS - START[$n]))
  case $rc in
    0) status="ok ($dt s)" ;;
    3) status="SKIPPED ($(tail -n 1 "$OUT/parts/$n.md" | sed 's/^skip: //'))" ;;
    99) status="NOT RUN (no time left in the ${BUDGET_S} s budget)"; BAD=1 ;;
    124|137) status="TIMEOUT after $dt s (limit ${LIMIT[$n]} s; logs/part$n.log)"; BAD=1 ;;
    *) status="FAILED (exit $rc after $dt s; logs/part$n.log)"; BAD=1; ll=$(last_line "$LOGS/part$n.log")
       [ -z "$ll" ] || status+=": $ll" ;;
  esac
  if [ "$n" = 5 ] && { [ $rc = 124 ] || [ $rc = 137 ]; }; then   # what the runs reached before the limit
    PYTHONPATH="$ROOT" timeout 20 "$PY" "$WORK/helper.py" cifar "$CIFAR_EPOCHS" \
        "baseline=$WORK/runs/cifar-baseline" "stack-et=$WORK/runs/cifar-stack-et" >> "$OUT/parts/5.md" 2>&1 || true
  fi
  { echo "## $2"; echo; cat "$OUT/parts/$n.md"; echo; echo "part $n: $status"; echo; } >> "$SUMMARY"
}
prep() {  # NAME NOMINAL_LIMIT: a background preparation that parts wait for
  local lim; lim=$(limit "$2"); [ "$lim" -ge 5 ] || lim=5   # (timeout 0 would mean none)
  timeout -k 10 "$lim" "$SELF" __prep "$1" > "$LOGS/prep_$1.log" 2>&1 &
  PID[prep_$1]=$!
  echo $! > "$WORK/prep_$1.pid"
}

{ echo "# dsvit GPU acceptance ($([ "$SMOKE" = 1 ] && echo "smoke mode: CPU, tiny sizes" || echo GPU))"; echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "?")" \
       "+ $(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l) uncommitted files; budget $BUDGET_S s, each part" \
       "under its own time limit; logs in logs/, runs in $WORK/runs/"; echo; } > "$SUMMARY"
start 0 "$LIM0"; finish 0 "setup"
[ ! -e "$WORK/env.sh" ] || source "$WORK/env.sh"
if [ "$BAD" = 1 ] || [ -z "$PY" ]; then
  echo "total: $((SECONDS - T0)) s; stopped: the setup failed" >> "$SUMMARY"; cat "$SUMMARY"; exit 1
fi
prep images "$LIM2"; prep cifar "$((LIM1 + LIM2))"
start 1 "$LIM1"; finish 1 "1. bench throughput: ViT-S/16 and ViT-B/16, 224 px, bf16, baseline and stack"
start 2 "$LIM2"; finish 2 "2. DeepSpeed training, ViT-B/16, bf16, ZeRO-1, baseline and stack"
start 3 "$LIM3"; start 4 "$LIM3"
finish 3 "3. the stack under ZeRO-3 (zero3-bf16): device memory across rebuilds"
finish 4 "4. identity rebuild in bf16: loss trace against no rebuild"
start 5 "$LIM5"; finish 5 "5. CIFAR-10 (cifar10-bench, $CIFAR_EPOCHS epochs), baseline and stack-et side by side"
cleanup
echo "total: $((SECONDS - T0)) s; $([ $BAD = 0 ] && echo "every part ok or skipped" || echo "a part FAILED, timed out or did not run")" >> "$SUMMARY"
cat "$SUMMARY"
exit "$BAD"
