"""Checkpoints: atomic files, truncated ones skipped, and kill -9 + --resume == an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from trainer_fixtures import one_thread, photo_shards, tiny_config  # noqa: F401 (autouse fixture)

from effnetv2.recipes.engine import checkpoint
from effnetv2.recipes.engine.trainer import train


@pytest.fixture(scope="module")
def shards(tmp_path_factory, photos):
    return photo_shards(tmp_path_factory.mktemp("resume-shards"), photos)


def _state(step: int) -> dict:
    return dict(model={"w": torch.full((3,), float(step))}, ema={}, optimizer={}, train_step={}, step=step,
                stage=0, config={})


def test_save_is_atomic_keeps_last_k_and_skips_truncated(tmp_path, capsys):
    for step in (4, 8, 12, 16):
        checkpoint.save(tmp_path, _state(step), keep_last=3)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "ckpt-000000016.pt", "ckpt-000000012.pt", "ckpt-000000008.pt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
    newest = checkpoint.checkpoint_path(tmp_path, 16)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a disk that filled up
    path, state = checkpoint.find_latest(tmp_path)
    assert path.name == "ckpt-000000012.pt" and torch.equal(state["model"]["w"], torch.full((3,), 12.0))
    err = capsys.readouterr().err
    assert "skipping" in err and "ckpt-000000016.pt" in err and "unreadable checkpoint" in err
    with pytest.raises(ValueError, match="lacks"):
        torch.save({"format": checkpoint.FORMAT, "step": 1}, tmp_path / "ckpt-000000001.pt")
        checkpoint.load(tmp_path / "ckpt-000000001.pt")


_KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path[:0] = sys.argv[1:2]
    from trainer_fixtures import tiny_config
    from effnetv2.recipes.engine import checkpoint, trainer

    real_save = checkpoint.save

    def save_then_die(out, state, keep_last=3):
        path = real_save(out, state, keep_last)
        if state["step"] == int(sys.argv[4]):
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit: like kill -9
        return path

    checkpoint.save = save_then_die
    trainer.train(tiny_config(sys.argv[2], sys.argv[3], **RUN))
""")


@pytest.mark.slow
def test_kill_9_then_resume_matches_uninterrupted_run(shards, tmp_path, capsys):
    # 2 stages of 8 steps; stochastic depth and dropout on, so the RNG state must be restored too
    run = dict(epochs=2.0, ckpt_every=3, log_every=3, eval_split="", drop_path_rate=0.2, dropout=(0.1, 0.2),
               mixup=(0.0, 0.2), cutmix=(0.0, 0.2))
    full = train(tiny_config(shards, tmp_path / "full", **run))
    assert full.step == 16

    out = tmp_path / "killed"
    script = tmp_path / "killer.py"
    script.write_text(f"RUN = {run!r}\n" + _KILLER)
    tests_dir = os.path.dirname(__file__)
    proc = subprocess.run([sys.executable, str(script), tests_dir, str(shards), str(out), "12"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p.name for p in checkpoint.list_checkpoints(out)] == [
        "ckpt-000000012.pt", "ckpt-000000009.pt", "ckpt-000000008.pt"]
    # the newest file is then damaged: resume must skip it and go back to step 9 (mid stage 2)
    newest = checkpoint.checkpoint_path(out, 12)
    newest.write_bytes(newest.read_bytes()[:4096])
    resumed = train(tiny_config(shards, out, resume=True, **run))
    assert "skipping" in capsys.readouterr().err
    assert resumed.resumed_from == checkpoint.checkpoint_path(out, 9) and resumed.step == 16

    a, b = checkpoint.load(full.checkpoint), checkpoint.load(resumed.checkpoint)
    for part in ("model", "ema"):
        for key, value in a[part].items():
            torch.testing.assert_close(b[part][key], value, rtol=0, atol=1e-6, msg=f"{part}.{key}")
    assert a["reports"][0]["end_step"] == b["reports"][0]["end_step"] == 8
    # the metrics file tells one history: the killed run's records after step 9 were dropped on resume
    logged = [[(r["step"], r["loss"]) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
               if r["event"] == "train"] for d in (tmp_path / "full", out)]
    assert [s for s, _ in logged[1]] == [s for s, _ in logged[0]] == [3, 6, 8, 9, 12, 15, 16]
    assert [x for _, x in logged[1]] == pytest.approx([x for _, x in logged[0]], abs=1e-6)
