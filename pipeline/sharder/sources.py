"""Datasets as they lie on disk, listed as :class:`~effnetv2.pipeline.sharder.writer.SourceItem` per split.

Listing never decodes an image; it only decides which file is which class in which split, in a
deterministic (sorted) order, so that the sharder's seeded shuffle gives the same plan on every
machine. Anything a listing drops (a file outside any class folder, a validation image without a
label, an unsafe tar member name, a link to a folder, an unreadable folder) is returned in
``Listing.rejected`` with the reason, to be written to ``rejected.tsv``. Names in reports are printable:
bytes of a file name that are not UTF-8 appear as ``\\xNN`` (the file itself is still read).
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from .writer import MAX_INPUT_BYTES, SourceItem, TarMember, process_pool

SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
RELEASES = {"fall11": 21841, "winter21": 19167}  # synset counts of the ImageNet-21k releases
_VAL_RE = re.compile(r"(ILSVRC2012_val_\d{8})")


@dataclass
class Listing:
    """What a source hands the sharder: items per split, class names, and what it left out."""

    splits: dict[str, list[SourceItem]]
    classes: list[str]
    rejected: list[tuple[str, str]] = field(default_factory=list)
    info: dict = field(default_factory=dict)  # extra manifest fields (source, release, ...)
    multilabel: bool = False
    notes: list[str] = field(default_factory=list)  # things the user should know, printed by the CLI
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (merged image, kept image)


def printable(name: str) -> str:
    """A file name as reports show it: bytes that are not UTF-8 (kept by Python as surrogate escapes,
    which no UTF-8 file can hold) written as ``\\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _rel(path: Path, root: Path) -> str:
    return printable(path.relative_to(root).as_posix())


def _walk_files(folder: Path, root: Path, rejected: list[tuple[str, str]]) -> Iterator[Path]:
    """Every regular file below ``folder`` in sorted order (links to files included).

    Links to folders are not followed: one to a parent folder would add the other classes' images again
    under this class, one to itself never ends. They are reported in ``rejected``, as are unreadable
    folders (skipped, the run goes on) and entries that are neither files nor folders. A class folder
    that is itself a link is followed unless it leads to a folder holding the dataset. Uses
    ``os.scandir``'s cached file types, so listing ImageNet costs no stat per file."""

    def walk(path: str) -> Iterator[Path]:
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            rejected.append((_rel(Path(path), root), f"unreadable folder, skipped: {e.strerror or e}"))
            return
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    yield from walk(entry.path)
                elif entry.is_symlink() and entry.is_dir():  # is_dir raises for a link to itself
                    rejected.append((_rel(Path(entry.path), root), "link to a folder: not followed"))
                elif entry.is_file():
                    yield Path(entry.path)
                else:
                    rejected.append((_rel(Path(entry.path), root), "not a regular file (FIFO, socket or broken link)"))
            except OSError as e:
                rejected.append((_rel(Path(entry.path), root), f"unreadable: {e.strerror or e}"))

    if folder.is_symlink() and folder.parent.resolve().is_relative_to(folder.resolve()):
        rejected.append((_rel(folder, root), "link to a folder holding the dataset: not followed"))
        return
    yield from walk(str(folder))


def _unsafe_member(name: str) -> bool:
    """A tar member name that would leave the folder it is extracted to (we never extract, but
    such a name marks a hostile or broken archive and is reported instead of used)."""
    p = PurePosixPath(name.replace("\\", "/"))
    return p.is_absolute() or ".." in p.parts or bool(re.match(r"^[A-Za-z]:", name))


