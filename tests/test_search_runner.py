"""``effnetv2 search`` and ``effnetv2 scale`` end to end on a tiny shard set of real photo crops.

The search runs as the user runs it (a subprocess of the CLI), is killed with SIGKILL after its first
candidate's line appears, and is rerun: finished candidates must not be trained again, and the files it
shows (table, chart, best.json) must describe what the results file holds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trainer_fixtures import photo_shards

from effnetv2.model import count_parameters, create_model, load_config
from effnetv2.recipes.search.results import SearchFileError, append_result, check_settings, read_results

# 4 classes, 64 training crops: 4 steps of batch 8 per candidate (--epochs 0.5), evaluated on 32 crops
TINY = ["--epochs", "0.5", "--image-size", "32", "--time-warmup", "1", "--time-reps", "2", "--time-per-rep", "1",
        "--set", "batch_size=8", "--set", "eval_batch_size=16", "--set", "eval_split=val", "--set", "device=cpu",
        "--set", "num_workers=1", "--set", "torch_threads=1"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, photos) -> Path:
    return photo_shards(tmp_path_factory.mktemp("search-shards"), photos)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "effnetv2.recipes.cli.search", *args]


def _lines(out: Path) -> list[str]:
    path = out / "results.jsonl"
    return path.read_text().splitlines() if path.is_file() else []


def test_search_runs_resumes_after_kill_and_writes_its_outputs(shards, tmp_path):
    out = tmp_path / "search"
    cmd = _cli("--data", str(shards), "--out", str(out), "--samples", "2", "--seed", "3", *TINY)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not _lines(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _lines(out), f"no candidate finished: {proc.stderr.read().decode()[-2000:] if proc.poll() else ''}"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    first = _lines(out)
    assert 1 <= len(first) < 3, "the kill should land before the last candidate finished"
    backbone_ckpts = {p: p.stat().st_mtime_ns for p in (out / "candidates").glob("c000-*/ckpt-*.pt")}
    assert backbone_ckpts

    done = subprocess.run(cmd + ["--rank-check", "1", "--rank-factor", "2"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = _lines(out)
    assert lines[: len(first)] == first  # finished lines untouched ...
    records = [json.loads(line) for line in lines]
    assert sorted(r["index"] for r in records) == [0, 1, 2]  # ... none redone or duplicated, all three there
    assert {p: p.stat().st_mtime_ns for p in backbone_ckpts} == backbone_ckpts  # the backbone was not retrained
    assert "already done" in done.stdout

    by_index = {r["index"]: r for r in records}
    base = by_index[0]
    assert base["s_norm"] == 1.0 and base["reward"] == pytest.approx(base["top1"])  # the reference point
    for r in records:
        assert r["status"] == "ok" and 0.0 <= r["top1"] <= 1.0 and r["step_s"] > 0 and r["backbone_step_s"] > 0
        assert r["s_norm"] == pytest.approx(r["step_s"] / r["backbone_step_s"])
        # P counted on the network the candidate's own model file builds, with the shard set's 4 classes
        assert r["params"] == count_parameters(create_model(r["model"], 4))
        assert (out / "candidates" / f"c{r['index']:03d}-{r['id']}" / "train.log").read_text().count("top1") >= 1
    assert by_index[1]["id"] != by_index[2]["id"] != base["id"]

    # best.json: the highest reward, a model file create_model accepts, with the line's parameter count
    best_index = max(records, key=lambda r: (r["reward"], -r["index"]))["index"]
    info = json.loads((out / "best.json").read_text())["info"]
    assert info["index"] == best_index
    assert count_parameters(create_model(str(out / "best.json"), 4)) == by_index[best_index]["params"]
    assert load_config(out / "best.json").stages == load_config(by_index[best_index]["model"]).stages

    table = (out / "top.md").read_text()
    assert all(f"| {r['id']} |" in table for r in records) and "c000 (backbone)" in table
    assert table in done.stdout  # printed as written
    png = (out / "search.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    rank = [json.loads(line) for line in (out / "rank_check.jsonl").read_text().splitlines()]
    assert len(rank) == 2 and all(x["epochs"] == 1.0 for x in rank)  # top-1 + 1 random, 2 x 0.5 epochs
    assert "Kendall tau" in (out / "rank_check.md").read_text()



def test_search_refuses_to_continue_a_folder_with_other_settings(shards, tmp_path, capsys):
    from effnetv2.recipes.cli.search import main

    out = tmp_path / "search"
    check_settings(out, {"seed": 0})  # as if a search with other settings had started here
    assert main(["--data", str(shards), "--out", str(out), "--samples", "2", "--seed", "4", *TINY]) == 2
    err = capsys.readouterr().err
    assert "search.json" in err and "seed: 0 -> 4" in err and not (out / "results.jsonl").exists()


def test_a_renamed_backbone_of_the_same_architecture_is_the_same_search(tmp_path):
    """The backbone's name is a label (recorded, not compared); its architecture id is a setting."""
    out = tmp_path / "search"
    check_settings(out, {"backbone_id": "57563cdfb4", "seed": 0}, labels={"backbone": "efficientnetv2-demo"})
    check_settings(out, {"backbone_id": "57563cdfb4", "seed": 0}, labels={"backbone": "efficientnetv2-demo-base"})
    with pytest.raises(SearchFileError, match=r"backbone_id: '57563cdfb4' -> '899abfbea2'"):
        check_settings(out, {"backbone_id": "899abfbea2", "seed": 0}, labels={"backbone": "efficientnetv2-demo"})


