"""Write a shard set from lists of images: the engine behind ``effnetv2 shard`` and its Python API.

Three steps, so that the result never depends on how it was produced:

1. **Plan.** Each split is shuffled globally (seeded) and cut into shards by sample count or by input
   bytes, and every sample gets its key (``{split}_{running id}``). All of this is decided before any
   image is opened, so the bytes of every shard are a pure function of (inputs, seed, options):
   any worker count, ``resume`` after a crash and ``part`` i/n on several machines give the same files.
2. **Write.** One shard is one task in a process pool: read each image (file, in-memory bytes or tar
   member), check/convert it (:func:`effnetv2.pipeline.sharder.images.check_image`), write it with
   :class:`~effnetv2.pipeline.format.shards.ShardWriter`, then record the shard's statistics in
   ``_parts/{shard}.json``. That record marks the shard as finished for ``resume``.
3. **Merge.** Each part writes ``_parts/part-{i}-of-{n}.json``; merging them (at once for a single
   part, or ``effnetv2 shard merge OUT``) writes ``_info.json`` and ``rejected.tsv``.

Usage::

    items = [SourceItem(Path("cat1.jpg"), (0,), "cat1.jpg"), SourceItem(png_bytes, (1,), "dog-7")]
    shard_set = write_shard_set("out", {"train": items}, ["cat", "dog"], shard_size=1000)
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import struct
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from effnetv2 import __version__
from effnetv2.pipeline.format import atomic
from effnetv2.pipeline.format.index import index_path
from effnetv2.pipeline.format.shards import (
    MANIFEST,
    ShardSet,
    ShardWriter,
    read_shard_set,
    shard_name,
    write_manifest,
)

from .images import CheckedImage, check_image

PARTS = "_parts"
REJECTED = "rejected.tsv"
_SPLIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9\-]*$")
_TAR_OVERHEAD = 4 * 512  # three member headers plus padding, per sample, for --shard-bytes planning
MAX_INPUT_BYTES = 1 << 30  # no image worth training on is near this; reading a larger "image" risks memory


class InputTooLarge(OSError):
    """An input file or tar member larger than :data:`MAX_INPUT_BYTES`: rejected before it is read."""


@dataclass(frozen=True, slots=True)
class TarMember:
    """An image inside a tar (ImageNet-21k synset tars): read in memory at its offset, never extracted."""

    tar: Path
    offset: int
    size: int

    def read(self) -> bytes:
        if self.size > MAX_INPUT_BYTES:
            raise InputTooLarge(f"{self.size} bytes (at most {MAX_INPUT_BYTES})")
        with open(self.tar, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"tar member cut short ({len(data)} of {self.size} bytes)")
        return data


@dataclass(frozen=True, slots=True)
class SourceItem:
    """One input image: a file, encoded bytes (any format PIL reads) or a tar member; its class
    id(s), the first being the primary class; and a name used in reports (never in shard keys)."""

    source: Path | bytes | TarMember
    labels: tuple[int, ...]
    name: str

    def read(self) -> bytes:
        if isinstance(self.source, (bytes, bytearray, memoryview)):
            return bytes(self.source)
        if isinstance(self.source, TarMember):
            return self.source.read()
        with open(self.source, "rb") as f:
            data = f.read(MAX_INPUT_BYTES + 1)
        if len(data) > MAX_INPUT_BYTES:
            raise InputTooLarge(f"more than {MAX_INPUT_BYTES} bytes")
        return data

    def input_size(self) -> int:
        """Bytes of the encoded input, used to plan shards by size."""
        if isinstance(self.source, (bytes, bytearray, memoryview)):
            return len(self.source)
        if isinstance(self.source, TarMember):
            return self.source.size
        try:
            return os.stat(self.source).st_size
        except OSError:
            return 0  # unreadable: it will be rejected with the reason when the shard is written

    def content_id(self) -> str:
        """What identifies the content in a plan fingerprint: the name for files (mount-independent),
        plus a hash for in-memory bytes and the position for tar members."""
        if isinstance(self.source, (bytes, bytearray, memoryview)):
            return hashlib.blake2b(self.source, digest_size=16).hexdigest()
        if isinstance(self.source, TarMember):
            return f"{self.source.offset}+{self.source.size}"
        return ""


@dataclass(frozen=True)
class ContentOptions:
    """The options that change the bytes of a shard (besides its planned items)."""

    quality: int = 95
    max_side: int | None = None
    multilabel: bool = False


@dataclass(frozen=True)
class ShardTask:
    """One planned shard: its split, number, the running id of its first sample and its items."""

    split: str
    index: int
    start: int
    items: tuple[SourceItem, ...]

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)

    def key(self, j: int) -> str:
        return f"{self.split}_{self.start + j:09d}"

    def fingerprint(self, content: ContentOptions) -> str:
        h = hashlib.blake2b(json.dumps(asdict(content), sort_keys=True).encode(), digest_size=16)
        for j, item in enumerate(self.items):
            labels = ",".join(map(str, item.labels))
            h.update(f"{self.key(j)}\t{item.name}\t{labels}\t{item.content_id()}\n".encode())
        return h.hexdigest()


def plan_shards(splits: dict[str, list[SourceItem]], *, seed: int, shard_size: int | None = 1000,
                shard_bytes: int | None = None) -> dict[str, list[ShardTask]]:
    """Shuffle each split (seeded by ``seed`` and the split name) and cut it into shards.

    ``shard_bytes`` (if given) cuts by the summed input size plus tar overhead instead of by count;
    shards then hold about that many bytes (converted images change size a little).
    """
    plan = {}
    for split, items in splits.items():
        order = np.random.default_rng([seed, zlib.crc32(split.encode())]).permutation(len(items))
        shuffled = [items[i] for i in order]
        bounds = [0]
        if shard_bytes is not None:
            total = 0
            for i, item in enumerate(shuffled):
                size = item.input_size() + _TAR_OVERHEAD
                if total and total + size > shard_bytes:
                    bounds.append(i)
                    total = 0
                total += size
        else:
            bounds += list(range(shard_size, len(shuffled), shard_size))
        bounds.append(len(shuffled))
        plan[split] = [ShardTask(split, k, a, tuple(shuffled[a:b]))
                       for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])) if b > a]
    return plan


# ---- writing one shard (runs in a pool worker) ----

_on_image: Callable[[], None] = lambda: None  # noqa: E731  (progress hook, set per process)


def _count_into(counter) -> None:
    """Pool initializer: count processed images in a shared counter the main process polls."""
    global _on_image

    def tick() -> None:
        with counter.get_lock():
            counter.value += 1

    _on_image = tick


def _record_path(out: Path, task: ShardTask) -> Path:
    return out / PARTS / f"{task.name[:-4]}.json"


def write_shard(task: ShardTask, out: Path, content: ContentOptions, fingerprint: str) -> dict:
    """Write one planned shard and its record; returns the record (length, statistics, rejections)."""
    stats = {"count": 0, "copied": 0, "converted": 0, "rejected": 0, "bytes": 0, "sum_width": 0,
             "sum_height": 0}
    converted: Counter[str] = Counter()
    rejected = []
    writer = ShardWriter(out / task.name)
    try:
        for j, item in enumerate(task.items):
            try:
                result = check_image(item.read(), quality=content.quality, max_side=content.max_side)
            except InputTooLarge as e:
                result = CheckedImage(None, "rejected", f"too large: {e}")
            except OSError as e:
                result = CheckedImage(None, "rejected", f"unreadable: {e.strerror or e}")
            if result.data is None:
                rejected.append([item.name, result.reason])
                stats["rejected"] += 1
            else:
                members = {"jpg": result.data, "cls": str(item.labels[0]).encode("ascii")}
                if content.multilabel:
                    members["labels"] = struct.pack(f"<{len(item.labels)}i", *item.labels)
                writer.write(task.key(j), members)
                stats[result.action] += 1
                if result.action == "converted":
                    converted[result.reason] += 1
                stats["count"] += 1
                stats["bytes"] += len(result.data)
                stats["sum_width"] += result.width
                stats["sum_height"] += result.height
            _on_image()
    except BaseException:
        writer.abort()
        raise
    if len(writer):
        writer.close()
    else:  # every image rejected: no empty tar (readers dislike them); the record still says so
        writer.abort()
    record = {"shard": task.name, "split": task.split, "index": task.index, "length": stats["count"],
              "fingerprint": fingerprint, "stats": stats, "converted_by_reason": dict(sorted(converted.items())),
              "rejected": rejected}
    atomic.write_json(_record_path(out, task), record, sort_keys=True)
    return record


def _finished_record(out: Path, task: ShardTask, fingerprint: str) -> dict | None:
    """The record of a shard an earlier run finished, or None; refuses shards of another plan."""
    path = _record_path(out, task)
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("fingerprint") != fingerprint:
        raise FileExistsError(
            f"{path}: shard {task.name} was written from other inputs, seed or options; "
            f"write to a new folder or rerun with the original ones")
    if record["length"] == 0 or ((out / task.name).is_file() and index_path(out / task.name).is_file()):
        return record
    return None  # the record outlived its tar (deleted since): write the shard again


# ---- running a part ----

def parse_part(part: tuple[int, int] | str) -> tuple[int, int]:
    if isinstance(part, str):
        m = re.fullmatch(r"(\d+)/(\d+)", part.strip())
        if not m:
            raise ValueError(f"--part {part!r}: expected i/n, e.g. 0/4")
        part = int(m.group(1)), int(m.group(2))
    i, n = part
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"part {i}/{n}: need 0 <= i < n")
    return i, n


def class_list_hash(classes: Sequence[str]) -> str:
    """A short identity of a class list, recorded so that sets with different indices never mix."""
    return "sha256:" + hashlib.sha256("\n".join(classes).encode()).hexdigest()


def _check_inputs(splits: dict[str, list[SourceItem]], classes: Sequence[str]) -> None:
    if not classes:
        raise ValueError("no classes given")
    if not splits:
        raise ValueError("no splits given")
    for split, items in splits.items():
        if not _SPLIT_RE.match(split):
            raise ValueError(f"split name {split!r}: use ASCII letters, digits and '-' only")
        for item in items:
            if not item.labels or any(not 0 <= c < len(classes) for c in item.labels):
                raise ValueError(f"{item.name}: labels {item.labels} outside 0..{len(classes) - 1}")
            if not _encodable(item.name):
                raise ValueError(f"{item.name!r}: a report name must be valid UTF-8 (the listings make it so "
                                 f"with effnetv2.pipeline.sharder.sources.printable)")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def pool_context() -> mp.context.BaseContext:
    """Worker processes start clean (forkserver on Linux), never as forks of a parent that may run
    threads (torch, tqdm); scripts calling the API therefore need an ``if __name__ == "__main__"`` guard."""
    return mp.get_context("forkserver" if sys.platform.startswith("linux") else "spawn")


def process_pool(workers: int, initializer: Callable | None = None, initargs: tuple = ()) -> ProcessPoolExecutor:
    """A process pool (:func:`pool_context`) whose workers exit as soon as this process is gone, also
    after ``kill -9``.

    Each worker watches a pipe whose only write end this process holds: end of file means the parent
    died. Without it the workers of a killed run wait for tasks forever, and the forkserver and the
    resource tracker, which live as long as any worker does, with them. (``PR_SET_PDEATHSIG`` would not
    do: a forkserver worker's parent is the forkserver, which outlives the run for the same reason.)
    """
    ctx = pool_context()
    lifeline, keep = ctx.Pipe(duplex=False)
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_start_worker,
                               initargs=(lifeline, initializer, initargs))
    pool._effnetv2_lifeline = (lifeline, keep)  # the write end lives (open) exactly as long as the pool
    return pool


def _start_worker(lifeline, initializer: Callable | None, initargs: tuple) -> None:
    threading.Thread(target=_exit_with_parent, args=(lifeline,), name="parent-watch", daemon=True).start()
    if initializer is not None:
        initializer(*initargs)


def _exit_with_parent(lifeline) -> None:
    try:
        lifeline.recv_bytes()  # nothing is ever sent: this returns only at end of file, when the parent is gone
    except (EOFError, OSError):
        pass
    os._exit(1)


def _run_tasks(tasks: list[tuple[ShardTask, str]], out: Path, content: ContentOptions, workers: int,
               progress: bool) -> dict[str, dict]:
    """Write the given shards, in a process pool unless ``workers`` is 1; returns records by shard."""
    from tqdm import tqdm

    global _on_image
    total = sum(len(t.items) for t, _ in tasks)
    bar = tqdm(total=total, unit="img", desc="shard", disable=not progress, smoothing=0.1)
    records = {}
    try:
        if workers <= 1 or len(tasks) <= 1:
            _on_image = lambda: bar.update(1)  # noqa: E731
            for task, fp in tasks:
                records[task.name] = write_shard(task, out, content, fp)
            return records
        counter = pool_context().Value("q", 0)
        pool = process_pool(min(workers, len(tasks)), _count_into, (counter,))
        try:
            pending = {pool.submit(write_shard, t, out, content, fp): t for t, fp in tasks}
            while pending:
                done, _ = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                for future in done:
                    task = pending.pop(future)
                    records[task.name] = future.result()
                bar.update(counter.value - bar.n)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return records
    finally:
        _on_image = lambda: None  # noqa: E731
        bar.close()


def write_shard_set(out: str | Path, splits: dict[str, Iterable[SourceItem]], classes: Sequence[str], *,
                    shard_size: int | None = 1000, shard_bytes: int | None = None, seed: int = 0,
                    quality: int = 95, max_side: int | None = None, workers: int | None = None,
                    extra_info: dict | None = None, multilabel: bool | None = None,
                    part: tuple[int, int] | str = (0, 1), resume: bool = False,
                    listing_rejected: Iterable[tuple[str, str]] = (), progress: bool = False,
                    ) -> ShardSet | None:
    """Shard ``splits`` (name -> items, in a deterministic order) into ``out``.

    Returns the finished :class:`ShardSet`; for ``part`` i/n with n > 1 it writes only every n-th
    shard and returns None (run :func:`merge_parts` once all parts are done). ``resume`` skips the
    shards an interrupted run finished, giving the same files as an uninterrupted run.
    ``listing_rejected`` are (name, reason) pairs a source dropped before sharding (e.g. unsafe tar
    member names); they go to ``rejected.tsv`` with the images rejected here. ``multilabel`` (default:
    whether any item has several labels) adds the ``labels`` member to every sample.

    An existing shard set in ``out`` is never overwritten: ``resume=True`` on a finished set checks
    that it was made from the same inputs and options and returns it. With ``workers`` > 1 the pool
    starts fresh processes, so a script calling this needs an ``if __name__ == "__main__":`` guard.
    """
    out = Path(out)
    i, n = parse_part(part)
    splits = {name: list(items) for name, items in splits.items()}
    classes = [str(c) for c in classes]
    _check_inputs(splits, classes)
    if shard_bytes is None and not (shard_size and shard_size > 0):
        raise ValueError("shard_size must be a positive number of samples (or give shard_bytes)")
    if shard_bytes is not None and shard_bytes <= 0:
        raise ValueError("shard_bytes must be positive")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality {quality}: must be within 1..100")
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side {max_side}: must be positive")
    if multilabel is None:
        multilabel = any(len(item.labels) > 1 for items in splits.values() for item in items)
    content = ContentOptions(quality=quality, max_side=max_side, multilabel=multilabel)
    plan = plan_shards(splits, seed=seed, shard_size=None if shard_bytes else shard_size,
                       shard_bytes=shard_bytes)
    fingerprints = {t.name: t.fingerprint(content) for tasks in plan.values() for t in tasks}
    options = {"shard_size": None if shard_bytes else shard_size, "shard_bytes": shard_bytes, **asdict(content)}
    plan_hash = hashlib.blake2b(json.dumps([seed, options, classes, fingerprints], sort_keys=True).encode(),
                                digest_size=16).hexdigest()

    if not resume and (out / MANIFEST).exists():
        raise FileExistsError(f"{out / MANIFEST} exists: {out} already holds a shard set; write to a new "
                              f"folder, or pass --resume to finish an interrupted run")
    (out / PARTS).mkdir(parents=True, exist_ok=True)
    mine = [t for tasks in plan.values() for t in tasks if t.index % n == i]
    records, todo = {}, []
    for task in mine:
        if not resume and (_record_path(out, task).exists() or (out / task.name).exists()):
            raise FileExistsError(f"{out / task.name}: shards of an earlier run are in {out}; pass --resume "
                                  f"to finish that run, or write to a new folder")
        record = _finished_record(out, task, fingerprints[task.name]) if resume else None
        if record is None:
            todo.append((task, fingerprints[task.name]))
        else:
            records[task.name] = record

    start = time.perf_counter()
    records.update(_run_tasks(todo, out, content, workers or len(os.sched_getaffinity(0)), progress))
    seconds = time.perf_counter() - start
    info = {**(extra_info or {}),
            "classes": classes, "num_classes": len(classes), "class_list_hash": class_list_hash(classes),
            "multilabel": multilabel, "seed": seed, "options": options,
            "tool": "effnetv2", "version": __version__}
    info.setdefault("release", None)
    part_file = {"plan": plan_hash, "part": i, "num_parts": n, "info": info,
                 "planned_shards": {split: len(tasks) for split, tasks in plan.items()},
                 "records": [records[t.name] for t in mine],
                 "listing_rejected": [list(r) for r in listing_rejected]}
    atomic.write_json(out / PARTS / f"part-{i}-of-{n}.json", part_file, sort_keys=True)
    if progress:
        done = sum(len(t.items) for t, _ in todo)
        rate = f"{done / seconds:.0f} imgs/s" if seconds > 0 and done else "nothing left to do"
        print(f"effnetv2 shard: part {i}/{n}: {len(todo)} shard(s) written, "
              f"{len(mine) - len(todo)} already finished; {rate}", file=sys.stderr)
    if n > 1:
        return None
    return merge_parts(out, plan=plan_hash)


# ---- merging parts into the manifest ----

def _load_parts(out: Path, plan: str | None) -> list[dict]:
    files = sorted((out / PARTS).glob("part-*-of-*.json"))
    parts = [json.loads(f.read_text(encoding="utf-8")) for f in files]
    if plan is not None:
        parts = [p for p in parts if p["plan"] == plan]
    if not parts:
        raise FileNotFoundError(f"{out / PARTS}: no part files; run 'effnetv2 shard ...' first")
    plans = {p["plan"] for p in parts}
    if len(plans) > 1:
        raise ValueError(f"{out / PARTS}: part files of {len(plans)} different runs "
                         f"({', '.join(f.name for f in files)}); keep those of one run only")
    n = parts[0]["num_parts"]
    have = {p["part"] for p in parts if p["num_parts"] == n}
    missing = sorted(set(range(n)) - have)
    if missing or len(parts) != n:
        raise FileNotFoundError(f"{out / PARTS}: parts {missing or '?'} of {n} are missing; run them "
                                f"with --part i/{n} first")
    return sorted(parts, key=lambda p: p["part"])


def _tsv_field(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def write_tsv(path: Path, columns: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    """A tab-separated report with a header line (tabs, newlines and backslashes escaped), atomically."""
    lines = ["\t".join(columns) + "\n"] + ["\t".join(map(_tsv_field, row)) + "\n" for row in rows]
    atomic.write_text(path, "".join(lines))


def _split_stats(records: list[dict]) -> dict:
    total = Counter()
    converted, rejected = Counter(), Counter()
    for r in records:
        total.update(r["stats"])
        converted.update(r["converted_by_reason"])
        rejected.update(reason.split(":")[0] for _, reason in r["rejected"])
    count = total["count"]
    return {"count": count, "copied": total["copied"], "converted": total["converted"],
            "rejected": total["rejected"], "bytes": total["bytes"],
            "mean_width": round(total["sum_width"] / count, 1) if count else 0.0,
            "mean_height": round(total["sum_height"] / count, 1) if count else 0.0,
            "converted_by_reason": dict(sorted(converted.items())),
            "rejected_by_reason": dict(sorted(rejected.items()))}


def merge_parts(out: str | Path, *, plan: str | None = None) -> ShardSet:
    """Combine the part files in ``out/_parts`` into ``_info.json`` and ``rejected.tsv``."""
    out = Path(out)
    parts = _load_parts(out, plan)
    info = dict(parts[0]["info"])
    by_name = {r["shard"]: r for p in parts for r in p["records"]}
    splits, stats, rejected = {}, {}, list(parts[0]["listing_rejected"])
    for split, planned in parts[0]["planned_shards"].items():
        records = []
        for k in range(planned):
            name = shard_name(split, k)
            if name not in by_name:
                raise FileNotFoundError(f"{out}: shard {name} was planned but no part wrote it")
            records.append(by_name[name])
        written = [r for r in records if r["length"]]
        splits[split] = {"name": split, "num_samples": sum(r["length"] for r in written),
                         "filenames": [r["shard"] for r in written],
                         "shard_lengths": [r["length"] for r in written]}
        stats[split] = _split_stats(records)
        rejected += [entry for r in records for entry in r["rejected"]]
    stats["total"] = _split_stats([r for p in parts for r in p["records"]])
    stats["total"]["rejected_at_listing"] = len(parts[0]["listing_rejected"])
    info.update(splits=splits, image_stats=stats)
    write_tsv(out / REJECTED, ("path", "reason"), rejected)
    write_manifest(out, info)
    return read_shard_set(out)


def summary(shard_set: ShardSet) -> str:
    """One line of counts for the end of a run."""
    info = shard_set.info
    total = info["image_stats"]["total"]
    rejected = total["rejected"] + total.get("rejected_at_listing", 0)
    per_split = ", ".join(f"{s.name} {s.num_samples}" for s in shard_set.splits.values())
    shards = sum(len(s.files) for s in shard_set.splits.values())
    extra = f", {info['duplicates_merged']} duplicates merged" if info.get("duplicates_merged") else ""
    where = f" (see {shard_set.root / REJECTED})" if rejected else ""
    return (f"effnetv2 shard: {total['count']} samples in {shards} shards ({per_split}); "
            f"{total['copied']} copied, {total['converted']} converted, {rejected} rejected{where}{extra}")
