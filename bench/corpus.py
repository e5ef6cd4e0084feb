"""A reproducible ImageNet-like JPEG corpus for benchmarks, made from photos that Python packages ship.

Loader speed depends on what is decoded: pixel count, chroma subsampling and entropy-coded size.
ILSVRC2012 training JPEGs are mostly ~500x375 px (short side ~300-375, long side <= 500), quality
~90, 4:2:0, ~110 KiB on average. Benchmarks cannot download it, so this module builds look-alikes
from the real photographs installed with scikit-image, scikit-learn and matplotlib: a random crop
(area 50-100 %, aspect 3/4-4/3), a random horizontal flip, a bicubic rescale to a short side of
300-375 px with the long side capped at 500, mild Gaussian sensor noise (sigma 5-14; upscaled small
photos are otherwise too smooth and would encode to ~35 KiB, making decode unrealistically cheap),
and a JPEG encode at quality 88-96 with 4:2:0 subsampling (4:4:4 for one image in ten). The result
is ~40-110 KiB per image. Image ``i`` depends only on ``(seed, i)``, so any worker count gives the
same bytes. Labels are drawn uniformly from ``num_classes`` (1000 by default) so targets have
ImageNet's width.

The images are sharded with the project's own sharder, so benchmarks read exactly what training
reads; users can point every benchmark at their own shard set instead.
"""

from __future__ import annotations

import io
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# (package, path inside the package, file names): real RGB photographs, not drawings.
_PHOTO_SOURCES = (
    ("skimage", "data", ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "retina.jpg",
                         "hubble_deep_field.jpg", "motorcycle_left.png", "color.png")),
    ("sklearn", "datasets/images", ("china.jpg", "flower.jpg")),
    ("matplotlib", "mpl-data/sample_data", ("grace_hopper.jpg",)),
)


def source_photos() -> list[Path]:
    """The installed photographs the corpus is cut from; a clear error when too few are present."""
    import importlib

    paths: list[Path] = []
    missing: list[str] = []
    for package, sub, names in _PHOTO_SOURCES:
        try:
            root = Path(importlib.import_module(package).__file__).parent / sub
        except ImportError:
            missing.append(package)
            continue
        paths += [root / n for n in names if (root / n).is_file()]
    if len(paths) < 4:
        raise RuntimeError(f"found only {len(paths)} source photos; the corpus is cut from the photos that "
                           f"scikit-image, scikit-learn and matplotlib ship (missing: {missing or 'none'}). "
                           f"Install them: pip install 'effnetv2[dev]'")
    return paths


@dataclass(frozen=True)
class CorpusSpec:
    """The statistics the look-alikes follow (see the module docstring for why)."""

    short_side: tuple[int, int] = (300, 375)
    max_long_side: int = 500
    crop_area: tuple[float, float] = (0.5, 1.0)
    quality: tuple[int, int] = (88, 96)
    share_444: float = 0.1  # the rest is 4:2:0, as in ImageNet
    noise_sigma: tuple[float, float] = (5.0, 14.0)


_PHOTOS: list[Image.Image] = []  # decoded once per process


def _photos() -> list[Image.Image]:
    if not _PHOTOS:
        _PHOTOS.extend(Image.open(p).convert("RGB") for p in source_photos())
    return _PHOTOS


def synth_jpeg(index: int, seed: int = 0, spec: CorpusSpec = CorpusSpec()) -> bytes:
    """Image ``index`` of the corpus for ``seed``: a JPEG that depends on nothing else."""
    rng = np.random.default_rng([seed, index])
    photos = _photos()
    photo = photos[int(rng.integers(len(photos)))]
    w, h = photo.size
    area = rng.uniform(*spec.crop_area) * w * h
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    cw, ch = min(w, round((area * aspect) ** 0.5)), min(h, round((area / aspect) ** 0.5))
    x, y = int(rng.integers(w - cw + 1)), int(rng.integers(h - ch + 1))
    crop = photo.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    scale = int(rng.integers(spec.short_side[0], spec.short_side[1] + 1)) / min(cw, ch)
    scale = min(scale, spec.max_long_side / max(cw, ch))
    crop = crop.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.BICUBIC)
    pixels = np.asarray(crop, dtype=np.float32)
    pixels = pixels + rng.normal(0.0, rng.uniform(*spec.noise_sigma), pixels.shape).astype(np.float32)
    image = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    subsampling = 0 if rng.random() < spec.share_444 else 2  # PIL: 0 = 4:4:4, 2 = 4:2:0
    image.save(buf, format="JPEG", quality=int(rng.integers(spec.quality[0], spec.quality[1] + 1)),
               subsampling=subsampling)
    return buf.getvalue()


def _write_one(job: tuple[Path, int, int]) -> tuple[Path, int]:
    path, index, seed = job
    data = synth_jpeg(index, seed)
    path.write_bytes(data)
    return path, len(data)


def write_jpegs(folder: Path | str, n: int, *, seed: int = 0, workers: int | None = None) -> list[Path]:
    """Write images ``0..n-1`` as ``folder/img-{i:07d}.jpg`` (in parallel); returns the paths in order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder / f"img-{i:07d}.jpg", i, seed) for i in range(n)]
    workers = workers or len(os.sched_getaffinity(0))
    if workers == 1 or n < 32:
        return [_write_one(j)[0] for j in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return [p for p, _ in pool.map(_write_one, jobs, chunksize=16)]


def corpus_labels(n: int, num_classes: int, seed: int = 0) -> list[int]:
    """Uniform random class ids, reproducible from the seed."""
    return np.random.default_rng([seed, 1 << 20]).integers(num_classes, size=n).tolist()


def make_corpus(out: Path | str, n: int, *, val: int = 0, num_classes: int = 1000, seed: int = 0,
                shard_size: int = 256, workers: int | None = None):
    """Write ``n`` training (+ ``val``) look-alike JPEGs and shard them into ``out``; returns the ShardSet."""
    from effnetv2.pipeline.sharder.writer import SourceItem, write_shard_set

    if n < 1 or val < 0 or num_classes < 1:
        raise ValueError(f"need n >= 1, val >= 0 and num_classes >= 1 (got {n}, {val}, {num_classes})")
    labels = corpus_labels(n + val, num_classes, seed)
    with tempfile.TemporaryDirectory(prefix="effnetv2-corpus-") as tmp:
        paths = write_jpegs(tmp, n + val, seed=seed, workers=workers)
        items = [SourceItem(p, (lab,), p.name) for p, lab in zip(paths, labels)]
        splits = {"train": items[:n], **({"val": items[n:]} if val else {})}
        classes = [f"class{c:04d}" for c in range(num_classes)]
        info = {"corpus": {"generator": "effnetv2.bench.corpus", "seed": seed, "spec": asdict(CorpusSpec())}}
        return write_shard_set(out, splits, classes, shard_size=shard_size, seed=seed, workers=workers,
                               extra_info=info)
