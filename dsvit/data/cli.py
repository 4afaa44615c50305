"""`dsvit shards {imagefolder,npz,verify,synthetic}`: write and check shard datasets.

Errors in the input raise SystemExit with a message saying what is wrong and what to do.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import numpy as np

from dsvit.data import shards as S

IMAGE_SUFFIXES = tuple("." + e for e in S.IMAGE_EXTS)


def _fail(msg: str):
    raise SystemExit(f"dsvit shards: error: {msg}")


def _list_images(class_dir: Path) -> list[Path]:
    return sorted(p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def scan_imagefolder(src: Path, split: str | None) -> dict[str, dict[str, list[Path]]]:
    """{split: {class: [files]}} from SRC/<split>/<class>/<file> or (with split) SRC/<class>/<file>."""
    if not src.is_dir():
        _fail(f"source folder {src} does not exist or is not a folder")
    subdirs = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        _fail(f"{src} has no subfolders; expected {src}/<split>/<class>/<image> "
              f"(or {src}/<class>/<image> with --split NAME)")
    if split:
        trees = {split: src}
    else:
        if any(p.suffix.lower() in IMAGE_SUFFIXES for d in subdirs for p in d.iterdir()):
            _fail(f"{src}/{subdirs[0].name} holds images directly, so {src} looks like one split "
                  f"(<class>/<image>); pass --split NAME (e.g. --split train)")
        trees = {d.name: d for d in subdirs}
    out = {}
    for name, root in trees.items():
        classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            _fail(f"split folder {root} has no class folders; expected {root}/<class>/<image>")
        out[name] = {}
        for c in classes:
            files = _list_images(c)
            if not files:
                _fail(f"class folder {c} has no images (looked for {', '.join(IMAGE_SUFFIXES)}); "
                      f"add images or remove the folder")
            out[name][c.name] = files
    return out


def _probe_all(paths: list[str], workers: int, progress: bool) -> list[str]:
    bar = S.progress_bar(len(paths), "checking files", progress)
    if workers > 1 and len(paths) > 256:
        with mp.get_context("fork").Pool(workers) as pool:
            res = []
            for r in pool.imap(S.probe_file, paths, chunksize=256):
                res.append(r)
                bar.update(1)
    else:
        res = [S.probe_file(p) for p in paths]
        bar.update(len(paths))
    bar.close()
    return res


def _encoding(args) -> S.Encoding:
    return S.Encoding(format=getattr(args, "format", "png"), quality=args.quality,
                      reencode=getattr(args, "reencode", "") or "", resize=getattr(args, "resize", 0))


def _write_opts(args) -> dict:
    return dict(shard_max_count=args.shard_size, shard_max_bytes=int(args.shard_mb * (1 << 20)),
                workers=args.workers, seed=args.seed, progress=not args.no_progress)


def cmd_imagefolder(args) -> int:
    src, out = Path(args.src), Path(args.out)
    tree = scan_imagefolder(src, args.split)
    class_names = sorted({c for split in tree.values() for c in split})
    for i, (split, classes) in enumerate(tree.items()):
        records = [(class_names.index(c), os.path.relpath(p, src), str(p))
                   for c, files in classes.items() for p in files]
        why = _probe_all([r[2] for r in records], args.workers, not args.no_progress)
        skipped = [(r[1], w) for r, w in zip(records, why) if w]
        if skipped and args.strict:
            _fail(f"{len(skipped)} unreadable files in split '{split}' (--strict), e.g. "
                  + "; ".join(f"{p}: {w}" for p, w in skipped[:5]))
        records = [r for r, w in zip(records, why) if not w]
        try:
            info = S.prepare_out_dir(out, split, class_names, overwrite=args.overwrite and i == 0,
                                     add_split=i > 0 or bool(args.split))
            summary = S.write_split(records, out, split, class_names, info, enc=_encoding(args),
                                    skipped=skipped, source=str(src), **_write_opts(args))
        except S.ShardError as e:
            _fail(str(e))
        print(S.format_summary(summary))
    print(f"wrote {out}/{S.INFO_NAME}; check with: dsvit shards verify {out}")
    return 0


def load_npz_arrays(path: Path, images_key: str, labels_key: str):
    if not path.is_file():
        _fail(f"{path} does not exist")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:  # not an npz, corrupt zip
        _fail(f"cannot read {path} as .npz ({type(e).__name__}: {e})")
    for key in (images_key, labels_key):
        if key not in data.files:
            _fail(f"{path} has no array '{key}' (has {data.files}); pass --images/--labels")
    images, labels = (_npz_array(data, path, key) for key in (images_key, labels_key))
    if images.dtype != np.uint8:
        _fail(f"'{images_key}' has dtype {images.dtype}; images must be uint8 NHWC (convert with "
              f"(x * 255).round().astype(np.uint8) if they are floats in [0, 1])")
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        hint = " (looks like NCHW: use x.transpose(0, 2, 3, 1))" if images.ndim == 4 and images.shape[1] in (1, 3) else ""
        _fail(f"'{images_key}' has shape {images.shape}; images must be uint8 NHWC with 1 or 3 channels{hint}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        _fail(f"'{labels_key}' has shape {labels.shape} dtype {labels.dtype}; labels must be integers of shape ({images.shape[0]},)")
    if len(labels) == 0:
        _fail(f"{path}: no images")
    if labels.min() < 0:
        _fail(f"'{labels_key}' has negative class {labels.min()}")
    return images, labels


def _npz_array(data, path: Path, key: str) -> np.ndarray:
    try:
        return data[key]
    except ValueError as e:  # object dtype: loading needs pickle, which we do not allow
        if "allow_pickle" not in str(e):
            _fail(f"cannot read array '{key}' of {path} ({e})")
        _fail(f"array '{key}' in {path} has dtype object (a list of arrays of different sizes, or of "
              f"Python objects), which is not read (it would need pickle); store '{key}' as one "
              f"numeric array: images as uint8 NHWC of one size (np.stack(list).astype(np.uint8), "
              f"resizing first if sizes differ), labels as integers (np.asarray(labels, np.int64))")
    except Exception as e:  # a damaged member of the zip
        _fail(f"cannot read array '{key}' of {path} ({type(e).__name__}: {e})")


def cmd_npz(args) -> int:
    path, out = Path(args.file), Path(args.out)
    images, labels = load_npz_arrays(path, args.images, args.labels)
    existing = S.load_info(out) if out.exists() else None
    if args.classes:
        class_names = args.classes.split(",")
    elif existing:
        class_names = existing["class_names"]
    else:
        class_names = [str(c) for c in range(int(labels.max()) + 1)]
    if labels.max() >= len(class_names):
        _fail(f"class {labels.max()} in '{args.labels}' but only {len(class_names)} class names")
    records = [(int(y), f"{path.name}[{i}]", images[i]) for i, y in enumerate(labels)]
    try:
        info = S.prepare_out_dir(out, args.split, class_names, overwrite=args.overwrite, add_split=True)
        summary = S.write_split(records, out, args.split, class_names, info, enc=_encoding(args),
                                source=str(path), **_write_opts(args))
    except S.ShardError as e:
        _fail(str(e))
    print(S.format_summary(summary))
    return 0


def cmd_verify(args) -> int:
    problems, stats = S.verify_dataset(args.out, progress=not args.no_progress)
    for split, st in stats.items():
        print(f"split '{split}': {st['samples']} samples read from {st['shards']} shards")
    if problems:
        print(f"{len(problems)} problems:")
        for p in problems[:200]:
            print("  " + p)
        raise SystemExit(1)
    print(f"{args.out}: OK")
    return 0


def cmd_synthetic(args) -> int:
    from dsvit.data.synthetic import ensure_synthetic
    print(ensure_synthetic(args.out, args.num_train, args.num_val, seed=args.seed))
    return 0


def _common(p, encode_arrays: bool):
    p.add_argument("--shard-size", type=int, default=1000, help="max samples per shard")
    p.add_argument("--shard-mb", type=float, default=256, help="max MB per shard")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="writer processes")
    p.add_argument("--seed", type=int, default=0, help="seed of the write-time shuffle")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset/split")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality when encoding")
    if encode_arrays:
        p.add_argument("--format", choices=["png", "jpeg"], default="png", help="encoding of arrays")
    else:
        p.add_argument("--reencode", choices=["jpeg"], default="", help="re-encode instead of keeping bytes")
        p.add_argument("--resize", type=int, default=0, help="shorter side when re-encoding (0: keep)")


def add_shards_parser(subparsers):
    p = subparsers.add_parser("shards", help="write/verify webdataset shard datasets")
    sub = p.add_subparsers(dest="shards_cmd", required=True)
    q = sub.add_parser("imagefolder", help="SRC/<split>/<class>/<image> -> shards")
    q.add_argument("src")
    q.add_argument("out")
    q.add_argument("--split", default=None, help="SRC is one split (SRC/<class>/<image>) with this name")
    q.add_argument("--strict", action="store_true", help="fail on unreadable files instead of skipping")
    _common(q, encode_arrays=False)
    q.set_defaults(func=cmd_imagefolder)
    q = sub.add_parser("npz", help="one split from uint8 NHWC arrays in an .npz")
    q.add_argument("file")
    q.add_argument("out")
    q.add_argument("--split", required=True)
    q.add_argument("--images", default="images", help="array key of the images")
    q.add_argument("--labels", default="labels", help="array key of the labels")
    q.add_argument("--classes", default="", help="comma-separated class names")
    _common(q, encode_arrays=True)
    q.set_defaults(func=cmd_npz)
    q = sub.add_parser("verify", help="read and decode everything, check counts")
    q.add_argument("out")
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=cmd_verify)
    q = sub.add_parser("synthetic", help="write the embedded synthetic dataset")
    q.add_argument("out")
    q.add_argument("--num-train", type=int, default=10000)
    q.add_argument("--num-val", type=int, default=2000)
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=cmd_synthetic)
    return p
