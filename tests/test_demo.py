"""The main job: the demo recipe on the real Fashion-MNIST photos, end to end (shortened to a few steps)."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from effnetv2.pipeline.sharder import fashion_mnist

needs_fmnist = pytest.mark.skipif(
    not (fashion_mnist.DEFAULT_ROOT / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST is not installed (Debian package dataset-fashion-mnist; 'make test' installs it as root)",
)


@needs_fmnist
def test_fashion_mnist_reads_the_real_files():
    images, labels = fashion_mnist.load("test")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == [1000] * 10  # the official balanced test split
    png = next(fashion_mnist.encoded(images[:1], 64))
    up = np.asarray(Image.open(__import__("io").BytesIO(png)))
    assert up.shape == (64, 64) and abs(float(up.mean()) - float(images[0].mean())) < 3
    native = np.asarray(Image.open(__import__("io").BytesIO(next(fashion_mnist.encoded(images[:1], 28)))))
    assert np.array_equal(native, images[0])  # the demo's 28 px: the pixels as they are, no resampling


def test_fashion_mnist_bad_files_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        fashion_mnist.load("train", root=tmp_path)
    with pytest.raises(ValueError, match="unknown Fashion-MNIST split"):
        fashion_mnist.load("validation", root=tmp_path)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x03" + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\x00" * 100)
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz: truncated"):
        fashion_mnist.load("test", root=tmp_path)


@needs_fmnist
@pytest.mark.slow
def test_demo_end_to_end_then_reused(tmp_path):
    """Shard the real dataset, train 4 short stages, report; a second run re-shards and retrains nothing."""
    data, out = tmp_path / "fmnist", tmp_path / "run"
    cmd = [sys.executable, "-m", "effnetv2.recipes.catalog.demo", "--data", str(data), "--make-data", "--out", str(out),
           "--set", "total_steps=12", "--set", "progress=false", "--set", "log_every=3",
           "--set", "eval_batch_size=500"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "sharding Fashion-MNIST" in first.stdout
    rows = [line.split() for line in first.stdout.splitlines() if line.strip()[:1].isdigit() and "%" in line]
    assert [r[1] for r in rows] == ["28", "28", "28", "28"]  # one summary row per stage, at the eval size
    assert [r[4] for r in rows] == ["0.00", "0.03", "0.07", "0.10"]  # dropout grows with the stages
    assert "2 CPU processes (torchrun" in first.stdout or len(__import__("os").sched_getaffinity(0)) < 2
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = (data / "_info.json").read_text()
    assert '"num_samples": 60000' in manifest and '"num_samples": 10000' in manifest

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "found the Fashion-MNIST shard set" in second.stdout
    assert "nothing left to train" in second.stdout
    shutil.rmtree(tmp_path)
