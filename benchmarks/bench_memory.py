"""Per-rank memory of parameters, gradients and optimizer state under ZeRO 0/1/2/3, measured, next to
DeepSpeed's own estimators.

    python benchmarks/bench_memory.py [--models vit_small_patch16_224 vit_base_patch16_224]
        [--stages 0 1 2 3] [--world-sizes 1 2] [--precisions fp32 bf16] [--batch 2]
        [--grad-accum N] [--zero-overrides JSON] [--time-steps N] [--jsonl FILE] [--from-jsonl FILE]

The driver starts one job per (model, precision, ZeRO stage, world size) through the real launcher,
``deepspeed --num_gpus WS --master_port P benchmarks/bench_memory.py --worker ...`` (on the CPU
accelerator ``--num_gpus 2`` starts 2 gloo ranks; each rank gets ``cores / WS`` OpenMP threads unless
OMP_NUM_THREADS is set), so every measurement is a fresh process. A worker builds the engine as
dsvit's Trainer does (``complete_ds_config`` on ``ds_configs/zeroS.json`` with ``run.precision``,
``build_model``, ``build_engine`` = timm AdamW + ``deepspeed.initialize``; the whole model is built on
every rank, no ``zero.Init``), runs one optimizer step on ``--batch`` random 224px images per rank
(1000 classes), and walks the tensors the engine and its optimizer really hold, by category:

- gathered: ZeRO-3 only: full parameters gathered for compute (a partitioned parameter's ``.data``);
- params:  the module's parameters as DeepSpeed left them (under ZeRO-3 the local ``ds_tensor``
           partitions plus the persistent small parameters) and the optimizer's flat copies they are
           views of (``bit16_groups_flat``, ``lp_param_buffer``, ...);
- master:  fp32 master weights (``single_partition_of_fp32_groups``, ``fp32_partitioned_groups_flat``,
           the bf16 ZeRO-0 wrapper's ``fp32_groups``); none for plain fp32 ZeRO-0;
- buckets: the reduce (IPG) buckets. ZeRO-1/2 allocate them at the start of each backward and free
           them at its end, so they are read just before that release; ZeRO-3 keeps its bucket;
- grads:   ``param.grad``, the master weights' ``.grad``, gradient partitions and flat buffers;
- adam:    the wrapped optimizer's ``state`` (exp_avg, exp_avg_sq);
- other:   anything else tensor-valued the optimizer holds (a check that nothing is missed).

Every tensor counts with its whole storage (``untyped_storage().nbytes()``), once per storage
(deduplicated by storage ``data_ptr``), in the first category of that list that reaches it: views of
one flat buffer count once, a parameter that is a view of the optimizer's flat copy counts as params,
a ``param.grad`` that is a view into a bucket counts as bucket. Snapshots are taken in two optimizer
steps (the first records ZeRO-3's module trace, the second follows it) after every forward, in every
backward just before the buckets are released (ZeRO-1/2), after every backward and after the step;
each category is its largest over the snapshots, and "step peak" the largest sum at one snapshot.
Transients inside ``step()`` (e.g. the bf16 ZeRO-0 wrapper's fp32 gradients) are not seen. total =
params + master + grads + adam (the model states the estimators cover); buckets and gathered are
reported next to it. Bytes are allocated sizes (what a GPU's caching allocator reserves); on CPU an
untouched ``torch.empty`` is not resident, so RSS can grow by less.

The second step's collectives are counted on ``deepspeed.comm``'s backend object (calls and payload
per phase: forward, backward, ``engine.step``) and printed for world sizes > 1 in units of one copy of
the model (Ψ·b = parameters x bytes per element of the model dtype).

``--time-steps N`` also times N further steps (after one warm-up) and prints images/s per world
size; on a 2-core machine that says nothing about a cluster (see docs/scaling.md).

DeepSpeed's estimators are called on rank 0 on the still unpartitioned model (after
``deepspeed.initialize`` a ZeRO-3 model's ``parameters()`` are partitioned and the estimators would
count only the persistent ones): ``estimate_zero2_model_states_mem_needs_all_live`` for stages 0-2
(stage 0 with 1 GPU, i.e. nothing partitioned; DeepSpeed has no stage-1 estimator) and
``estimate_zero3_model_states_mem_needs_all_live`` for stage 3, with ``num_gpus_per_node=WS,
num_nodes=1``. Their printed "per GPU" figure of the row without offload is parsed from the captured
table and checked against the unrounded number from ``estimate_zero{2,3}_model_states_mem_needs``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MIB = 2 ** 20
CATEGORIES = ("gathered", "params", "master", "grads", "adam", "buckets", "other")
MODEL_STATES = ("params", "master", "grads", "adam")     # what DeepSpeed's estimators cover

# Attributes of DeepSpeed's ZeRO / BF16 optimizers (0.19.8), by what they hold. Anything else
# tensor-valued the optimizer holds ends up in "other".
PARAM_ATTRS = ("bit16_groups_flat", "bit16_groups", "round_robin_bit16_groups",
               "parallel_partitioned_bit16_groups", "lp_param_buffer", "fp16_partitioned_groups_flat",
               "fp16_partitioned_groups", "fp16_groups", "bf16_groups_flat", "bf16_groups",
               "bf16_partitioned_groups", "lp_param_contiguous_pin_buffer")
MASTER_ATTRS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat",
                "fp32_groups_flat_partition", "fp32_groups", "fp32_groups_flat")
GRAD_ATTRS = ("averaged_gradients", "grads_in_partition", "all_grad_tensors", "grad_partitions_flat_buffer",
              "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition", "fp32_groups_gradients_flat",
              "fp32_groups_gradients", "fp32_groups_gradient_flat_partition")
BUCKET_ATTRS = ("ipg_buckets",)


# ------------------------------------------------------------------ walking what the engine holds
def _tensors(obj, grads: bool = True, depth: int = 0, seen=None):
    """Every tensor reachable from ``obj`` through containers and DeepSpeed/torch objects, with each
    one's ZeRO-3 ``ds_tensor`` and (``grads``) ``.grad``; modules are not entered (the parameters come
    separately)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        yield obj
        for extra in (getattr(obj, "ds_tensor", None), obj.grad if grads else None):
            if extra is not None:
                yield from _tensors(extra, grads, depth + 1, seen)
        return
    if depth > 6 or id(obj) in seen or isinstance(obj, (str, bytes, int, float, torch.nn.Module)):
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        items = list(obj)
    elif type(obj).__module__.split(".")[0] in ("deepspeed", "torch", "timm") and hasattr(obj, "__dict__"):
        items = list(vars(obj).values())
    else:
        return
    for item in items:
        yield from _tensors(item, grads, depth + 1, seen)


