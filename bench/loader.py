"""``effnetv2 bench loader``: imgs/s of our train loaders beside the peers users pick instead, in one run.

Series (each at every point, i.e. stage size + RandAugment magnitude + mixup/cutmix alpha):

- ``ours dali-gpu`` / ``ours dali-cpu`` / ``ours opencv``: :func:`build_train_loader` with the
  full official RandAugment (2 of 16 ops) at the point's magnitude and mixup/cutmix at its alpha,
  batches delivered normalised, channels_last, on the device.
- ``peer torchvision`` / ``peer albumentations``: see :mod:`effnetv2.bench.peers`; the torchvision peer
  runs in ``--peer-python`` when torchvision does not import here.
- ``ceiling dali-crop-decode`` (per point) and ``ceiling pil-decode`` / ``ceiling dali-decode``
  (measured once: a full decode does not depend on the output size).

Default points: the official EfficientNetV2-S plan's four stages (171/214/257/300 px at magnitude
5/6.67/8.33/10, no mixup), plus 128/224/300 px at magnitude 9, the conditions of the reference table in
``loading-pitfalls.md``. Ratios: our best CPU path over each peer at every point (goals: >= 1.5x the
torchvision pipeline, >= 1.0x the albumentations one).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, replace
from pathlib import Path

from .peers import PeerConfig, Point, measure_peer, missing, run_elsewhere
from .report import Report, Row, machine
from .timing import Timing, measure

REFERENCE_POINTS = (Point(128, 9), Point(224, 9), Point(300, 9))
# (backend, device) -> series name, and the ``usable_backends`` key of ``effnetv2 doctor`` that says if it runs
OURS = {("dali", "cuda"): ("ours dali-gpu", "dali-gpu"), ("dali", "cpu"): ("ours dali-cpu", "dali-cpu"),
        ("opencv", "cpu"): ("ours opencv", "opencv")}
DECODE_POINT = "decode only"


def plan_points(model: str = "efficientnetv2-s", preset: str = "official") -> list[Point]:
    """One point per stage of the model's progressive plan."""
    from effnetv2.recipes.engine.plan import make_plan

    return [Point(s.image_size, round(s.randaug_magnitude, 2), round(s.mixup_alpha, 3), round(s.cutmix_alpha, 3))
            for s in make_plan(model, preset, epochs=1, batch_size=1)]


def default_points() -> list[Point]:
    return plan_points() + list(REFERENCE_POINTS)


def measure_ours(shards: Path, backend: str, device: str, point: Point, cfg: PeerConfig, *, warmup: int,
                 reps: int, per_rep: int) -> Timing:
    """Time one of our train loaders over as many epochs as it takes; the loader is closed afterwards."""
    import torch

    from effnetv2.pipeline.loaders.loader import build_train_loader

    loader = build_train_loader(shards, cfg.batch_size, point.size, point.magnitude, point.mixup, point.cutmix,
                                num_classes=None, device=device, backend=backend, seed=cfg.seed,
                                num_workers=cfg.workers)

    def batches():
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            for images, _ in loader:
                yield images.shape[0]
            epoch += 1

    stream = batches()
    try:
        sync = torch.cuda.synchronize if device == "cuda" else None
        return measure({"ours": lambda: next(stream)}, warmup=warmup, reps=reps, per_rep=per_rep, sync=sync)["ours"]
    finally:
        stream.close()
        loader.close()


def _peer_rows(peer: str, shards: Path, points: list[Point], cfg: PeerConfig, timing_args: dict,
               peer_python: str | None, device: str) -> tuple[list[dict], dict | None]:
    """Measure a peer here, or in ``peer_python`` when it cannot run here; returns results and versions."""
    reason = missing(peer)
    if reason is None or not peer_python:
        results = measure_peer(peer, shards, points, cfg, device=device, **timing_args)
        if reason:
            for r in results:
                r["note"] += "; pass --peer-python PYTHON naming an interpreter that has it"
        return results, None
    argv = ["--peer", peer, "--shards", str(shards), "--points", ",".join(_point_arg(p) for p in points),
            "--config", json.dumps(asdict(cfg)), "--device", device,
            "--warmup", str(timing_args["warmup"]), "--reps", str(timing_args["reps"]),
            "--per-rep", str(timing_args["per_rep"])]
    try:
        out = run_elsewhere(peer_python, "bench.peers", argv)
    except (OSError, RuntimeError, ValueError) as e:
        return [{"point": asdict(p), "status": "error", "note": str(e)[-300:], "timing": None} for p in points], None
    v = out["versions"]
    for r in out["results"]:
        r["note"] = (r["note"] + f" in {peer_python} (torch {v.get('torch')}, torchvision {v.get('torchvision')})").strip()
    return out["results"], v


def _point_arg(p: Point) -> str:
    return f"{p.size}@{p.magnitude:g}+{p.mixup:g}+{p.cutmix:g}"


def _add_result(report: Report, series: str, point: str, result: dict, params: dict) -> None:
    timing = Timing.from_dict(result["timing"]) if result.get("timing") else None
    report.add(Row(series, point, timing, result["status"], result.get("note", ""), params))


