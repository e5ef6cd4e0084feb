"""The loader API on both backends (DALI CPU and OpenCV), on real photos."""

from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest
import torch
from conftest import jpeg_bytes, make_shard_set, random_crops

from effnetv2.pipeline.format.shards import ShardWriter, shard_name, write_manifest
from effnetv2.pipeline.loaders import build_eval_loader, build_train_loader
from effnetv2.pipeline.loaders.sampler import CorruptSampleWarning

BACKENDS = ["dali", "opencv"]


def _pixels(images: torch.Tensor) -> np.ndarray:
    """Undo the normalisation: (B, 3, S, S) float -> (B, S, S, 3) uint8-valued float64."""
    return (images.float() * 128 + 128).permute(0, 2, 3, 1).double().numpy()


def _write(root, split_samples: dict[str, list[tuple[bytes, tuple[int, ...]]]], num_classes: int, shard_size=16):
    """A shard set from (jpeg, labels) pairs; a ``labels`` member is written for multi-label rows."""
    root.mkdir(parents=True, exist_ok=True)
    splits, multilabel = {}, any(len(lab) > 1 for s in split_samples.values() for _, lab in s)
    for split, samples in split_samples.items():
        files, lengths = [], []
        for s, start in enumerate(range(0, len(samples), shard_size)):
            chunk = samples[start : start + shard_size]
            with ShardWriter(root / shard_name(split, s)) as w:
                for i, (jpg, labs) in enumerate(chunk):
                    members = {"jpg": jpg, "cls": str(labs[0]).encode()}
                    if multilabel:
                        members["labels"] = np.asarray(labs, "<i4").tobytes()
                    w.write(f"{split}{start + i:05d}", members)
            files.append(shard_name(split, s))
            lengths.append(len(chunk))
        splits[split] = {"num_samples": len(samples), "filenames": files, "shard_lengths": lengths}
    write_manifest(root, {"splits": splits, "classes": [f"c{i}" for i in range(num_classes)],
                          "multilabel": multilabel})
    return root


@pytest.fixture(scope="module")
def id_shards(tmp_path_factory, photos):
    """Class id == sample index, so a target row tells which sample it is (40 train, 21 val)."""
    imgs = random_crops(photos, 61, seed=7)
    return make_shard_set(tmp_path_factory.mktemp("ids"), imgs[:40], list(range(40)), 40, shard_size=12,
                          extra_splits={"val": (imgs[40:], list(range(21)))})


def _ids(targets: torch.Tensor) -> list[int]:
    assert torch.equal(targets.amax(1), torch.ones(len(targets)))  # one-hot, no mixing
    return targets.argmax(1).tolist()


