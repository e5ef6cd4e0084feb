"""`effnetv2 shard`: shard sets that DALI and webdataset read back completely, with the right labels;
reproducible across worker counts, parts and a SIGKILLed-then-resumed run."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import random_crops
from PIL import Image
from test_shard_images import malformed_inputs

from effnetv2.pipeline.format.index import index_path
from effnetv2.pipeline.format.shards import read_shard_set
from effnetv2.pipeline.sharder.writer import SourceItem, plan_shards, write_shard_set
from effnetv2.recipes.cli.main import main as cli

CLASSES = ["cat", "dog", "owl"]


def read_dali(split, ext=("jpg", "cls")) -> list[tuple[bytes, ...]]:
    """Every sample of a split through DALI's CPU webdataset reader, using the index files."""
    from nvidia.dali import fn, pipeline_def, types

    dtypes = {"jpg": types.UINT8, "cls": types.UINT8, "labels": types.INT32}

    @pipeline_def(batch_size=split.num_samples, num_threads=1, device_id=None)
    def pipe():
        return tuple(fn.readers.webdataset(
            paths=[str(f) for f in split.files], index_paths=[str(index_path(f)) for f in split.files],
            ext=list(ext), missing_component_behavior="error", dtypes=[dtypes[e] for e in ext], name="reader"))

    p = pipe()
    p.build()
    assert p.reader_meta("reader")["epoch_size"] == split.num_samples
    outs = p.run()
    return [tuple(o.at(i).tobytes() for o in outs) for i in range(split.num_samples)]


def read_wds(split) -> list[dict]:
    import webdataset as wds

    return list(wds.WebDataset([str(f) for f in split.files], shardshuffle=False))


def write_folder(src: Path, photos) -> dict[str, tuple[int, str, bytes]]:
    """An ImageFolder of real photo crops (RGB JPEGs) plus every malformed kind, spread over classes.
    Returns relative path -> (label, expected action, source bytes)."""
    kinds = list(malformed_inputs(np.zeros((8, 8, 3), np.uint8)))
    crops = random_crops(photos, 12 + len(kinds), seed=5, size=(48, 72))
    expected = {}
    for i, img in enumerate(crops[:12]):
        label = i % 3
        path = src / CLASSES[label] / f"img{i:02d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=85, progressive=bool(i % 2))
        path.write_bytes(buf.getvalue())
        expected[f"{CLASSES[label]}/{path.name}"] = (label, "copied", buf.getvalue())
    for j, name in enumerate(kinds):  # each kind from its own crop, so that pixels identify it
        data, action, _ = malformed_inputs(crops[12 + j])[name]
        if action == "copied":
            continue
        label = j % 3
        (src / CLASSES[label] / name).write_bytes(data)
        expected[f"{CLASSES[label]}/{name}"] = (label, action, data)
    (src / "README.txt").write_text("not a class")
    os.mkfifo(src / "cat" / "pipe.jpg")  # not a file: reported, never opened (opening would block)
    return expected


@pytest.fixture(scope="module")
def folder_set(tmp_path_factory, photos):
    """The imagefolder set written once by the CLI with 2 workers."""
    root = tmp_path_factory.mktemp("folder")
    expected = write_folder(root / "src", photos)
    assert cli(["shard", "imagefolder", str(root / "src"), str(root / "out"), "--shard-size", "5",
                "--workers", "2", "--no-progress", "--seed", "3"]) == 0
    return root, expected


