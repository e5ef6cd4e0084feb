"""``effnetv2 predict CKPT_OR_RUN IMAGE_OR_FOLDER... [--top-k 5] [--format csv|jsonl] [--out FILE]``.

The top classes of each image (a folder is searched recursively for image files), named from the run's
``classes.json`` (:mod:`effnetv2.recipes.inference.run`); images are prepared as the eval loader prepares
them, at the run's eval size and crop (:mod:`effnetv2.recipes.inference.predict`).

Output: CSV (``file,class_1,index_1,score_1,...,class_k,index_k,score_k``, one row per image) or JSON
lines (``{"file", "top": [{"class", "index", "score"}, ...]}``), to stdout as they come or to ``--out``
(written atomically at the end). A file that cannot be read is reported on stderr and skipped.
Exit status: 0 every file predicted, 1 some file could not be read (the others are still written) or the
run could not be loaded, 2 a usage error.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys

from tqdm import tqdm

from effnetv2.recipes.engine import distributed
from effnetv2.recipes.engine.evaluate import TTA
from effnetv2.recipes.inference.run import WEIGHTS, RunError, load_run

FORMATS = ("csv", "jsonl")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="CKPT_OR_RUN",
                        help="a checkpoint (ckpt-*.pt) or a run folder (its newest valid checkpoint)")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and folders of them")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    parser.add_argument("--format", choices=FORMATS, default="csv", help="csv (default) or jsonl")
    parser.add_argument("--out", metavar="FILE", help="write here (atomically) instead of stdout")
    parser.add_argument("--weights", choices=WEIGHTS, default="ema", help="EMA (default) or raw weights")
    parser.add_argument("--model", help="the architecture expected (refuses a checkpoint of another one)")
    parser.add_argument("--image-size", type=int, help="default: the size the run evaluated at")
    parser.add_argument("--crop-ratio", type=float, help="centre crop of the shorter side (default: the run's)")
    parser.add_argument("--tta", choices=TTA, help="flip: mean logits of the image and its mirror")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", choices=distributed.DEVICES, default="auto")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from effnetv2.pipeline.loaders.geometry import eval_crop_ratio
    from effnetv2.recipes.engine.step import resolve_amp
    from effnetv2.recipes.inference.predict import Failure, list_images, predict_files

    for name, value, low in (("--top-k", args.top_k, 1), ("--batch-size", args.batch_size, 1),
                             ("--image-size", args.image_size, 8)):
        if value is not None and value < low:
            return _say(f"{name} must be >= {low}, got {value}", 2)
    try:
        device = distributed.resolve_device(args.device)
        loaded = load_run(args.source, weights=args.weights, device=device, model=args.model)
    except RunError as e:
        return _say(str(e), 1)
    except RuntimeError as e:  # --device cuda without a GPU
        return _say(str(e), 2)
    size = args.image_size or loaded.eval_size
    crop = loaded.cfg.eval_crop if args.crop_ratio is None else args.crop_ratio
    try:
        eval_crop_ratio(size, crop)
    except ValueError as e:
        return _say(f"--crop-ratio: {e}", 2)
    if loaded.classes.note:
        _say(f"note: {loaded.classes.note}", 0)
    files, failures = list_images(args.inputs)
    missing = len(failures)
    for failure in failures:
        _say(str(failure), 0)
    if not files:
        return _say(f"no image files in {' '.join(args.inputs)}", 1)
    names = loaded.classes.names
    out = io.StringIO() if args.out else sys.stdout
    write = _writer(out, args.format, min(args.top_k, loaded.model.num_classes))
    bar = tqdm(total=len(files), unit="img", disable=args.no_progress, dynamic_ncols=True, desc="predict")
    try:
        for item in predict_files(loaded.model, files, image_size=size, crop_ratio=crop, top_k=args.top_k,
                                  batch_size=args.batch_size, tta=args.tta,
                                  scores="sigmoid" if loaded.cfg.loss == "bce" else "softmax",
                                  amp_dtype=resolve_amp(loaded.cfg.amp, device)):
            bar.update(1)
            if isinstance(item, Failure):
                failures.append(item)
                bar.clear()
                _say(str(item), 0)
                continue
            write(str(item.path), [(names[i], i, s) for i, s in zip(item.indices, item.scores)])
    finally:
        bar.close()
    if args.out:
        from effnetv2.pipeline.format import atomic

        try:
            atomic.write_text(args.out, out.getvalue())
        except OSError as e:
            return _say(f"{args.out}: cannot write: {e.strerror or e}", 1)
    if failures:
        return _say(f"{len(failures)} of {len(files) + missing} input(s) could not be read; the others are written", 1)
    return 0


def _writer(out, fmt: str, k: int):
    """A function writing one image's row: ``write(file, [(class name, index, score), ...])``."""
    if fmt == "jsonl":
        def write_json(path: str, top: list) -> None:
            out.write(json.dumps({"file": path, "top": [{"class": c, "index": i, "score": round(s, 6)}
                                                        for c, i, s in top]}) + "\n")
            out.flush()
        return write_json
    rows = csv.writer(out, lineterminator="\n")
    rows.writerow(["file"] + [f"{col}_{r}" for r in range(1, k + 1) for col in ("class", "index", "score")])

    def write_csv(path: str, top: list) -> None:
        rows.writerow([path] + [v for c, i, s in top for v in (c, i, f"{s:.6f}")])
        out.flush()
    return write_csv


def _say(message: str, code: int) -> int:
    print(f"effnetv2 predict: {' '.join(message.split())}", file=sys.stderr)
    return code
