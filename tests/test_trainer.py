"""The training loop on the CPU with the real loader and the real demo model, on real photo crops."""

from __future__ import annotations

import json
import math

import pytest
import torch
from trainer_fixtures import photo_shards, tiny_config

from effnetv2.recipes import checkpoint
from effnetv2.recipes.trainer import NonFiniteLoss, train


@pytest.fixture(scope="module")
def shards(tmp_path_factory, photos):
    return photo_shards(tmp_path_factory.mktemp("trainer-shards"), photos)


def test_short_run_loss_falls_and_reports_each_stage(shards, tmp_path):
    cfg = tiny_config(shards, tmp_path / "run", epochs=6.0, lr_per_256=0.1, warmup_epochs=0.5)
    result = train(cfg)
    assert result.finished and result.step == result.total_steps == 48  # 6 epochs of 64 // 8
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["event"] == "train"]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    stages = [r for r in records if r["event"] == "stage"]
    assert [(s["image_size"], s["first_step"], s["end_step"]) for s in stages] == [(32, 0, 24), (40, 24, 48)]
    assert [s["randaug"] for s in stages] == [0.0, 3.0] and [s["dropout"] for s in stages] == [0.0, 0.1]
    assert stages == result.stages
    last = result.stages[-1]
    assert last["eval_samples"] == 32 and last["eval_size"] == 40
    assert last["top1"] > 0.4  # 4 classes: chance is 0.25
    assert 0 < last["imgs_per_s"] and last["top1"] <= last["top5"] <= 1.0
    # a checkpoint per stage end; the last one holds what the run ended with
    assert result.checkpoint == checkpoint.checkpoint_path(tmp_path / "run", 48)
    state = checkpoint.load(result.checkpoint)
    assert state["step"] == 48 and len(state["reports"]) == 2
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"] == "efficientnetv2-demo"


def test_nan_loss_stops_naming_the_step_without_a_bad_checkpoint(shards, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(shards, out, lr_per_256=1e12, warmup_epochs=0.0, log_every=2, ckpt_every=2)
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at step (\d+)") as err:
        train(cfg)
    bad = int(err.value.args[0].split("at step ")[1].split()[0])
    for path in checkpoint.list_checkpoints(out):
        state = checkpoint.load(path)
        assert state["step"] <= bad, f"{path.name} written after the non-finite step {bad}"
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_existing_run_needs_resume_or_fresh(shards, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(shards, out, epochs=1.0, num_stages=1, eval_split=""))
    with pytest.raises(FileExistsError, match="pass --resume"):
        train(tiny_config(shards, out, epochs=1.0, num_stages=1, eval_split=""))
    again = train(tiny_config(shards, out, epochs=1.0, num_stages=1, eval_split="", resume=True))
    assert again.resumed_from is not None and again.step == 8 and len(again.stages) == 1
