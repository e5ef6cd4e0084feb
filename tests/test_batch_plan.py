"""Stage batches planned from memory (``batch_plan=memory``): the batches fit the budget, every rank reads
each epoch's order once across batch changes, the LR follows the batch, resume is exact."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch
from trainer_fixtures import one_thread, photo_shards, tiny_config  # noqa: F401 (autouse fixture)

from effnetv2.model.memory import step_memory
from effnetv2.pipeline.loaders.loader import TrainLoader
from effnetv2.pipeline.loaders.sampler import epoch_order, steps_per_epoch
from effnetv2.recipes.cli import plan as plan_cli
from effnetv2.recipes.engine import checkpoint
from effnetv2.recipes.engine.batch_plan import StagedLR
from effnetv2.recipes.engine.plan import Span, make_plan, stage_bounds, stage_spans
from effnetv2.recipes.engine.schedule import LRSchedule, make_schedule
from effnetv2.recipes.engine.trainer import build_run, train

N_TRAIN = 60  # not a multiple of 16: an epoch at batch 16 drops 12 samples, at batch 8 only 4
# 2 stages over 3 epochs at the reference batch 8 (7 steps/epoch, 21 steps, stages end at 10 and 21); the
# budget fits 16 images at 32 px and 8 at 40 px, so stage 0 is 10 * 3/7 = 4.3 -> 4 steps of 16 (3 steps per
# epoch: it crosses into epoch 1) and stage 1 is 11 steps of 8, starting at sample 16 of epoch 1
RUN = dict(epochs=3.0, batch_plan="memory", eval_split="", drop_path_rate=0.2, dropout=(0.1, 0.2), log_every=2)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, photos):
    return photo_shards(tmp_path_factory.mktemp("batch-plan-shards"), photos, n_train=N_TRAIN)


def _budget() -> int:
    """Bytes per device in which the demo model's step fits 16 images at 32 px (not 24) and 8 at 40 px (not 16)."""
    m32, m40 = (step_memory("efficientnetv2-demo", 4, size) for size in (32, 40))
    budget = max(m32.total(16), m40.total(8))
    assert budget < min(m32.total(24), m40.total(16))
    return budget


def _record_ids(mp: pytest.MonkeyPatch, ids: list[int]) -> None:
    """Every sample id a train loader hands to the step, in order (it checks each batch's ids for bad samples)."""
    real = TrainLoader._bad_rows

    def record(self, batch_ids, labels):
        ids.extend(int(i) for i in batch_ids)
        return real(self, batch_ids, labels)

    mp.setattr(TrainLoader, "_bad_rows", record)


def _train(shards, out, ids: list[int], **changes):
    with pytest.MonkeyPatch.context() as mp:
        _record_ids(mp, ids)
        return train(tiny_config(shards, out, **{"memory": str(_budget()), **RUN, **changes}))


@pytest.fixture(scope="module")
def full(shards, tmp_path_factory):
    ids: list[int] = []
    out = tmp_path_factory.mktemp("batch-plan-full")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every test here (one_thread); this fixture outlives one test
    try:
        return _train(shards, out, ids), ids, out
    finally:
        torch.set_num_threads(threads)


