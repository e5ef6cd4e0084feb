"""The OpenCV backend (DataLoader workers, OpenCV/numpy ops) on real photo shards."""

from __future__ import annotations

import io
import math
import warnings

import cv2
import numpy as np
import pytest
import torch
from conftest import jpeg_bytes, random_crops
from PIL import Image

from effnetv2.pipeline.format.jpeg import jpeg_size
from effnetv2.pipeline.format.shards import ShardWriter, shard_name, write_manifest
from effnetv2.pipeline.loaders.backend import AugmentSpec
from effnetv2.pipeline.loaders.geometry import centre_crop_window, random_crop_window
from effnetv2.pipeline.loaders.opencv import backend as albu
from effnetv2.pipeline.loaders.opencv.backend import OpenCVBackend
from effnetv2.pipeline.loaders.opencv.randaugment import RandAugment
from effnetv2.pipeline.loaders.sampler import CorruptSampleWarning, SampleTable, epoch_order

S = 64


@pytest.fixture(scope="module")
def train_table(small_shards) -> SampleTable:
    return SampleTable.from_shards(small_shards, "train")


def AlbuBackend(table, size, randaug_magnitude=None, randaug_layers=2, *, num_workers=0, seed=0, train=True,  # noqa: N802
                crop_ratio=None, **options) -> OpenCVBackend:
    """The backend from the spec's fields (the tests' shorthand)."""
    spec = AugmentSpec(size, train, randaug_magnitude=randaug_magnitude, randaug_layers=randaug_layers,
                       crop_ratio=crop_ratio, seed=seed)
    return OpenCVBackend(table, spec, num_workers=num_workers, **options)


def _collect(backend: OpenCVBackend, order, batch_size=16, epoch=0, start_step=0):
    return [(x.clone(), y) for x, y in backend.batches(order, batch_size, epoch, start_step)]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, u) and y == v for (x, y), (u, v) in zip(a, b))


# -- geometry helpers ----------------------------------------------------------------------------------
def test_jpeg_size_reads_the_frame_header(photos):
    for img in photos:
        for progressive in (False, True):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, "JPEG", quality=85, progressive=progressive)
            assert jpeg_size(np.frombuffer(buf.getvalue(), np.uint8)) == img.shape[:2]
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": ignored, pixels come in stored order matching the header
    buf = io.BytesIO()
    Image.fromarray(photos[0][:40, :80]).save(buf, "JPEG", exif=exif.tobytes())
    data = np.frombuffer(buf.getvalue(), np.uint8)
    assert jpeg_size(data) == (40, 80) and albu.decode(data).shape == (40, 80, 3)
    assert jpeg_size(b"\xff\xd8 not a jpeg at all") is None
    assert jpeg_size(np.frombuffer(jpeg_bytes(photos[0])[:40], np.uint8)) is None


def test_reduction_keeps_the_crop_at_least_the_target_size():
    assert albu.reduction((0, 0, 400, 300), 128) == 2
    assert albu.reduction((0, 0, 1030, 1100), 128) == 8
    assert albu.reduction((0, 0, 400, 255), 128) == 1
    assert albu.reduction((0, 0, 600, 600), 150) == 4


def test_reduced_decode_gives_the_same_region_less_aliased(photos):
    """A reduced decode is a block average: compared (blurred, to ignore aliasing) with an area resize
    of the full-size crop it matches; a box off by 2.5% of its size would not."""
    big = [p for p in photos if min(p.shape[:2]) >= 400][:4]
    assert big
    rng = np.random.default_rng(0)

    def blur(a):
        return cv2.GaussianBlur(a.astype(np.float32), (0, 0), 1.5)

    for img in big:
        data = np.frombuffer(jpeg_bytes(img, 95), np.uint8)
        hw = img.shape[:2]
        for r in (2, 4):
            assert albu.decode(data, r).shape == (math.ceil(hw[0] / r), math.ceil(hw[1] / r), 3)
        full = albu.decode(data)
        for _ in range(2):
            x, y, w, h = window = random_crop_window(rng, *hw, area=(0.6, 1.0))
            r = albu.reduction(window, 96)
            assert r >= 2
            reduced = blur(albu.crop_resize(albu.decode(data, r), window, hw, 96))
            area = blur(cv2.resize(full[y : y + h, x : x + w], (96, 96), interpolation=cv2.INTER_AREA))
            dy, dx = y + h // 40, x + w // 40
            shifted = blur(cv2.resize(full[dy : dy + h, dx : dx + w], (96, 96), interpolation=cv2.INTER_AREA))
            assert np.abs(reduced - area).mean() < 3.5 < np.abs(reduced - shifted).mean()


