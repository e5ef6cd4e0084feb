"""Shared fixtures: real photos shipped by installed packages, and small shard sets made from them."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from effnetv2.pipeline.format.shards import ShardWriter, shard_name, write_manifest


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _photo_paths() -> list[Path]:
    """Real RGB photographs that the dev dependencies install (scikit-image, scikit-learn, matplotlib)."""
    import matplotlib
    import skimage
    import sklearn

    sk = Path(skimage.__file__).parent / "data"
    names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "retina.jpg",
             "hubble_deep_field.jpg", "motorcycle_left.png", "color.png"]
    paths = [sk / n for n in names]
    paths += [Path(sklearn.__file__).parent / "datasets" / "images" / n for n in ("china.jpg", "flower.jpg")]
    paths.append(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    return [p for p in paths if p.is_file()]


@pytest.fixture(scope="session")
def photo_paths() -> list[Path]:
    paths = _photo_paths()
    assert len(paths) >= 8, f"expected the real photos of scikit-image/scikit-learn/matplotlib, found {paths}"
    return paths


@pytest.fixture(scope="session")
def photos(photo_paths) -> list[np.ndarray]:
    """The real photos as RGB uint8 arrays."""
    return [np.asarray(Image.open(p).convert("RGB")) for p in photo_paths]


def random_crops(photos: list[np.ndarray], n: int, seed: int = 0, size=(96, 160)) -> list[np.ndarray]:
    """``n`` varied images: random crops of the real photos, resized to a random side in ``size``."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        ch, cw = int(h * rng.uniform(0.4, 1.0)), int(w * rng.uniform(0.4, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        side = int(rng.integers(size[0], size[1] + 1))
        crop = Image.fromarray(img[y : y + ch, x : x + cw]).resize((side, int(side * rng.uniform(0.75, 1.33))))
        out.append(np.asarray(crop))
    return out


def jpeg_bytes(img: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_shard_set(root: Path, images: list[np.ndarray], labels: list[int], num_classes: int,
                   split: str = "train", shard_size: int = 16, extra_splits: dict | None = None) -> Path:
    """Write a small shard set directly with ShardWriter (independent of the sharder under test)."""
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for name, (imgs, labs) in {split: (images, labels), **(extra_splits or {})}.items():
        files, lengths = [], []
        for s, start in enumerate(range(0, len(imgs), shard_size)):
            with ShardWriter(root / shard_name(name, s)) as w:
                for i in range(start, min(start + shard_size, len(imgs))):
                    w.write(f"{name}{i:06d}", {"jpg": jpeg_bytes(imgs[i]), "cls": str(labs[i]).encode()})
            files.append(shard_name(name, s))
            lengths.append(min(shard_size, len(imgs) - start))
        splits[name] = {"num_samples": len(imgs), "filenames": files, "shard_lengths": lengths}
    write_manifest(root, {"splits": splits, "classes": [f"c{i}" for i in range(num_classes)]})
    return root


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory, photos) -> Path:
    """64 train + 24 val samples of real photo crops, 4 classes, shards of 16."""
    images = random_crops(photos, 88, seed=1)
    labels = [i % 4 for i in range(88)]
    root = tmp_path_factory.mktemp("shards")
    return make_shard_set(root, images[:64], labels[:64], 4,
                          extra_splits={"val": (images[64:], labels[64:])})


os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))