# -- spans: steps and data positions ---------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2])
def test_spans_at_the_configured_batch_are_the_fixed_plan(world):
    stages = make_plan("s", "official", epochs=7, batch_size=64)
    n, total = 1000, 7 * (1000 // 64)
    spans = stage_spans(stages, total, num_samples=n, batch_size=64, world_size=world)
    assert [(s.first, s.end) for s in spans] == stage_bounds(stages, total)
    spe, b = n // 64, 64 // world
    for span in spans:
        for k in range(span.first, span.end + 1):  # global step k: batch k % spe of epoch k // spe
            assert span.position(k) == (k // spe, k % spe * b)


@pytest.mark.parametrize("world", [1, 2])
def test_spans_at_other_batches_read_each_epoch_once_in_order(world):
    """Stages at 48, 16, 32 and 8 (global): reading every span's steps at its positions gives each epoch's
    order once, in order, dropping only a tail shorter than the batch reading it."""
    n, seed = 203, 3
    stages = tuple(dataclasses.replace(s, batch_size=b)
                   for s, b in zip(make_plan("s", "official", epochs=9, batch_size=16), (48, 16, 32, 8)))
    spans = stage_spans(stages, 9 * (n // 16), num_samples=n, batch_size=16, world_size=world)
    # 27 reference steps each (12 steps/epoch at 16) x steps/epoch at the stage's batch (4, 12, 6, 25) / 12
    assert [s.end - s.first for s in spans] == [9, 27, 14, 56]
    for rank in range(world):
        read: dict[int, list[int]] = {}
        ended_by: dict[int, int] = {}  # epoch -> the batch of its last step
        for span in spans:
            b = span.local_batch
            for k in range(span.first, span.end):
                epoch, sample = span.position(k)
                order = epoch_order(n, seed, epoch, rank, world, b)
                assert sample + b <= len(order)
                read.setdefault(epoch, []).extend(order[sample : sample + b])
                ended_by[epoch] = b
        epochs = sorted(read)
        assert epochs == list(range(len(epochs)))  # 9 epochs, give or take the rounding to whole steps
        for e in epochs:
            whole = epoch_order(n, seed, e, rank, world, 1)  # this rank's share of the epoch, in order
            assert read[e] == list(whole[: len(read[e])])  # a prefix: in order, no repeat, no skip
            if e != epochs[-1]:  # a finished epoch leaves less than one batch of the stage that ended it
                assert len(whole) - len(read[e]) < ended_by[e]


# -- the planner in the trainer ----------------------------------------------------------------------------------


def test_planned_stages_fit_the_budget_and_errors_name_the_problem(shards, tmp_path):
    budget = _budget()
    run = build_run(tiny_config(shards, tmp_path, **{**RUN, "memory": str(budget)}))
    assert [s.batch_size for s in run.stages] == [16, 8]
    for mem, stage in zip(run.memory, run.stages):
        assert mem.total(stage.batch_size) <= budget < mem.total(stage.batch_size + 8)  # the largest that fits
    assert [(s.first, s.end, s.steps_per_epoch) for s in run.spans] == [(0, 4, 3), (4, 15, 7)]
    capped = build_run(tiny_config(shards, tmp_path, **{**RUN, "memory": str(budget), "max_batch": 8}))
    assert [s.batch_size for s in capped.stages] == [8, 8]
    roomy = build_run(tiny_config(shards, tmp_path, **{**RUN, "memory": "1TiB"}))
    assert [s.batch_size for s in roomy.stages] == [56, 56]  # the data's cap: 60 samples, multiples of 8

    small = step_memory("efficientnetv2-demo", 4, 40).total(8) - 1  # stage 0 fits 8, stage 1 does not
    with pytest.raises(ValueError, match=r"stage 1 \(40px\): a batch of 8 needs .* but the budget is"):
        build_run(tiny_config(shards, tmp_path, **{**RUN, "memory": str(small)}))
    with pytest.raises(ValueError, match="memory=auto: .*needs a CUDA GPU.*on a CPU give a size"):
        build_run(tiny_config(shards, tmp_path, **{**RUN, "memory": "auto"}))
    with pytest.raises(ValueError, match="memory='80 gigs': cannot read memory budget"):
        build_run(tiny_config(shards, tmp_path, **{**RUN, "memory": "80 gigs"}))


def test_planned_run_reads_each_epoch_once_in_order(full):
    result, ids, _ = full
    assert [(s["batch_size"], s["first_step"], s["end_step"]) for s in result.stages] == [(16, 0, 4), (8, 4, 15)]
    # epoch 0: three batches of 16 (12 left over); epoch 1: one of 16, then five of 8 from sample 16 (4 left
    # over); epoch 2: six of 8
    expected = [*epoch_order(N_TRAIN, 0, 0, 0, 1, 16), *epoch_order(N_TRAIN, 0, 1, 0, 1, 8),
                *epoch_order(N_TRAIN, 0, 2, 0, 1, 8)[:48]]
    assert steps_per_epoch(N_TRAIN, 1, 16) * 16 == 48 and steps_per_epoch(N_TRAIN, 1, 8) * 8 == 56
    assert ids == expected


def test_planned_lr_follows_the_batch_on_the_reference_clock(full):
    result, _, out = full
    cfg = tiny_config(out, out, **RUN)
    base = make_schedule(cfg.lr_schedule, lr_per_256=cfg.lr_per_256, global_batch=8, steps_per_epoch=7,
                         total_steps=21, warmup_epochs=cfg.warmup_epochs, decay_epochs=cfg.decay_epochs,
                         decay_rate=cfg.decay_rate)
    # stage 0: 4 steps at batch 16 span reference steps 0-10; stage 1: 11 steps at batch 8 span 10-21
    clocks = {0: (0, 0.0, 10 / 4, 16), 1: (4, 10.0, 1.0, 8)}
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seen = set()
    for r in (r for r in logged if r["event"] == "train"):
        first, ref_first, rate, batch = clocks[r["stage"]]
        step = r["step"] - 1  # the LR logged is the last step's
        lr = float(base(torch.tensor(ref_first + (step - first) * rate)))
        assert r["lr"] == pytest.approx(lr * batch / 8, rel=1e-6), r
        seen.add(r["stage"])
    assert seen == {0, 1}
    assert 0.016 * 16 / 256 == pytest.approx(2 * 0.016 * 8 / 256)  # the linear rule: twice the batch, twice the LR


def test_lr_ramps_when_the_batch_rises_and_drops_at_once():
    sched = StagedLR(LRSchedule("constant", 0.1, 100), ref_batch=8, device=torch.device("cpu"))
    small = Span(0, 10, 8, 8, 10, 0, 0, 0, 10)
    big = Span(10, 20, 32, 32, 10, 1, 0, 10, 50)  # 4x the batch: reference steps run 4x as fast
    sched.set_stage(big, small, ramp_epochs=0.5)  # 5 steps: from 0.1 (batch 8) to 0.4 (batch 32)
    assert [round(sched.at(k), 6) for k in range(10, 17)] == [0.16, 0.22, 0.28, 0.34, 0.4, 0.4, 0.4]
    sched.set_stage(Span(20, 30, 8, 8, 10, 2, 0, 50, 60), big, ramp_epochs=0.5)
    assert sched.at(20) == pytest.approx(0.1)  # a smaller batch: its LR at once
    decay = StagedLR(LRSchedule("exponential", 0.1, 100, decay_steps=10, decay_rate=0.5), 8, torch.device("cpu"))
    decay.set_stage(big, None, ramp_epochs=0.5)  # the first stage: no ramp; decay on the reference clock
    # steps 10, 12, 13, 15 are reference steps 10, 18, 22, 30 (4 per step): 1, 1, 2, 3 decays
    assert [decay.at(k) for k in (10, 12, 13, 15)] == pytest.approx([0.4 * 0.5, 0.4 * 0.5, 0.4 * 0.5**2, 0.4 * 0.5**3])


@pytest.mark.slow
def test_planned_run_stopped_and_resumed_mid_stage_matches_uninterrupted(full, shards, tmp_path, capsys):
    result, ids, _ = full
    out, pieces = tmp_path / "pieces", []
    first = _train(shards, out, pieces, stop_at=2)  # mid stage 0, epoch 0
    assert not first.finished and first.step == 2
    # mid stage 1 (which began mid-epoch 1), resumed under a budget that now plans other batches
    _train(shards, out, pieces, stop_at=7, resume=True, memory="1TiB")  # sample 40 of epoch 1
    assert "keeping the checkpoint's stage batches [16, 8] (this budget plans [56, 56])" in capsys.readouterr().out
    last = _train(shards, out, pieces, resume=True)
    assert last.finished and last.step == result.step == 15
    assert pieces == ids
    a, b = checkpoint.load(result.checkpoint), checkpoint.load(last.checkpoint)
    assert b["stage_batches"] == [16, 8] and b["data_position"] == {"epoch": 2, "step": 6, "sample": 48}
    for part in ("model", "ema"):
        for key, value in a[part].items():
            torch.testing.assert_close(b[part][key], value, rtol=0, atol=1e-6, msg=f"{part}.{key}")


# -- effnetv2 plan --memory ---------------------------------------------------------------------------------------


def _plan(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    plan_cli.add_arguments(parser)
    return plan_cli.run(parser.parse_args(argv))


def test_plan_cli_plans_batches_for_a_memory_size(capsys):
    # (the README's `--model s --memory 80GiB` works alike; B0 in 2 stages keeps this test quick)
    assert _plan(["--model", "b0", "--preset", "official", "--stages", "2", "--memory", "16GiB"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "batches planned for 16.0 GiB per device" in out[0] and "bf16" in out[0]
    rows = [line.split() for line in out[2:4]]
    sizes, batches = [int(r[1]) for r in rows], [int(r[7]) for r in rows]
    assert sizes == [160, 192]
    assert all(b % 8 == 0 for b in batches) and batches == sorted(batches, reverse=True) and batches[-1] > 8
    steps = [tuple(map(int, r[8].split("-"))) for r in rows]
    assert steps[0][0] == 0 and all(a[1] == b[0] for a, b in zip(steps, steps[1:]))
    assert all(r[10] == "GiB" and float(r[9]) <= 16 for r in rows)
    assert [float(r[11]) for r in rows] == pytest.approx([0.016 * b / 256 for b in batches], rel=1e-3)
    assert out[4].startswith("LR: linear in the batch")
    for size, batch in zip(sizes, batches):  # the largest multiple of 8 that fits
        mem = step_memory("efficientnetv2-b0", 1000, size, amp=torch.bfloat16)
        assert mem.total(batch) <= 16 * 2**30 < mem.total(batch + 8)


def test_plan_cli_budget_too_small_for_the_last_stage_is_one_line_naming_it(capsys):
    tight = step_memory("efficientnetv2-b0", 1000, 192, amp=torch.bfloat16).total(8) - 1
    assert _plan(["--model", "b0", "--stages", "2", "--memory", str(tight)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("effnetv2 plan: stage 1 (192px): a batch of 8 needs")
    assert _plan(["--model", "b0", "--memory", "auto"]) == 2
    assert "on a CPU give a size" in capsys.readouterr().err


# -- bench e2e --batch-plan memory -----------------------------------------------------------------------------


def test_e2e_bench_times_planned_batches_beside_the_fixed_one(shards):
    from effnetv2.bench.e2e import PLANNED, SERIES, run_e2e_bench

    budget = step_memory("efficientnetv2-demo", 4, 40).total(16)  # the plan's sizes: 36 and 40 px
    report = run_e2e_bench(shards, "efficientnetv2-demo", plan_of="efficientnetv2-b0", batch_size=8, device="cpu",
                           num_stages=2, image_size=(32, 40), warmup=1, reps=1, per_rep=1, workers=1,
                           batch_plan="memory", memory=str(budget))
    planned = report.config["planned_batches"]
    assert all(b % 8 == 0 for b in planned) and planned[0] >= planned[1] == 16  # the fixed batch is 8
    assert all(p <= budget for p in report.config["predicted_bytes"])
    for stage, batch in zip(report.config["stages"], planned):
        point = f"{stage['image_size']}px m5"
        rows = {r.series: r for r in report.rows if r.point == point}
        assert set(rows) == {*SERIES, *PLANNED} and all(r.status == "ok" for r in rows.values())
        assert rows[PLANNED[0]].params["batch_size"] == batch
        assert {r.name for r in report.ratios if r.point == point} >= {
            "planned / fixed batch: trainer + loader", "planned / fixed batch: trainer + synthetic"}
