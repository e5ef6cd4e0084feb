"""``effnetv2 export CKPT_OR_RUN --format timm|safetensors|onnx|torchscript --out FILE [--weights ema|model]``.

A thin command over :func:`effnetv2.recipes.inference.export.export_model`: the run's model with its EMA
(default) or raw weights, its class names (``classes.json``, see :mod:`effnetv2.recipes.inference.run`) and
its eval preprocessing (size and crop) go into the export's JSON; what loads it is printed.
Exit status: 0 written, 1 a failure (named on one line; nothing is written), 2 a usage error.
"""

from __future__ import annotations

import argparse
import sys

from effnetv2.recipes.inference.export import FORMATS
from effnetv2.recipes.inference.run import WEIGHTS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="CKPT_OR_RUN",
                        help="a checkpoint (ckpt-*.pt) or a run folder (its newest valid checkpoint)")
    parser.add_argument("--format", choices=FORMATS, required=True,
                        help="timm: timm's tf_efficientnetv2_* layout (official architectures); safetensors: "
                             "ours, for load_weights; onnx; torchscript")
    parser.add_argument("--out", required=True, metavar="FILE", help="the model file; FILE.json goes beside it")
    parser.add_argument("--weights", choices=WEIGHTS, default="ema", help="EMA (default) or raw weights")
    parser.add_argument("--model", help="the architecture expected (refuses a checkpoint of another one)")
    parser.add_argument("--image-size", type=int, help="default: the size the run evaluated at")
    parser.add_argument("--crop-ratio", type=float, help="centre crop of the shorter side (default: the run's)")


def run(args: argparse.Namespace) -> int:
    from effnetv2.recipes.inference.export import ExportError, ExportMeta, export_model
    from effnetv2.recipes.inference.run import RunError, load_run

    try:
        loaded = load_run(args.source, weights=args.weights, device="cpu", model=args.model)
    except RunError as e:
        return _say(str(e), 1)
    if loaded.classes.note:
        _say(f"note: {loaded.classes.note}", 0)
    meta = ExportMeta(classes=None if loaded.classes.generic else loaded.classes.names,
                      image_size=args.image_size or loaded.eval_size,
                      crop_ratio=loaded.cfg.eval_crop if args.crop_ratio is None else args.crop_ratio,
                      source=loaded.source)
    try:
        done = export_model(loaded.model, args.format, args.out, meta=meta)
    except ExportError as e:
        return _say(str(e), 1)
    print(done.describe())
    return 0


def _say(message: str, code: int) -> int:
    print(f"effnetv2 export: {' '.join(message.split())}", file=sys.stderr)
    return code
