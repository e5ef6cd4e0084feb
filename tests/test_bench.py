"""Every benchmark runs on tiny inputs and writes valid output. Timings are never asserted."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from effnetv2.bench.corpus import CorpusSpec, make_corpus, synth_jpeg
from effnetv2.bench.peers import Point, measure_peer, run_elsewhere
from effnetv2.bench.report import Report, Row, publish
from effnetv2.bench.timing import measure
from effnetv2.pipeline.format.shards import iter_samples, read_shard_set
from effnetv2.recipes.cli.main import main as cli_main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tests check outputs, not speed: one intra-op thread avoids OpenMP spin-wait stalls when the
    test machine's cores are shared (2 threads on 2 busy cores can be 100x slower than 1)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "corpus"
    make_corpus(out, 24, val=4, num_classes=10, shard_size=8, workers=1)
    return out


def _check_outputs(paths: dict, bench: str) -> dict:
    data = json.loads(paths["json"].read_text())
    assert data["bench"] == bench
    assert {"machine", "config", "rows", "ratios", "created", "command"} <= set(data)
    assert {"cpu", "cpu_count", "torch", "dali"} <= set(data["machine"])
    assert paths["png"].read_bytes()[:8] == PNG_MAGIC
    for row in data["rows"]:
        assert row["status"] in ("ok", "n/a", "error")
        if row["status"] == "ok":
            t = row["timing"]
            assert t["rates"] and all(r > 0 for r in t["rates"]) and t["low"] <= t["median"] <= t["high"]
        else:
            assert row["timing"] is None and row["note"], row
    return data


def _rows(data: dict, series: str) -> list[dict]:
    return [r for r in data["rows"] if r["series"] == series]


def test_corpus_is_imagenet_like_and_reproducible(corpus):
    spec = CorpusSpec()
    shard_set = read_shard_set(corpus)
    assert shard_set.split("train").num_samples == 24 and shard_set.split("val").num_samples == 4
    assert shard_set.num_classes == 10
    sizes, subsampling = [], []
    for f in shard_set.split("train").files:
        for _, sample in iter_samples(f):
            image = Image.open(io.BytesIO(sample["jpg"]))
            assert image.format == "JPEG" and image.mode == "RGB"
            assert spec.short_side[0] <= min(image.size) <= spec.short_side[1]
            assert max(image.size) <= spec.max_long_side
            assert 0 <= int(sample["cls"]) < 10
            sizes.append(len(sample["jpg"]))
            subsampling.append(JpegImagePlugin.get_sampling(image))
    assert 30 * 1024 < np.median(sizes) < 120 * 1024
    assert subsampling.count(2) > len(subsampling) / 2  # mostly 4:2:0
    assert synth_jpeg(5, seed=3) == synth_jpeg(5, seed=3)
    assert synth_jpeg(5, seed=3) != synth_jpeg(5, seed=4) != synth_jpeg(6, seed=4)


def test_point_parse():
    assert Point.parse("300@10") == Point(300, 10.0)
    assert Point.parse("256@8.33+0.1+0.2") == Point(256, 8.33, 0.1, 0.2)
    assert Point.parse("256@8.33+0.1+0.2").label == "256px m8.33 mix0.1 cut0.2"
    with pytest.raises(ValueError, match="SIZE@MAGNITUDE"):
        Point.parse("big@5")


def test_measure_interleaves_and_excludes_warmup():
    calls = []

    def step(name, n):
        def fn():
            calls.append(name)
            return n
        return fn

    timings = measure({"a": step("a", 4), "b": step("b", 2)}, warmup=2, reps=3, per_rep=2)
    assert calls[:4] == ["a", "a", "b", "b"]  # warm-up, not timed
    assert calls[4:] == ["a", "a", "b", "b"] * 3  # repetitions interleaved A B A B
    assert len(timings["a"].rates) == 3 and timings["a"].median > 0
    with pytest.raises(ValueError):
        measure({"a": step("a", 1)}, warmup=0, reps=0, per_rep=1)


def test_report_marks_missing_rows_and_ratios(tmp_path):
    from effnetv2.bench.timing import Timing

    report = Report("unit", "a unit test")
    report.add(Row("x", "p", Timing((10.0, 12.0, 11.0), 0.0)))
    report.add(Row("y", "p", Timing((5.0, 5.5, 6.0), 0.0)))
    report.add(Row("z", "p", None, "n/a", "not here"))
    assert report.add_ratio("x/y", "p", "x", "y").value == pytest.approx(11.0 / 5.5)
    assert report.add_ratio("x/z", "p", "x", "z") is None
    data = _check_outputs(publish(report, tmp_path, quiet=True), "unit")
    assert [r["series"] for r in data["rows"]] == ["x", "y", "z"]


def test_loader_bench(corpus, tmp_path):
    from effnetv2.bench.loader import run_loader_bench
    from effnetv2.bench.peers import PeerConfig

    report = run_loader_bench(corpus, [Point(48, 9, 0.2, 0.2)], PeerConfig(batch_size=4, workers=1, num_classes=10),
                              warmup=1, reps=1, per_rep=1)
    data = _check_outputs(publish(report, tmp_path, quiet=True), "loader")
    for series in ("ours dali-cpu", "ours opencv", "peer albumentations", "ceiling dali-crop-decode",
                   "ceiling pil-decode", "ceiling dali-decode"):
        assert [r["status"] for r in _rows(data, series)] == ["ok"], series
    (gpu,) = _rows(data, "ours dali-gpu")
    assert gpu["status"] in ("ok", "n/a")
    (tv,) = _rows(data, "peer torchvision")
    if tv["status"] == "n/a":  # torchvision does not import here: the row says how to measure it anyway
        assert "--peer-python" in tv["note"]
    assert {r["denominator"] for r in data["ratios"]} >= {"peer albumentations"}


def test_peer_runs_in_another_interpreter(corpus):
    out = run_elsewhere(sys.executable, "bench.peers",
                        ["--peer", "pil-decode", "--shards", str(corpus), "--points", "32@0",
                         "--config", json.dumps({"batch_size": 4, "workers": 0}),
                         "--warmup", "0", "--reps", "1", "--per-rep", "1"])
    assert out["versions"]["executable"] == sys.executable
    (result,) = out["results"]
    assert result["status"] == "ok" and result["timing"]["median"] > 0


def test_peer_unavailable_is_reported_not_raised(corpus, monkeypatch):
    import effnetv2.bench.peers as peers

    monkeypatch.setitem(peers._NEEDS, "albumentations", ("a_module_that_does_not_exist",))
    (r,) = measure_peer("albumentations", corpus, [Point(32, 5)], peers.PeerConfig(), warmup=0, reps=1, per_rep=1)
    assert r["status"] == "n/a" and "a_module_that_does_not_exist" in r["note"]


def test_step_bench(tmp_path):
    from effnetv2.bench.step import StepCase, run_step_bench

    cases = [StepCase("efficientnetv2-demo", 32, 4, "eager", "fp32"), StepCase("efficientnetv2-demo", 32, 4, "graph")]
    report = run_step_bench(cases, device="cpu", warmup=1, reps=1, per_rep=1)
    data = _check_outputs(publish(report, tmp_path, quiet=True), "step")
    ours = [r for r in data["rows"] if r["series"] in ("ours", "ours (this env)")]
    assert [r["status"] for r in ours] == ["ok"]
    assert all(r["status"] == "n/a" for r in _rows(data, "timm"))  # demo has no timm counterpart / no timm
    trainer = {r["point"]: r["status"] for r in _rows(data, "ours trainer")}
    assert trainer == {"demo 32px eager fp32": "ok", "demo 32px graph fp32": "n/a"}


def test_e2e_bench(corpus, tmp_path):
    from effnetv2.bench.e2e import SERIES, run_e2e_bench

    report = run_e2e_bench(corpus, "efficientnetv2-demo", plan_of="efficientnetv2-b0", batch_size=4, device="cpu",
                           num_stages=2, image_size=(32, 40), warmup=1, reps=1, per_rep=1, workers=1)
    data = _check_outputs(publish(report, tmp_path, quiet=True), "e2e")
    sizes = [s["image_size"] for s in data["config"]["stages"]]
    assert len(sizes) == 2 and sizes[-1] == 40
    assert sorted({r["point"] for r in data["rows"]}) == [f"{s}px m5" for s in sizes]
    assert all(len(_rows(data, s)) == 2 and all(r["status"] == "ok" for r in _rows(data, s)) for s in SERIES)
    switches = data["extra"]["stage_switch"]
    assert [s["image_size"] for s in switches] == sizes and all(s["total_s"] > 0 for s in switches)
    assert len(data["ratios"]) == 4


def test_shard_bench(tmp_path):
    from effnetv2.bench.shard import CHECK, RAW, run_shard_bench

    report = run_shard_bench(6, workers=1, reps=1, shard_size=4, tmp=tmp_path)
    data = _check_outputs(publish(report, tmp_path / "out", quiet=True), "shard")
    assert {r["point"] for r in data["rows"]} == {"JPEG in (copied)", "PNG in (converted)"}
    assert {r["series"] for r in data["rows"]} == {RAW, CHECK, "effnetv2 shard, 1 worker"}
    assert all(r["status"] == "ok" for r in data["rows"])
    assert [r.name for r in tmp_path.iterdir()] == ["out"]  # inputs and outputs were cleaned up


def test_cli_corpus_and_bench(tmp_path, capsys):
    assert cli_main(["bench", "corpus", str(tmp_path / "c"), "--n", "6", "--classes", "3", "--shard-size", "4",
                     "--workers", "1"]) == 0
    assert read_shard_set(tmp_path / "c").split("train").num_samples == 6
    assert cli_main(["bench", "loader", str(tmp_path / "c"), "--points", "32@5", "--batch-size", "2",
                     "--workers", "1", "--warmup", "0", "--reps", "1", "--per-rep", "1", "--only", "pil-decode",
                     "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "ceiling pil-decode" in printed and "machine:" in printed
    (json_file,) = (tmp_path / "out").glob("loader-*.json")
    assert json_file.with_suffix(".png").is_file()