def tar_members(tar_path: Path, root: Path) -> tuple[list[tuple[str, TarMember]], list[tuple[str, str]]]:
    """The regular-file members of an uncompressed tar as (display name, TarMember), read in memory.

    Member names are used for reports only, never as paths. Absolute names, names with ``..``,
    links and device files are returned as rejected with the reason.
    """
    prefix = _rel(tar_path, root)
    members, rejected = [], []
    try:
        tar_size = tar_path.stat().st_size
        with tarfile.open(tar_path, "r:") as tar:
            for info in tar:
                display = f"{prefix}:{printable(info.name)}"
                if info.isdir():
                    continue
                if _unsafe_member(info.name):
                    rejected.append((display, "unsafe tar member name (absolute or '..'); not read"))
                elif not info.isreg():
                    rejected.append((display, "tar member is not a regular file (link or device)"))
                elif info.offset_data + info.size > tar_size:  # nothing can follow it: stop here
                    rejected.append((display, f"tar member declares {info.size} bytes, past the end of the tar "
                                              f"({tar_size} bytes): a corrupt or truncated tar; not read"))
                    break
                elif info.size > MAX_INPUT_BYTES:
                    rejected.append((display, f"too large: {info.size} bytes (at most {MAX_INPUT_BYTES}); not read"))
                else:
                    members.append((display, TarMember(tar_path, info.offset_data, info.size)))
    except (tarfile.TarError, OSError) as e:
        rejected.append((prefix, f"unreadable tar after {len(members)} members: {e}"))
    members.sort(key=lambda m: m[0])
    return members, rejected


def _class_entries(folder: Path) -> tuple[list[tuple[str, Path]], list[Path]]:
    """Classes under ``folder``: sub-folders and ``<class>.tar`` files; other files are returned apart."""
    classes, others = [], []
    for entry in sorted(folder.iterdir()):
        if entry.is_dir():
            classes.append((printable(entry.name), entry))
        elif entry.is_file() and entry.suffix == ".tar":
            classes.append((printable(entry.stem), entry))
        else:
            others.append(entry)
    dup = [c for c, n in Counter(c for c, _ in classes).items() if n > 1]
    if dup:
        raise ValueError(f"{folder}: class {dup[0]!r} is both a folder and a .tar; keep one")
    return sorted(classes), others


def _class_items(name: str, entry: Path, label_of: dict[str, int], root: Path, rejected: list) -> list[SourceItem]:
    """Items of one class folder (all files below it) or class tar (all regular members)."""
    label = (label_of[name],)
    if entry.is_dir():
        return [SourceItem(p, label, _rel(p, root)) for p in _walk_files(entry, root, rejected)]
    members, bad = tar_members(entry, root)
    rejected += bad
    return [SourceItem(m, label, display) for display, m in members]


def hold_out(items: list[SourceItem], n: int, seed: int, what: str) -> tuple[list[SourceItem], list[SourceItem]]:
    """Split off ``n`` random items (seeded) as a held-out split; both keep the listing order."""
    if n < 0 or n >= len(items):
        raise ValueError(f"cannot hold out {n} of {len(items)} images for {what}; use a smaller number")
    chosen = np.zeros(len(items), dtype=bool)
    chosen[np.random.default_rng(seed).choice(len(items), n, replace=False)] = True
    return [x for x, c in zip(items, chosen) if not c], [x for x, c in zip(items, chosen) if c]


# ---- ImageFolder ----

def _has_folders(folder: Path) -> bool:
    try:
        return any(x.is_dir() for x in folder.iterdir())
    except OSError:  # unreadable: a class folder, reported when it is walked
        return False