# -- the backend ---------------------------------------------------------------------------------------
def test_train_batches_have_the_promised_shape_dtype_and_labels(train_table):
    backend = AlbuBackend(train_table, S, randaug_magnitude=None, num_workers=0, seed=0)  # level 2 may posterize to 0 bits
    order = epoch_order(len(train_table), 0, 0, 0, 1, 16)
    batches = _collect(backend, order)
    assert len(batches) == 4
    for k, (x, y) in enumerate(batches):
        assert x.shape == (16, S, S, 3) and x.dtype == torch.uint8 and x.is_contiguous()
        ids = order[k * 16 : (k + 1) * 16]
        assert y == [train_table.labels(int(i)) for i in ids]
        assert x.float().std(dim=(1, 2, 3)).min() > 5  # real image content, not blanks
    backend.close()


def test_same_seed_same_batches_whatever_the_worker_count(train_table):
    order = epoch_order(len(train_table), 0, 0, 0, 1, 16)
    serial = AlbuBackend(train_table, S, 12, num_workers=0, seed=3)
    a = _collect(serial, order)
    parallel = AlbuBackend(train_table, S, 12, num_workers=2, seed=3)
    torch.manual_seed(0)
    b = _collect(parallel, order)
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))  # the trainer's global torch RNG is left alone
    assert _same(a, b)
    abandoned = parallel.batches(order, 16, 0)
    next(abandoned)
    abandoned.close()  # batches still in flight in the workers must not leak into the next call
    assert _same(_collect(parallel, order, start_step=2), a[2:])  # resume mid-epoch
    assert _same(_collect(parallel, order[:32], batch_size=8), [(x[i:i + 8], y[i:i + 8])
                                                                for x, y in a[:2] for i in (0, 8)])
    parallel.close()
    other_seed = _collect(AlbuBackend(train_table, S, 12, num_workers=0, seed=4), order)
    other_epoch = _collect(serial, order, epoch=1)
    for c in (other_seed, other_epoch):
        assert all(y == v for (_, y), (_, v) in zip(a, c))
        assert not any(torch.equal(x, u) for (x, _), (u, _) in zip(a, c))


def test_magnitude_0_keeps_geometry_and_20_changes_more_than_5(train_table):
    order = epoch_order(len(train_table), 0, 0, 0, 1, 16)
    plain = torch.cat([x for x, _ in _collect(AlbuBackend(train_table, S, None, num_workers=0), order)])
    m0 = torch.cat([x for x, _ in _collect(AlbuBackend(train_table, S, 0, 2, num_workers=0), order)])
    # the same crop and flip, then level-0 RandAugment (no op moves a pixel at level 0, see its tests)
    policy = RandAugment(0)
    for k, sid in enumerate(order):
        rng = np.random.default_rng([0, 0, int(sid)])
        data, _ = train_table.read_sample(int(sid))
        random_crop_window(rng, *jpeg_size(data))
        rng.random()
        np.testing.assert_array_equal(m0[k].numpy(), policy(plain[k].numpy(), rng))

    def change(m):
        out = torch.cat([x for x, _ in _collect(AlbuBackend(train_table, S, m, 2, num_workers=0), order)])
        return (out.float() - plain.float()).abs().mean().item()

    assert change(20) > 1.3 * change(5)


