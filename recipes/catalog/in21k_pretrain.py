"""ImageNet-21k pretraining (paper §5.2; the official release's ``21k`` configs): 60 epochs at 224 px, cosine, no augmentation beyond crop/flip.

Multi-label shards (``labels`` member) give targets that are multi-hot and normalised to sum 1;
the loss is softmax cross-entropy on them (``--set loss=bce`` for the sigmoid alternative). The head
has the shard set's class count (21,843 for fall11 as the official weights, fewer for winter21).
LR 0.008 x batch/256 with 1 warm-up epoch, no RandAugment, mixup, dropout, stochastic depth or label
smoothing; EMA 0.9999. Evaluation reports top-1/top-5 against the labels and precision@1/@5.

    effnetv2 train in21k-pretrain --data /data/in21k-shards
"""

from __future__ import annotations

import sys

from effnetv2.recipes.engine.config import TrainConfig


def config(model: str = "efficientnetv2-s") -> TrainConfig:
    return TrainConfig(
        recipe="in21k-pretrain", model=model, plan="paper", num_stages=1, epochs=60.0, batch_size=4096,
        image_size=(224, 224), randaug=(0.0, 0.0), mixup=(0.0, 0.0), cutmix=(0.0, 0.0), dropout=(0.0, 0.0),
        randaug_layers=0, drop_path_rate=0.0, label_smoothing=0.0, loss="softmax", eval_size=224,
        lr_per_256=0.008, lr_schedule="cosine", warmup_epochs=1.0, weight_decay=1e-5, ema_decay=0.9999,
        bn_momentum=0.1, bn_eps=1e-3, train_split="train", eval_split="val",
    )


if __name__ == "__main__":
    from effnetv2.recipes.cli.train import recipe_main

    sys.exit(recipe_main("in21k-pretrain"))