class Ledger:
    """Storage bytes per category, each storage counted once, in the first category that claims it."""

    def __init__(self):
        self.owner: dict[int, str] = {}
        self.bytes = {c: 0 for c in CATEGORIES}

    def add(self, category: str, tensors) -> None:
        for t in tensors:
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in self.owner:
                continue
            self.owner[key] = category
            self.bytes[category] += size


def held(engine) -> dict:
    """Bytes the engine and its optimizer hold now, by category."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)     # ZeRO/BF16 wrappers hold the client optimizer
    attrs = lambda names: [getattr(opt, a, None) for a in names]   # noqa: E731
    params = list(engine.module.parameters())
    offload = getattr(opt, "parameter_offload", None)
    ledger = Ledger()
    # ZeRO-3: a partitioned parameter's .data is empty at rest and the full tensor while gathered
    ledger.add("gathered", (p for p in params
                            if hasattr(p, "ds_tensor") and not getattr(p, "ds_persist", False)))
    ledger.add("params", _tensors(params, grads=False))
    ledger.add("params", _tensors(attrs(PARAM_ATTRS), grads=False))
    ledger.add("params", _tensors(getattr(offload, "persistent_parameters", None), grads=False))
    ledger.add("master", _tensors(attrs(MASTER_ATTRS), grads=False))
    ledger.add("buckets", _tensors(attrs(BUCKET_ATTRS)))   # before grads: p.grad may be a bucket view
    ledger.add("grads", _tensors([p.grad for p in params]))
    ledger.add("grads", (t.grad for t in _tensors(attrs(MASTER_ATTRS), grads=False) if t.grad is not None))
    ledger.add("grads", _tensors(attrs(GRAD_ATTRS)))
    ledger.add("adam", _tensors(inner.state))
    ledger.add("other", _tensors(opt))
    return ledger.bytes


def rss_mib() -> tuple[float, float]:
    """(current, peak) resident set of this process in MiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines()
                  if ":" in line)
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


