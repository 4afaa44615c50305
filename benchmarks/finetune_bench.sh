#!/usr/bin/env bash
# Fine-tuning benchmark (issue 26): a ViT pretrained by dsvit's main job (the embedded shapes
# dataset, 4 epochs) fine-tuned on CIFAR-10 for 2 epochs, with and without ToE (and the token level),
# against the same model trained from scratch for the same 2 epochs; all runs interleaved on the
# cores by `dsvit bench run` (the machine's drift hits every run alike).
#   benchmarks/finetune_bench.sh WORKDIR [--results benchmarks/RESULTS.md]
# About 25 minutes on 2 cores (the pretraining ~3, the 4 fine-tuning runs ~20).
set -euo pipefail
work=$(mkdir -p "$1" && cd "$1" && pwd); shift
here=$(cd "$(dirname "$0")" && pwd)
dsvit=${DSVIT:-dsvit}
"$here/cifar10_prepare.sh" "$work/cifar"
# 1. pretraining: exactly the main job (`dsvit train`), into its own folder, exported once
[ -f "$work/pretrained.safetensors" ] || {
  $dsvit train run.dir="$work/pretrain" checkpoint.resume=auto log.progress=false
  $dsvit export "$work/pretrain" "$work/pretrained.safetensors"
}
# 2. the spec: cifar10-bench's data and schedule, the main job's architecture (4 blocks x 128, patch 4)
cat > "$work/finetune_spec.yaml" <<SPEC
name: finetune-cifar10
recipe: cifar10-bench
baseline: scratch
seeds: [0]
overrides: [model.embed_dim=128, model.depth=4, model.num_heads=4, model.patch_size=4, train.epochs=${EPOCHS:-2}]
variants:
  scratch: {note: "random init, the same budget"}
  init: {overrides: [model.init=$work/pretrained.safetensors, train.layer_decay=0.75], note: "pretrained by the main job; layer decay 0.75"}
  init-toe: {overrides: [model.init=$work/pretrained.safetensors, train.layer_decay=0.75, plugins.toe.enabled=true], note: "+ ToE (keep 0.5/0.75/1.0)"}
  init-toe-tokens: {overrides: [model.init=$work/pretrained.safetensors, train.layer_decay=0.75, plugins.toe.enabled=true, plugins.token_pruning.enabled=true, plugins.token_pruning.keep_rate=0.9], note: "+ ToE + token level 0.9"}
SPEC
$dsvit bench run "$work/finetune_spec.yaml" --dir "$work/bench" data.root="$work/cifar/shards" "$@"
