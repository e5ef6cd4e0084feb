"""The loaders users pick instead of ours, written the way their users write them, over the same shards.

- ``torchvision``: torch DataLoader, PIL decode, ``RandomResizedCrop`` + flip + torchvision
  ``RandAugment(num_ops=2, magnitude=m)`` + ``ToTensor`` + ``Normalize`` in the workers.
- ``albumentations``: torch DataLoader, OpenCV decode, albumentations ``RandomResizedCrop`` + flip +
  ``SomeOf`` 2 of 14 of albumentations' own ops (rotate, shear x/y, translate x/y, auto-contrast,
  equalize, invert, posterize, solarize, brightness, contrast, saturation, sharpen) with ranges scaled
  by m/10 + ``Normalize`` + ``ToTensorV2``.
- ``pil-decode`` and ``dali-decode``: decode-only ceilings (PIL in DataLoader workers; DALI CPU with
  ``fn.decoders.image``), and ``dali-crop-decode``: DALI CPU ROI random-crop decode + resize to S, the
  front end of our DALI pipeline without RandAugment.

Every peer reads the shard set through its DALI index files (random access, shuffled per epoch), so
all of them do the same I/O and differ only in decode and augmentation. Batches are moved to
channels_last (and mixed with a per-batch Beta(alpha, alpha) mixup when the point asks for mixup, as
timm's batch mixup does), because that is what a trainer consumes and what our loaders deliver.

A peer that needs a package this interpreter lacks (torchvision does not import in the project's
environment on every machine) runs in another interpreter: ``python -m effnetv2.bench.peers`` works
in any Python with torch, numpy and PIL, given the package on ``PYTHONPATH`` (see :func:`run_elsewhere`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from effnetv2.pipeline.format.shards import read_index, read_shard_set

from .timing import measure

PEERS = ("torchvision", "albumentations", "pil-decode", "dali-decode", "dali-crop-decode")
_NEEDS = {"torchvision": ("torch", "torchvision", "PIL"), "albumentations": ("torch", "cv2", "albumentations"),
          "pil-decode": ("torch", "PIL"), "dali-decode": ("nvidia.dali",), "dali-crop-decode": ("nvidia.dali",)}


@dataclass(frozen=True)
class Point:
    """Where a loader is measured: output size, RandAugment magnitude (10 = nominal max), mixup and
    cutmix alpha (the official plans ramp both together; the peers do mixup only)."""

    size: int
    magnitude: float
    mixup: float = 0.0
    cutmix: float = 0.0

    @property
    def label(self) -> str:
        text = f"{self.size}px m{self.magnitude:g}"
        text += f" mix{self.mixup:g}" if self.mixup else ""
        return text + (f" cut{self.cutmix:g}" if self.cutmix else "")

    @classmethod
    def parse(cls, text: str) -> Point:
        """``SIZE@MAGNITUDE[+MIXUP[+CUTMIX]]``, e.g. ``300@10`` or ``256@8.33+0.07+0.07``."""
        try:
            size, _, rest = text.partition("@")
            magnitude, *alphas = rest.split("+")
            if len(alphas) > 2:
                raise ValueError("too many '+'")
            return cls(int(size), float(magnitude or 0), *(float(a) for a in alphas))
        except (TypeError, ValueError) as e:
            raise ValueError(f"bad point {text!r}: expected SIZE@MAGNITUDE[+MIXUP[+CUTMIX]], "
                             f"e.g. 300@10 or 256@8.33+0.07+0.07") from e


@dataclass(frozen=True)
class PeerConfig:
    batch_size: int = 64
    workers: int = 2  # DataLoader workers or DALI threads
    num_classes: int = 1000
    seed: int = 0


def missing(peer: str) -> str | None:
    """Why ``peer`` cannot run in this interpreter, or None when it can."""
    import importlib

    for module in _NEEDS[peer]:
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - a broken install is as unusable as a missing one
            return f"{module} does not import here ({type(e).__name__}: {e})"
    return None


# ---- reading samples: the same random access for every DataLoader peer ----

class _ShardSamples:
    """Map-style dataset over one split: ``transform(jpeg bytes) -> tensor``, class id from ``.cls``."""

    def __init__(self, files, transform: Callable[[bytes], object]):
        self.files = [str(f) for f in files]
        self.entries = [(i, *e["jpg"], *e["cls"]) for i, f in enumerate(self.files) for e in read_index(f).samples()]
        self.transform = transform
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int):
        shard, off, size, cls_off, cls_size = self.entries[index]
        fd = self._fds.get(shard)
        if fd is None:  # opened lazily: each worker process gets its own descriptors
            fd = self._fds[shard] = os.open(self.files[shard], os.O_RDONLY)
        return self.transform(os.pread(fd, size, off)), int(os.pread(fd, cls_size, cls_off))


def _torchvision_transform(point: Point) -> Callable[[bytes], object]:
    import io

    from PIL import Image
    from torchvision import transforms as T

    pipeline = T.Compose([
        T.RandomResizedCrop(point.size, scale=(0.05, 1.0), ratio=(3 / 4, 4 / 3)),
        T.RandomHorizontalFlip(),
        T.RandAugment(num_ops=2, magnitude=int(round(point.magnitude))),
        T.ToTensor(),
        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    return lambda data: pipeline(Image.open(io.BytesIO(data)).convert("RGB"))


def albumentations_ops(magnitude: float) -> list:
    """14 of albumentations' own ops, ranges scaled by magnitude/10, fill 128 for geometry."""
    import albumentations as A

    f = magnitude / 10.0
    geo = {"fill": 128, "p": 1.0}
    return [
        A.Affine(rotate=(-30 * f, 30 * f), **geo),
        A.Affine(shear={"x": (-17 * f, 17 * f), "y": (0, 0)}, **geo),
        A.Affine(shear={"x": (0, 0), "y": (-17 * f, 17 * f)}, **geo),
        A.Affine(translate_px={"x": (-int(100 * f), int(100 * f)), "y": 0}, **geo),
        A.Affine(translate_px={"x": 0, "y": (-int(100 * f), int(100 * f))}, **geo),
        A.AutoContrast(p=1.0),
        A.Equalize(p=1.0),
        A.InvertImg(p=1.0),
        A.Posterize(num_bits=(max(1, 8 - int(4 * f)), 8), p=1.0),
        A.Solarize(threshold_range=(max(0.0, 1 - f), 1.0), p=1.0),
        A.RandomBrightnessContrast(brightness_limit=0.9 * f, contrast_limit=0, p=1.0),
        A.RandomBrightnessContrast(brightness_limit=0, contrast_limit=0.9 * f, p=1.0),
        A.ColorJitter(brightness=0, contrast=0, saturation=0.9 * f, hue=0, p=1.0),
        A.Sharpen(alpha=(0.1, min(1.0, 0.1 + 0.9 * f)), p=1.0),
    ]


