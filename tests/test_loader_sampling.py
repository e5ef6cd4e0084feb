"""Sample order (ranks, epochs, resume), random access to shards, and mixup/cutmix semantics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_shard_set, random_crops

from effnetv2.pipeline.format.shards import ShardWriter, iter_samples, shard_name, write_manifest
from effnetv2.pipeline.loaders.mix import MixConfig, cutmix, mix_batch, mixup
from effnetv2.pipeline.loaders.sampler import SampleTable, epoch_order, steps_per_epoch


# -- epoch_order -----------------------------------------------------------------------------------
@pytest.mark.parametrize("n,world,batch", [(100, 2, 8), (103, 3, 5), (64, 1, 64), (17, 4, 2)])
def test_ranks_get_equal_disjoint_shares_of_a_global_shuffle(n, world, batch):
    orders = [epoch_order(n, 7, 3, r, world, batch) for r in range(world)]
    steps = steps_per_epoch(n, world, batch)
    assert all(len(o) == steps * batch for o in orders)  # same step count on every rank
    seen = np.concatenate(orders)
    assert len(np.unique(seen)) == len(seen) == steps * batch * world  # disjoint
    assert seen.min() >= 0 and seen.max() < n
    assert n - len(seen) < world * batch  # only the tail that cannot fill a step is dropped


def test_each_epoch_is_a_different_full_permutation_and_seeded():
    a, b = epoch_order(50, 0, 0, 0, 1, 10), epoch_order(50, 0, 1, 0, 1, 10)
    assert sorted(a) == sorted(b) == list(range(50))
    assert not np.array_equal(a, b)
    assert np.array_equal(a, epoch_order(50, 0, 0, 0, 1, 10))
    assert not np.array_equal(a, epoch_order(50, 1, 0, 0, 1, 10))


def test_rank_sequence_does_not_depend_on_batch_size():
    """What makes resuming after a stage switch with another batch size exact."""
    a, b = epoch_order(200, 3, 2, 1, 2, 8), epoch_order(200, 3, 2, 1, 2, 32)
    assert np.array_equal(a[: len(b)], b)


def test_eval_order_pads_with_minus_one_and_covers_every_sample_once():
    orders = [epoch_order(23, 0, 0, r, 2, 4, drop_last=False, shuffle=False) for r in range(2)]
    assert len(orders[0]) == len(orders[1]) == 12
    real = np.concatenate([o[o >= 0] for o in orders])
    assert sorted(real) == list(range(23))
    assert (np.concatenate(orders) == -1).sum() == 1


def test_order_rejects_bad_rank_and_too_few_samples():
    with pytest.raises(ValueError, match="rank 2"):
        epoch_order(10, 0, 0, 2, 2, 1)
    with pytest.raises(ValueError, match="do not fill one step"):
        epoch_order(10, 0, 0, 0, 2, 8)


# -- SampleTable -------------------------------------------------------------------------------------
def test_table_reads_the_same_bytes_as_the_tar(small_shards):
    table = SampleTable.from_shards(small_shards, "train")
    assert len(table) == 64 and table.num_classes == 4 and not table.multilabel
    expected = [s for f in table.files for s in iter_samples(f)]
    for i in (0, 17, 63):
        jpg, labels = table.read_sample(i)
        key, members = expected[i]
        assert bytes(jpg) == members["jpg"]
        assert labels == (int(members["cls"]),)
        assert table.key(i) == key
        assert key in table.describe(i) and table.files[i // 16].name in table.describe(i)


def test_table_from_tar_list_needs_num_classes(small_shards):
    tars = sorted(small_shards.glob("val-*.tar"))
    with pytest.raises(ValueError, match="num_classes"):
        SampleTable.from_shards(tars)
    assert len(SampleTable.from_shards(tars, num_classes=4)) == 24


def test_table_reads_multilabel_members(tmp_path, photos):
    imgs = random_crops(photos, 3, seed=4)
    from conftest import jpeg_bytes

    with ShardWriter(tmp_path / shard_name("train", 0)) as w:
        for i, labs in enumerate([(1, 3), (2,), (0, 1, 2)]):
            w.write(f"s{i}", {"jpg": jpeg_bytes(imgs[i]), "cls": str(labs[0]).encode(),
                              "labels": np.asarray(labs, "<i4").tobytes()})
    table = SampleTable.from_shards([tmp_path / shard_name("train", 0)], num_classes=4)
    assert table.multilabel
    assert [table.read_sample(i)[1] for i in range(3)] == [(1, 3), (2,), (0, 1, 2)]


def test_table_names_the_file_of_a_truncated_shard(tmp_path, photos):
    root = make_shard_set(tmp_path / "s", random_crops(photos, 4), [0, 1, 0, 1], 2)
    tar = root / shard_name("train", 0)
    tar.write_bytes(tar.read_bytes()[:2000])
    with pytest.raises(ValueError, match=f"{tar}.*truncated"):
        SampleTable.from_shards(root)


def test_table_rejects_index_without_jpg(tmp_path):
    with ShardWriter(tmp_path / "train-000000.tar") as w:
        w.write("a", {"cls": b"1"})
    write_manifest(tmp_path, {"splits": {"train": {"num_samples": 1, "filenames": ["train-000000.tar"],
                                                   "shard_lengths": [1]}}, "classes": ["a", "b"]})
    with pytest.raises(ValueError, match="train-000000.idx.*no 'jpg'"):
        SampleTable.from_shards(tmp_path)


# -- mixup / cutmix ----------------------------------------------------------------------------------
def _constant_batch(n: int = 8, size: int = 16):
    """Image i is filled with the value i, its target is one-hot i: mixing can be read off exactly."""
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, size, size).clone()
    return images.contiguous(memory_format=torch.channels_last), torch.eye(n)


def test_alpha_zero_is_exactly_the_identity():
    images, targets = _constant_batch()
    out = mix_batch(images, targets, MixConfig(0.0, 0.0), seed=0, epoch=0, step=0)
    assert out[0] is images and out[1] is targets


def test_mixup_blends_with_the_reversed_batch_and_the_targets_agree():
    images, targets = _constant_batch()
    out, t = mixup(images, targets, 0.4, np.random.default_rng(0))
    lam = t.diagonal()
    assert (lam >= 0.5).all() and torch.allclose(t.sum(1), torch.ones(8))
    rev = torch.arange(7, -1, -1, dtype=torch.float32)
    assert torch.allclose(t[torch.arange(8), rev.long()], 1 - lam)
    assert torch.allclose(out[:, 0, 0, 0], lam * torch.arange(8.0) + (1 - lam) * rev, atol=1e-6)


def test_cutmix_target_weight_is_the_area_actually_kept():
    images, targets = _constant_batch(n=16, size=20)
    out, t = cutmix(images, targets, 1.0, np.random.default_rng(3))
    own = (out[:, 0] == torch.arange(16.0).view(16, 1, 1)).float().mean((1, 2))
    partner = (out[:, 0] == torch.arange(15, -1, -1, dtype=torch.float32).view(16, 1, 1)).float().mean((1, 2))
    assert torch.allclose(own + partner, torch.ones(16))  # every pixel is one of the two images
    assert torch.allclose(t.diagonal(), own, atol=1e-6)  # lambda corrected to the clipped box
    assert (own < 1).any() and torch.allclose(t.sum(1), torch.ones(16))


def test_both_on_mixes_first_half_by_mixup_and_second_half_by_cutmix():
    images, targets = _constant_batch(n=8, size=24)
    out, t = mix_batch(images, targets, MixConfig(0.5, 0.5), seed=1, epoch=2, step=3)
    assert out.is_contiguous(memory_format=torch.channels_last)
    # mixup half: partners come from the reversed first half (0<->3, 1<->2), constant images stay flat
    assert torch.equal(t[:4, 4:], torch.zeros(4, 4)) and torch.equal(t[4:, :4], torch.zeros(4, 4))
    assert all(out[i].unique().numel() == 1 for i in range(4))
    assert all(set(out[i].unique().tolist()) <= {float(i), float(11 - i)} for i in range(4, 8))
    again = mix_batch(images, targets, MixConfig(0.5, 0.5), seed=1, epoch=2, step=3)
    assert torch.equal(again[0], out) and torch.equal(again[1], t)
    other = mix_batch(images, targets, MixConfig(0.5, 0.5), seed=1, epoch=2, step=4)
    assert not torch.equal(other[1], t)
