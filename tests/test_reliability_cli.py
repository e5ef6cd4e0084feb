"""Bad configs, commands and files in the training CLI: one line naming the problem, the right exit code,
nothing written. Every bad input is made here."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from trainer_fixtures import one_thread, photo_shards, tiny_config  # noqa: F401 (autouse fixture)

from effnetv2.model import create_model, load_weights
from effnetv2.recipes.cli.main import main as cli
from effnetv2.recipes.engine import checkpoint
from effnetv2.recipes.engine.trainer import train


@pytest.fixture(scope="module")
def shards(tmp_path_factory, photos):
    return photo_shards(tmp_path_factory.mktemp("cli-shards"), photos, classes=2, n_train=32, n_val=16)


def _one_line_error(capsys, code: int, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == code, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("item, needles", [
    ("image_size=-32,40", ("image_size", "-32")),
    ("image_size=48,32", ("image_size", "exceeds")),
    ("lr_per_256=-1", ("lr_per_256", "> 0")),
    ("batch_size=-8", ("batch_size", ">= 1")),
    ("epochs=-5", ("epochs", ">= 0")),
    ("label_smoothing=1.0", ("label_smoothing",)),
    ("ema_decay=1.5", ("ema_decay",)),
    ("eval_crop=1.5", ("eval_crop",)),
    ("crop_area=0,1", ("crop_area",)),
    ("randaug=5,2", ("randaug",)),
    ("dropout=0,1.2", ("dropout",)),
    ("resize_every=0", ("resize_every",)),
    ("model=efficientnetv2-q", ("efficientnetv2-q",)),
    ("backend=pil", ("backend", "opencv")),
    ("amp=fp8", ("amp",)),
    ("num_workers=-1", ("num_workers",)),
])
@pytest.mark.parametrize("dry_run", [True, False])
def test_bad_values_are_one_line_and_exit_2(shards, tmp_path, capsys, item, needles, dry_run):
    out = tmp_path / "run"
    argv = ["train", "demo", "--data", str(shards), "--out", str(out), "--set", item]
    rc = cli(argv + (["--dry-run"] if dry_run else []))
    _one_line_error(capsys, 2, rc, *needles)
    assert not out.exists()  # nothing trained, nothing written


def test_plan_command_refuses_negative_values(capsys):
    for argv, why in ((["plan", "--epochs", "-5"], "must be positive"), (["plan", "--batch-size", "0"], "must be positive"),
                      (["plan", "--stages", "x"], "expected a whole number")):
        with pytest.raises(SystemExit) as e:
            cli(argv)
        assert e.value.code == 2
        assert why in capsys.readouterr().err
    assert cli(["plan", "--model", "demo"]) == 2
    _one_line_error(capsys, 2, 2, "no progressive-learning preset")


def test_demo_does_not_shard_into_a_mistyped_data_folder(tmp_path, capsys):
    typo = tmp_path / "shards-typo"
    rc = cli(["train", "demo", "--data", str(typo), "--out", str(tmp_path / "run")])
    _one_line_error(capsys, 2, rc, str(typo), "not a shard set", "--make-data")
    assert not typo.exists() and not (tmp_path / "run").exists()


def test_resuming_with_another_model_names_the_checkpoint(shards, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(shards, run, epochs=1.0, num_stages=1, image_size=(32, 32), eval_split="")
    train(cfg)
    ckpt = checkpoint.list_checkpoints(run)[0]
    other = dataclasses.replace(cfg, model="efficientnetv2-b0", resume=True)
    with pytest.raises(ValueError, match=rf"{ckpt}: .*'efficientnetv2-demo'.*--fresh"):
        train(other)


def test_load_weights_refuses_nan_naming_the_file(tmp_path):
    model = create_model("efficientnetv2-demo", 3)
    state = model.state_dict()
    state["stem.conv.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "diverged.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=rf"{path}.*NaN.*stem\.conv\.weight"):
        load_weights(create_model("efficientnetv2-demo", 3), path)