def test_imagefolder_read_back_by_dali_and_webdataset(folder_set):
    root, expected = folder_set
    shards = read_shard_set(root / "out")
    assert shards.classes == tuple(CLASSES) and not shards.multilabel
    split = shards.split("train")
    kept = {k: v for k, v in expected.items() if v[1] != "rejected"}
    assert split.num_samples == len(kept) == sum(split.lengths)
    assert all(n <= 5 for n in split.lengths)

    dali = read_dali(split)
    wds = read_wds(split)
    assert sorted(dali) == sorted((s["jpg"], s["cls"]) for s in wds)
    keys = [s["__key__"] for s in wds]
    assert len(set(keys)) == len(keys) and all("." not in k and k.isascii() for k in keys)
    labels = [int(cls) for _, cls in dali]
    assert labels != sorted(labels)  # globally shuffled, not class-sorted

    # every kept source is in the set exactly once, with its label: copies byte-identical,
    # conversions decoded to RGB and matched by pixels
    by_bytes = {data: (name, label) for name, (label, action, data) in kept.items() if action == "copied"}
    found = []
    for jpg, cls in dali:
        if jpg in by_bytes:
            name, label = by_bytes[jpg]
        else:
            img = Image.open(io.BytesIO(jpg))
            assert img.format == "JPEG" and img.mode == "RGB"
            small = np.asarray(img.convert("RGB").resize((16, 16)), np.float32)
            name, label = min(
                ((n, lab) for n, (lab, act, _) in kept.items() if act == "converted"),
                key=lambda nl: np.abs(small - _small(kept[nl[0]][2], nl[0])).mean())
        assert int(cls) == label, name
        found.append(name)
    assert sorted(found) == sorted(kept)


