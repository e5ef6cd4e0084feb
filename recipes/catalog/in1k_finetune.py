"""Fine-tune a 21k-pretrained model on ImageNet-1k (paper §5.2, Appendix; the official release's ``ft`` configs).

Starts from the EMA weights of the pretraining run (``--set init_from=RUN_DIR_OR_CKPT``) with a new,
re-initialised classifier, and trains at the model's eval size (S 384, M/L 480, XL 512): batch 512,
15 epochs, LR 0.0005 x batch/256 held constant (the released code; the paper says cosine:
``--set lr_schedule=cosine``), EMA 0.9996, weight decay 1e-5, label smoothing 0.1. Augmentation is
the official fine-tune one: the whole image resized to the size, flip, and a noise cutout of half-size
S/4 (``augment="finetune"``); no RandAugment or mixup.

    effnetv2 train in1k-finetune --data /data/imagenet-shards --set init_from=runs/in21k-pretrain
"""

from __future__ import annotations

import sys

from effnetv2.model import get_config
from effnetv2.recipes.engine.config import TrainConfig


def config(model: str = "efficientnetv2-s") -> TrainConfig:
    model_cfg = get_config(model)
    size, dropout = model_cfg.eval_size, model_cfg.dropout
    return TrainConfig(
        recipe="in1k-finetune", model=model, new_head=True, plan="paper", num_stages=1, epochs=15.0,
        batch_size=512, image_size=(size, size), randaug=(0.0, 0.0), mixup=(0.0, 0.0), cutmix=(0.0, 0.0),
        dropout=(dropout, dropout), randaug_layers=0, augment="finetune", eval_size=size, lr_per_256=0.0005,
        lr_schedule="constant", warmup_epochs=0.0, weight_decay=1e-5, label_smoothing=0.1, ema_decay=0.9996,
        drop_path_rate=0.2, bn_momentum=0.1, bn_eps=1e-3, train_split="train", eval_split="val",
    )


if __name__ == "__main__":
    from effnetv2.recipes.cli.train import recipe_main

    sys.exit(recipe_main("in1k-finetune"))
