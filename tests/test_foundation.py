"""The package layout, the CLI, doctor, and the shard format core."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tarfile

import pytest
import webdataset as wds

from effnetv2.pipeline.format.shards import ShardWriter, iter_samples, read_index, read_shard_set


def test_one_package_no_bare_top_level_modules():
    for sub in ("model", "pipeline", "recipes", "bench"):
        assert importlib.util.find_spec(f"effnetv2.{sub}") is not None
    # run from a neutral folder so the checkout itself is not on sys.path
    code = "import importlib.util as u; print([m for m in ('model','pipeline','recipes','bench') if u.find_spec(m)])"
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_doctor_tells_the_truth():
    import torch

    out = subprocess.run([sys.executable, "-m", "effnetv2.recipes.cli.main", "doctor"],
                         capture_output=True, text=True, check=True).stdout
    assert torch.__version__ in out
    assert ("dali-gpu        usable" in out) == torch.cuda.is_available()
    try:
        import nvidia.dali  # noqa: F401
        assert "dali-cpu        usable" in out
    except ImportError:
        assert "dali-cpu        not usable" in out


def test_cli_lists_commands_and_rejects_unknown():
    run = lambda *a: subprocess.run([sys.executable, "-m", "effnetv2.recipes.cli.main", *a],  # noqa: E731
                                    capture_output=True, text=True)
    assert all(c in run("--help").stdout for c in ("shard", "plan", "train", "bench", "doctor"))
    bad = run("frobnicate")
    assert bad.returncode == 2 and "unknown command 'frobnicate'" in bad.stderr


def test_shard_writer_roundtrip_and_index(tmp_path, photos):
    from conftest import jpeg_bytes

    p = tmp_path / "train-000000.tar"
    jpgs = [jpeg_bytes(img) for img in photos[:5]]
    with ShardWriter(p) as w:
        for i, j in enumerate(jpgs):
            w.write(f"k{i}", {"jpg": j, "cls": str(i).encode()})
    with tarfile.open(p) as tf:  # plain USTAR, contiguous members
        names = tf.getnames()
        assert all(m.type == tarfile.REGTYPE for m in tf.getmembers())
    assert names[:4] == ["k0.jpg", "k0.cls", "k1.jpg", "k1.cls"]
    index = read_index(p).samples()
    raw = p.read_bytes()
    for i, entry in enumerate(index):
        off, size = entry["jpg"]
        assert raw[off : off + size] == jpgs[i]
    assert [s["cls"] for _, s in iter_samples(p)] == [str(i).encode() for i in range(5)]
    assert sum(1 for _ in wds.WebDataset(str(p), shardshuffle=False)) == 5


def test_shard_writer_never_leaves_a_half_shard(tmp_path):
    p = tmp_path / "train-000000.tar"
    with pytest.raises(RuntimeError):
        with ShardWriter(p) as w:
            w.write("a", {"jpg": b"x" * 1000})
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_bad_keys_rejected(tmp_path):
    with ShardWriter(tmp_path / "t.tar") as w:
        for key in ("a.b", "ünï", "_hidden", "a b"):
            with pytest.raises(ValueError, match="invalid sample key"):
                w.write(key, {"jpg": b""})
        w.write("ok", {"jpg": b"1"})
        with pytest.raises(ValueError, match="duplicate"):
            w.write("ok", {"jpg": b"1"})


def test_manifest_missing_shard_named(small_shards, tmp_path):
    ss = read_shard_set(small_shards)
    assert ss.split("train").num_samples == 64 and ss.num_classes == 4
    with pytest.raises(FileNotFoundError, match="no manifest"):
        read_shard_set(tmp_path)
