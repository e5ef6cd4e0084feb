"""ILSVRC2012 and ImageNet-21k layouts, with tiny fake devkits and synset tars made of real photo crops."""

from __future__ import annotations

import hashlib
import io
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from conftest import jpeg_bytes, random_crops
from test_shard import read_dali, read_wds

from effnetv2.pipeline.format.shards import read_shard_set
from effnetv2.pipeline.sharder.sources import content_hashes
from effnetv2.pipeline.sharder.writer import SourceItem
from effnetv2.recipes.cli.main import main as cli

WNIDS = ["n00000001", "n00000002", "n00000003"]
# the devkit's ILSVRC2012_IDs are not in wnid order: id 1 is the third wnid, and so on
META_ORDER = ["n00000003", "n00000001", "n00000002"]


def write_meta(path: Path) -> None:
    """A devkit meta.mat: a struct array ``synsets`` with ILSVRC2012_ID and WNID (plus a non-leaf)."""
    wnids = [*META_ORDER, "n09999999"]
    arr = np.zeros((len(wnids), 1), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    for i, w in enumerate(wnids):
        arr[i, 0] = (np.array([[i + 1]], np.uint16), np.array([w]), np.array([[0 if i < 3 else 2]], np.uint8))
    scipy.io.savemat(str(path), {"synsets": arr})


def add_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def ilsvrc(tmp_path_factory, photos):
    """train/<wnid>/ folders (the third class as train/<wnid>.tar, as in the official train tarball),
    a flat val/ of 6 labelled images and one image missing from the ground truth."""
    src = tmp_path_factory.mktemp("ilsvrc")
    images = [jpeg_bytes(c) for c in random_crops(photos, 19, seed=11, size=(40, 56))]
    train = {}
    for k, data in enumerate(images[:12]):
        wnid = WNIDS[k % 3]
        train[f"{wnid}_{k}.JPEG"] = (wnid, data)
        if wnid != WNIDS[2]:
            (src / "train" / wnid).mkdir(parents=True, exist_ok=True)
            (src / "train" / wnid / f"{wnid}_{k}.JPEG").write_bytes(data)
    add_tar(src / "train" / f"{WNIDS[2]}.tar",
            {name: data for name, (w, data) in train.items() if w == WNIDS[2]})
    (src / "val").mkdir()
    val = {}
    for k, data in enumerate(images[12:18], start=1):
        val[f"ILSVRC2012_val_{k:08d}"] = (WNIDS[(k * 2) % 3], data)
        (src / "val" / f"ILSVRC2012_val_{k:08d}.JPEG").write_bytes(data)
    (src / "val" / "ILSVRC2012_val_00000099.JPEG").write_bytes(images[18])  # not in the ground truth
    return src, train, val


def write_devkit(src: Path, val: dict, kind: str) -> None:
    if kind == "csv":
        rows = [f"{name},{wnid} 1 2 30 40 {wnid} 5 6 20 30\n" for name, (wnid, _) in val.items()]
        (src / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "".join(rows))
    else:
        data = src / "ILSVRC2012_devkit_t12" / "data"
        data.mkdir(parents=True)
        ids = [META_ORDER.index(wnid) + 1 for _, (wnid, _) in sorted(val.items())]
        (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{i}\n" for i in ids))
        write_meta(data / "meta.mat")


@pytest.mark.parametrize("kind", ["csv", "txt+meta.mat"])
def test_imagenet_layout_with_devkit_and_minival(ilsvrc, tmp_path, kind):
    src, train, val = ilsvrc
    work = tmp_path / "src"
    work.symlink_to(src)  # the devkit files go next to the shared images
    devkit = tmp_path / "devkit"
    devkit.mkdir()
    write_devkit(devkit, val, kind)
    label_file = next(p for p in devkit.rglob("*") if p.suffix in (".csv", ".txt"))
    meta = ["--meta", str(devkit / "ILSVRC2012_devkit_t12" / "data" / "meta.mat")] if kind != "csv" else []
    out = tmp_path / "out"
    assert cli(["shard", "imagenet", str(work), str(out), "--minival", "3", "--shard-size", "4",
                "--workers", "1", "--no-progress", "--val-labels", str(label_file), *meta]) == 0
    shards = read_shard_set(out)
    assert shards.classes == tuple(WNIDS) and shards.info["release"] == "ILSVRC2012"
    assert {s: shards.split(s).num_samples for s in shards.splits} == {"train": 9, "minival": 3, "val": 6}
    want = {data: WNIDS.index(w) for w, data in train.values()}
    want_val = {data: WNIDS.index(w) for w, data in val.values()}
    seen = []
    for split, truth in (("train", want), ("minival", want), ("val", want_val)):
        for jpg, cls in read_dali(shards.split(split)):
            assert truth[jpg] == int(cls)  # byte-identical copies, with the right (sorted-wnid) label
            seen.append(jpg)
    assert len(set(seen)) == 18
    rejected = (out / "rejected.tsv").read_text().splitlines()[1:]
    assert rejected == ["val/ILSVRC2012_val_00000099.JPEG\tno ground-truth label for this validation image"]


def test_imagenet_finds_the_devkit_itself(ilsvrc, tmp_path):
    src, _, val = ilsvrc
    work = tmp_path / "src"
    work.mkdir()
    for name in ("train", "val"):
        (work / name).symlink_to(src / name)
    write_devkit(work, val, "txt+meta.mat")
    out = tmp_path / "out"
    assert cli(["shard", "imagenet", str(work), str(out), "--workers", "1", "--no-progress"]) == 0
    assert read_shard_set(out).split("val").num_samples == 6


@pytest.fixture(scope="module")
def in21k(tmp_path_factory, photos):
    """Three synsets: two tars and one extracted folder; one image under two synsets; a tar with a
    '../evil.jpg' and an absolute member name; a labels file adding a synset to one image."""
    root = tmp_path_factory.mktemp("in21k")
    src = root / "fall11"
    src.mkdir()
    img = [jpeg_bytes(c) for c in random_crops(photos, 8, seed=13, size=(40, 56))]
    evil = b"\xff\xd8evil"
    add_tar(src / "n00000001.tar", {"n00000001_1.JPEG": img[0], "n00000001_2.JPEG": img[1],
                                    "n00000001_3.JPEG": img[2]})
    add_tar(src / "n00000002.tar", {"n00000002_1.JPEG": img[3], "n00000002_7.JPEG": img[1],  # duplicate
                                    "../evil.jpg": evil, "/tmp/evil2.jpg": evil, "n00000002_2.JPEG": img[4]})
    (src / "n00000003").mkdir()
    for k in (5, 6, 7):
        (src / "n00000003" / f"n00000003_{k}.JPEG").write_bytes(img[k])
    labels = root / "labels.txt"
    labels.write_text("# image synsets\nn00000001_3 n00000003\n")
    out = root / "out"
    assert cli(["shard", "imagenet21k", str(src), str(out), "--release", "fall11", "--val", "2",
                "--labels", str(labels), "--shard-size", "3", "--workers", "2", "--no-progress"]) == 0
    return root, out, img


def test_imagenet21k_duplicates_become_one_multilabel_sample(in21k):
    root, out, img = in21k
    shards = read_shard_set(out)
    assert shards.multilabel and shards.classes == tuple(WNIDS)
    assert {s: shards.split(s).num_samples for s in shards.splits} == {"train": 6, "val": 2}  # 9 images, one duplicate
    info = shards.info
    assert info["release"] == "fall11" and info["num_classes"] == 3 and info["duplicates_merged"] == 1
    assert info["class_list_hash"] == "sha256:" + hashlib.sha256("\n".join(WNIDS).encode()).hexdigest()
    want = {img[0]: [0], img[1]: [0, 1], img[2]: [0, 2], img[3]: [1], img[4]: [1],
            img[5]: [2], img[6]: [2], img[7]: [2]}
    got = {}
    for split in ("train", "val"):
        for jpg, cls, labels in read_dali(shards.split(split), ext=("jpg", "cls", "labels")):
            ids = list(struct.unpack(f"<{len(labels) // 4}i", labels))
            assert ids[0] == int(cls)
            got[jpg] = ids
        for sample in read_wds(shards.split(split)):
            assert list(np.frombuffer(sample["labels"], "<i4")) == got[sample["jpg"]]
    assert got == want
    dups = (out / "duplicates.tsv").read_text().splitlines()
    assert dups == ["merged\tkept", "n00000002.tar:n00000002_7.JPEG\tn00000001.tar:n00000001_2.JPEG"]


def test_imagenet21k_unsafe_member_names_are_reported_not_written(in21k):
    root, out, _ = in21k
    rejected = dict(line.split("\t") for line in (out / "rejected.tsv").read_text().splitlines()[1:])
    assert set(rejected) == {"n00000002.tar:../evil.jpg", "n00000002.tar:/tmp/evil2.jpg"}
    assert all(reason.startswith("unsafe tar member name") for reason in rejected.values())
    assert read_shard_set(out).info["image_stats"]["total"]["rejected_at_listing"] == 2
    assert not list(root.parent.rglob("evil*"))  # the whole pytest temp tree, sources and outputs
    for place in (Path("/tmp/evil2.jpg"), Path.cwd() / "evil.jpg", Path.cwd().parent / "evil.jpg"):
        assert not place.exists()
    shards = read_shard_set(out)
    for split in shards.splits.values():
        assert all(b"evil" not in s["jpg"] for s in read_wds(split))


def test_content_hashes_same_in_a_pool(photos):
    crops = random_crops(photos, 4, seed=17, size=(32, 40))
    same_size = [bytes([k]) * 700 for k in range(6)]  # equal sizes: all must be hashed
    items = [SourceItem(d, (0,), f"s{k}") for k, d in enumerate([*same_size, same_size[2]])]
    items += [SourceItem(jpeg_bytes(c), (0,), f"u{k}") for k, c in enumerate(crops)]
    serial = content_hashes(items, workers=1, chunk=2)
    assert serial == content_hashes(items, workers=2, chunk=2)
    assert serial[2] == serial[6] and len(set(serial[:6])) == 6
    sizes = [len(i.source) for i in items[7:]]
    assert [h is None for h in serial[7:]] == [sizes.count(n) == 1 for n in sizes]
