"""Recipes: their official hyper-parameters, --set overrides, the train CLI, and 21k -> 1k end to end."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from trainer_fixtures import multilabel_shards, one_thread, photo_shards  # noqa: F401 (autouse fixture)

from effnetv2.model import CONFIGS
from effnetv2.recipes.catalog import in1k, in1k_finetune, in21k_pretrain, transfer
from effnetv2.recipes.cli import train as train_cli
from effnetv2.recipes.engine import checkpoint
from effnetv2.recipes.engine.config import TrainConfig, apply_overrides, format_config, validate
from effnetv2.recipes.engine.trainer import build_plan, train

OFFICIAL = {  # paper §5 and the official release's hparams
    in1k: dict(batch_size=4096, epochs=350.0, lr_per_256=0.016, lr_schedule="exponential", warmup_epochs=5.0,
               decay_epochs=2.4, decay_rate=0.97, weight_decay=1e-5, label_smoothing=0.1, ema_decay=0.9999,
               rmsprop_decay=0.9, momentum=0.9, eps=1e-3, bn_eps=1e-3, plan="official", num_stages=4),
    in21k_pretrain: dict(epochs=60.0, lr_per_256=0.008, lr_schedule="cosine", warmup_epochs=1.0,
                         label_smoothing=0.0, drop_path_rate=0.0, randaug_layers=0, image_size=(224, 224),
                         mixup=(0.0, 0.0), dropout=(0.0, 0.0), num_classes=0, loss="softmax"),
    in1k_finetune: dict(batch_size=512, epochs=15.0, lr_per_256=0.0005, lr_schedule="constant",
                        ema_decay=0.9996, weight_decay=1e-5, label_smoothing=0.1, new_head=True,
                        image_size=(384, 384), eval_size=384, augment="finetune", randaug_layers=0),
    transfer: dict(batch_size=512, total_steps=10_000, lr_per_256=0.0005, lr_schedule="cosine",
                   weight_decay=0.0, new_head=True, augment="finetune"),
}


@pytest.mark.parametrize("recipe", list(OFFICIAL), ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_recipes_carry_the_official_hyper_parameters(recipe):
    cfg = recipe.config()
    assert isinstance(cfg, TrainConfig) and cfg.model == "efficientnetv2-s"
    for key, value in OFFICIAL[recipe].items():
        assert getattr(cfg, key) == value, key
    assert cfg.lr_per_256 * cfg.batch_size / 256 == pytest.approx(
        {in1k: 0.256, in21k_pretrain: 0.128, in1k_finetune: 0.001, transfer: 0.001}[recipe])


def test_model_dependent_values_follow_the_model():
    assert in1k_finetune.config("efficientnetv2-l").image_size == (480, 480)
    assert in1k_finetune.config("efficientnetv2-xl").eval_size == 512
    sizes = [s.image_size for s in build_plan(in1k.config("efficientnetv2-m"))]
    assert sizes == [192, 256, 320, 384]
    assert [s.dropout for s in build_plan(in1k.config("efficientnetv2-b3"))] == [0.3] * 4


def test_set_overrides_are_type_checked():
    cfg = apply_overrides(in1k.config(), ["epochs=3.5", "batch_size=64", "randaug=(1,7)", "eval_crop=none",
                                          "cuda_graphs=false", "image-size=32,64", "num_workers=2"])
    assert (cfg.epochs, cfg.batch_size, cfg.randaug, cfg.eval_crop) == (3.5, 64, (1.0, 7.0), None)
    assert cfg.cuda_graphs is False and cfg.image_size == (32, 64) and cfg.num_workers == 2
    with pytest.raises(ValueError, match="batch_size=lots: expected int"):
        apply_overrides(cfg, ["batch_size=lots"])
    with pytest.raises(ValueError, match="expected 2 comma-separated values"):
        apply_overrides(cfg, ["randaug=5"])
    with pytest.raises(ValueError, match="no such config key; did you mean ema_decay"):
        apply_overrides(cfg, ["ema=0.9"])
    with pytest.raises(ValueError, match="expected a boolean"):
        apply_overrides(cfg, ["resume=maybe"])
    assert "  batch_size      = 64" in format_config(cfg)


def test_finetune_augmentation_is_checked_before_anything_is_built():
    cfg = apply_overrides(in1k_finetune.config(), ["data=/shards", "init_from=runs/in21k-pretrain"])
    validate(cfg)
    assert in1k.config().augment == "randaugment"
    with pytest.raises(ValueError, match="no RandAugment: set randaug_layers=0"):
        validate(apply_overrides(cfg, ["randaug_layers=2"]))
    with pytest.raises(ValueError, match="augment='autoaugment': choose one of randaugment, finetune"):
        validate(apply_overrides(cfg, ["augment=autoaugment"]))


def test_train_cli_dry_run_prints_config_and_plan(capsys):
    assert train_cli.main(["in1k", "--dry-run", "--data", "/nowhere", "--set", "model=efficientnetv2-m"]) == 0
    out = capsys.readouterr().out
    assert "model           = 'efficientnetv2-m'" in out and "data            = '/nowhere'" in out
    assert [line.split()[1] for line in out.splitlines()[-4:]] == ["192", "256", "320", "384"]
    assert train_cli.main(["in1k"]) == 2
    assert "pass --data DIR" in capsys.readouterr().err
    assert train_cli.main(["in1k", "--set", "epochs=many"]) == 2
    assert train_cli.main(["in1k-finetune", "--data", "/nowhere"]) == 2
    assert "set init_from=" in capsys.readouterr().err
    assert train_cli.main(["in1k", "--data", "/nowhere", "--set", "lr_schedule=step"]) == 2
    assert "lr_schedule='step': choose one of exponential, cosine, constant" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown recipe 'imagenet'"):
        train_cli.main(["imagenet"])


def test_cpu_processes_launch_only_on_a_cpu_outside_torchrun(monkeypatch):
    """How many torchrun ranks `effnetv2 train` starts: capped at the cores, none under torchrun or on a GPU."""
    cores = len(__import__("os").sched_getaffinity(0))
    cfg = TrainConfig(device="cpu")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert train_cli.cpu_ranks(cfg) == 1  # the default: one process
    assert train_cli.cpu_ranks(apply_overrides(cfg, ["cpu_processes=2"])) == min(2, cores)
    assert train_cli.cpu_ranks(apply_overrides(cfg, ["cpu_processes=64"])) == cores
    assert train_cli.cpu_ranks(apply_overrides(cfg, ["cpu_processes=0"])) == cores
    monkeypatch.setenv("WORLD_SIZE", "2")  # already a torchrun rank: never launch again
    assert train_cli.cpu_ranks(apply_overrides(cfg, ["cpu_processes=2"])) == 1
    with pytest.raises(ValueError, match="cpu_processes=-1: must be >= 0"):
        validate(apply_overrides(cfg, ["cpu_processes=-1"]), inputs=False)


def test_recipe_module_runs_as_a_script():
    proc = subprocess.run([sys.executable, "-m", "effnetv2.recipes.catalog.in21k_pretrain", "--dry-run",
                           "--set", "batch_size=1024"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "recipe          = 'in21k-pretrain'" in proc.stdout and "batch_size      = 1024" in proc.stdout
    assert proc.stdout.splitlines()[-1].split()[:2] == ["0", "224"]


@pytest.mark.slow
def test_in21k_pretrain_then_in1k_finetune_end_to_end(tmp_path, photos):
    """Pretrain on multi-label shards (6 classes) writes a checkpoint; the fine-tune (2 classes) starts
    from its EMA weights with a new head, through the recipes' own configs."""
    tiny = ["model=efficientnetv2-demo", "batch_size=8", "eval_batch_size=16", "num_workers=1", "device=cpu",
            "progress=false", "tensorboard=false", "log_every=3"]
    pre_cfg = apply_overrides(in21k_pretrain.config(), tiny + [
        f"data={multilabel_shards(tmp_path / 'in21k', photos)}", f"out={tmp_path / 'pre'}", "epochs=1",
        "image_size=32,32", "eval_size=32", "lr_per_256=0.016"])
    pre = train(pre_cfg)
    report = pre.stages[-1]
    assert pre.step == 6 and report["eval_samples"] == 16
    assert {"top1", "top5", "precision@1", "precision@5"} <= set(report)
    assert report["precision@1"] == report["top1"] and 0 <= report["precision@5"] <= report["top5"]
    ema = checkpoint.load(pre.checkpoint)["ema"]
    assert ema["classifier.weight"].shape == (6, 512)

    ft_cfg = apply_overrides(in1k_finetune.config("efficientnetv2-demo"), tiny + [
        f"data={photo_shards(tmp_path / 'in1k', photos, classes=2)}", f"out={tmp_path / 'ft'}",
        f"init_from={tmp_path / 'pre'}", "epochs=0.5"])
    size = CONFIGS["efficientnetv2-demo"].eval_size
    assert ft_cfg.image_size == (size, size) and ft_cfg.eval_size == size and ft_cfg.new_head
    ft = train(ft_cfg)
    assert ft.step == 4 and ft.stages[-1]["eval_samples"] == 32
    tuned = checkpoint.load(ft.checkpoint)["model"]
    assert tuned["classifier.weight"].shape == (2, 512)
    # LR 0.0005 x 8/256 for 4 steps: the body is still the pretraining's EMA, not a fresh init
    body = [k for k, v in ema.items() if v.is_floating_point() and not k.startswith("classifier")
            and "running" not in k]
    assert max((tuned[k] - ema[k]).abs().max() for k in body) < 2e-3
    torch.manual_seed(0)
    from effnetv2.model import create_model

    fresh = create_model("efficientnetv2-demo", 2).state_dict()
    assert max((fresh[k] - ema[k]).abs().max() for k in body) > 0.05