def imagefolder(src: Path, *, val: int = 0, seed: int = 0) -> Listing:
    """One folder per class (classes sorted by name); or ``train/``, ``val/``, ``test/`` folders
    each holding the class folders. ``val`` > 0 holds out that many training images as ``val``."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: not a folder")
    subdirs = [d for d in sorted(src.iterdir()) if d.is_dir()]
    split_dirs = [d for d in subdirs if d.name.lower() in SPLIT_FOLDERS and _has_folders(d)]
    if split_dirs and len(split_dirs) != len(subdirs):
        others = [d.name for d in subdirs if d not in split_dirs]
        raise ValueError(f"{src}: mixes split folders ({', '.join(d.name for d in split_dirs)}) with other "
                         f"folders ({', '.join(others)}); point SRC at one layout")
    roots = {SPLIT_FOLDERS[d.name.lower()]: d for d in split_dirs} if split_dirs else {"train": src}
    if len(roots) != len(split_dirs or [src]):
        raise ValueError(f"{src}: two folders name the same split ({', '.join(d.name for d in split_dirs)})")
    rejected: list[tuple[str, str]] = []
    per_split, names = {}, set()
    for split, root in roots.items():
        entries = []
        for entry in sorted(root.iterdir()):
            if entry.is_dir():
                entries.append(entry)
            else:
                rejected.append((_rel(entry, src), "not inside a class folder"))
        per_split[split] = entries
        names |= {printable(e.name) for e in entries}
    classes = sorted(names)
    if not classes:
        raise ValueError(f"{src}: no class folders found")
    label_of = {c: i for i, c in enumerate(classes)}
    splits = {split: [item for e in entries for item in _class_items(printable(e.name), e, label_of, src, rejected)]
              for split, entries in per_split.items()}
    if val:
        if "val" in splits:
            raise ValueError(f"{src}: has a val folder already; --val holds out from train only without one")
        splits["train"], splits["val"] = hold_out(splits["train"], val, seed, "--val")
    listing = Listing(splits, classes, rejected, {"source": "imagefolder", "release": None})
    counts = Counter(item.labels[0] for items in splits.values() for item in items)
    empty = [c for k, c in enumerate(classes) if not counts[k]]
    if empty:
        listing.notes.append(f"{len(empty)} class folder(s) hold no files, e.g. {empty[0]!r}")
    return listing


# ---- ILSVRC2012 ----

def _find(src: Path, name: str) -> Path | None:
    """``name`` in ``src`` or up to three folders below it, never looking inside train/ or val/."""
    frontier = [src]
    for _ in range(4):
        for folder in frontier:
            if (folder / name).is_file():
                return folder / name
        frontier = [d for f in frontier for d in sorted(f.iterdir(), key=lambda p: p.name)
                    if d.name not in ("train", "val") and d.is_dir()]
    return None


def _meta_ids(meta: Path) -> dict[int, str]:
    """ILSVRC2012_ID -> WNID from the devkit's ``meta.mat``."""
    from scipy.io import loadmat

    try:
        synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
        ids = [int(np.asarray(x).ravel()[0]) for x in np.asarray(synsets["ILSVRC2012_ID"]).ravel()]
        wnids = [str(np.asarray(x).ravel()[0]) for x in np.asarray(synsets["WNID"]).ravel()]
    except (KeyError, ValueError, IndexError, TypeError, OSError) as e:
        raise ValueError(f"{meta}: not an ILSVRC2012 devkit meta.mat (synsets with ILSVRC2012_ID, WNID): {e}") from e
    return dict(zip(ids, wnids))


def imagenet_val_labels(src: Path, val_labels: Path | None = None, meta: Path | None = None) -> dict[str, str]:
    """Validation image id (``ILSVRC2012_val_00000001``) -> wnid, from ``LOC_val_solution.csv`` or
    from ``ILSVRC2012_validation_ground_truth.txt`` with the ``meta.mat`` that maps its ids to wnids."""
    path = val_labels or _find(src, "LOC_val_solution.csv") or _find(src, "ILSVRC2012_validation_ground_truth.txt")
    if path is None:
        raise FileNotFoundError(f"{src}: no LOC_val_solution.csv or ILSVRC2012_validation_ground_truth.txt "
                                f"found; pass --val-labels FILE")
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        if not rows or [c.strip() for c in rows[0][:2]] != ["ImageId", "PredictionString"]:
            raise ValueError(f"{path}: expected a header 'ImageId,PredictionString'")
        out = {}
        for n, row in enumerate(rows[1:], start=2):
            if len(row) < 2 or not row[1].split():
                raise ValueError(f"{path}:{n}: no synset in {row!r}")
            out[row[0].strip()] = row[1].split()[0]
        return out
    meta = meta or _find(src, "meta.mat")
    if meta is None:
        raise FileNotFoundError(f"{path} needs the devkit's meta.mat (its ids are not wnids); pass --meta FILE")
    wnid_of = _meta_ids(meta)
    out = {}
    for n, line in enumerate(path.read_text(encoding="ascii").split(), start=1):
        if int(line) not in wnid_of:
            raise ValueError(f"{path}:{n}: id {line} is not in {meta}")
        out[f"ILSVRC2012_val_{n:08d}"] = wnid_of[int(line)]
    return out


