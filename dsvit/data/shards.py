"""Write datasets as webdataset shards with an ``_info.json``, and verify them.

Layout of one dataset folder::

    OUT/_info.json              timm's convention: splits -> {name, num_samples, filenames, shard_lengths}
    OUT/train-000000.tar ...    samples: KEY.jpg|KEY.png (image), KEY.cls (class index), KEY.txt (source)

Each split's samples are shuffled once with a fixed seed and written in that order, so the uid (the
``__key__``, zero padded, dense 0..N-1) is the write position: shard i holds exactly the uids
``[sum(shard_lengths[:i]), sum(shard_lengths[:i+1]))``. The pipeline uses that to count active
samples per shard without reading anything. Images keep their original encoded bytes unless
re-encoding is asked for; arrays are encoded PNG (lossless) or JPEG.

The output is a pure function of the records and the options: the shuffle is seeded, a write task
(``shard_max_count`` records) ends a shard only on counts and encoded bytes, and tar members carry
a fixed mtime (0), owner and mode. A task writes ``.SPLIT-tTASK-PART.tar.tmp`` files, and a shard
gets its final name once it and every shard before it are complete, so a killed writer never leaves
a half shard under a final name. That is what lets ``dsvit.data.convert`` resume a killed conversion
and still produce the very bytes of an uninterrupted one.
"""
from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dsvit.errors import UserError

INFO_NAME = "_info.json"
PROGRESS_NAME = "_progress.json"  # an unfinished conversion (dsvit.data.convert)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
KEY_DIGITS = 9


