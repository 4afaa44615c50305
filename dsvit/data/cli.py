"""`dsvit shards {imagefolder,npz,verify,synthetic}`: write and check shard datasets.

Errors in the input raise SystemExit with a message saying what is wrong and what to do.
`imagefolder` also takes ImageNet as distributed (a flat validation folder plus a label file:
``dsvit.data.imagenet``) and resumes a killed conversion (``dsvit.data.convert``).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from dsvit.data import convert, imagenet
from dsvit.data import shards as S

IMAGE_SUFFIXES = imagenet.IMAGE_SUFFIXES


def _fail(msg: str):
    raise SystemExit(f"dsvit shards: error: {msg}")


def _list_images(class_dir: Path) -> list[Path]:
    return sorted(p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def scan_imagefolder(src: Path, split: str | None, flat: Path | None = None) -> dict[str, dict[str, list[Path]]]:
    """{split: {class: [files]}} from SRC/<split>/<class>/<file> or (with split) SRC/<class>/<file>.
    flat: a flat validation folder, converted on its own (not scanned here)."""
    if not src.is_dir():
        _fail(f"source folder {src} does not exist or is not a folder")
    subdirs = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")
                     and not (flat and p.resolve() == flat.resolve()))
    if not subdirs:
        _fail(f"{src} has no subfolders; expected {src}/<split>/<class>/<image> "
              f"(or {src}/<class>/<image> with --split NAME)")
    if split:
        trees = {split: src}
    else:
        holds_images = [d for d in subdirs if any(p.suffix.lower() in IMAGE_SUFFIXES for p in d.iterdir())]
        if holds_images:
            d = holds_images[0]
            _fail(f"{d} holds images directly, so {src} looks like one split (<class>/<image>): pass "
                  f"--split NAME (e.g. --split train); or {d.name}/ is a flat validation folder: pass "
                  f"--val-labels FILE{'' if d.name == 'val' else f' --val-split {d.name}'} for it; a folder "
                  f"without labels (e.g. test/) must be moved out of {src}")
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


def _encoding(args) -> S.Encoding:
    return S.Encoding(format=getattr(args, "format", "png"), quality=args.quality,
                      reencode=getattr(args, "reencode", "") or "", resize=getattr(args, "resize", 0))


def _write_opts(args) -> dict:
    return dict(shard_max_count=args.shard_size, shard_max_bytes=int(args.shard_mb * (1 << 20)),
                workers=args.workers, seed=args.seed, progress=not args.no_progress)


def cmd_imagefolder(args) -> int:
    src, out = Path(args.src), Path(args.out)
    try:
        splits, class_names, descriptions = _imagefolder_records(args, src)
        log, info = _start_conversion(args, src, out, list(splits), class_names)
        if descriptions:
            info["class_descriptions"] = descriptions
        for split, records in splits.items():
            log.open_split(split, convert.fingerprint(records))
            skipped = log.probed(split)
            if skipped is None:
                started = time.perf_counter()
                why = convert.probe_all([r[2] for r in records], args.workers, not args.no_progress,
                                        f"checking {split}")
                took = time.perf_counter() - started
                print(f"split '{split}': checked {len(records)} files in {took:.1f} s "
                      f"({len(records) / max(took, 1e-9):.0f} img/s)")
                skipped = [(r[1], w) for r, w in zip(records, why) if w]
                if not (skipped and args.strict):  # a failed --strict run re-checks the files it named
                    log.record_probe(split, skipped)
            if skipped and args.strict:
                _fail(f"{len(skipped)} unreadable files in split '{split}' (--strict), e.g. "
                      + "; ".join(f"{p}: {w}" for p, w in skipped[:5]))
            bad = {p for p, _ in skipped}
            summary = S.write_split([r for r in records if r[1] not in bad], out, split, class_names, info,
                                    enc=_encoding(args), skipped=skipped, source=str(src), log=log,
                                    save=False, **_write_opts(args))
            print(S.format_summary(summary))
        S.save_info(out, info)  # last: a folder with _info.json and no _progress.json is complete
        log.remove()
    except S.ShardError as e:
        _fail(str(e))
    print(f"wrote {out}/{S.INFO_NAME}; check with: dsvit shards verify {out}")
    return 0


def _imagefolder_records(args, src: Path):
    """({split: [(label, name, path)]}, class names, class descriptions or None)."""
    flat = None
    if args.val_labels:
        flat = Path(args.val_dir) if args.val_dir else (None if args.split else src / args.val_split)
        if flat is None:
            _fail("--val-labels with --split: SRC is one split, so name the validation folder with --val-dir DIR")
    elif args.val_dir:
        _fail("--val-dir needs --val-labels FILE (the labels of the flat validation folder); a "
              "validation folder of class folders is converted as SRC/<split>/ or with --split")
    tree = scan_imagefolder(src, args.split, flat)
    if flat is not None and args.val_split in tree:
        _fail(f"split '{args.val_split}' comes both from {src}/{args.val_split} and from --val-dir {flat}; "
              f"name the flat one's split with --val-split NAME")
    class_names = sorted({c for split in tree.values() for c in split})
    index = {c: i for i, c in enumerate(class_names)}   # 1.28M ImageNet files: no list.index per file
    splits = {split: [(index[c], os.path.relpath(p, src), str(p))
                      for c, files in classes.items() for p in files] for split, classes in tree.items()}
    synsets = imagenet.read_synsets(Path(args.synsets)) if args.synsets else None
    if flat is not None:
        files = imagenet.list_flat_images(flat)
        labels = imagenet.val_labels(Path(args.val_labels), files, class_names, synsets,
                                     Path(args.synsets) if args.synsets else None)
        splits[args.val_split] = [(y, f"{flat.name}/{f.name}", str(f)) for f, y in zip(files, labels)]
    descriptions = imagenet.class_descriptions(class_names, synsets, Path(args.synsets)) if synsets else None
    return splits, class_names, descriptions


def _start_conversion(args, src: Path, out: Path, splits: list[str], class_names: list[str]):
    """(log, info): continue the unfinished conversion in OUT if it had these arguments, else start
    one (prepare_out_dir's checks: --overwrite to replace, --split to add a split)."""
    absolute = lambda p: str(Path(p).resolve()) if p else None  # noqa: E731
    record = {"command": "imagefolder", "src": absolute(src), "split": args.split,
              "val_dir": absolute(args.val_dir), "val_labels": absolute(args.val_labels),
              "val_split": args.val_split if args.val_labels else None, "synsets": absolute(args.synsets),
              "seed": args.seed, "shard_size": args.shard_size, "shard_mb": args.shard_mb,
              "reencode": args.reencode or "", "quality": args.quality, "resize": args.resize}
    log = convert.ConversionLog.find(out)
    if log is not None and not args.overwrite:
        diff = log.differences(record)
        if diff:
            _fail(f"{out} holds an unfinished conversion started with other arguments ({'; '.join(diff)}): "
                  f"run it again with the same arguments to continue it, or pass --overwrite to start over")
        print(f"continuing the unfinished conversion in {out} (finished shards are checked and kept)")
        return log, S.start_info(S.load_info(out), class_names, splits)
    info = S.prepare_out_dir(out, splits, class_names, overwrite=args.overwrite, add_split=bool(args.split))
    log = convert.ConversionLog(out, record)
    log.save()
    return log, info


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
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes that check and write images (the shards do not depend on it)")
    p.add_argument("--seed", type=int, default=0, help="seed of the write-time shuffle")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset/split, or start an unfinished conversion over")
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
    q = sub.add_parser("imagefolder", help="SRC/<split>/<class>/<image> -> shards", description=(
        "SRC/<split>/<class>/<image> (or, with --split, SRC/<class>/<image>) -> shards. Class indices "
        "are the sorted class folder names (torchvision's ImageFolder order), the same in every split. "
        "A flat validation folder (ImageNet's val/) takes its labels from --val-labels. A killed run "
        "continues when run again with the same arguments (finished shards are checked and kept; "
        "--workers may differ); the result is byte-identical to an uninterrupted run. "
        "ImageNet: dsvit shards imagefolder ILSVRC/Data/CLS-LOC/train OUT --split train "
        "--val-dir ILSVRC/Data/CLS-LOC/val --val-labels LOC_val_solution.csv --synsets LOC_synset_mapping.txt"))
    q.add_argument("src")
    q.add_argument("out")
    q.add_argument("--split", default=None, help="SRC is one split (SRC/<class>/<image>) with this name")
    q.add_argument("--val-labels", default="", metavar="FILE", help=(
        "labels of a flat validation folder: the devkit's ILSVRC2012_validation_ground_truth.txt "
        "(ids, needs --synsets in the devkit's meta.mat id order: NOT LOC_synset_mapping.txt, which is "
        "sorted), one class name per line (sorted file order), a CSV file,label (label: class folder "
        "name or 0-based class index), or Kaggle's LOC_val_solution.csv"))
    q.add_argument("--val-dir", default="", metavar="DIR",
                   help="the flat validation folder (default: SRC/<--val-split>)")
    q.add_argument("--val-split", default="val", metavar="NAME", help="split name of the flat validation folder")
    q.add_argument("--synsets", default="", metavar="FILE", help=(
        "lines 'WNID description' (e.g. LOC_synset_mapping.txt): descriptions stored as "
        "_info.json's class_descriptions; the id order for ground-truth ids"))
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
    q.add_argument("out", metavar="dataset", help="the dataset folder (holding _info.json)")
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=cmd_verify)
    q = sub.add_parser("synthetic", help="write the embedded synthetic dataset")
    q.add_argument("out")
    q.add_argument("--num-train", type=int, default=10000)
    q.add_argument("--num-val", type=int, default=2000)
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=cmd_synthetic)
    return p
