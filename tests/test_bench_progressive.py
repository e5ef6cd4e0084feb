"""``effnetv2 bench progressive``: the arms' plans follow the study's table; a tiny study on real photo crops
writes a valid table, JSON and PNG, and a rerun after kill -9 reuses the finished runs. No accuracy is asserted."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trainer_fixtures import one_thread, photo_shards  # noqa: F401 - one_thread is an autouse fixture

from effnetv2.bench.progressive import ARMS, RESULT, arm_config, study_base, time_to_reach
from effnetv2.recipes.catalog import demo, in1k
from effnetv2.recipes.cli.main import main as cli_main
from effnetv2.recipes.engine.plan import make_plan, stage_bounds
from effnetv2.recipes.engine.trainer import build_plan

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REGS = ("randaug_magnitude", "mixup_alpha", "cutmix_alpha", "dropout")


def _regs(stage) -> tuple:
    return tuple(getattr(stage, k) for k in REGS)


@pytest.mark.parametrize("cfg", [study_base(demo.config()), study_base(dataclasses.replace(demo.config(), seed=3)),
                                 study_base(in1k.config("efficientnetv2-s"))], ids=["demo", "demo-seed3", "in1k-s"])
def test_arm_plans_differ_exactly_as_the_table_says(cfg):
    plans = {arm: build_plan(arm_config(cfg, arm)) for arm in ARMS}
    recipe = build_plan(cfg)
    final = recipe[-1]
    m = cfg.num_stages
    # every arm: the recipe's M equal stages, hence the same evaluation steps
    for arm, stages in plans.items():
        assert len(stages) == m, arm
        assert stage_bounds(stages, 1000) == stage_bounds(recipe, 1000), arm
        assert all(s.epochs == pytest.approx(cfg.epochs / m) for s in stages), arm
    # progressive-adaptive is the recipe's own plan (Algorithm 1): size and regularisation grow together
    assert plans["progressive-adaptive"] == recipe
    sizes = [s.image_size for s in recipe]
    assert sizes == sorted(sizes) and len(set(sizes)) > 1
    assert _regs(recipe[0]) != _regs(final)
    # fixed: the final size and the final level all along
    assert all(s.image_size == final.image_size and _regs(s) == _regs(final) for s in plans["fixed"])
    # progressive: the recipe's sizes, regularisation held at the final level
    assert [s.image_size for s in plans["progressive"]] == sizes
    assert all(_regs(s) == _regs(final) for s in plans["progressive"])
    # random-adaptive: the random-resize preset drawing every E/M epochs (seeded by the run's seed)
    drawn = plans["random-adaptive"]
    preset = make_plan(cfg.model, "random-resize", epochs=cfg.epochs, batch_size=cfg.batch_size, num_stages=m,
                       size=cfg.image_size, randaug=cfg.randaug, mixup=cfg.mixup, cutmix=cfg.cutmix,
                       dropout=cfg.dropout, round_to=cfg.round_to, resize_every=cfg.epochs / m, seed=cfg.seed)
    assert drawn == preset
    levels = build_plan(dataclasses.replace(cfg, plan="paper"))
    assert all(any((s.image_size, _regs(s)) == (lv.image_size, _regs(lv)) for lv in levels) for s in drawn)
    # random: the same draws, regularisation held at the top level of those levels
    assert [s.image_size for s in plans["random"]] == [s.image_size for s in drawn]
    assert all(_regs(s) == _regs(levels[-1]) for s in plans["random"])
    # nothing but the plan differs between arms
    plan_keys = {"plan", "image_size", "randaug", "mixup", "cutmix", "dropout", "resize_every"}
    for arm in ARMS:
        a = dataclasses.asdict(arm_config(cfg, arm))
        assert {k for k, v in dataclasses.asdict(cfg).items() if a[k] != v} <= plan_keys, arm


def test_a_recipe_at_one_size_is_studied_growing_up_to_it():
    assert demo.config().image_size == (28, 28)  # the demo trains at its evaluation size
    assert study_base(demo.config()).image_size == (20, 28)  # 70% of it, on the recipe's 4-px grid
    s = in1k.config("efficientnetv2-s")
    assert study_base(s) == s  # a recipe that already grows is studied as it is


def test_arm_config_rejects_an_unknown_arm():
    with pytest.raises(ValueError, match="unknown arm 'big'"):
        arm_config(demo.config(), "big")


def test_time_to_reach_interpolates_between_evaluations():
    points = [(10.0, 50.0), (20.0, 70.0), (30.0, 90.0)]
    assert time_to_reach(points, 80.0) == pytest.approx(25.0)
    assert time_to_reach(points, 90.0) == pytest.approx(30.0)
    assert time_to_reach(points, 40.0) == 10.0  # already at the first evaluation
    assert time_to_reach(points, 95.0) is None
    assert time_to_reach([(10.0, 50.0), (20.0, 70.0), (30.0, 60.0), (40.0, 80.0)], 65.0) == pytest.approx(17.5)
    assert time_to_reach([(10.0, 60.0), (20.0, 55.0), (30.0, 65.0)], 62.0) == pytest.approx(27.0)  # after a dip


def _study_args(shards: Path, out: Path) -> list[str]:
    """All arms, 1 seed, 1 epoch of 4 steps in 2 stages (32 -> 40 px) on the CPU."""
    sets = ["batch_size=8", "num_stages=2", "image_size=32,40", "eval_size=40", "eval_split=val", "eval_batch_size=16",
            "warmup_epochs=0.25", "log_every=2", "num_workers=1", "torch_threads=1", "device=cpu", "tensorboard=false",
            "progress=false", "cpu_processes=1"]
    return ["bench", "progressive", "--recipe", "demo", "--data", str(shards), "--epochs", "1", "--seeds", "1",
            "--out", str(out), "--threads", "1"] + [x for s in sets for x in ("--set", s)]


def test_tiny_study_writes_table_json_png_and_resumes_after_kill_9(tmp_path, photos, capsys):
    shards = photo_shards(tmp_path / "shards", photos, n_train=32, n_val=16)
    out = tmp_path / "out"
    args = _study_args(shards, out)
    first = out / "progressive" / "fixed-s0"
    proc = subprocess.Popen([sys.executable, "-m", "effnetv2.recipes.cli.main", *args], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not (first / RESULT).is_file():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the first arm did not finish in time"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the command and its loader workers, like kill -9
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "progressive" / "progressive-s0" / RESULT).exists()  # killed before the second arm ended
    ckpt = sorted(first.glob("ckpt-*.pt"))[-1]
    before = {p.name: p.stat().st_mtime_ns for p in (ckpt, first / RESULT)}

    assert cli_main(args) == 0  # the rerun continues
    printed = capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (ckpt, first / RESULT)} == before  # not retrained
    assert "fixed seed 0 (reused)" in printed
    for arm in ARMS:
        assert (out / "progressive" / f"{arm}-s0" / RESULT).is_file(), arm
        assert re.search(rf"^{arm} +1 +\d+\.\d\d +", printed, re.M), arm  # its line in the study table
    assert "Table 12 (progressive-adaptive vs fixed)" in printed and "Table 13 (random resize" in printed

    (report_file,) = out.glob("progressive-2*.json")
    data = json.loads(report_file.read_text())
    assert data["bench"] == "progressive" and data["machine"]["cpu_count"] >= 1
    assert report_file.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
    assert Path(data["extra"]["accuracy_chart"]).read_bytes()[:8] == PNG_MAGIC
    assert [r["series"] for r in data["rows"]] == list(ARMS) and all(r["status"] == "ok" for r in data["rows"])
    arms = data["extra"]["arms"]
    steps = [[p["step"] for p in arms[a]["curve"]] for a in ARMS]
    assert all(s == [2, 4] for s in steps)  # every arm evaluated at the same steps
    for a in ARMS:
        seed = arms[a]["seeds"]["0"]
        times = [p["train_s"] for p in seed["curve"]]
        assert 0 < times[0] < times[1] == pytest.approx(seed["train_s"]) and seed["wall_s"] > seed["train_s"]
        assert all(0 <= p["top1_pct"] <= 100 for p in seed["curve"])
        run = json.loads((out / "progressive" / f"{a}-s0" / RESULT).read_text())
        assert [s["image_size"] for s in run["stages"]] == [p["image_size"] for p in seed["curve"]]
        assert all(e is not None and e > 0 for e in run["eval_s"])
    assert [s["image_size"] for s in json.loads((first / RESULT).read_text())["stages"]] == [40, 40]
    reach = arms["fixed"]["to_fixed_top1"]
    assert reach["reached"] and reach["train_s"] <= arms["fixed"]["train_s"]["mean"] + 1e-9
    back = arms["fixed"]["fixed_to_this_top1"]  # its own curve against itself
    assert back["train_s"] == pytest.approx(reach["train_s"]) and back["saving_pct"] == pytest.approx(0.0)
    paper = data["extra"]["paper"]
    assert paper["table12"]["paper"] == {"delta_top1_pp": [0.2, 0.5], "time_saving_pct": [29, 65]}
    for key in ("table12", "table13_progressive", "table13_random"):
        measured = paper[key]["measured"]
        a, b = paper[key]["compares"]
        assert measured["delta_top1_pp"] == pytest.approx(arms[a]["top1_pct"]["mean"] - arms[b]["top1_pct"]["mean"])

    # a third run reuses everything; another config in the same folder is refused, naming the difference
    assert cli_main(args) == 0
    assert sum("(reused)" in line for line in capsys.readouterr().out.splitlines()) == len(ARMS)
    with pytest.raises(SystemExit, match="epochs: 1.0 -> 2.0"):
        cli_main([*args[:args.index("--epochs") + 1], "2", *args[args.index("--epochs") + 2:]])


def test_an_arm_of_a_multi_process_recipe_trains_through_torchrun(tmp_path, photos, capsys):
    """cpu_processes=2 (what the demo asks for on a CPU): the arm runs as 2 torchrun ranks, as `effnetv2
    train` would run it; rank 0 writes the run's record, the study reads it like an in-process one."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 cores: cpu_processes is capped at one process per core")
    shards = photo_shards(tmp_path / "shards", photos, n_train=32, n_val=16)
    out = tmp_path / "out"
    args = _study_args(shards, out)
    args[args.index("cpu_processes=1")] = "cpu_processes=2"
    assert cli_main([*args, "--arms", "fixed"]) == 0
    run = out / "progressive" / "fixed-s0"
    record = json.loads((run / RESULT).read_text())
    assert [s["image_size"] for s in record["stages"]] == [40, 40] and record["config"]["cpu_processes"] == 2
    assert "2 rank(s) on cpu" in (run / "train.log").read_text()
    assert "fixed seed 0 (trained)" in capsys.readouterr().out