def _albumentations_transform(point: Point) -> Callable[[bytes], object]:
    import albumentations as A
    import cv2
    import numpy as np
    from albumentations.pytorch import ToTensorV2

    pipeline = A.Compose([
        A.RandomResizedCrop(size=(point.size, point.size), scale=(0.05, 1.0), ratio=(3 / 4, 4 / 3)),
        A.HorizontalFlip(),
        A.SomeOf(albumentations_ops(point.magnitude), n=2),
        A.Normalize(),
        ToTensorV2(),
    ])

    def transform(data: bytes):
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        return pipeline(image=cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))["image"]

    return transform


def _pil_decode(data: bytes) -> int:
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB").width  # a full-size decode


def _opencv_worker_init(_: int) -> None:
    import cv2

    cv2.setNumThreads(0)  # albumentations' advice: one process per core, no nested OpenCV threads


def _dataloader_stream(peer: str, files, point: Point, cfg: PeerConfig, device: str) -> Iterator[int]:
    import torch

    transform = {"torchvision": lambda: _torchvision_transform(point),
                 "albumentations": lambda: _albumentations_transform(point),
                 "pil-decode": lambda: _pil_decode}[peer]()
    dataset = _ShardSamples(files, transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True, num_workers=cfg.workers,
        persistent_workers=cfg.workers > 0, pin_memory=device == "cuda",
        worker_init_fn=_opencv_worker_init if peer == "albumentations" else None,
        generator=torch.Generator().manual_seed(cfg.seed))
    try:
        while True:
            for images, labels in loader:
                if peer == "pil-decode":
                    yield len(labels)
                    continue
                images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                targets = torch.nn.functional.one_hot(labels.to(device), cfg.num_classes).float()
                if point.mixup > 0:
                    lam = float(torch.distributions.Beta(point.mixup, point.mixup).sample())
                    images = images.mul(lam).add_(images.flip(0), alpha=1 - lam)
                    targets = targets.mul(lam).add_(targets.flip(0), alpha=1 - lam)
                yield images.shape[0]
    finally:
        del loader  # shuts the persistent workers down before the next measurement starts