# ------------------------------------------------------------------ DeepSpeed's estimators
GB_ROW = re.compile(r"^\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.*)$")


def deepspeed_estimate(model: torch.nn.Module, stage: int, world_size: int) -> dict:
    """DeepSpeed's per-GPU estimate without offload for this stage, from the printed table of its
    ``*_all_live`` estimator (captured) and, unrounded, from the function behind it."""
    from deepspeed.runtime.zero import stage3, stage_1_and_2
    gpus = 1 if stage == 0 else world_size     # stage 0 partitions nothing
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        if stage == 3:
            stage3.estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node=gpus, num_nodes=1)
        else:
            stage_1_and_2.estimate_zero2_model_states_mem_needs_all_live(model, num_gpus_per_node=gpus,
                                                                         num_nodes=1)
    if stage == 3:
        total, largest = stage3.model_to_params(model)
        _, gpu_bytes, _ = stage3.estimate_zero3_model_states_mem_needs(
            total, largest, num_gpus_per_node=gpus, num_nodes=1, cpu_offload=False,
            cpu_offload_params=False, zero_init=False)
        row = "offload_param=none, offload_optimizer=none, zero_init=0"
    else:
        total = stage_1_and_2.model_to_params(model)
        _, gpu_bytes = stage_1_and_2.estimate_zero2_model_states_mem_needs(
            total, num_gpus_per_node=gpus, num_nodes=1, cpu_offload=False)
        row = "offload_optimizer=none"
    rows = {m.group(3).strip(): float(m.group(2)) for m in map(GB_ROW.match, printed.getvalue().splitlines())
            if m}
    if abs(rows[row] - gpu_bytes / 2**30) > 0.006:
        raise AssertionError(f"parsed {rows[row]} GB from the estimator's table, "
                             f"computed {gpu_bytes / 2**30}")
    return {"estimator": f"zero{3 if stage == 3 else 2}@{gpus}", "printed_gb": rows[row],
            "bytes": gpu_bytes, "table": printed.getvalue()}


# ------------------------------------------------------------------ communication
def _payload(args) -> int:
    """Bytes of the largest tensor (or list of tensors, summed) among a collective's arguments: an
    all-reduce's or reduce's tensor, an all-gather's output, a reduce-scatter's input."""
    sizes = [0]
    for a in args:
        if isinstance(a, torch.Tensor):
            sizes.append(a.numel() * a.element_size())
        elif isinstance(a, (list, tuple)) and a and all(isinstance(t, torch.Tensor) for t in a):
            sizes.append(sum(t.numel() * t.element_size() for t in a))
    return max(sizes)


class CommCounter:
    """Calls and payload bytes of the collectives DeepSpeed issues while ``on``, by "phase:op"
    (wraps the methods of ``deepspeed.comm``'s backend object, through which all of them go)."""
    OPS = ("all_reduce", "all_reduce_coalesced", "inference_all_reduce", "reduce", "all_gather",
           "all_gather_base", "all_gather_into_tensor", "all_gather_coalesced", "reduce_scatter",
           "reduce_scatter_tensor", "broadcast", "all_to_all_single")

    def __init__(self):
        import deepspeed.comm.comm as ds_comm
        self.on, self.phase, self.ops = False, "", {}
        for name in self.OPS:
            if hasattr(ds_comm.cdb, name):
                setattr(ds_comm.cdb, name, self._counted(name, getattr(ds_comm.cdb, name)))

    def _counted(self, name, fn):
        def counted(*args, **kwargs):
            if self.on:
                entry = self.ops.setdefault(f"{self.phase}:{name}", [0, 0])
                entry[0] += 1
                entry[1] += _payload((*args, *kwargs.values()))
            return fn(*args, **kwargs)
        return counted