def imagenet(src: Path, *, minival: int = 0, seed: int = 0, val_labels: Path | None = None,
             meta: Path | None = None) -> Listing:
    """ILSVRC2012 as distributed: ``train/<wnid>/`` (or ``train/<wnid>.tar``) and a flat ``val/``
    labelled by the devkit (or ``val/<wnid>/``). Class index = sorted wnid order (timm, torchvision).
    ``minival`` holds out that many training images as a third split ``minival``."""
    src = Path(src)
    root = next((r for r in (src, src / "ILSVRC" / "Data" / "CLS-LOC") if (r / "train").is_dir()), None)
    if root is None:
        raise FileNotFoundError(f"{src}: no train/ folder (expected train/<wnid>/*.JPEG and val/)")
    entries, others = _class_entries(root / "train")
    classes = sorted(name for name, _ in entries)
    label_of = {c: i for i, c in enumerate(classes)}
    rejected = [(_rel(p, src), "not inside a class folder") for p in others]
    train = [item for name, e in entries for item in _class_items(name, e, label_of, src, rejected)]
    splits = {"train": train}
    notes = []
    if len(classes) != 1000:
        notes.append(f"{len(classes)} training classes (ILSVRC2012 has 1000)")
    val_dir = root / "val"
    if val_dir.is_dir():
        if any(p.is_dir() for p in val_dir.iterdir()):
            vals, loose = _class_entries(val_dir)
            rejected += [(_rel(p, src), "not inside a class folder") for p in loose]
            for name, _ in vals:
                if name not in label_of:
                    raise ValueError(f"{val_dir / name}: {name} is not a training class")
            splits["val"] = [item for name, e in vals for item in _class_items(name, e, label_of, src, rejected)]
        else:
            truth = imagenet_val_labels(src, val_labels, meta)
            splits["val"], seen = [], set()
            for path in _walk_files(val_dir, src, rejected):
                m = _VAL_RE.search(path.name)
                wnid = truth.get(m.group(1)) if m else None
                if wnid is None:
                    rejected.append((_rel(path, src), "no ground-truth label for this validation image"))
                elif wnid not in label_of:
                    rejected.append((_rel(path, src), f"ground-truth synset {wnid} is not a training class"))
                else:
                    seen.add(m.group(1))
                    splits["val"].append(SourceItem(path, (label_of[wnid],), _rel(path, src)))
            if len(truth) > len(seen):
                notes.append(f"{len(truth) - len(seen)} ground-truth entries have no image in {val_dir}")
    else:
        notes.append(f"{val_dir}: missing; writing no val split")
    if minival:
        splits["train"], splits["minival"] = hold_out(train, minival, seed, "--minival")
    return Listing(splits, classes, rejected, {"source": "imagenet", "release": "ILSVRC2012"}, notes=notes)


# ---- ImageNet-21k ----

def _hash_chunk(items: list[SourceItem]) -> list[str | None]:
    """Content hashes of a chunk of items (None for unreadable ones: the sharder reports those)."""
    out = []
    for item in items:
        try:
            out.append(hashlib.blake2b(item.read(), digest_size=16).hexdigest())
        except OSError:
            out.append(None)
    return out


def content_hashes(items: list[SourceItem], workers: int = 1, progress: bool = False,
                   chunk: int = 256) -> list[str | None]:
    """A content hash for each item whose size equals another item's (others cannot be duplicates,
    and are left None): reading only those saves a pass over most of the data."""
    from tqdm import tqdm

    sizes = [item.input_size() for item in items]
    counts = Counter(sizes)
    todo = [i for i, s in enumerate(sizes) if counts[s] > 1 and s > 0]
    chunks = [todo[a : a + chunk] for a in range(0, len(todo), chunk)]
    hashes: list[str | None] = [None] * len(items)
    with tqdm(total=len(todo), unit="img", desc="hash", disable=not progress) as bar:
        if workers <= 1 or len(chunks) <= 1:
            results: Iterator[list[str | None]] = map(_hash_chunk, ([items[i] for i in c] for c in chunks))
            for chunk, res in zip(chunks, results):
                for i, h in zip(chunk, res):
                    hashes[i] = h
                bar.update(len(chunk))
        else:
            with process_pool(min(workers, len(chunks))) as pool:
                for chunk, res in zip(chunks, pool.map(_hash_chunk, [[items[i] for i in c] for c in chunks])):
                    for i, h in zip(chunk, res):
                        hashes[i] = h
                    bar.update(len(chunk))
    return hashes