def test_results_file_drops_a_torn_last_line_and_rejects_a_bad_one(tmp_path):
    append_result(tmp_path, {"index": 0, "id": "a"})
    append_result(tmp_path, {"index": 1, "id": "b"})
    with open(tmp_path / "results.jsonl", "a") as f:
        f.write('{"index": 2, "id"')  # a write cut by kill -9
    assert [r["index"] for r in read_results(tmp_path)] == [0, 1]
    assert (tmp_path / "results.jsonl").read_text().endswith('"b"}\n')  # rewritten without it
    (tmp_path / "results.jsonl").write_text('{"index": 0}\nnot json\n{"index": 1}\n')
    with pytest.raises(SearchFileError, match=r"results.jsonl: line 2"):
        read_results(tmp_path)


def test_settings_of_another_search_are_refused(tmp_path):
    check_settings(tmp_path, {"epochs": 1.0, "seed": 0})
    check_settings(tmp_path, {"epochs": 1.0, "seed": 0})  # the same: continue
    with pytest.raises(SearchFileError, match=r"search.json.*epochs: 1.0 -> 2.0"):
        check_settings(tmp_path, {"epochs": 2.0, "seed": 0})


def test_scale_writes_a_growing_family(tmp_path):
    from effnetv2.recipes.cli.scale import main

    out = tmp_path / "family"
    assert main(["efficientnetv2-demo", "--out", str(out), "--phis", "1,2", "--max-size", "36",
                 "--num-classes", "10"]) == 0
    members = [load_config(out / f"efficientnetv2-demo-x{phi}.json") for phi in (1, 2)]
    params = [count_parameters(create_model("efficientnetv2-demo", 10))]
    params += [count_parameters(create_model(out / f"efficientnetv2-demo-x{phi}.json", 10)) for phi in (1, 2)]
    assert params[0] < params[1] < params[2]
    assert [m.eval_size for m in members] == [32, 36]  # 28 x 1.15^phi (32.2, 37.0) on a grid of 4, capped at 36
    info = json.loads((out / "efficientnetv2-demo-x2.json").read_text())["info"]
    assert info["phi"] == 2 and info["params"] == params[2]
    assert main([str(tmp_path / "missing.json"), "--out", str(out)]) == 2
