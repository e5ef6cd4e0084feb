"""``effnetv2 eval CKPT_OR_RUN [--data SHARDS] [--split val] [--image-size S] [--crop-ratio R] [--tta flip]
[--weights ema|model] [--per-class] [--plot PNG] [--json FILE|-]``: score a trained model on a shard set.

Single-label sets: top-1/top-5 and loss; multi-label sets (ImageNet-21k style ``labels`` members): top-1
against any of the labels, mAP, precision@1/@5 and loss. The numbers are the trainer's own
(:func:`~effnetv2.recipes.engine.evaluate.run_evaluation` on the trainer's eval loader); every default
(data, split, eval size and crop, model, padding, batch, amp) is the run's. Several processes:
``torchrun --nproc_per_node N -m effnetv2.recipes.cli.eval ...``, every sample counted once.
Exit status: 0 done, 1 a failure (named on one line), 2 a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from effnetv2.pipeline.format import atomic
from effnetv2.pipeline.loaders.backend import ALIASES, BACKENDS
from effnetv2.recipes.engine import distributed
from effnetv2.recipes.engine.evaluate import TTA, eval_loader, run_evaluation
from effnetv2.recipes.engine.step import AMP, resolve_amp
from effnetv2.recipes.inference.run import WEIGHTS, LoadedRun, RunError, load_run

REPORT_FORMAT = "effnetv2-eval/1"
PLOT_MAX_CLASSES = 1000


class UsageError(ValueError):
    """Options that cannot go together with this data (exit status 2)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="CKPT_OR_RUN",
                        help="a checkpoint (ckpt-*.pt) or a run folder (its newest valid checkpoint)")
    parser.add_argument("--data", help="shard set folder (default: the run's)")
    parser.add_argument("--split", help="split to score (default: the run's eval split)")
    parser.add_argument("--image-size", type=int, help="default: the size the run evaluated at")
    parser.add_argument("--crop-ratio", type=float,
                        help="centre crop of the shorter side, (0, 1] (default: the run's, else the official "
                             "S/(S+32) below 320 px and the whole image from 320 px)")
    parser.add_argument("--backend", choices=BACKENDS + tuple(ALIASES), help="loader backend (default: the run's)")
    parser.add_argument("--tta", choices=TTA, help="flip: mean logits of the image and its mirror")
    parser.add_argument("--weights", choices=WEIGHTS, default="ema", help="EMA (default) or raw weights")
    parser.add_argument("--model", help="the architecture expected (refuses a checkpoint of another one)")
    parser.add_argument("--per-class", action="store_true",
                        help="per-class accuracy (average precision on multi-label sets) and the confusion "
                             "matrix in the JSON")
    parser.add_argument("--plot", metavar="PNG", help="write the confusion matrix as a PNG (single-label sets)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE; '-' prints the JSON "
                                                        "to stdout instead of the text")
    parser.add_argument("--batch-size", type=int, help="global eval batch (default: the run's)")
    parser.add_argument("--device", choices=distributed.DEVICES, default="auto")
    parser.add_argument("--amp", choices=tuple(AMP), help="default: the run's")
    parser.add_argument("--workers", type=int, help="loader workers/threads (default: the loader's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.batch_size is not None and args.batch_size < 1:
        return _fail(f"--batch-size must be >= 1, got {args.batch_size}", 2)
    if args.image_size is not None and args.image_size < 8:
        return _fail(f"--image-size must be >= 8, got {args.image_size}", 2)
    try:
        info = distributed.init(args.device)
    except (RuntimeError, ValueError) as e:
        return _fail(str(e), 2)
    try:
        report = evaluate_run(args, info)
    except UsageError as e:
        return _fail(str(e), 2, info)
    except (RunError, ValueError, OSError, RuntimeError) as e:
        return _fail(str(e), 1, info)
    distributed.shutdown()
    if not info.is_main:
        return 0
    if args.json == "-":
        print(json.dumps(report, indent=1))
    else:
        print(format_report(report))
        if args.json:
            print(f"json: {args.json}")
    if args.plot:
        print(f"plot: {args.plot}", file=sys.stdout if args.json != "-" else sys.stderr)
    return 0


def evaluate_run(args: argparse.Namespace, info: distributed.DistInfo) -> dict:
    """Load the run, score it, write --json/--plot on rank 0; returns the report (the JSON's content)."""
    from effnetv2.pipeline.format import read_shard_set
    from effnetv2.pipeline.loaders.geometry import eval_crop_ratio

    loaded = load_run(args.source, weights=args.weights, device=info.device, model=args.model,
                      store_classes=info.is_main)
    cfg, model = loaded.cfg, loaded.model
    data = args.data or cfg.data
    if not data:
        raise UsageError(f"{loaded.checkpoint}: its config names no shard set; pass --data")
    shards = read_shard_set(data)
    split = args.split or cfg.eval_split or "val"
    if split not in shards.splits:
        raise UsageError(f"{shards.root}: no split {split!r}; it has {', '.join(sorted(shards.splits))}")
    n = model.num_classes
    _check_classes(shards, n, loaded)
    if args.plot and shards.multilabel:
        raise UsageError(f"--plot draws the confusion matrix of a single-label set; {shards.root} is multi-label")
    if args.plot and n > PLOT_MAX_CLASSES:
        raise UsageError(f"--plot draws up to {PLOT_MAX_CLASSES} classes; the model has {n} (use --per-class)")
    size = args.image_size or loaded.eval_size
    crop = cfg.eval_crop if args.crop_ratio is None else args.crop_ratio
    try:
        ratio = eval_crop_ratio(size, crop)
    except ValueError as e:
        raise UsageError(f"--crop-ratio: {e}") from None
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    ecfg = dataclasses.replace(cfg, eval_split=split, eval_crop=crop,
                               eval_batch_size=args.batch_size or cfg.eval_batch_size,
                               backend=args.backend or cfg.backend,
                               num_workers=cfg.num_workers if args.workers is None else args.workers)
    loader = eval_loader(ecfg, shards, info, n, size)
    backend = loader.backend_name
    amp = resolve_amp(args.amp or cfg.amp, info.device)
    per_class = args.per_class or bool(args.plot)
    result = run_evaluation(model, loader, amp_dtype=amp, multilabel=shards.multilabel, tta=args.tta,
                            confusion=per_class and not shards.multilabel, average_precision=shards.multilabel,
                            scores="sigmoid" if cfg.loss == "bce" else "softmax",
                            progress=info.is_main and not args.no_progress)
    names = list(shards.classes) if len(shards.classes) == n else list(loaded.classes.names)
    report = {
        "format": REPORT_FORMAT, "checkpoint": str(loaded.checkpoint), "step": loaded.step,
        "weights": loaded.weights, "model": cfg.model, "num_classes": n, "data": str(shards.root), "split": split,
        "multilabel": shards.multilabel, "image_size": size, "crop_ratio": ratio, "tta": args.tta,
        "backend": backend, "world_size": info.world_size, "device": info.device.type,
        "amp": None if amp is None else str(amp).removeprefix("torch."), "metrics": result.metrics,
    }
    if args.per_class:
        if shards.multilabel:
            report["per_class"] = [
                {"index": i, "name": names[i], "positives": int(p),
                 "ap": None if torch.isnan(ap) else float(ap)}
                for i, (ap, p) in enumerate(zip(result.class_ap, result.class_positives))]
        else:
            conf = result.confusion.tolist()
            report["per_class"] = [
                {"index": i, "name": names[i], "samples": sum(row), "correct": row[i],
                 "top1": row[i] / sum(row) if sum(row) else None} for i, row in enumerate(conf)]
            report["confusion"] = conf
    if info.is_main:
        if args.plot:
            plot_confusion(result.confusion, names, Path(args.plot),
                           f"{cfg.model} on {shards.root.name}/{split}: top-1 {100 * result.metrics['top1']:.2f}%")
        if args.json and args.json != "-":
            atomic.write_json(args.json, report)
    return report


def _check_classes(shards, n: int, loaded: LoadedRun) -> None:
    """A shard set of another class count is refused, unless the run itself trained this head size on a
    shard set with fewer classes (``num_classes=`` set in its config)."""
    have = shards.num_classes
    if not have or have == n or (loaded.cfg.num_classes == n and have < n):
        return
    raise RunError(f"{shards.root}: {have} classes, but the model in {loaded.checkpoint} has {n} outputs; "
                   "evaluate it on a shard set of its own label set")


def format_report(r: dict) -> str:
    """The report for a person: what was scored, the metrics, and the per-class table if asked."""
    m = r["metrics"]
    lines = [f"effnetv2 eval: {r['checkpoint']} ({r['weights']} weights, step {r['step']}): {r['model']}, "
             f"{r['num_classes']} classes",
             f"data: {r['data']} split {r['split']!r}: {m['eval_samples']} images at {r['image_size']} px, centre "
             f"crop {r['crop_ratio']:.4g}, tta {r['tta'] or 'none'}, backend {r['backend']}, "
             f"{r['world_size']} rank(s) on {r['device']}, amp {r['amp'] or 'none'}"]
    if r["multilabel"]:
        lines.append(f"top-1 (any label) {100 * m['top1']:.2f}%  top-5 {100 * m['top5']:.2f}%  mAP "
                     f"{100 * m['mAP']:.2f}% ({m['map_classes']} classes with positives)  precision@1 "
                     f"{100 * m['precision@1']:.2f}%  precision@5 {100 * m['precision@5']:.2f}%  "
                     f"loss {m['eval_loss']:.4f}")
    else:
        lines.append(f"top-1 {100 * m['top1']:.2f}%  top-5 {100 * m['top5']:.2f}%  loss {m['eval_loss']:.4f}")
    rows = r.get("per_class")
    if rows:
        width = max(12, *(len(row["name"]) for row in rows))
        if r["multilabel"]:
            lines.append(f"\nclass  {'name':<{width}}  positives       AP")
            lines += [f"{row['index']:>5}  {row['name']:<{width}}  {row['positives']:>9}  "
                      + ("      -" if row["ap"] is None else f"{100 * row['ap']:6.2f}%") for row in rows]
        else:
            lines.append(f"\nclass  {'name':<{width}}  samples  correct    top-1")
            lines += [f"{row['index']:>5}  {row['name']:<{width}}  {row['samples']:>7}  {row['correct']:>7}  "
                      + ("      -" if row["top1"] is None else f"{100 * row['top1']:6.2f}%") for row in rows]
    return "\n".join(lines)


def plot_confusion(confusion: torch.Tensor, names: list[str], path: Path, title: str) -> Path:
    """The confusion matrix as a PNG: rows are the true classes, each normalised to 1; counts written in
    the cells of small matrices. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    counts = confusion.double()
    frac = (counts / counts.sum(1, keepdim=True).clamp_min(1)).numpy()
    side = min(max(5.0, 0.3 * n + 2.5), 30.0)
    fig, ax = plt.subplots(figsize=(side, side))
    image = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    if n <= 60:
        ax.set_xticks(range(n), names, rotation=90, fontsize=8)
        ax.set_yticks(range(n), names, fontsize=8)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=8,
                            color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class (top-1)")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic.atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path


def _fail(message: str, code: int, info: distributed.DistInfo | None = None) -> int:
    if info is not None:
        distributed.shutdown()
    if info is None or info.is_main:
        print(f"effnetv2 eval: {' '.join(message.split())}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    from effnetv2.recipes.cli.main import command

    return command("eval", argv)


if __name__ == "__main__":
    sys.exit(main())