# ------------------------------------------------------------------ one job (every rank)
def worker(args) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F
    from deepspeed.accelerator import get_accelerator
    from dsvit import config as C
    from dsvit.cli import init_distributed
    from dsvit.engine.setup import build_engine, clear_stale_zero3_grads, complete_ds_config, model_dtype
    from dsvit.model.vit import build_model

    world = init_distributed(None)
    comm = CommCounter()
    rss_start, _ = rss_mib()
    cfg = C.Config()
    for item in (f"run.ds_config=zero{args.stage}", f"run.precision={args.precision}",
                 f"model.name={args.model}", "model.num_classes=1000", f"train.grad_accum={args.grad_accum}",
                 f"train.batch_size={args.batch * world.world_size * args.grad_accum}"):
        cfg = C.apply_override(cfg, item)
    ds_config = complete_ds_config(cfg, world.world_size)
    ds_config["zero_optimization"].update(json.loads(args.zero_overrides or "{}"))
    device = torch.device(get_accelerator().device_name(world.local_rank))
    torch.manual_seed(cfg.run.seed)
    model, _ = build_model(cfg.model, cfg.model.num_classes)
    num_params = sum(p.numel() for p in model.parameters())
    estimate = deepspeed_estimate(model, args.stage, world.world_size) if world.rank == 0 else None
    engine, _, _ = build_engine(model, cfg.train, ds_config, device)
    del model

    snapshots = []
    release = getattr(engine.optimizer, "_release_ipg_buffers", None)
    if release is not None:      # ZeRO-1/2 free their reduce buckets at the end of every backward
        def snapshot_then_release(*a, **kw):
            snapshots.append(held(engine))
            return release(*a, **kw)
        engine.optimizer._release_ipg_buffers = snapshot_then_release
    engine.train()
    gen = torch.Generator().manual_seed(world.rank)
    images = torch.randn(args.batch, 3, 224, 224, generator=gen).to(device, model_dtype(ds_config))
    labels = torch.randint(0, cfg.model.num_classes, (args.batch,), generator=gen).to(device)

    def one_step(snapshot=lambda: None) -> None:
        """One optimizer step as Trainer.train_step takes it (engine.step after every micro-batch)."""
        for _ in range(args.grad_accum):
            comm.phase = "forward"
            logits = engine(images)
            snapshot()
            comm.phase = "backward"
            engine.backward(F.cross_entropy(logits.float(), labels))
            snapshot()
            comm.phase = "step"
            engine.step()
        if args.stage == 3:
            clear_stale_zero3_grads(engine)
        snapshot()

    # Two steps: the first records ZeRO-3's module trace (and releases every gathered parameter after
    # its module); from the second on, ZeRO-3 follows the trace, which changes what stays gathered.
    one_step(snapshot=lambda: snapshots.append(held(engine)))
    comm.on = True               # count the second step's collectives only (the first one's include set-up)
    one_step(snapshot=lambda: snapshots.append(held(engine)))
    comm.on = False
    rss_now, rss_peak = rss_mib()
    if release is not None:
        del engine.optimizer._release_ipg_buffers     # the class's method again
    mine = {c: max(s[c] for s in snapshots) for c in CATEGORIES}
    mine["peak"] = max(sum(s[c] for c in CATEGORIES if c != "other") for s in snapshots)
    mine.update(rank=world.rank, rss_delta_mib=rss_now - rss_start, rss_peak_delta_mib=rss_peak - rss_start)
    mine["comm"] = comm.ops
    if args.time_steps:          # optional: the median time of further steps (after one more warm-up)
        times = []
        for _ in range(args.time_steps + 1):
            dist.barrier()
            t0 = time.perf_counter()
            one_step()
            get_accelerator().synchronize()
            times.append(time.perf_counter() - t0)
        mine["step_s"] = statistics.median(times[1:])
    ranks = [None] * world.world_size
    dist.all_gather_object(ranks, mine)
    if world.rank == 0:
        Path(args.out).write_text(json.dumps(dict(
            model=args.model, num_params=num_params, stage=args.stage, world_size=world.world_size,
            precision=args.precision, batch=args.batch, grad_accum=args.grad_accum, estimate=estimate,
            zero_overrides=args.zero_overrides,
            ranks=ranks, torch=torch.__version__, deepspeed=__import__("deepspeed").__version__)))
    dist.barrier()