class ShardError(UserError, ValueError):
    """Bad input or a bad dataset folder; the message says what and what to do."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def uid_key(uid: int) -> str:
    return f"{uid:0{KEY_DIGITS}d}"


def part_tmp_name(split: str, task: int, part: int) -> str:
    """Where write task ``task`` writes its ``part``-th shard before the shard gets its final name."""
    return f".{split}-t{task:06d}-{part:03d}.tar.tmp"


# ---------------------------------------------------------------- _info.json
def load_info(out_dir) -> dict | None:
    path = Path(out_dir) / INFO_NAME
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path} is not valid JSON ({e}); rewrite the dataset with --overwrite") from None


SPLIT_KEYS = ("num_samples", "filenames", "shard_lengths")


def check_info(info, path, sums: bool = True) -> dict:
    """``info`` if it has what the pipeline reads, else ShardError naming ``path``, the key and the fix.
    sums: also require sum(shard_lengths) == num_samples (``verify_dataset`` reports that itself)."""
    fix = "re-create the dataset with `dsvit shards imagefolder|npz ... --overwrite`"
    if not isinstance(info, dict) or not isinstance(info.get("splits"), dict):
        raise ShardError(f"{path} has no 'splits'; it is not a dsvit/timm shard {INFO_NAME}: {fix}")
    if not info.get("num_classes") and "class_names" not in info:
        raise ShardError(f"{path} has neither 'num_classes' nor 'class_names': {fix}")
    for name, s in info["splits"].items():
        missing = [k for k in SPLIT_KEYS if not isinstance(s, dict) or k not in s]
        if missing:
            raise ShardError(f"{path}: split '{name}' has no '{missing[0]}' (needs {', '.join(SPLIT_KEYS)}): "
                             f"the index is incomplete; {fix} (`dsvit shards verify` checks a dataset)")
        files, lengths = s["filenames"], s["shard_lengths"]
        if len(files) != len(lengths) or (sums and sum(lengths) != s["num_samples"]):
            raise ShardError(f"{path}: split '{name}' lists {len(files)} filenames, {len(lengths)} "
                             f"shard_lengths summing to {sum(lengths)} and num_samples={s['num_samples']}; "
                             f"they must agree: {fix}")
    return info


def save_info(out_dir, info: dict) -> None:
    path = Path(out_dir) / INFO_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, path)  # atomic: readers never see half a file


def prepare_out_dir(out_dir, split: str | list[str], class_names: list[str], *, overwrite: bool,
                    add_split: bool) -> dict:
    """Check OUT_DIR may receive ``split`` (a name or a list of names); return the info dict to extend.

    add_split: an existing dataset folder may gain a new split (npz: one call per split)."""
    out = Path(out_dir)
    splits = [split] if isinstance(split, str) else list(split)
    info = load_info(out) if out.exists() else None
    if out.exists() and any(out.iterdir()):
        if info is None and not overwrite:
            raise ShardError(f"output folder {out} exists and is not empty; pass --overwrite or pick a new folder")
        if info is not None:
            split = next((s for s in splits if s in info.get("splits", {})), splits[0])
            has_split = split in info.get("splits", {})
            if not overwrite and (has_split or not add_split):
                what = f"already has split '{split}'" if has_split else "already holds a dataset"
                raise ShardError(f"output folder {out} {what}; pass --overwrite to replace it")
            if overwrite and not add_split:
                info = None
            if info is not None and info.get("class_names") != class_names:
                raise ShardError(f"{out}: class names {class_names[:5]}... differ from the dataset's "
                                 f"{info.get('class_names', [])[:5]}...; write to a new folder or pass the same --classes")
        if overwrite:
            for s in splits:
                for p in [*out.glob(f"{s}-*.tar"), *out.glob(f".{s}-t*.tar.tmp")]:
                    p.unlink()
            for p in [out / PROGRESS_NAME] + ([] if add_split else [*out.glob("*.tar"), *out.glob(".*.tar.tmp")]):
                p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return start_info(info, class_names, splits)


def start_info(info: dict | None, class_names: list[str], splits: list[str]) -> dict:
    """The info dict to extend with ``splits``: ``info`` (an existing dataset's) or a new one."""
    info = info or {"format": "dsvit-shards-1", "splits": {}}
    info["class_names"] = list(class_names)
    info["num_classes"] = len(class_names)
    for split in splits:
        info["splits"].pop(split, None)
    return info


# ---------------------------------------------------------------- encoding
@dataclass
class Encoding:
    format: str = "png"        # arrays: png | jpeg
    quality: int = 95          # jpeg quality
    reencode: str = ""         # files: "" keeps original bytes | jpeg
    resize: int = 0            # shorter side when re-encoding; 0 keeps the size


def encode_array(img: np.ndarray, enc: Encoding) -> tuple[bytes, str]:
    pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
    return encode_pil(pil, enc.format, enc.quality, enc.resize)


def encode_pil(pil: Image.Image, fmt: str, quality: int, resize: int) -> tuple[bytes, str]:
    if resize:
        w, h = pil.size
        s = resize / min(w, h)
        pil = pil.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
    buf = io.BytesIO()
    if fmt == "jpeg":
        pil.convert("RGB").save(buf, format="JPEG", quality=quality)
        return buf.getvalue(), "jpg"
    pil.save(buf, format="PNG", compress_level=1)  # lossless; level 1: fast, nearly as small
    return buf.getvalue(), "png"


def _file_sample(path: str, enc: Encoding) -> tuple[bytes, str]:
    with open(path, "rb") as f:
        data = f.read()
    if enc.reencode:
        with Image.open(io.BytesIO(data)) as im:
            return encode_pil(im, enc.reencode, enc.quality, enc.resize)
    ext = path.rsplit(".", 1)[-1].lower()
    return data, "jpg" if ext == "jpeg" else ext


def _write_task(task) -> list[tuple[str, int, int]]:
    """Write one task's records to one or more tar parts; returns [(tmp_path, count, bytes)]."""
    out_dir, split, task_index, first_uid, records, enc, max_bytes = task
    import webdataset as wds
    parts, writer, count, nbytes = [], None, 0, 0
    for i, (label, name, payload) in enumerate(records):
        data, ext = (encode_array(payload, enc) if isinstance(payload, np.ndarray)
                     else _file_sample(payload, enc))
        if writer is None or (nbytes + len(data) > max_bytes and count > 0):
            if writer is not None:
                writer.close()
                parts[-1] = (parts[-1][0], count, nbytes)
            path = os.path.join(out_dir, part_tmp_name(split, task_index, len(parts)))
            writer, count, nbytes = wds.TarWriter(path, encoder=False, mtime=0), 0, 0  # int mtime: no pax headers, reproducible
            parts.append((path, 0, 0))
        writer.write({"__key__": uid_key(first_uid + i), ext: data,
                      "cls": str(label).encode(), "txt": name.encode()})
        count += 1
        nbytes += len(data) + 1536  # 3 tar members: headers + padding, roughly
    writer.close()
    parts[-1] = (parts[-1][0], count, nbytes)
    return [(p, c, os.path.getsize(p)) for p, c, _ in parts]


def write_split(records: list, out_dir, split: str, class_names: list[str], info: dict, *,
                enc: Encoding | None = None, shard_max_count: int = 1000,
                shard_max_bytes: int = 256 << 20, workers: int = 1, seed: int = 0,
                progress: bool = True, skipped: list | None = None, source: str = "",
                log=None, save: bool = True) -> dict:
    """Shuffle ``records`` [(label, name, path-or-HWC-array)] with ``seed`` and write them as shards.

    Parallel over ``workers`` processes, one task per ``shard_max_count`` records (a task writes
    more than one shard when its bytes exceed ``shard_max_bytes``); the output does not depend on
    ``workers``. ``log`` (a ``dsvit.data.convert.ConversionLog``) records every finished task and
    says which ones an interrupted run already finished: those are not written again. Updates
    ``info`` (and saves it unless ``save`` is false); returns a summary dict."""
    if not records:
        raise ShardError(f"split '{split}': no images to write")
    enc = enc or Encoding()
    started = time.perf_counter()
    order = np.random.default_rng(seed).permutation(len(records))
    records = [records[i] for i in order]
    tasks = [(str(out_dir), split, t, s, records[s:s + shard_max_count], enc, shard_max_bytes)
             for t, s in enumerate(range(0, len(records), shard_max_count))]
    finished = log.finished(split, len(tasks)) if log is not None else {}
    results = [finished.get(t) for t in range(len(tasks))]
    names = _FinalNames(out_dir, split, results)
    names.advance()
    todo = [(t, tasks[t]) for t in range(len(tasks)) if results[t] is None]
    reused = sum(len(tasks[t][4]) for t in finished)
    bar = progress_bar(len(records), f"writing {split}", progress, initial=reused)

    def done(t, parts):
        if log is not None:
            log.record(split, t, [(count, size) for _, count, size in parts])
        results[t] = parts
        names.advance()
        bar.update(len(tasks[t][4]))

    if workers > 1 and len(todo) > 1:
        with mp.get_context("fork").Pool(min(workers, len(todo))) as pool:
            for t, parts in pool.imap_unordered(_indexed_write, todo):
                done(t, parts)
    else:
        for t, task in todo:
            done(t, _write_task(task))
    bar.close()
    for stray in Path(out_dir).glob(f".{split}-t*.tar.tmp"):  # parts of a killed run's unrecorded tasks
        stray.unlink()
    filenames, lengths, sizes = (list(x) for x in zip(*names.shards))
    counts = Counter(label for label, _, _ in records)
    skipped = list(skipped or [])
    reasons = dict(sorted(Counter(why.split(":", 1)[0] for _, why in skipped).items()))
    info["splits"][split] = {
        "name": split, "num_samples": len(records), "filenames": filenames,
        "shard_lengths": lengths, "shard_bytes": sizes, "seed": seed, "source": source,
        "class_counts": [counts.get(c, 0) for c in range(len(class_names))],
        "skipped": [s for s, _ in skipped], "skipped_reasons": reasons,
    }
    if save:
        save_info(out_dir, info)
    return {"split": split, "samples": len(records), "shards": len(filenames), "bytes": sum(sizes),
            "class_counts": dict(zip(class_names, info["splits"][split]["class_counts"])),
            "skipped": skipped, "skipped_reasons": reasons, "reused": reused,
            "seconds": time.perf_counter() - started}


class _FinalNames:
    """Renames finished shards to ``SPLIT-NNNNNN.tar`` in order: a shard's index is known once every
    task before it is finished (a task may write several shards), so the named shards are always a
    complete prefix of the split."""

    def __init__(self, out_dir, split: str, results: list):
        self.out, self.split, self.results = Path(out_dir), split, results
        self.next_task, self.shards = 0, []

    def advance(self) -> None:
        while self.next_task < len(self.results) and self.results[self.next_task] is not None:
            for path, count, size in self.results[self.next_task]:
                name = shard_name(self.split, len(self.shards))
                os.replace(path, self.out / name)  # a no-op for a shard already named by a killed run
                self.shards.append((name, count, size))
            self.next_task += 1


def _indexed_write(item):
    t, task = item
    return t, _write_task(task)


def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True, initial=initial)