def _dali_stream(peer: str, files, point: Point, cfg: PeerConfig) -> Iterator[int]:
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=cfg.batch_size, num_threads=cfg.workers, device_id=None, seed=cfg.seed,
                  prefetch_queue_depth=2)
    def decode_only():
        jpegs = fn.readers.webdataset(paths=[str(f) for f in files],
                                      index_paths=[str(Path(f).with_suffix(".idx")) for f in files],
                                      ext=["jpg"], random_shuffle=True, initial_fill=256, name="reader")
        if peer == "dali-decode":
            return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        images = fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB,
                                               random_area=[0.05, 1.0], random_aspect_ratio=[3 / 4, 4 / 3])
        return fn.resize(images, resize_x=point.size, resize_y=point.size)

    pipe = decode_only()
    pipe.build()
    try:
        while True:
            (images,) = pipe.run()
            yield len(images)
    finally:
        del pipe  # DALI frees its threads and buffers only when the pipeline object goes


def peer_stream(peer: str, files, point: Point, cfg: PeerConfig, device: str = "cpu") -> Iterator[int]:
    """An endless stream of batch sizes; producing each item does all the work of one batch."""
    if peer.startswith("dali"):
        return _dali_stream(peer, files, point, cfg)
    return _dataloader_stream(peer, files, point, cfg, device)


def measure_peer(peer: str, shards: Path | str, points: list[Point], cfg: PeerConfig, *, warmup: int,
                 reps: int, per_rep: int, device: str = "cpu", split: str = "train") -> list[dict]:
    """Time ``peer`` at each point in this interpreter: ``{"point", "status", "note", "timing"}`` per point."""
    reason = missing(peer)
    if reason:
        return [{"point": asdict(p), "status": "n/a", "note": reason, "timing": None} for p in points]
    files = read_shard_set(shards).split(split).files
    sync = None
    if device == "cuda":
        import torch

        sync = torch.cuda.synchronize
    results = []
    for point in points:
        stream = peer_stream(peer, files, point, cfg, device)
        try:
            timing = measure({peer: lambda s=stream: next(s)}, warmup=warmup, reps=reps, per_rep=per_rep,
                             sync=sync)[peer]
            results.append({"point": asdict(point), "status": "ok", "note": "", "timing": timing.to_dict()})
        except Exception as e:  # noqa: BLE001 - one broken peer must not hide the others' numbers
            results.append({"point": asdict(point), "status": "error", "note": f"{type(e).__name__}: {e}",
                            "timing": None})
        finally:
            stream.close()  # stops DataLoader workers / frees the DALI pipeline before the next point
    return results


def interpreter_versions() -> dict:
    """Versions of what the peers use, in this interpreter."""
    import importlib
    import platform

    versions = {"python": platform.python_version(), "executable": sys.executable}
    for module in ("torch", "torchvision", "timm", "PIL", "cv2", "albumentations", "nvidia.dali"):
        try:
            versions[module] = str(getattr(importlib.import_module(module), "__version__", "?"))
        except Exception:  # noqa: BLE001
            versions[module] = None
    return versions


def run_elsewhere(python: str, module: str, argv: list[str], timeout: float | None = None) -> dict:
    """Run ``python -m effnetv2.<module> argv`` in another interpreter and return the JSON it prints.

    The other interpreter need not have effnetv2 installed: a temporary folder holding a link named
    ``effnetv2`` to this package is put on its ``PYTHONPATH``.
    """
    import effnetv2

    root = Path(effnetv2.__file__).resolve().parent
    with tempfile.TemporaryDirectory(prefix="effnetv2-peer-") as tmp:
        (Path(tmp) / "effnetv2").symlink_to(root, target_is_directory=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([tmp, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        proc = subprocess.run([python, "-m", f"effnetv2.{module}", *argv], env=env, capture_output=True,
                              text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{python} -m effnetv2.{module} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """Entry point for another interpreter: measure one peer, print one JSON line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer", choices=PEERS, required=True)
    p.add_argument("--shards", required=True)
    p.add_argument("--points", required=True, help="comma-separated SIZE@MAGNITUDE[+MIXUP[+CUTMIX]]")
    p.add_argument("--config", default="{}", help="PeerConfig fields as JSON")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--per-rep", type=int, default=8)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    points = [Point.parse(t) for t in args.points.split(",")]
    results = measure_peer(args.peer, args.shards, points, PeerConfig(**json.loads(args.config)),
                           warmup=args.warmup, reps=args.reps, per_rep=args.per_rep, device=args.device)
    print(json.dumps({"versions": interpreter_versions(), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
