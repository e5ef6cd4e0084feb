"""Two processes (torchrun, gloo, CPU) against one process on the same global batch.

Each rank reads exactly its half of every global batch (same samples, same per-sample augmentation)
and DDP averages the two half-batch gradients, which equals the full-batch gradient only if no
sample's gradient depends on the others. BatchNorm in training mode breaks that: each rank normalises
its 4 samples with their own statistics instead of all 8 (on this tiny model at initialisation the
gradient then differs by about as much as a different batch would; SyncBN fixes it but needs CUDA).
So the comparison runs with ``freeze_bn=True`` (BN normalises with its running statistics), no
dropout and no stochastic depth: then the two runs must agree to float rounding, through the whole
trainer (loader sharding, DDP, optimizer, EMA, metrics reduction, checkpoint).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from trainer_fixtures import one_thread, photo_shards, tiny_config  # noqa: F401 (autouse fixture)

from effnetv2.recipes.engine import checkpoint
from effnetv2.recipes.engine.trainer import train

_WORKER = textwrap.dedent("""
    import json, sys
    sys.path[:0] = sys.argv[1:2]
    from trainer_fixtures import tiny_config
    from effnetv2.recipes.engine import distributed
    from effnetv2.recipes.engine.trainer import train

    result = train(tiny_config(sys.argv[2], sys.argv[3], **json.loads(sys.argv[4])))
    print("RESULT", json.dumps({"step": result.step, "stages": result.stages}))
    distributed.shutdown()
""")

RUN = dict(epochs=2.0, freeze_bn=True, drop_path_rate=0.0, dropout=(0.0, 0.0), randaug=(0.0, 2.0),
           ckpt_every=0, lr_per_256=0.05)


@pytest.mark.slow
def test_two_gloo_ranks_agree_with_one_process(tmp_path, photos):
    shards = photo_shards(tmp_path / "shards", photos, classes=2)
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         os.path.dirname(__file__), str(shards), str(tmp_path / "two"), json.dumps(RUN)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    untimed = [[{k: v for k, v in s.items() if not k.endswith(("_s", "_per_s"))} for s in r["stages"]]
               for r in results]
    assert len(results) == 2 and untimed[0] == untimed[1]  # both ranks report the same reduced metrics
    two = results[0]
    one = train(tiny_config(shards, tmp_path / "one", **RUN))

    assert two["step"] == one.step == 16
    for s2, s1 in zip(two["stages"], one.stages):
        assert (s2["first_step"], s2["end_step"], s2["eval_samples"]) == (s1["first_step"], s1["end_step"], 32)
        assert s2["top1"] == s1["top1"] and s2["top5"] == s1["top5"]  # every val sample once over both ranks
        assert s2["loss"] == pytest.approx(s1["loss"], rel=1e-4)  # mean over ranks of the per-rank means
    w2 = checkpoint.load(checkpoint.list_checkpoints(tmp_path / "two")[0])
    w1 = checkpoint.load(one.checkpoint)
    moved = max((w1["model"][k] - v).abs().max() for k, v in _initial_weights().items() if v.is_floating_point())
    assert moved > 1e-3  # the runs trained (updates are ~100x the tolerance below)
    for part in ("model", "ema"):
        for key, value in w1[part].items():
            torch.testing.assert_close(w2[part][key], value, rtol=1e-4, atol=1e-5, msg=f"{part}.{key}")


def _initial_weights() -> dict[str, torch.Tensor]:
    from effnetv2.model import create_model

    torch.manual_seed(0)  # what the trainer does for seed 0
    return create_model("efficientnetv2-demo", 2, drop_path_rate=0.0).state_dict()