def test_eval_is_the_official_centre_crop_or_whole_image(small_shards):
    table = SampleTable.from_shards(small_shards, "val")
    order = np.arange(len(table))
    for ratio, resolved in ((0.875, 0.875), (None, S / (S + 32)), (1.0, 1.0)):
        backend = AlbuBackend(table, S, num_workers=0, train=False, crop_ratio=ratio, reduced_decode=False)
        (x, y), = _collect(backend, order, batch_size=len(order))
        for k in range(len(order)):
            data, labels = table.read_sample(k)
            img = cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            left, top, w, h = centre_crop_window(*img.shape[:2], resolved)
            want = cv2.resize(img[top : top + h, left : left + w], (S, S), interpolation=cv2.INTER_LINEAR)
            np.testing.assert_array_equal(x[k].numpy(), want)
            assert y[k] == labels
        reduced = AlbuBackend(table, S, num_workers=0, train=False, crop_ratio=ratio)
        (xr, _), = _collect(reduced, order, batch_size=len(order))
        assert (xr.float() - x.float()).abs().mean() < 3.0


def test_padding_rows_are_blank_with_no_labels(small_shards):
    table = SampleTable.from_shards(small_shards, "val")
    order = epoch_order(len(table), 0, 0, 0, 1, 16, drop_last=False, shuffle=False)  # 24 -> 32 with 8 pads
    backend = AlbuBackend(table, S, num_workers=0, train=False, crop_ratio=0.875)
    batches = _collect(backend, order)
    x, y = batches[-1]
    assert (order[16:] < 0).sum() == 8
    assert (x[8:] == 0).all() and y[8:] == [()] * 8 and all(y[:8])


def _shards_with_a_corrupt_sample(root, photos) -> tuple[SampleTable, str]:
    images = random_crops(photos, 8, seed=5)
    with ShardWriter(root / shard_name("train", 0)) as w:
        for i, img in enumerate(images):
            data = jpeg_bytes(img) if i != 3 else jpeg_bytes(img)[:300]  # truncated inside the scan
            w.write(f"img{i:03d}", {"jpg": data, "cls": str(i).encode()})
    write_manifest(root, {"splits": {"train": {"num_samples": 8, "filenames": [shard_name("train", 0)],
                                               "shard_lengths": [8]}}, "classes": [f"c{i}" for i in range(8)]})
    return SampleTable.from_shards(root, "train"), str(root / shard_name("train", 0))


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_sample_is_reported_once_with_shard_and_key(tmp_path, photos, workers):
    table, shard = _shards_with_a_corrupt_sample(tmp_path, photos)
    backend = AlbuBackend(table, S, None, num_workers=workers)  # RandAugment can blank a 64 px image
    order = np.arange(8)
    with pytest.warns(CorruptSampleWarning, match=rf"{shard}.*img003") as record:
        (x, y), = _collect(backend, order, batch_size=8)
    assert len([w for w in record if issubclass(w.category, CorruptSampleWarning)]) == 1
    assert x.shape == (8, S, S, 3) and backend.num_corrupt == 1
    assert y == [(0,), (1,), (2,), (), (4,), (5,), (6,), (7,)]  # the loader substitutes or masks row 3
    assert (x[3] == 0).all() and (x[[0, 1, 2, 4]].flatten(1).float().std(1) > 5).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CorruptSampleWarning)  # a second epoch does not warn again
        _collect(backend, order, batch_size=8, epoch=1)
    assert backend.num_corrupt == 1
    backend.close()


def test_bad_arguments_are_refused(train_table):
    backend = AlbuBackend(train_table, S, num_workers=0)
    assert [len(y) for _, y in backend.batches(np.arange(40), 16, 0)] == [16, 16]  # the tail is not a step
    with pytest.raises(ValueError, match="batch_size"):
        backend.batches(np.arange(30), 0, 0)
    with pytest.raises(ValueError, match="start_step"):
        backend.batches(np.arange(32), 16, 0, start_step=3)
    backend.close()
    with pytest.raises(RuntimeError, match="closed"):
        backend.batches(np.arange(32), 16, 0)
    with pytest.raises(ValueError, match="crop_ratio"):
        AlbuBackend(train_table, S, num_workers=0, train=False, crop_ratio=1.5)


@pytest.mark.gpu
def test_pinned_batches_for_a_cuda_device(train_table):
    backend = AlbuBackend(train_table, S, 9, num_workers=2, pin_memory=True)
    order = epoch_order(len(train_table), 0, 0, 0, 1, 16)
    for x, y in backend.batches(order, 16, 0):
        assert x.is_pinned() and x.shape == (16, S, S, 3)
        assert all(isinstance(lab, tuple) and lab for lab in y)
    backend.close()