# ------------------------------------------------------------------ the driver
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, model: str, stage: int, world_size: int, precision: str, tmp: Path) -> dict:
    out = tmp / f"{model}-{precision}-z{stage}-ws{world_size}.json"
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(world_size),
           "--master_port", str(free_port()), str(Path(__file__).resolve()), "--worker",
           "--model", model, "--stages", str(stage), "--precisions", precision, "--batch", str(args.batch),
           "--grad-accum", str(args.grad_accum), "--time-steps", str(args.time_steps), "--out", str(out)]
    if args.zero_overrides:
        cmd += ["--zero-overrides", args.zero_overrides]
    # each rank its share of the cores, as launchers/single_node.sh does
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, os.cpu_count() // world_size))))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def _table(head: str, rows: list[str]) -> str:
    return "\n".join([head, "|" + "---|" * (head.count("|") - 1), *rows])


HEAD = "| model | params (M) | precision | ZeRO | ws | k |"


def _row_start(r: dict) -> str:
    stage = f"{r['stage']} {r['zero_overrides']}" if r.get("zero_overrides") else str(r["stage"])
    return (f"| {r['model'].replace('_patch16_224', '')} | {r['num_params'] / 1e6:.2f} | {r['precision']} | "
            f"{stage} | {r['world_size']} | {r.get('grad_accum', 1)} |")


def memory_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        per_rank = [{c: rank[c] / MIB for c in (*CATEGORIES, "peak")} for rank in r["ranks"]]
        most = {c: max(p[c] for p in per_rank) for c in (*CATEGORIES, "peak")}
        totals = [sum(p[c] for c in MODEL_STATES) for p in per_rank]
        uneven = "*" if max(totals) - min(totals) > 0.01 * max(totals) else ""
        est = r["estimate"]["bytes"] / MIB
        rss = [max(rank[k] for rank in r["ranks"]) for k in ("rss_delta_mib", "rss_peak_delta_mib")]
        rows.append(_row_start(r) + "".join(f" {most[c]:.0f} |" for c in MODEL_STATES) +
                    f" **{max(totals):.0f}**{uneven} | {est:.0f} ({r['estimate']['estimator']}) |"
                    f" {max(totals) / est:.2f} | {most['buckets']:.0f} | {most['gathered']:.0f} |"
                    f" {most['peak']:.0f} | {rss[0]:.0f} / {rss[1]:.0f} |")
    return _table(HEAD + " params | master | grads | Adam | total | DeepSpeed estimate (estimator) | "
                  "total / estimate | buckets | gathered | step peak | RSS growth end / peak |", rows)


PHASES = {"forward": "fwd", "backward": "bwd", "step": "step"}
OP_NAMES = {"all_gather_into_tensor": "all-gather", "all_gather": "all-gather",
            "all_gather_base": "all-gather",
            "reduce_scatter_tensor": "reduce-scatter", "reduce_scatter": "reduce-scatter",
            "all_reduce": "all-reduce", "inference_all_reduce": "all-reduce"}


def comm_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        if r["world_size"] < 2:
            continue
        unit = r["num_params"] * (4 if r["precision"] == "fp32" else 2)     # one copy of the model
        ops = r["ranks"][0]["comm"]
        parts = []
        for key in sorted(ops, key=lambda key: list(PHASES).index(key.split(":")[0])):
            (phase, op), (calls, size) = key.split(":"), ops[key]
            if size >= 0.005 * unit:      # leave out the odd scalar (loss scale, norms)
                parts.append(f"{PHASES[phase]} {OP_NAMES.get(op, op)} {size / unit:.2f} ({calls})")
        total = sum(size for _, size in ops.values())
        rows.append(_row_start(r) + f" {', '.join(parts)} | {total / MIB:.0f} | {total / unit:.2f} |")
    return _table(HEAD + " collectives per optimizer step, rank 0: phase op payload/(Ψ·b) (calls) | "
                  "payload MiB | payload / (Ψ·b) |", rows)