# -- the batch contract ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size,dtype", [(48, torch.float32), (80, torch.bfloat16)])
def test_train_batches_shape_dtype_layout_range_targets(small_shards, backend, size, dtype):
    loader = build_train_loader(small_shards, 16, size, 9.0, 0.3, 0.3, backend=backend, dtype=dtype, seed=1)
    assert loader.spec.image_shape == (16, 3, size, size) and loader.spec.num_classes == 4
    assert len(loader) == 4
    batches = list(loader)
    assert len(batches) == 4
    for images, targets in batches:
        assert images.shape == (16, 3, size, size) and images.dtype == dtype
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert images.min() >= -1 and images.max() <= 127 / 128 and torch.isfinite(images).all()
        assert targets.shape == (16, 4) and targets.dtype == torch.float32 and (targets >= 0).all()
        assert torch.allclose(targets.sum(1), torch.ones(16), atol=1e-5)
    assert any((t.amax(1) < 1).any() for _, t in batches)  # something was mixed
    assert loader.state_dict() == {"epoch": 1, "step": 0, "sample": 0}
    loader.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_multilabel_targets_normalised_for_training_multi_hot_for_eval(tmp_path, photos, backend):
    imgs = random_crops(photos, 16, seed=9)
    sets = [tuple(sorted({i % 5, (i * 3) % 5, (i // 4) % 5})) for i in range(16)]
    root = _write(tmp_path / "ml", {"train": [(jpeg_bytes(im), s) for im, s in zip(imgs, sets)],
                                    "val": [(jpeg_bytes(im), s) for im, s in zip(imgs, sets)]}, 5)
    train = build_train_loader(root, 8, 32, None, backend=backend)
    seen = []
    for _, targets in train:
        assert torch.allclose(targets.sum(1), torch.ones(8))
        for row in targets:
            support = tuple(torch.nonzero(row).flatten().tolist())
            assert torch.allclose(row[list(support)], torch.full((len(support),), 1 / len(support)))
            seen.append(support)
    assert sorted(seen) == sorted(sets)
    evaluated = [t for _, t, _ in build_eval_loader(root, 8, 32, backend=backend)]
    rows = torch.cat(evaluated)
    assert sorted(tuple(torch.nonzero(r).flatten().tolist()) for r in rows) == sorted(sets)
    assert set(rows.unique().tolist()) == {0.0, 1.0}


# -- sample order across ranks, epochs, resumes and stage switches -----------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_disjoint_cover_and_a_stage_switch_continues_exactly(id_shards, backend):
    ranks = [build_train_loader(id_shards, 4, 32, None, backend=backend, rank=r, world_size=2, seed=5)
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 5
    seen = [sum((_ids(t) for _, t in loader), []) for loader in ranks]
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(40))
    # rank 0, epoch 1: stop after 3 steps of 4, continue with batch 2 (a stage switch), nothing lost
    first = ranks[0]
    first.set_epoch(1)
    it, head = iter(first), []
    for _ in range(3):
        head += _ids(next(it)[1])
    state = first.state_dict()
    assert state == {"epoch": 1, "step": 3, "sample": 12}
    first.close()
    nxt = build_train_loader(id_shards, 2, 48, None, backend=backend, rank=0, world_size=2, seed=5)
    nxt.load_state_dict(state)
    tail = sum((_ids(t) for _, t in nxt), [])
    full = build_train_loader(id_shards, 2, 32, None, backend=backend, rank=0, world_size=2, seed=5)
    full.set_epoch(1)
    assert head + tail == sum((_ids(t) for _, t in full), [])
    assert head + tail != seen[0]  # epoch 1 is reshuffled
    for loader in (ranks[1], nxt, full):
        loader.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_batches_and_resume_yields_exactly_the_rest(small_shards, backend):
    make = lambda seed: build_train_loader(small_shards, 8, 40, 12.0, 0.3, 0.3,  # noqa: E731
                                           backend=backend, seed=seed)
    reference = make(3)
    run = list(reference)
    reference.close()
    again = make(3)
    it = iter(again)
    for k in range(3):
        images, targets = next(it)
        assert torch.equal(images, run[k][0]) and torch.equal(targets, run[k][1])
    state = again.state_dict()
    again.close()
    resumed = make(3)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(run) - 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(rest, run[3:]))
    other = make(4)
    images, targets = next(iter(other))
    assert not torch.equal(images, run[0][0])
    other.close()
    resumed.close()


# -- evaluation ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_every_sample_once_across_ranks_padding_masked(id_shards, backend):
    got = []
    for rank in range(2):
        loader = build_eval_loader(id_shards, 4, 32, backend=backend, rank=rank, world_size=2, num_classes=40)
        assert len(loader) == 3
        for images, targets, valid in loader:
            assert images.shape == (4, 3, 32, 32) and valid.dtype == torch.bool
            assert torch.equal(targets[~valid], torch.zeros_like(targets[~valid]))
            got += targets[valid].argmax(1).tolist()
        loader.close()
    assert sorted(got) == list(range(21))


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_centre_crop_and_whole_image_geometry(tmp_path, photos, backend):
    img = random_crops(photos, 1, seed=11, size=(200, 200))[0][:120, :200]
    data = jpeg_bytes(img, quality=95)
    root = _write(tmp_path / "one", {"val": [(data, (0,))]}, 1)
    decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    side = int(64 / 96 * 120)  # S/(S+32) of the shorter side, centred (official)
    y0, x0 = (120 - side + 1) // 2, (200 - side + 1) // 2
    expected = {None: decoded[y0 : y0 + side, x0 : x0 + side], 1.0: decoded}
    for ratio, region in expected.items():
        loader = build_eval_loader(root, 1, 64, crop_ratio=ratio, backend=backend, num_classes=1)
        (images, _, valid), = list(loader)
        ref = cv2.resize(region, (64, 64), interpolation=cv2.INTER_LINEAR).astype(np.float64)
        got = _pixels(images)[0]
        assert valid.all() and np.abs(got - ref).mean() < 3.0, (ratio, np.abs(got - ref).mean())
        loader.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_finetune_augment_is_whole_image_flip_and_a_noise_cutout(id_shards, backend):
    """The official fine-tune augmentation: every image is the whole photo resized to S (maybe flipped) except one box of at most
    S/2 x S/2 (half-size S/4, clipped at the border) of uniform noise."""
    size, half = 96, 96 // 4  # the photos are 96-160 px: no reduced (DCT-scaled) decode at 96
    loader = build_train_loader(id_shards, 20, size, None, backend=backend, seed=5, augment="finetune",
                                num_workers=1)
    noise, flips = [], 0
    for images, targets in loader:
        got = _pixels(images)
        for k, sid in enumerate(_ids(targets)):
            data, _ = loader.table.read_sample(sid)
            full = cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            ref = cv2.resize(full, (size, size), interpolation=cv2.INTER_LINEAR).astype(np.float64)
            diffs = [np.abs(got[k] - r).max(-1) for r in (ref, ref[:, ::-1])]
            flipped = int(np.median(diffs[1]) < np.median(diffs[0]))
            flips += flipped
            changed = diffs[flipped] > 40
            ys, xs = np.nonzero(changed)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            assert y1 - y0 <= 2 * half and x1 - x0 <= 2 * half, (sid, y0, y1, x0, x1)
            box = np.zeros_like(changed)
            box[y0:y1, x0:x1] = True
            assert changed[box].mean() > 0.9 and diffs[flipped][~box].mean() < 3.0, sid
            noise.append(got[k][box].ravel())
    loader.close()
    pixels = np.concatenate(noise)
    assert pixels.mean() == pytest.approx(127.5, abs=3) and pixels.std() == pytest.approx(73.9, abs=3)
    assert 8 <= flips <= 32  # of 40: p = 1/2
    with pytest.raises(ValueError, match="no RandAugment"):
        build_train_loader(id_shards, 20, size, 5.0, backend=backend, augment="finetune")
    with pytest.raises(ValueError, match="policy"):
        build_train_loader(id_shards, 20, size, None, backend=backend, augment="autoaugment")


# -- augmentation strength ------------------------------------------------------------------------------
def _structure(images: np.ndarray) -> np.ndarray:
    """8x8 block means of the grey image, ranked: survives point ops (even inversion), not geometry."""
    grey = images.mean(-1)
    b, s = grey.shape[:2]
    blocks = grey.reshape(b, 8, s // 8, 8, s // 8).mean((2, 4)).reshape(b, 64)
    return blocks.argsort(1).argsort(1).astype(np.float64)


def _rank_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    return np.abs((a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_magnitude_zero_keeps_geometry_and_twenty_changes_more_than_five(small_shards, backend):
    def first_epoch(magnitude):
        loader = build_train_loader(small_shards, 32, 64, magnitude, backend=backend, seed=2)
        out = np.concatenate([_pixels(x) for x, _ in loader])
        loader.close()
        return out

    plain = first_epoch(None)
    ref = _structure(plain)
    flat = plain.std((1, 2, 3)) < 1
    corr, fill = {}, {}
    for m in (0.0, 5.0, 20.0):
        images = first_epoch(m)
        corr[m] = _rank_corr(ref, _structure(images))[~flat]
        fill[m] = float((images == 128).all(-1).mean())  # pixels a geometric op or cutout left empty
    assert np.median(corr[0.0]) > 0.9, corr[0.0]  # level 0: colour ops only, nothing moved
    change = {m: float(np.mean(1 - c)) for m, c in corr.items()}
    assert change[20.0] > change[5.0] + 0.03 and change[5.0] > change[0.0] + 0.1, change
    assert fill[20.0] > fill[5.0] + 0.08 and fill[5.0] > fill[0.0], fill


def test_backends_match_statistically(small_shards):
    """Same settings, independent randomness: the image statistics of the two backends agree.

    The share of fill pixels (exactly 128) per image is nearly all-or-nothing at level 15 on 64 px
    images (a 150 px translate or a 120 px cutout blanks the image), so its means are compared within
    4 standard errors rather than a fixed tolerance.
    """
    stats = {}
    for backend in BACKENDS:
        for magnitude in (None, 15.0):
            loader = build_train_loader(small_shards, 32, 64, magnitude, backend=backend, seed=0)
            px = []
            for epoch in range(6):
                loader.set_epoch(epoch)
                px += [_pixels(x) for x, _ in loader]
            loader.close()
            px = np.concatenate(px)
            stats[backend, magnitude] = (px.mean((0, 1, 2)), px.std((0, 1, 2)), (px == 128).all(-1).mean((1, 2)))
    for magnitude, tol in ((None, 6.0), (15.0, 10.0)):
        (m1, s1, f1), (m2, s2, f2) = stats["dali", magnitude], stats["opencv", magnitude]
        assert np.abs(m1 - m2).max() < tol and np.abs(s1 - s2).max() < tol, (magnitude, m1, m2, s1, s2)
        standard_error = np.sqrt(f1.var() / len(f1) + f2.var() / len(f2))
        assert abs(f1.mean() - f2.mean()) <= 4 * standard_error + 1e-3, (magnitude, f1.mean(), f2.mean())
    assert stats["dali", 15.0][2].mean() > 0.05  # translate/rotate/cutout leave plenty of fill at level 15


# -- bad data -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corrupt_shards(tmp_path_factory, photos):
    """24 samples (label = index) in 2 shards; sample 5 is garbage, sample 14 is cut in half."""
    samples = [(jpeg_bytes(im), (i,)) for i, im in enumerate(random_crops(photos, 24, seed=13))]
    samples[5] = (np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes(), (5,))
    samples[14] = (samples[14][0][: len(samples[14][0]) // 2], (14,))
    return _write(tmp_path_factory.mktemp("corrupt"), {"train": samples, "val": samples}, 24, shard_size=12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_samples_are_reported_and_skipped_not_fatal(corrupt_shards, backend):
    train = build_train_loader(corrupt_shards, 8, 32, 5.0, backend=backend, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(train)
    messages = [str(w.message) for w in caught if issubclass(w.category, CorruptSampleWarning)]
    assert any("train-000000.tar" in m and "train00005" in m for m in messages), messages
    assert any("train-000001.tar" in m and "train00014" in m for m in messages), messages
    assert len(batches) == len(train) == 3 and train.num_corrupt == 2
    labels = sum((t.argmax(1).tolist() for _, t in batches), [])
    assert 5 not in labels and 14 not in labels and len(labels) == 24
    assert all(torch.allclose(t.sum(1), torch.ones(8)) for _, t in batches)
    train.close()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptSampleWarning)
        evaluated = list(build_eval_loader(corrupt_shards, 8, 32, backend=backend))
    got = sorted(sum((t[v].argmax(1).tolist() for _, t, v in evaluated), []))
    assert got == [i for i in range(24) if i not in (5, 14)]


def test_backend_auto_rule_and_bad_names():
    from effnetv2.pipeline.loaders.backend import dali_available, resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "opencv"  # measured faster on CPUs
    assert resolve_backend("auto", torch.device("cuda", 0)) == ("dali" if dali_available() else "opencv")
    assert resolve_backend("dali", torch.device("cpu")) == "dali"
    assert resolve_backend("albumentations", torch.device("cpu")) == "opencv"  # the old name still works
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("pil", torch.device("cpu"))
