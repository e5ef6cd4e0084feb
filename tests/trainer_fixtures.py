"""Data and configs shared by the trainer/recipe tests: tiny shard sets of real photo crops.

The class of a crop is the photo it was cut from, so a few dozen steps of the demo model learn
something real (a short run's loss falls) while every test stays at 32-40 px on the CPU.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import jpeg_bytes, make_shard_set, random_crops

from effnetv2.pipeline.format.shards import ShardWriter, shard_name, write_manifest
from effnetv2.recipes.engine.config import TrainConfig

# photos that differ most at 32 px (hubble deep field, flower, coffee, chelsea the cat, ...): a from-scratch
# network separates the first two within a few dozen steps
DISTINCT = (5, 9, 2, 1, 0, 3)


def photo_shards(root: Path, photos: list[np.ndarray], *, classes: int = 4, n_train: int = 64,
                 n_val: int = 32, seed: int = 0) -> Path:
    """``classes`` classes (one per photo), ``n_train``/``n_val`` crops of 48-72 px, shards of 16."""
    picked = [photos[i] for i in DISTINCT[:classes]]
    images = random_crops(picked, n_train + n_val, seed=seed, size=(48, 72))
    labels = [i % classes for i in range(n_train + n_val)]
    return make_shard_set(root, images[:n_train], labels[:n_train], classes,
                          extra_splits={"val": (images[n_train:], labels[n_train:])})


def multilabel_shards(root: Path, photos: list[np.ndarray], *, classes: int = 6, n_train: int = 48,
                      n_val: int = 16) -> Path:
    """A 21k-style multi-label shard set: each crop has its photo's class plus one related class
    (``(photo + 1) % classes``); ``labels`` members are little-endian int32, the first equals ``cls``."""
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, n, seed in (("train", n_train, 5), ("val", n_val, 6)):
        images = random_crops(photos[:classes], n, seed=seed, size=(48, 72))
        files, lengths = [], []
        for s, start in enumerate(range(0, n, 16)):
            with ShardWriter(root / shard_name(split, s)) as w:
                for i in range(start, min(start + 16, n)):
                    labs = (i % classes, (i % classes + 1) % classes)
                    w.write(f"{split}{i:06d}", {"jpg": jpeg_bytes(images[i]), "cls": str(labs[0]).encode(),
                                                "labels": struct.pack(f"<{len(labs)}i", *labs)})
            files.append(shard_name(split, s))
            lengths.append(min(16, n - start))
        splits[split] = {"num_samples": n, "filenames": files, "shard_lengths": lengths}
    write_manifest(root, {"splits": splits, "classes": [f"m{i}" for i in range(classes)], "multilabel": True})
    return root


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: with the loader's worker on a 2-core machine shared with other jobs, two
    OpenMP threads spin against each other and a step takes 10-50x longer."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(data: Path, out: Path, **changes) -> TrainConfig:
    """The demo model, 2 stages (32 -> 40 px), batch 8, official LR per 256 images, CPU, quiet; every
    test changes what it needs."""
    base = dict(recipe="test", model="efficientnetv2-demo", data=str(data), out=str(out), plan="paper",
                epochs=2.0, num_stages=2, batch_size=8, image_size=(32, 40), randaug=(0.0, 3.0),
                mixup=(0.0, 0.0), cutmix=(0.0, 0.0), dropout=(0.0, 0.1), lr_per_256=0.016, warmup_epochs=0.5,
                lr_schedule="exponential", decay_epochs=1.0, ema_decay=0.99, eval_size=40,
                eval_batch_size=16, log_every=4, num_workers=1, device="cpu", progress=False,
                tensorboard=False)
    base.update(changes)
    return TrainConfig(**base)