def format_summary(summary: dict) -> str:
    written = summary["samples"] - summary.get("reused", 0)
    seconds = summary.get("seconds", 0.0)
    lines = [f"split '{summary['split']}': {summary['samples']} samples in {summary['shards']} shards, "
             f"{summary['bytes'] / 1e6:.1f} MB; wrote {written} in {seconds:.1f} s "
             f"({written / max(seconds, 1e-9):.0f} img/s)"
             + (f", {summary['reused']} kept from the interrupted run" if summary.get("reused") else ""),
             "  per class: " + ", ".join(f"{k}={v}" for k, v in summary["class_counts"].items())]
    if summary["skipped"]:
        reasons = ", ".join(f"{k}: {v}" for k, v in summary.get("skipped_reasons", {}).items())
        lines.append(f"  skipped {len(summary['skipped'])} unreadable files ({reasons}):")
        lines += [f"    {p}: {why}" for p, why in summary["skipped"][:50]]
        if len(summary["skipped"]) > 50:
            lines.append(f"    ... and {len(summary['skipped']) - 50} more")
    else:
        lines.append("  unreadable files skipped: 0")
    return "\n".join(lines)


# ---------------------------------------------------------------- verify
def read_tar_members(path):
    """Yield (name, bytes) of a tar file; raises tarfile.ReadError/EOFError on truncation."""
    with tarfile.open(path, "r|") as tf:  # streaming: detects a cut-off shard as it reads
        for m in tf:
            if m.isfile():
                data = tf.extractfile(m).read()
                if len(data) != m.size:
                    raise tarfile.ReadError(f"member {m.name} truncated ({len(data)}/{m.size} bytes)")
                yield m.name, data


