"""Labels of a flat validation folder (ImageNet's ``val/`` as distributed: 50,000 images, no class
folders) from a label file, and class descriptions from a synset list.

Label files, told apart by their content:

- the ILSVRC2012 devkit's ground truth (``ILSVRC2012_validation_ground_truth.txt``): one integer per
  line, the ILSVRC2012_ID of the i-th file in sorted name order. Id k is the k-th line of
  ``--synsets``, which must list the synsets in ILSVRC2012_ID order: the devkit's ``meta.mat`` order,
  where id 1 is n02119789 (kit fox), not the sorted wnid order of class indices (tench, n01440764,
  is id 449 there; val_00000001 is id 490, sea snake, class index 65). Kaggle's
  ``LOC_synset_mapping.txt`` and caffe's ``synset_words.txt`` are in sorted order, so with those the
  ids would name wrong classes for nearly every image: that pairing (1000 synsets, sorted) is refused.
- one class name (wnid) per line, for the i-th file in sorted name order (e.g. TensorFlow's
  ``imagenet_2012_validation_synset_labels.txt``).
- a CSV ``file,label`` (a header row is recognised by not naming a file): ``file`` a file name with
  or without its extension, ``label`` a class folder name or an integer class index (0-based, in
  the sorted class order, as torchvision's ImageFolder counts); a class name wins over an index.
- Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``): the class is the first token of
  PredictionString.

Class indices come from the sorted class folder names of the other splits, so train and val agree.
Every mismatch (a file without a label, a label for no file, an unknown class, a bad line) is an
error naming the file and line: a silently mislabelled validation set is worse than none.
"""
from __future__ import annotations

import csv
from pathlib import Path

from dsvit.data.shards import IMAGE_EXTS, ShardError

IMAGE_SUFFIXES = tuple("." + e for e in IMAGE_EXTS)
FIX_FORMATS = ("a label file is one of: the devkit's ground-truth ids (one integer per line) with "
               "--synsets, one class name per line, or a CSV of file,label (Kaggle's LOC_val_solution.csv too)")


