"""Bad input and process hazards around the pipeline, each made here: abandoned loaders in forked
children, shards truncated or forged under a loader, a sharder killed with -9, hostile source folders
and tars, malformed manifests and indexes, out-of-range classes, decompression-bomb headers."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import jpeg_bytes, make_shard_set, random_crops
from PIL import Image
from trainer_fixtures import one_thread, photo_shards, tiny_config  # noqa: F401 (autouse: one torch thread)

from effnetv2.pipeline.format.index import index_path
from effnetv2.pipeline.format.shards import MANIFEST, ShardWriter, read_shard_set, shard_name, write_manifest
from effnetv2.pipeline.loaders import build_eval_loader, build_train_loader
from effnetv2.pipeline.loaders.sampler import CorruptSampleWarning, SampleTable
from effnetv2.pipeline.sharder import sources
from effnetv2.pipeline.sharder.writer import REJECTED, write_shard_set

BACKENDS = ["dali", "opencv"]
TESTS = str(Path(__file__).parent)


def _python(script: str, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter (a hang or a fatal signal must not take pytest with it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"hung for {timeout} s; stderr: {(e.stderr or b'')[-2000:]!r}")


@pytest.fixture(scope="module")
def shards(tmp_path_factory, photos) -> Path:
    """32 train + 8 val samples of real photo crops, 4 classes, shards of 8."""
    images = random_crops(photos, 40, seed=21, size=(48, 64))
    labels = [i % 4 for i in range(40)]
    return make_shard_set(tmp_path_factory.mktemp("rel"), images[:32], labels[:32], 4, shard_size=8,
                          extra_splits={"val": (images[32:], labels[32:])})


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# -- process hazards ---------------------------------------------------------------------------------
_ABANDON = """
    import gc, sys
    import torch
    from effnetv2.pipeline.loaders import build_train_loader

    def abandon():
        loader = build_train_loader(sys.argv[1], 4, 32, 5.0, backend=sys.argv[2], num_workers=1)
        next(iter(loader))  # mid-epoch, and no close(): garbage the parent has not collected yet

    class Collects(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            gc.collect()  # the worker meets the parent's abandoned loader
            return i

    gc.disable()
    abandon()
    loader = torch.utils.data.DataLoader(Collects(), num_workers=2, multiprocessing_context="fork")
    print("items", sorted(int(x) for x in loader), flush=True)
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_abandoned_loader_is_left_alone_in_forked_workers(shards, backend):
    proc = _python(_ABANDON, str(shards), backend, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "items [0, 1, 2, 3]" in proc.stdout
    assert "AssertionError" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-3000:]


_TRUNCATE = """
    import os, sys
    from effnetv2.pipeline.loaders.sampler import SampleTable, ShardChangedError

    table = SampleTable.from_shards(sys.argv[1], "train")
    first = [i for i in range(len(table)) if table.shard[i] == 0]
    table.read_sample(first[0])  # the shard is open (and, before the fix, mapped)
    os.truncate(table.files[0], os.path.getsize(table.files[0]) // 3)
    for i in first:
        try:
            table.read_sample(i)
        except ShardChangedError as e:
            print("error:", e)
            break
"""


def test_truncated_shard_is_an_error_naming_it_not_a_sigbus(shards, tmp_path):
    root = _copy(shards, tmp_path / "set")
    proc = _python(_TRUNCATE, str(root))
    assert proc.returncode == 0, f"killed by signal {-proc.returncode}" if proc.returncode < 0 else proc.stderr
    assert f"error: {root / 'train-000000.tar'}:" in proc.stdout
    assert "truncated" in proc.stdout and "now ends at" in proc.stdout


def _descendants(root: int) -> dict[int, str]:
    """pid -> start time (to tell a reused pid) of every process below ``root``, from /proc."""
    parent, start = {}, {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            parent[int(d)], start[int(d)] = int(fields[1]), fields[19]
    found, grew = {root}, True
    while grew:
        new = {p for p, pp in parent.items() if pp in found} - found
        found |= new
        grew = bool(new)
    return {p: start[p] for p in found - {root}}


def _running(pid: int, started: str) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[19] == started and fields[0] != "Z"  # a zombie has exited (nobody reaped it yet)


_SHARD_RUN = """
    import sys
    from pathlib import Path
    from effnetv2.pipeline.sharder.writer import SourceItem, write_shard_set

    if __name__ == "__main__":
        items = [SourceItem(p, (k % 2,), p.name) for k, p in enumerate(sorted(Path(sys.argv[1]).iterdir()))]
        write_shard_set(sys.argv[2], {"train": items}, ["a", "b"], shard_size=2, workers=2)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process tree from /proc")
def test_killed_sharder_leaves_no_process_behind(tmp_path, photos):
    src = tmp_path / "src"
    src.mkdir()
    for i, img in enumerate(random_crops(photos, 7, seed=3, size=(40, 48))):
        Image.fromarray(img).save(src / f"img{i:02d}.jpg", quality=85)
    os.mkfifo(src / "img99.jpg")  # opening it blocks: one worker is stuck mid-shard when the run is killed
    runner = tmp_path / "runner.py"
    runner.write_text(textwrap.dedent(_SHARD_RUN))
    proc = subprocess.Popen([sys.executable, str(runner), str(src), str(tmp_path / "out")],
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while len(tree := _descendants(proc.pid)) < 4:  # forkserver, resource tracker, two workers
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended or never got going"
            time.sleep(0.1)
        time.sleep(1.0)  # the other shards are written; one worker waits on the FIFO
        tree = _descendants(proc.pid)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 5
    while (alive := [p for p, t in tree.items() if _running(p, t)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in alive:  # clean up before failing
        os.kill(p, signal.SIGKILL)
    assert not alive, f"{len(alive)} of {len(tree)} processes of the killed run still running after 5 s"


# -- sharding hostile folders and tars ---------------------------------------------------------------
def _two_classes(root: Path, photos) -> Path:
    crops = random_crops(photos, 4, seed=5, size=(32, 40))
    for k, name in enumerate(("a/1.jpg", "a/2.jpg", "b/3.jpg", "b/4.jpg")):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(crops[k]).save(root / name, quality=85)
    return root


def _listed(listing) -> dict[str, tuple[int, ...]]:
    return {item.name: item.labels for items in listing.splits.values() for item in items}


def test_links_to_folders_are_not_followed_and_loops_do_not_crash(tmp_path, photos):
    src = _two_classes(tmp_path / "src", photos)
    os.symlink("loop", src / "a" / "loop")  # a link to itself
    os.symlink("..", src / "a" / "up")  # the parent folder: the other class again, under label a
    os.symlink(".", src / "c")  # a class folder that is the dataset itself
    listing = sources.imagefolder(src)
    assert _listed(listing) == {"a/1.jpg": (0,), "a/2.jpg": (0,), "b/3.jpg": (1,), "b/4.jpg": (1,)}
    rejected = dict(listing.rejected)
    assert rejected["a/up"] == "link to a folder: not followed"
    assert "symbolic links" in rejected["a/loop"]
    assert rejected["c"] == "link to a folder holding the dataset: not followed"


def test_unreadable_folder_is_reported_and_skipped(tmp_path, photos, monkeypatch):
    src = _two_classes(tmp_path / "src", photos)
    locked = src / "b" / "locked"
    locked.mkdir()
    Image.fromarray(photos[0][:40, :40]).save(locked / "5.jpg")
    locked.chmod(0)
    if os.geteuid() == 0:  # root reads it anyway: make scandir answer as the kernel does everyone else
        scandir = os.scandir

        def denied(path="."):
            if Path(path) == locked:
                raise PermissionError(13, "Permission denied", str(path))
            return scandir(path)

        monkeypatch.setattr(os, "scandir", denied)
    try:
        listing = sources.imagefolder(src)
    finally:
        locked.chmod(0o755)
    assert _listed(listing) == {"a/1.jpg": (0,), "a/2.jpg": (0,), "b/3.jpg": (1,), "b/4.jpg": (1,)}
    assert dict(listing.rejected) == {"b/locked": "unreadable folder, skipped: Permission denied"}


def test_file_name_that_is_not_utf8_is_sharded_and_named_printably(tmp_path, photos):
    src = _two_classes(tmp_path / "src", photos)
    odd = os.fsencode(src / "a") + b"/caf\xe9.jpg"  # Latin-1, not UTF-8
    with open(odd, "wb") as f:
        f.write(jpeg_bytes(photos[1][:48, :48]))
    with open(os.fsencode(src / "b") + b"/empty\xff.jpg", "wb"):
        pass  # rejected by the sharder: its reason must reach rejected.tsv with a printable name
    listing = sources.imagefolder(src)
    assert _listed(listing)["a/caf\\xe9.jpg"] == (0,)
    out = tmp_path / "out"
    shard_set = write_shard_set(out, listing.splits, listing.classes, listing_rejected=listing.rejected, workers=1)
    assert shard_set.split("train").num_samples == 5
    assert (out / REJECTED).read_text(encoding="utf-8").splitlines() == [
        "path\treason", "b/empty\\\\xff.jpg\tempty file"]  # the TSV escapes the backslash itself


def _tar_with_a_huge_member(path: Path, good: bytes) -> None:
    """A synset tar whose second member's header declares 2^50 bytes (base-256 size field)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("n00000001_1.JPEG")
        info.size = len(good)
        tar.addfile(info, io.BytesIO(good))
    data = buf.getvalue().rstrip(b"\0")
    data += b"\0" * (-len(data) % 512)
    huge = tarfile.TarInfo("n00000001_2.JPEG")
    huge.size = 1 << 50
    path.write_bytes(data + huge.tobuf(tarfile.GNU_FORMAT) + good + b"\0" * (-len(good) % 512) + b"\0" * 1024)


def test_tar_member_declaring_a_huge_size_is_rejected_with_the_reason(tmp_path, photos):
    src = tmp_path / "fall11"
    src.mkdir()
    crops = [jpeg_bytes(c) for c in random_crops(photos, 3, seed=9, size=(32, 40))]
    _tar_with_a_huge_member(src / "n00000001.tar", crops[0])
    (src / "n00000002").mkdir()
    for k in (1, 2):
        (src / "n00000002" / f"n00000002_{k}.JPEG").write_bytes(crops[k])
    listing = sources.imagenet21k(src, release="fall11", val=0)
    assert sorted(_listed(listing)) == ["n00000001.tar:n00000001_1.JPEG", "n00000002/n00000002_1.JPEG",
                                        "n00000002/n00000002_2.JPEG"]
    rejected = dict(listing.rejected)
    assert list(rejected) == ["n00000001.tar:n00000001_2.JPEG"]
    assert rejected["n00000001.tar:n00000001_2.JPEG"].startswith(f"tar member declares {1 << 50} bytes, past the end")
    out = tmp_path / "out"
    shard_set = write_shard_set(out, listing.splits, listing.classes, listing_rejected=listing.rejected, workers=1)
    assert shard_set.split("train").num_samples == 3


# -- shards as untrusted input -----------------------------------------------------------------------
def _rewrite_index(root: Path, edit) -> Path:
    path = index_path(root / shard_name("train", 1))
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")
    return path


def _negative_offset(lines):
    f = lines[3].split(" ")
    f[1] = "-" + f[1]
    return [*lines[:3], " ".join(f), *lines[4:]]


def _non_integer(lines):
    f = lines[2].split(" ")
    f[2] = "12.5"
    return [*lines[:2], " ".join(f), *lines[3:]]


def _fewer(lines):
    return [f"v1.2 {len(lines) - 2}", *lines[1:-1]]


@pytest.mark.parametrize("edit,message", [
    (_negative_offset, r"line 4: offset '-\d+' and size '\d+' of member 'jpg' must be non-negative integers"),
    (_non_integer, r"line 3: offset '\d+' and size '12.5' of member 'jpg' must be non-negative integers"),
    (_fewer, r"7 samples, but the shard set's manifest says 8 for train-000001.tar"),
])
def test_bad_index_entries_are_errors_naming_the_index(shards, tmp_path, edit, message):
    root = _copy(shards, tmp_path / "set")
    path = _rewrite_index(root, edit)
    with pytest.raises(ValueError, match=f"^{path}: {message}"):
        SampleTable.from_shards(root, "train")


def test_index_that_is_a_link_to_dev_zero_is_refused_at_once(shards, tmp_path):
    root = _copy(shards, tmp_path / "set")
    path = index_path(root / shard_name("train", 1))
    path.unlink()
    path.symlink_to("/dev/zero")
    start = time.monotonic()
    with pytest.raises(ValueError, match=f"^{path}: the index and its shard must be regular files"):
        SampleTable.from_shards(root, "train")
    assert time.monotonic() - start < 1


_GOOD = {"filenames": ["train-000000.tar"], "shard_lengths": [8], "num_samples": 8}


@pytest.mark.parametrize("manifest,message", [
    ([1, 2], "the top level is a list, not an object"),
    ({"splits": None}, "'splits' must be an object of splits, got null"),
    ({"splits": {}}, "'splits' must be an object of splits, got {}"),
    ({"splits": {"train": ["train-000000.tar"]}}, "splits.train must be an object"),
    ({"splits": {"train": {**_GOOD, "filenames": "train-000000.tar"}}}, "splits.train.filenames must be a list"),
    ({"splits": {"train": {**_GOOD, "shard_lengths": [-8], "num_samples": -8}}},
     r"splits.train.shard_lengths must be a list of non-negative integers, got \[-8\]"),
    ({"splits": {"train": {**_GOOD, "shard_lengths": [8.0]}}}, "shard_lengths must be a list of non-negative"),
    ({"splits": {"train": {**_GOOD, "num_samples": "8"}}}, "splits.train.num_samples must be a non-negative"),
    ({"splits": {"train": {**_GOOD, "num_samples": 9}}}, "shard_lengths summing to 8, num_samples 9: they disagree"),
    ({"splits": {"train": {**_GOOD, "filenames": ["../x.tar"]}}}, r"'\.\./x\.tar' is not a \.tar file name inside"),
    ({"splits": {"train": {**_GOOD, "filenames": ["/etc/x.tar"]}}}, r"'/etc/x\.tar' is not a \.tar file name inside"),
    ({"splits": {"train": {**_GOOD, "filenames": ["train-000000.idx"]}}}, "is not a .tar file name"),
    ({"splits": {"train": _GOOD}, "classes": "abcd"}, "'classes' must be a list of names"),
    ({"splits": {"train": _GOOD}, "multilabel": "yes"}, "'multilabel' must be true or false"),
])
def test_malformed_manifest_is_one_clear_error(shards, tmp_path, manifest, message):
    root = _copy(shards, tmp_path / "set")
    (root / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=f"^{root / MANIFEST}: malformed manifest \\(.*{message}"):
        read_shard_set(root)
    with pytest.raises(ValueError, match="malformed manifest"):
        build_train_loader(root, 4, 32, None)


def test_manifest_without_optional_fields_still_reads(shards, tmp_path):
    root = _copy(shards, tmp_path / "set")
    (root / MANIFEST).write_text(json.dumps({"splits": {"train": _GOOD}}))
    assert read_shard_set(root).split("train").num_samples == 8


def _with_sample(root: Path, jpeg: bytes, cls: bytes, photos) -> Path:
    """A shard set of 8 real samples plus ``(jpeg, cls)`` as sample 5 (key ``s00005``)."""
    crops = random_crops(photos, 8, seed=31, size=(40, 56))
    root.mkdir(parents=True)
    with ShardWriter(root / shard_name("train", 0)) as w:
        for i in range(9):
            members = {"jpg": jpeg, "cls": cls} if i == 5 else {"jpg": jpeg_bytes(crops[i - (i > 5)]),
                                                               "cls": str(i % 4).encode()}
            w.write(f"s{i:05d}", members)
    write_manifest(root, {"splits": {"train": {"filenames": [shard_name("train", 0)], "shard_lengths": [9],
                                               "num_samples": 9}}, "classes": ["a", "b", "c", "d"]})
    return root


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_class_names_the_id_and_the_sample(tmp_path, photos, backend):
    root = _with_sample(tmp_path / "set", jpeg_bytes(photos[0][:48, :48]), b"-1", photos)
    loader = build_train_loader(root, 9, 32, None, backend=backend, num_workers=0 if backend == "opencv" else 1)
    with pytest.raises(ValueError, match=f"^{root / 'train-000000.tar'} sample 's00005': class id -1 outside 0..3"):
        next(iter(loader))
    loader.close()


def _claiming(jpeg: bytes, height: int, width: int) -> bytes:
    """``jpeg`` with its frame header's size replaced (the scan data stays that of the small image)."""
    pos = jpeg.index(b"\xff\xc0")
    return jpeg[: pos + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + jpeg[pos + 9 :]


@pytest.mark.parametrize("backend", BACKENDS)
def test_header_claiming_65500_squared_is_a_corrupt_sample_in_both_backends(tmp_path, photos, backend):
    bomb = _claiming(jpeg_bytes(photos[2][:64, :64]), 65500, 65500)
    root = _with_sample(tmp_path / "set", bomb, b"1", photos)
    loader = build_eval_loader(root, 9, 32, split="train", backend=backend,
                               num_workers=0 if backend == "opencv" else 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (_, _, valid), = list(loader)
    loader.close()
    messages = [str(w.message) for w in caught if issubclass(w.category, CorruptSampleWarning)]
    assert len(messages) == 1 and "sample 's00005'" in messages[0], messages
    assert "claims 65500 x 65500 pixels" in messages[0]
    assert valid.tolist() == [i != 5 for i in range(9)]


def test_sharder_rejects_the_same_pixel_bomb_whatever_pil_allows(photos, monkeypatch):
    from effnetv2.pipeline.sharder.images import check_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # a caller that turned PIL's own check off
    result = check_image(_claiming(jpeg_bytes(photos[2][:64, :64]), 65500, 65500))
    assert result.data is None and result.reason.startswith("too large: 65500 x 65500 pixels")


# -- the trainer meets a bad validation split ----------------------------------------------------------
@pytest.fixture(scope="module")
def run_shards(tmp_path_factory, photos):
    return photo_shards(tmp_path_factory.mktemp("rel-run"), photos, classes=2, n_train=32, n_val=16)


def _small_run(data: Path, out: Path, **changes):
    return tiny_config(data, out, epochs=2.0, batch_size=8, image_size=(32, 32), randaug=(0.0, 0.0), eval_size=32,
                       log_every=2, **changes)  # 2 stages of 4 steps


def test_bad_eval_index_fails_before_training(run_shards, tmp_path):
    from effnetv2.recipes.engine.trainer import train

    data = _copy(run_shards, tmp_path / "set")
    bad = index_path(data / shard_name("val", 0))
    bad.write_text("v1.2 16\nnot an index\n")
    with pytest.raises(ValueError, match=f"^{bad}: the header announces 16 samples but 1 lines follow"):
        train(_small_run(data, tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # failed while the run was built: not a step trained, nothing written


def test_failed_evaluation_loses_no_training_and_resume_evaluates_again(run_shards, tmp_path, monkeypatch):
    from effnetv2.recipes.engine import checkpoint, trainer

    full = trainer.train(_small_run(run_shards, tmp_path / "full"))
    data = _copy(run_shards, tmp_path / "set")
    val_index = index_path(data / shard_name("val", 0))
    good, real = val_index.read_bytes(), trainer.evaluate_ema

    def damaged(run):  # the index goes bad after the run was built and the stage trained
        val_index.write_text("v1.2 16\n")
        return real(run)

    monkeypatch.setattr(trainer, "evaluate_ema", damaged)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=f"^{val_index}: the header announces 16 samples"):
        trainer.train(_small_run(data, out))
    saved = checkpoint.load(checkpoint.checkpoint_path(out, 4))  # stage 1's 4 steps are on disk
    assert saved["step"] == 4 and len(saved["reports"]) == 1 and "top1" not in saved["reports"][0]

    monkeypatch.setattr(trainer, "evaluate_ema", real)
    val_index.write_bytes(good)
    resumed = trainer.train(_small_run(data, out, resume=True))
    assert resumed.resumed_from == checkpoint.checkpoint_path(out, 4) and resumed.step == 8
    assert [sorted(r) for r in resumed.stages] == [sorted(r) for r in full.stages]  # stage 1 evaluated now
    for mine, ref in zip(resumed.stages, full.stages):
        assert (mine["top1"], mine["eval_loss"], mine["loss"]) == (ref["top1"], ref["eval_loss"], ref["loss"])
    a, b = checkpoint.load(full.checkpoint), checkpoint.load(resumed.checkpoint)
    for part in ("model", "ema"):
        for key, value in a[part].items():
            assert torch.equal(b[part][key], value), f"{part}.{key}"
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in logged if r["event"] == "stage"] == [0, 1]