def _measure_all_ours(report: Report, shards: Path, points: list[Point], cfg: PeerConfig, wanted,
                      timing_args: dict) -> None:
    from effnetv2.recipes.cli.doctor import collect, usable_backends

    usable = usable_backends(collect())
    for (backend, device), (series, key) in OURS.items():
        if not wanted(series):
            continue
        for p in points:
            params = {**asdict(p), "backend": backend, "device": device}
            if usable[key]:
                report.add(Row(series, p.label, None, "n/a", usable[key], params))
                continue
            try:
                timing = measure_ours(shards, backend, device, p, cfg, **timing_args)
                report.add(Row(series, p.label, timing, params=params))
            except Exception as e:  # noqa: BLE001 - report it and go on with the other series
                report.add(Row(series, p.label, None, "error", f"{type(e).__name__}: {e}", params))


def _add_ratios(report: Report, points: list[Point]) -> None:
    """Per point: our best CPU path, and DALI GPU when measured, over each peer."""
    for p in points:
        ours = [r for r in report.rows if r.point == p.label and r.timing and r.series.startswith("ours ")]
        cpu = [r for r in ours if r.series != "ours dali-gpu"]
        best = [max(cpu, key=lambda r: r.timing.median)] if cpu else []
        for row in best + [r for r in ours if r.series == "ours dali-gpu"]:
            name = f"best CPU ({row.series})" if row in best else row.series
            for peer in ("torchvision", "albumentations"):
                report.add_ratio(f"{name} / peer {peer}", p.label, row.series, f"peer {peer}")


def run_loader_bench(shards: Path, points: list[Point], cfg: PeerConfig, *, warmup: int = 3, reps: int = 5,
                     per_rep: int = 6, peer_python: str | None = None, only: list[str] | None = None) -> Report:
    """Measure every series at every point, one series after the other (each loader runs alone on the
    machine); ``only`` keeps the series whose name contains one of its strings."""
    import torch

    from effnetv2.pipeline.format.shards import read_shard_set

    def wanted(series: str) -> bool:
        return not only or any(o in series for o in only)

    cfg = replace(cfg, num_classes=read_shard_set(shards).num_classes)  # the peers' one-hot width
    report = Report("loader", f"train loader imgs/s, batch {cfg.batch_size}, {cfg.workers} workers/threads")
    report.config = {"shards": str(shards), "points": [asdict(p) for p in points], **asdict(cfg),
                     "warmup_batches": warmup, "reps": reps, "batches_per_rep": per_rep,
                     "peer_python": peer_python}
    timing_args = {"warmup": warmup, "reps": reps, "per_rep": per_rep}
    _measure_all_ours(report, shards, points, cfg, wanted, timing_args)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where the peers deliver their batches
    versions = {}
    for peer in ("torchvision", "albumentations"):
        if wanted(f"peer {peer}"):
            results, v = _peer_rows(peer, shards, points, cfg, timing_args, peer_python, device)
            versions.update({f"peer_{peer}": v} if v else {})
            for p, r in zip(points, results):
                _add_result(report, f"peer {peer}", p.label, r, {**asdict(p), "device": device})
    if wanted("ceiling dali-crop-decode"):
        for p, r in zip(points, measure_peer("dali-crop-decode", shards, points, cfg, **timing_args)):
            _add_result(report, "ceiling dali-crop-decode", p.label, r, asdict(p))
    for peer in ("pil-decode", "dali-decode"):
        if wanted(f"ceiling {peer}"):
            (r,) = measure_peer(peer, shards, points[:1], cfg, **timing_args)
            _add_result(report, f"ceiling {peer}", DECODE_POINT, r, {})
    _add_ratios(report, points)
    report.notes.append("goals: best CPU path >= 1.5x peer torchvision and >= 1.0x peer albumentations; "
                        "DALI GPU >= 3x the model's training imgs/s (see bench e2e)")
    report.machine = machine({"peer_interpreters": versions} if versions else None)
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("shards", type=Path, help="shard set (e.g. made by 'effnetv2 bench corpus')")
    p.add_argument("--points", default=None,
                   help="comma-separated SIZE@MAGNITUDE[+MIXUP[+CUTMIX]] (default: the S plan's stages "
                        "171@5,214@6.67,257@8.33,300@10 and the reference 128@9,224@9,300@9)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="DataLoader workers / DALI threads for every loader (default: all cores)")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches per loader and point")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--per-rep", type=int, default=6, help="batches per timed repetition")
    p.add_argument("--only", default=None, help="comma-separated substrings of series names to run")
    p.add_argument("--peer-python", default=None,
                   help="a Python with torch + torchvision for the torchvision peer, e.g. /tmp/side/bin/python")


def run(args: argparse.Namespace) -> Report:
    points = [Point.parse(t) for t in args.points.split(",")] if args.points else default_points()
    cfg = PeerConfig(batch_size=args.batch_size, workers=args.workers)
    only = args.only.split(",") if args.only else None
    return run_loader_bench(args.shards, points, cfg, warmup=args.warmup, reps=args.reps, per_rep=args.per_rep,
                            peer_python=args.peer_python, only=only)
