"""``effnetv2 bench shard``: sharding imgs/s, and whether it is bound by the disk or by Python.

Inputs are the corpus look-alikes (:mod:`effnetv2.bench.corpus`) written as files twice: as JPEGs,
which the sharder checks and copies byte-for-byte (the common case), and as PNGs of the same pixels,
which it must decode and re-encode (the conversion case). For each input the same bytes are also
copied raw into one file (read, write, fsync: what ``cp`` does, the floor any sharder pays), and run
through the sharder's per-image check alone (:func:`~effnetv2.pipeline.sharder.images.check_image`, one process,
nothing written). If the sharder's imgs/s on JPEGs is close to the raw copy's, sharding is disk-bound;
if it is far below, compare one worker with the check alone: near it, the check is the cost; far
below it, the rest of the sharder (tar writing, fsyncs, process pool) is. Per-core figures are in the
notes column.

Both runs read inputs that were just written, hence from the page cache: on a cold disk both slow
down by the same read cost, which only makes the copy case more disk-bound.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from .report import Report, Row
from .timing import measure

RAW = "raw copy of the same bytes"
CHECK = "check_image only, 1 process"


def _to_png(paths: tuple[Path, Path]) -> Path:
    from PIL import Image

    jpeg, png = paths
    Image.open(jpeg).save(png, compress_level=1)
    return png


def make_inputs(folder: Path, n: int, seed: int, workers: int) -> dict[str, list[Path]]:
    """The JPEG look-alikes and PNG copies of the same pixels, as files."""
    from concurrent.futures import ProcessPoolExecutor

    from .corpus import write_jpegs

    jpegs = write_jpegs(folder / "jpeg", n, seed=seed, workers=workers)
    (folder / "png").mkdir()
    jobs = [(p, folder / "png" / f"{p.stem}.png") for p in jpegs]
    with ProcessPoolExecutor(workers) as pool:
        pngs = list(pool.map(_to_png, jobs, chunksize=16))
    return {"JPEG in (copied)": jpegs, "PNG in (converted)": pngs}


def raw_copy(files: list[Path], dest: Path) -> int:
    """Append every file's bytes to ``dest`` and fsync it; returns the file count."""
    with open(dest, "wb") as out:
        for f in files:
            with open(f, "rb") as src:
                out.write(src.read())
        out.flush()
        os.fsync(out.fileno())
    return len(files)


def check_files(files: list[Path]) -> int:
    """Read each file and run the sharder's per-image check/convert, writing nothing: the CPU floor."""
    from effnetv2.pipeline.sharder.images import check_image

    for f in files:
        check_image(f.read_bytes())
    return len(files)


def shard_files(files: list[Path], dest: Path, workers: int, shard_size: int) -> int:
    """Shard ``files`` (labels: index mod 10) with the project's sharder; returns the sample count."""
    from effnetv2.pipeline.sharder.writer import SourceItem, write_shard_set

    items = [SourceItem(f, (i % 10,), f.name) for i, f in enumerate(files)]
    shard_set = write_shard_set(dest, {"train": items}, [f"c{i}" for i in range(10)], shard_size=shard_size,
                                workers=workers)
    return shard_set.split("train").num_samples


def run_shard_bench(n: int = 1000, *, workers: int | None = None, reps: int = 3, shard_size: int = 256,
                    seed: int = 0, tmp: Path | None = None) -> Report:
    cores = len(os.sched_getaffinity(0))
    workers = workers or cores
    report = Report("shard", f"sharding imgs/s, {n} ImageNet-like images")
    report.config = {"n": n, "workers": workers, "reps": reps, "shard_size": shard_size, "seed": seed}
    counts = sorted({1, workers})
    full = f"effnetv2 shard, {workers} worker{'s' * (workers > 1)}"
    with tempfile.TemporaryDirectory(prefix="effnetv2-bench-shard-", dir=tmp) as root:
        root = Path(root)
        inputs = make_inputs(root / "in", n, seed, workers)
        for point, files in inputs.items():
            size = sum(f.stat().st_size for f in files)
            steps = {RAW: lambda f=files: _in_fresh_folder(root, lambda out: raw_copy(f, out / "all.bin")),
                     CHECK: lambda f=files: check_files(f)}
            for w in counts:
                steps[f"effnetv2 shard, {w} worker{'s' * (w > 1)}"] = lambda f=files, w=w: _in_fresh_folder(
                    root, lambda out: shard_files(f, out / "shards", w, shard_size))
            for series, timing in measure(steps, warmup=0, reps=reps, per_rep=1).items():
                w = 1 if series in (RAW, CHECK) else int(series.split(", ")[1].split()[0])
                mib_s = timing.median * size / len(files) / 2**20
                unit = "process" if series in (RAW, CHECK) else "worker"
                report.add(Row(series, point, timing, note=f"{mib_s:,.0f} MiB/s; {timing.median / w:,.0f} imgs/s "
                                                           f"per {unit}",
                               params={"workers": w, "bytes": size, "files": len(files)}))
            report.add_ratio("sharder / raw copy", point, full, RAW)
    report.notes.append("sharder / raw copy near 1 on JPEG input: disk-bound; far below 1: CPU/Python-bound")
    return report


def _in_fresh_folder(root: Path, work) -> int:
    """Run ``work(folder)`` in a new empty folder under ``root`` and delete the folder afterwards."""
    out = Path(tempfile.mkdtemp(prefix="out-", dir=root))
    try:
        return work(out)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=1000, help="images per input kind (default 1000)")
    p.add_argument("--workers", type=int, default=None, help="sharder processes (default: all cores); "
                                                              "1 worker is always measured too")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--tmp", type=Path, default=None,
                   help="folder on the disk to measure (default: the system temp folder)")


def run(args: argparse.Namespace) -> Report:
    return run_shard_bench(args.n, workers=args.workers, reps=args.reps, shard_size=args.shard_size, tmp=args.tmp)