def verify_dataset(out_dir, progress: bool = True) -> tuple[list[str], dict]:
    """Read every shard, decode every image, check counts against _info.json.

    Returns (problems, stats); problems name the shard and key."""
    out = Path(out_dir)
    info = load_info(out)
    if info is None:
        return [f"{out / INFO_NAME} missing: not a dsvit shard folder (write one with `dsvit shards`)"], {}
    try:
        check_info(info, out / INFO_NAME, sums=False)
    except ShardError as e:
        return [str(e)], {}
    problems, stats = [], {}
    ncls = info.get("num_classes", len(info.get("class_names", [])))
    for split, sinfo in info["splits"].items():
        lengths = sinfo["shard_lengths"]
        bar = progress_bar(sinfo["num_samples"], f"verify {split}", progress)
        seen = 0
        for i, name in enumerate(sinfo["filenames"]):
            path = out / name
            if not path.exists():
                problems.append(f"{split}: shard {name} is missing")
                continue
            lo = sum(lengths[:i])
            keys, n = set(), 0
            try:
                samples = {}
                for member, data in read_tar_members(path):
                    key, ext = member.split(".", 1)
                    samples.setdefault(key, {})[ext] = data
                for key, s in samples.items():
                    n += 1
                    problems += _check_sample(split, name, key, s, ncls, lo, lo + lengths[i])
                    keys.add(key)
            except (tarfile.TarError, EOFError, OSError) as e:
                problems.append(f"{split}: shard {name} is truncated or unreadable ({e}) after {n} samples")
            if n != lengths[i]:
                problems.append(f"{split}: shard {name} has {n} samples, _info.json says {lengths[i]}")
            seen += n
            bar.update(n)
        bar.close()
        if sum(lengths) != sinfo["num_samples"]:
            problems.append(f"{split}: shard_lengths sum to {sum(lengths)}, num_samples says {sinfo['num_samples']}")
        stats[split] = {"samples": seen, "shards": len(sinfo["filenames"])}
    return problems, stats


def _check_sample(split, shard, key, s, ncls, lo, hi) -> list[str]:
    where = f"{split}: {shard} key {key}"
    out = []
    if not key.isdigit() or not lo <= int(key) < hi:
        out.append(f"{where}: key is not a uid in [{lo}, {hi})")
    img = [e for e in s if e in IMAGE_EXTS]
    if not img:
        return out + [f"{where}: no image member (has {sorted(s)})"]
    try:
        with Image.open(io.BytesIO(s[img[0]])) as im:
            im.load()
    except Exception as e:  # corrupt image bytes
        out.append(f"{where}: corrupt image ({type(e).__name__}: {e})")
    try:
        c = int(s["cls"])
        if not 0 <= c < ncls:
            out.append(f"{where}: class {c} out of range [0, {ncls})")
    except (KeyError, ValueError):
        out.append(f"{where}: missing or unreadable .cls")
    return out
