"""Transfer to a small labelled dataset (paper §5.3, Tables 8/9): CIFAR-10/100, Flowers, Cars, or
any ImageFolder shard set, from pretrained weights (``--set init_from=...``: one of our checkpoints or
run folders, or a weights file that ``effnetv2.model.load_weights`` reads).

The paper's setting for all four: batch 512, LR 0.001 (0.0005 x batch/256) cosine, 10,000 steps, no
weight decay, cutout; the classifier is new; trained and evaluated at the model's eval size with EMA
0.9996, label smoothing 0.1 and the fine-tune augmentation (whole image, flip, noise cutout of
half-size S/4), as the ImageNet fine-tune. Datasets split as ``train``/``test`` need
``--set eval_split=test``.

    effnetv2 train transfer --data /data/flowers-shards --set init_from=runs/in1k-finetune
"""

from __future__ import annotations

import sys

from effnetv2.model import get_config
from effnetv2.recipes.engine.config import TrainConfig


def config(model: str = "efficientnetv2-s") -> TrainConfig:
    model_cfg = get_config(model)
    size, dropout = model_cfg.eval_size, model_cfg.dropout
    return TrainConfig(
        recipe="transfer", model=model, new_head=True, plan="paper", num_stages=1, total_steps=10_000,
        epochs=1.0, batch_size=512, image_size=(size, size), randaug=(0.0, 0.0), mixup=(0.0, 0.0),
        cutmix=(0.0, 0.0), dropout=(dropout, dropout), randaug_layers=0, augment="finetune", eval_size=size, lr_per_256=0.0005,
        lr_schedule="cosine", warmup_epochs=0.0, weight_decay=0.0, label_smoothing=0.1, ema_decay=0.9996,
        drop_path_rate=0.2, bn_momentum=0.1, bn_eps=1e-3, train_split="train", eval_split="val",
    )


if __name__ == "__main__":
    from effnetv2.recipes.cli.train import recipe_main

    sys.exit(recipe_main("transfer"))
