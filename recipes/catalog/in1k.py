"""ImageNet-1k from scratch (paper §5.1 and the official release's ``hparams``): the official recipe, progressive, for S/M/L/XL and B0-B3.

Batch 4096, 350 epochs, TF RMSProp (0.9/0.9/1e-3), LR 0.016 x batch/256 with 5 warm-up epochs then
x0.97 every 2.4 epochs, weight decay 1e-5 (not on biases/norms), label smoothing 0.1, EMA 0.9999 with
warm-up, stochastic depth 0.2, BN momentum 0.1 (TF 0.9) and eps 1e-3; the ``official`` plan (4 stages,
sizes 128 -> train size by the released formula, RandAugment and mixup/cutmix ramped, dropout fixed).
Evaluation uses the EMA weights at the model's eval size on the shard set's ``val`` split
(``--set eval_split=minival`` for the official 25k held-out images: ``effnetv2 shard imagenet --minival``).

    effnetv2 train in1k --data /data/imagenet-shards --set model=efficientnetv2-m
"""

from __future__ import annotations

import sys

from effnetv2.recipes.engine.config import TrainConfig


def config(model: str = "efficientnetv2-s") -> TrainConfig:
    return TrainConfig(
        recipe="in1k", model=model, plan="official", epochs=350.0, num_stages=4, batch_size=4096,
        lr_per_256=0.016, lr_schedule="exponential", warmup_epochs=5.0, decay_epochs=2.4, decay_rate=0.97,
        rmsprop_decay=0.9, momentum=0.9, eps=1e-3, weight_decay=1e-5, label_smoothing=0.1,
        ema_decay=0.9999, drop_path_rate=0.2, bn_momentum=0.1, bn_eps=1e-3, randaug_layers=2,
        train_split="train", eval_split="val",
    )


if __name__ == "__main__":
    from effnetv2.recipes.cli.train import recipe_main

    sys.exit(recipe_main("in1k"))
