"""Resumable conversions: the progress file of an unfinished `dsvit shards imagefolder`, the cheap
check of the shards it finished, and the probe that decides which source files are skipped and why.

A conversion is a pure function of its arguments and its source files (``dsvit.data.shards``: seeded
shuffle, shard boundaries from counts and bytes only, fixed tar member metadata), so a killed one
can continue instead of starting over and still write the bytes of an uninterrupted one.
``OUT/_progress.json`` holds the arguments, a fingerprint of each split's file list and labels, the
probe's verdicts (the probe reads every file, so a resume does not repeat it) and, per finished
write task, its shards' sample counts and sizes. On resume, a finished task whose shards are there
(under their final name, or their temporary one if an earlier task was still running) with that
size and that many samples in a readable tar is kept; everything else is written again.
``_info.json`` is written last and the progress file removed then, so a folder with an
``_info.json`` and no progress file is a complete dataset.

The check reads tar headers only (no image decode): it catches a shard cut short or replaced, not a
flipped bit inside a JPEG, which ``dsvit shards verify`` finds. What a resume cannot see is a source
file whose content changed under the same name; the fingerprint covers names and labels.

The probe decodes each image, JPEGs in draft mode (libjpeg's 1/8 scale: still the whole entropy
stream, so a cut-off file is caught, at a fraction of a full decode), and names a reason per file
(``truncated``, ``not an image``, ...), counted per reason in the summary and ``_info.json``.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import tarfile
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from dsvit.data import shards as S


# ---------------------------------------------------------------- probe
def probe_file(path: str) -> str:
    """'' if ``path`` decodes as an image, else 'REASON: detail' (REASON is what the skips are counted by)."""
    try:
        with open(path, "rb") as f:
            if not f.read(1):
                return "empty file: 0 bytes"
            f.seek(0)
            with Image.open(f) as im:
                im.draft(None, (1, 1))  # JPEG: decode at the smallest DCT scale; other formats: no-op
                im.load()
        return ""
    except UnidentifiedImageError as e:
        return f"not an image: {e}"
    except (OSError, SyntaxError, ValueError) as e:  # PIL reports damage as OSError/SyntaxError/ValueError
        text = f"{type(e).__name__}: {e}"
        if "truncated" in str(e).lower() or "end of" in str(e).lower():
            return f"truncated: {text}"
        if isinstance(e, OSError) and e.errno is not None:
            return f"unreadable file: {text}"  # permissions, I/O errors
        return f"corrupt image: {text}"
    except Exception as e:  # noqa: BLE001  -- any other decoder failure is a corrupt image
        return f"corrupt image: {type(e).__name__}: {e}"


def probe_all(paths: list[str], workers: int, progress: bool, desc: str = "checking files") -> list[str]:
    """probe_file over ``paths``, in order, on ``workers`` processes."""
    bar = S.progress_bar(len(paths), desc, progress)
    if workers > 1 and len(paths) > 256:
        with mp.get_context("fork").Pool(workers) as pool:
            res = []
            for r in pool.imap(probe_file, paths, chunksize=64):
                res.append(r)
                bar.update(1)
    else:
        res = []
        for p in paths:
            res.append(probe_file(p))
            bar.update(1)
    bar.close()
    return res


# ---------------------------------------------------------------- progress file
def fingerprint(records: list) -> str:
    """sha256 over a split's (label, source name) in scan order: what decides its shards besides the options."""
    h = hashlib.sha256()
    for label, name, _ in records:
        h.update(f"{label}\t{name}\n".encode())
    return h.hexdigest()


def part_intact(path: Path, count: int, size: int) -> bool:
    """``path`` has ``size`` bytes and a readable tar of ``count`` samples (headers only, data skipped)."""
    try:
        if path.stat().st_size != size:
            return False
        keys = set()
        with tarfile.open(path, "r:") as tf:  # seeks over member data
            for m in tf:
                keys.add(m.name.split(".", 1)[0])
        return len(keys) == count
    except (OSError, tarfile.TarError, EOFError):
        return False


class ConversionLog:
    """``OUT/_progress.json`` of an unfinished conversion: its arguments and what it has finished."""

    def __init__(self, out_dir, args: dict, data: dict | None = None):
        self.out = Path(out_dir)
        self.path = self.out / S.PROGRESS_NAME
        self.data = data or {"args": dict(args), "splits": {}}

    @classmethod
    def find(cls, out_dir) -> ConversionLog | None:
        path = Path(out_dir) / S.PROGRESS_NAME
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            return cls(out_dir, data["args"], data)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise S.ShardError(f"{path} is damaged ({type(e).__name__}: {e}); the interrupted conversion "
                               f"cannot be continued: pass --overwrite to start over") from None

    def differences(self, args: dict) -> list[str]:
        old = self.data["args"]
        return [f"{k}: {old.get(k)!r} then, {args.get(k)!r} now" for k in sorted(set(old) | set(args))
                if old.get(k) != args.get(k)]

    def open_split(self, split: str, print_: str) -> dict:
        """The split's entry; refuses one whose files or labels changed since the interrupted run."""
        entry = self.data["splits"].setdefault(split, {"fingerprint": print_, "tasks": {}})
        if entry["fingerprint"] != print_:
            raise S.ShardError(f"the files or labels of split '{split}' changed since the interrupted "
                               f"conversion in {self.out} (other file names, more or fewer files); "
                               f"pass --overwrite to convert from scratch")
        return entry

    def probed(self, split: str) -> list | None:
        """The probe's verdicts [(name, why)] for the skipped files of ``split``, if it ran."""
        skipped = self.data["splits"][split].get("skipped")
        return None if skipped is None else [tuple(x) for x in skipped]

    def record_probe(self, split: str, skipped: list) -> None:
        self.data["splits"][split]["skipped"] = [list(x) for x in skipped]
        self.save()

    def record(self, split: str, task: int, parts: list) -> None:
        """Task ``task`` of ``split`` wrote shards of these (sample count, bytes)."""
        self.data["splits"][split]["tasks"][str(task)] = [list(p) for p in parts]
        self.save()

    def finished(self, split: str, num_tasks: int) -> dict:
        """{task: [(path, count, size)]} of the finished tasks whose shards are intact, where they are:
        under their final name when every task before them was finished (see shards._FinalNames),
        else under their temporary name."""
        tasks = self.data["splits"][split]["tasks"]
        out, index = {}, 0  # index: the final shard index of the task's first part, while known
        for t in range(num_tasks):
            parts = tasks.get(str(t))
            if parts is None:
                index = None
                continue
            found = []
            for p, (count, size) in enumerate(parts):
                where = [self.out / S.part_tmp_name(split, t, p)]
                if index is not None:
                    where.insert(0, self.out / S.shard_name(split, index + p))
                path = next((w for w in where if part_intact(w, count, size)), None)
                if path is None:
                    break
                found.append((str(path), count, size))
            if len(found) == len(parts):
                out[t] = found
            else:
                del tasks[str(t)]  # written again
            index = index + len(parts) if index is not None else None
        return out

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data))
        os.replace(tmp, self.path)  # atomic: a kill leaves the old or the new record

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