def list_flat_images(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name (the order of ground-truth lines)."""
    if not folder.is_dir():
        raise ShardError(f"validation folder {folder} does not exist or is not a folder (--val-dir)")
    files = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                   key=lambda p: p.name)
    if not files:
        raise ShardError(f"validation folder {folder} holds no images directly (looked for "
                         f"{', '.join(IMAGE_SUFFIXES)}); --val-dir names the folder of ILSVRC2012_val_*.JPEG")
    return files


def read_synsets(path: Path) -> list[tuple[str, str]]:
    """[(wnid, description)] in file order from lines 'n01440764 tench, Tinca tinca' (or bare wnids)."""
    out, seen = [], set()
    for n, line in enumerate(_lines(path, "--synsets"), 1):
        if not line.strip():
            continue
        wnid, _, desc = line.strip().partition(" ")
        if wnid in seen or "," in wnid:
            why = "repeats a synset" if wnid in seen else "is not 'WNID description'"
            raise ShardError(f"{path}, line {n}: {line.strip()[:80]!r} {why}; --synsets takes one "
                             f"'WNID description' per line (e.g. 'n01440764 tench, Tinca tinca')")
        seen.add(wnid)
        out.append((wnid, desc.strip()))
    if not out:
        raise ShardError(f"{path} lists no synsets; --synsets takes one 'WNID description' per line")
    return out


def class_descriptions(class_names: list[str], synsets: list[tuple[str, str]], path: Path) -> list[str]:
    """The description of each class (in class order); every class must be in the synset list."""
    desc = dict(synsets)
    missing = [c for c in class_names if c not in desc]
    if missing:
        raise ShardError(f"class folder(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
                         f"not in the synset list {path} ({len(missing)} of {len(class_names)}); "
                         f"pass the synset list of this dataset or leave out --synsets")
    return [desc[c] for c in class_names]


def val_labels(label_file: Path, files: list[Path], class_names: list[str],
               synsets: list[tuple[str, str]] | None, synsets_path: Path | None = None) -> list[int]:
    """The class index of each of ``files`` (sorted, as list_flat_images gives them)."""
    lines = _lines(label_file, "--val-labels")
    first = next((ln for ln in lines if ln.strip()), "")
    if not first:
        raise ShardError(f"{label_file} is empty; {FIX_FORMATS}")
    if "," in first:
        return _csv_labels(label_file, lines, files, class_names)
    rows = [(n, ln.strip()) for n, ln in enumerate(lines, 1) if ln.strip()]
    for n, text in rows:
        if len(text.split()) != 1:
            raise ShardError(f"{label_file}, line {n}: {text[:80]!r} is not one id or class name; {FIX_FORMATS}")
    if len(rows) != len(files):
        raise ShardError(f"{label_file} has {len(rows)} labels for the {len(files)} images of {files[0].parent} "
                         f"(one line per image in sorted name order): is it this folder's label file, "
                         f"and is the folder complete?")
    index = {c: i for i, c in enumerate(class_names)}
    if rows[0][1].isdigit():  # devkit ground truth: ILSVRC2012_IDs
        if not synsets:
            raise ShardError(f"{label_file} holds ILSVRC2012_IDs (integers): pass --synsets FILE listing the "
                             f"synsets in id order, so id k names the k-th synset")
        order = [w for w, _ in synsets]
        if len(order) == 1000 and order == sorted(order):
            raise ShardError(f"--synsets {synsets_path} is in sorted wnid order (like LOC_synset_mapping.txt), "
                             f"but ILSVRC2012_IDs follow the devkit's meta.mat order (id 1 is n02119789); "
                             f"the labels would be wrong: pass a synset list in meta.mat order, or "
                             f"Kaggle's LOC_val_solution.csv / a file of one wnid per line as --val-labels")
        out = []
        for (n, text), f in zip(rows, files):
            k = int(text) if text.isdigit() else 0
            if not 1 <= k <= len(order):
                raise ShardError(f"{label_file}, line {n}: {text!r} is not an ILSVRC2012_ID in [1, {len(order)}] "
                                 f"(the synsets in {synsets_path}); every line must be one id")
            out.append(_class_index(order[k - 1], index, label_file, n, f.name))
        return out
    return [_class_index(text, index, label_file, n, f.name) for (n, text), f in zip(rows, files)]


def _csv_labels(label_file: Path, lines: list[str], files: list[Path], class_names: list[str]) -> list[int]:
    by_name = {f.name: i for i, f in enumerate(files)}
    by_stem: dict[str, int] = {}
    for i, f in enumerate(files):
        by_stem[f.stem] = -1 if f.stem in by_stem else i  # -1: two files share the stem
    index = {c: i for i, c in enumerate(class_names)}
    labels: list[int | None] = [None] * len(files)
    kaggle = False
    for n, row in enumerate(csv.reader(lines), 1):
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2:
            raise ShardError(f"{label_file}, line {n}: {','.join(row)[:80]!r} has {len(row)} fields, not 2 "
                             f"(file,label); {FIX_FORMATS}")
        name, label = Path(row[0].strip()).name, row[1].strip()
        i = by_name.get(name, by_stem.get(name))
        if n == 1 and i is None:  # a header row names no file
            kaggle = row[1].strip().lower() == "predictionstring"
            continue
        if i is None or i < 0:
            why = "no file of the validation folder" if i is None else "two files (give the extension)"
            raise ShardError(f"{label_file}, line {n}: {row[0]!r} names {why}; the label file must "
                             f"belong to {files[0].parent} (--val-dir)")
        if labels[i] is not None:
            raise ShardError(f"{label_file}, line {n}: a second label for {files[i].name}; give each file one")
        labels[i] = _class_index(label.split()[0] if kaggle and label else label, index, label_file, n, files[i].name)
    missing = [f.name for f, y in zip(files, labels) if y is None]
    if missing:
        raise ShardError(f"{len(missing)} of the {len(files)} images in {files[0].parent} have no label in "
                         f"{label_file}, e.g. {', '.join(missing[:3])}: use the label file of this folder, "
                         f"or move the unlabelled images out")
    return labels


def _class_index(label: str, index: dict, label_file: Path, line: int, file: str) -> int:
    if label in index:
        return index[label]
    if label.lstrip("-").isdigit() and 0 <= int(label) < len(index):
        return int(label)
    known = ", ".join(list(index)[:3])
    raise ShardError(f"{label_file}, line {line} ({file}): label {label!r} is no class of this dataset "
                     f"({len(index)} classes from the class folders: {known}, ...; or an index in "
                     f"[0, {len(index)})): is the label file for this dataset?")


def _lines(path: Path, option: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ShardError(f"cannot read {path} ({option}): {type(e).__name__}: {e}") from None