def step_table(results: list[dict]) -> str:
    rows = []
    single = {(r["model"], r["precision"], r["stage"]): r for r in results if r["world_size"] == 1}
    for r in results:
        images = r["batch"] * r.get("grad_accum", 1)
        rate = images * r["world_size"] / r["ranks"][0]["step_s"]
        one = single.get((r["model"], r["precision"], r["stage"]))
        ratio = f"{rate / (images / one['ranks'][0]['step_s']):.2f}x" if one else "-"
        rows.append(_row_start(r) + f" {images} | {r['ranks'][0]['step_s']:.3f} | {rate:.1f} | {ratio} |")
    return _table(HEAD + " images/rank/step | step (s) | images/s | vs ws 1 |", rows)


def report(results: list[dict]) -> None:
    print(memory_table(results))
    print("\nk = micro-batches per optimizer step. MiB per rank, the larger rank where they differ (* = rank "
          "totals differ by > 1%). total = params + master + grads + Adam, each at its largest over the step "
          "(the model states DeepSpeed's estimators cover). buckets = reduce buckets; gathered = ZeRO-3 "
          "full parameters gathered for compute; step peak = the largest sum of all categories at one "
          "snapshot. RSS growth = resident set from before the model was built to after the step / its "
          "high-water mark (larger rank).")
    other = max(rank["other"] for r in results for rank in r["ranks"])
    print(f"Tensors the optimizer holds outside these categories: at most {other} bytes per rank.")
    if any(r["world_size"] > 1 for r in results):
        print("\nCommunication of one optimizer step (the second), counted on deepspeed.comm's backend; "
              "payload = an all-reduce's/reduce's tensor, an all-gather's output, a reduce-scatter's input; "
              "Ψ·b = parameter count x bytes per element of the model dtype:\n")
        print(comm_table(results))
    if all("step_s" in rank for r in results for rank in r["ranks"]):
        print(f"\nStep time, median of the timed steps after a warm-up (OMP_NUM_THREADS = cores / ws "
              f"unless set):\n")
        print(step_table(results))
    print("\nDeepSpeed's estimator tables (rank 0, captured):")
    seen = set()
    for r in results:
        key = (r["model"], r["estimate"]["estimator"])
        if key not in seen:
            seen.add(key)
            print(f"\n{r['model']} -> {r['estimate']['estimator']}\n{r['estimate']['table'].rstrip()}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["vit_small_patch16_224", "vit_base_patch16_224"])
    p.add_argument("--stages", nargs="+", type=int, default=[0, 1, 2, 3])
    p.add_argument("--world-sizes", nargs="+", type=int, default=[1, 2])
    p.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=2, help="images per rank and micro-batch (224px), kept small")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--time-steps", type=int, default=0,
                   help="also time this many further steps (after one warm-up) and print their median")
    p.add_argument("--zero-overrides", default="", metavar="JSON",
                   help="merged into the config's zero_optimization, "
                        'e.g. \'{"stage3_max_reuse_distance": 0}\'')
    p.add_argument("--jsonl", default="", help="also append every job's full result here")
    p.add_argument("--from-jsonl", default="", help="only print the tables of results saved with --jsonl")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)   # the launcher adds it
    args = p.parse_args()
    if args.worker:
        args.stage, args.precision = args.stages[0], args.precisions[0]
        worker(args)
        return
    if args.from_jsonl:
        report([json.loads(line) for line in Path(args.from_jsonl).read_text().splitlines() if line.strip()])
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        for model in args.models:
            for precision in args.precisions:
                for stage in args.stages:
                    for ws in args.world_sizes:
                        t0 = time.perf_counter()
                        results.append(launch(args, model, stage, ws, precision, Path(tmp)))
                        print(f"{model} {precision} ZeRO-{stage} ws{ws}: {time.perf_counter() - t0:.0f} s",
                              file=sys.stderr, flush=True)
                        if args.jsonl:
                            with open(args.jsonl, "a") as f:
                                f.write(json.dumps(results[-1]) + "\n")
    report(results)


if __name__ == "__main__":
    main()