def _small(data: bytes, name: str) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    if "rotated" in name:
        from PIL import ImageOps

        img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I;16"):
        img = Image.fromarray((np.asarray(img) // 257).astype(np.uint8))
    return np.asarray(img.convert("RGB").resize((16, 16)), np.float32)


def test_manifest_counts_and_rejected_report(folder_set):
    root, expected = folder_set
    info = read_shard_set(root / "out").info
    stats = info["image_stats"]["train"]
    actions = [a for _, a, _ in expected.values()]
    assert stats["copied"] == actions.count("copied")
    assert stats["converted"] == actions.count("converted")
    assert stats["rejected"] == actions.count("rejected")
    assert stats["count"] == info["splits"]["train"]["num_samples"]
    samples = read_wds(read_shard_set(root / "out").split("train"))
    assert stats["bytes"] == sum(len(s["jpg"]) for s in samples)
    widths = [Image.open(io.BytesIO(s["jpg"])).width for s in samples]
    assert stats["mean_width"] == pytest.approx(np.mean(widths), abs=0.05)
    assert info["seed"] == 3 and info["version"] and info["class_list_hash"].startswith("sha256:")
    lines = (root / "out" / "rejected.tsv").read_text().splitlines()
    assert lines[0] == "path\treason"
    rejected = dict(line.split("\t") for line in lines[1:])
    want = {n for n, (_, a, _) in expected.items() if a == "rejected"} | {"README.txt", "cat/pipe.jpg"}
    assert set(rejected) == want
    assert rejected["README.txt"] == "not inside a class folder"
    assert rejected["cat/pipe.jpg"].startswith("not a regular file")
    assert info["image_stats"]["total"]["rejected_at_listing"] == 2
    assert all(rejected[n] for n in want)


def test_parts_and_worker_count_give_the_same_files(folder_set, tmp_path):
    root, _ = folder_set
    args = [str(root / "src"), str(tmp_path), "--shard-size", "5", "--workers", "1", "--no-progress",
            "--seed", "3"]
    assert cli(["shard", "imagefolder", *args, "--part", "1/2"]) == 0
    with pytest.raises(FileNotFoundError):
        read_shard_set(tmp_path)  # no manifest before the merge
    assert cli(["shard", "merge", str(tmp_path)]) == 1  # part 0 is missing: refused with an error
    assert cli(["shard", "imagefolder", *args, "--part", "0/2"]) == 0
    assert cli(["shard", "merge", str(tmp_path)]) == 0
    single = root / "out"
    names = sorted(p.name for p in single.iterdir() if p.is_file())
    assert names == sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    for name in names:  # tars, indices, manifest and report all byte-identical
        assert (single / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_existing_output_is_not_overwritten(folder_set, capsys):
    root, _ = folder_set
    before = (root / "out" / "_info.json").read_bytes()
    assert cli(["shard", "imagefolder", str(root / "src"), str(root / "out"), "--no-progress"]) == 1
    assert "--resume" in capsys.readouterr().err
    assert (root / "out" / "_info.json").read_bytes() == before


def test_shard_bytes_cuts_by_size(tmp_path, photos):
    crops = random_crops(photos, 12, seed=2, size=(48, 64))
    items = [SourceItem(_png(c), (i % 2,), f"p{i}") for i, c in enumerate(crops)]
    total = sum(len(i.source) for i in items)
    shards = write_shard_set(tmp_path, {"train": items}, ["a", "b"], shard_bytes=total // 3, workers=1)
    split = shards.split("train")
    assert split.num_samples == 12 and 3 <= len(split.files) <= 5
    assert shards.info["image_stats"]["train"]["converted_by_reason"] == {"PNG/RGB": 12}


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


RUNNER = """
import sys
from pathlib import Path
from effnetv2.pipeline.sharder.writer import SourceItem, write_shard_set

def items(src):
    return [SourceItem(p, (k % 2,), p.name) for k, p in enumerate(sorted(Path(src).iterdir()))]

if __name__ == "__main__":
    src, out, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    write_shard_set(out, {"train": items(src)}, ["a", "b"], shard_size=2, seed=seed, workers=1,
                    resume=len(sys.argv) > 4)
"""


def test_sigkilled_run_resumes_to_an_identical_result(tmp_path, photos):
    src = tmp_path / "src"
    src.mkdir()
    crops = random_crops(photos, 14, seed=7, size=(40, 56))
    for i, img in enumerate(crops[:13]):
        Image.fromarray(img).save(src / f"img{i:02d}.jpg", quality=85)
    fifo = src / "img13.jpg"
    os.mkfifo(fifo)  # reading it blocks: the run hangs mid-way, inside a shard, until killed
    items = [SourceItem(p, (k % 2,), p.name) for k, p in enumerate(sorted(src.iterdir()))]
    seed, stuck = next((s, k) for s in range(100) for k, t in enumerate(plan_shards(
        {"train": items}, seed=s, shard_size=2)["train"]) if 3 <= k <= 5 and fifo in [i.source for i in t.items])
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(runner), str(src), str(out), str(seed)])
    try:
        deadline = time.monotonic() + 60
        while not (out / "_parts" / f"train-{stuck - 1:06d}.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended or never got going"
            time.sleep(0.05)
        time.sleep(0.2)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finished = {k: (out / f"train-{k:06d}.tar").stat() for k in range(stuck)}
    assert not (out / f"train-{stuck:06d}.tar").exists()
    assert (out / f".train-{stuck:06d}.tar.partial").exists()  # killed while writing that shard
    assert not (out / "_info.json").exists()

    fifo.unlink()
    Image.fromarray(crops[13]).save(fifo, quality=85)
    subprocess.run([sys.executable, str(runner), str(src), str(out), str(seed), "--resume"], check=True)
    subprocess.run([sys.executable, str(runner), str(src), str(tmp_path / "ref"), str(seed)], check=True)
    for k, st in finished.items():  # finished shards were skipped, not rewritten
        now = (out / f"train-{k:06d}.tar").stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "ref") for p in (tmp_path / "ref").rglob("*") if p.is_file())
    assert not any(f.name.endswith(".partial") for f in files)
    for f in files:
        assert (out / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f
    assert read_shard_set(out).split("train").num_samples == 14


def test_resume_returns_a_finished_set_and_refuses_other_options(tmp_path, photos):
    items = [SourceItem(_png(c), (i % 2,), f"p{i}") for i, c in enumerate(random_crops(photos, 6, seed=4))]
    first = write_shard_set(tmp_path, {"train": items}, ["a", "b"], shard_size=4, workers=1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    again = write_shard_set(tmp_path, {"train": items}, ["a", "b"], shard_size=4, workers=1, resume=True)
    assert again == first and before == {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(FileExistsError, match="train-000000"):
        write_shard_set(tmp_path, {"train": items}, ["a", "b"], shard_size=4, workers=1, resume=True, quality=80)