def _stem(name: str) -> str:
    base = name.rsplit(":", 1)[-1].rsplit("/", 1)[-1]
    return base.split(".", 1)[0]


def _extra_labels(path: Path, label_of: dict[str, int]) -> dict[str, set[int]]:
    """``--labels FILE``: lines ``<image> <wnid> [<wnid> ...]`` (whitespace or commas; ``#`` comments);
    the image is its file name without extension, e.g. ``n01440764_10026``."""
    extra: dict[str, set[int]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split("#", 1)[0].replace(",", " ").split()
        if not fields:
            continue
        if len(fields) < 2:
            raise ValueError(f"{path}:{n}: expected '<image> <wnid> [<wnid> ...]', got {line!r}")
        for wnid in fields[1:]:
            if wnid not in label_of:
                raise ValueError(f"{path}:{n}: unknown synset {wnid!r}")
        extra.setdefault(_stem(fields[0]), set()).update(label_of[w] for w in fields[1:])
    return extra


def imagenet21k(src: Path, *, release: str, val: int = 100_000, seed: int = 0, labels: Path | None = None,
                workers: int = 1, progress: bool = False) -> Listing:
    """ImageNet-21k (``release`` fall11 or winter21): one ``<wnid>.tar`` per synset or extracted
    ``<wnid>/`` folders. Images with identical bytes under several synsets become one multi-label
    sample; ``labels`` adds label lists per image; ``val`` images are held out as ``val``."""
    src = Path(src)
    if release not in RELEASES:
        raise ValueError(f"unknown ImageNet-21k release {release!r}; use one of {sorted(RELEASES)}")
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: not a folder")
    entries, others = _class_entries(src)
    classes = [name for name, _ in entries]
    if not classes:
        raise ValueError(f"{src}: no <wnid>.tar files or <wnid>/ folders")
    label_of = {c: i for i, c in enumerate(classes)}
    rejected = [(_rel(p, src), "not a synset tar or folder") for p in others]
    items = [item for name, e in entries for item in _class_items(name, e, label_of, src, rejected)]
    notes = []
    if len(classes) != RELEASES[release]:
        notes.append(f"{len(classes)} synsets; the {release} release has {RELEASES[release]}")
    if labels is not None:
        extra = _extra_labels(Path(labels), label_of)
        used = set()
        for k, item in enumerate(items):
            more = extra.get(_stem(item.name), set()) - set(item.labels)
            if more:
                used.add(_stem(item.name))
                items[k] = SourceItem(item.source, (item.labels[0], *sorted(more)), item.name)
        if len(extra) > len(used):
            notes.append(f"{len(extra) - len(used)} entries of {labels} name no image or add no label")
    hashes = content_hashes(items, workers, progress)
    kept: dict[str, int] = {}
    merged: list[SourceItem] = []
    duplicates = []
    for item, h in zip(items, hashes):
        if h is not None and h in kept:
            first = merged[kept[h]]
            rest = (set(first.labels) | set(item.labels)) - {first.labels[0]}
            union = (first.labels[0], *sorted(rest))
            merged[kept[h]] = SourceItem(first.source, union, first.name)
            duplicates.append((item.name, first.name))
            continue
        if h is not None:
            kept[h] = len(merged)
        merged.append(item)
    splits = {"train": merged}
    if val:
        splits["train"], splits["val"] = hold_out(merged, val, seed, "--val")
    info = {"source": "imagenet21k", "release": release, "duplicates_merged": len(duplicates)}
    return Listing(splits, classes, rejected, info, multilabel=True, notes=notes,
                   duplicates=duplicates)
