"""The demo: progressive learning on real photos, end to end, on any machine (``make demo``).

Fashion-MNIST (70,000 real product photos, 10 classes; Debian package ``dataset-fashion-mnist``) is
sharded at its native 28 px with the project's own sharder (grayscale PNG in, RGB JPEG out), then a
small EfficientNetV2 built from the official blocks (``efficientnetv2-demo``, not an official model)
trains through 4 stages of growing image size and regularisation, evaluated with its EMA weights on the
official 10,000-image test split after every stage. It ends with a summary table, a chart and the
command to resume. Run twice, it reuses the shards and the finished run (``--fresh`` starts over).
Why each value: README, "The demo's choices".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from effnetv2.pipeline.format import atomic
from effnetv2.recipes.engine.config import TrainConfig

DATA = "data/fashion-mnist-28"
STORED_SIZE = 28  # native: every stage and the evaluation read the photos as they are


def config(model: str = "efficientnetv2-demo") -> TrainConfig:
    return TrainConfig(
        recipe="demo", model=model, data=DATA, out="runs/demo", train_split="train", eval_split="test",
        plan="paper", num_stages=4, epochs=12.0, batch_size=128,
        image_size=(28, 28), randaug=(0.0, 0.0), mixup=(0.0, 0.0), cutmix=(0.0, 0.0), dropout=(0.0, 0.1),
        crop_area=(1.0, 1.0), round_to=4, eval_size=28, randaug_layers=0, eval_crop=1.0, drop_path_rate=0.0,
        lr_per_256=0.048, lr_schedule="cosine", warmup_epochs=0.3, weight_decay=1e-5, label_smoothing=0.1,
        ema_decay=0.998, log_every=20, resume=True, torch_threads=1, num_workers=0, cpu_processes=2,
    )


def prepare(cfg: TrainConfig, args: argparse.Namespace) -> TrainConfig:
    """Make the Fashion-MNIST shard set unless a complete one is already there."""
    from effnetv2.pipeline.format.shards import MANIFEST, read_shard_set
    from effnetv2.pipeline.sharder import fashion_mnist
    from effnetv2.pipeline.sharder.writer import SourceItem, write_shard_set

    out = Path(cfg.data)
    asked = getattr(args, "make_data", False) or out.resolve() == Path(DATA).resolve()
    if not (out / MANIFEST).is_file() and not asked:
        raise ValueError(f"{out}: not a shard set (no {MANIFEST}); the demo makes its Fashion-MNIST shard set "
                         f"only in its own folder {DATA} or when asked (--make-data), or pass a shard set "
                         f"made by 'effnetv2 shard'")
    if (out / MANIFEST).is_file():
        ss = read_shard_set(out)
        counts = ", ".join(f"{s.name} {s.num_samples:,}" for s in ss.splits.values())
        print(f"demo: found the Fashion-MNIST shard set in {out} ({counts}); reusing it "
              f"(--fresh retrains, 'rm -r {out}' re-shards)")
        return cfg
    print(f"demo: sharding Fashion-MNIST into {out} ({STORED_SIZE} px, RGB JPEG)")
    splits = {}
    for split in ("train", "test"):
        images, labels = fashion_mnist.load(split)
        splits[split] = [SourceItem(png, (int(y),), f"{split}[{i}]")
                         for i, (png, y) in enumerate(zip(fashion_mnist.encoded(images, STORED_SIZE), labels))]
    write_shard_set(out, splits, fashion_mnist.CLASSES, shard_size=5000, quality=95, seed=0,
                    extra_info={"source": "fashion-mnist", "stored_size": STORED_SIZE}, progress=True)
    return cfg


def finish(cfg: TrainConfig, result) -> None:
    """Summary table, chart, checkpoint and the command to resume."""
    print("\nstage  size  randaug  mixup  dropout   steps         img/s    loss    top-1    top-5")
    for r in result.stages:
        print(f"{r['stage'] + 1:>5}  {r['image_size']:>4}  {r['randaug']:>7.2f}  {r['mixup']:>5.2f}  "
              f"{r['dropout']:>7.2f}  {r['first_step']:>5}-{r['end_step']:<5}  {r['imgs_per_s']:>7,.0f}  "
              f"{r['loss']:.4f}  {100 * r.get('top1', float('nan')):6.2f}%  {100 * r.get('top5', float('nan')):6.2f}%")
    chart = plot_run(Path(result.out))
    print(f"\ncheckpoint: {result.checkpoint}")
    print(f"chart:      {chart}")
    print(f"metrics:    {Path(result.out) / 'metrics.jsonl'}")
    print("resume:     make demo            (or: effnetv2 train demo --resume; --fresh starts over)")


def plot_run(out: Path) -> Path:
    """Accuracy and imgs/s per stage against steps, with the stage boundaries marked, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r["event"] == "train"]
    stages = {r["stage"]: r for r in records if r["event"] == "stage"}.values()
    fig, (ax_acc, ax_ips) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax_acc.plot([r["end_step"] for r in stages], [100 * r.get("top1", float("nan")) for r in stages], "o-",
                label="test top-1 (EMA)")
    ax_loss = ax_acc.twinx()
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:gray", alpha=0.5,
                 label="train loss")
    ax_loss.set_ylabel("train loss")
    ax_acc.set_ylabel("top-1 accuracy (%)")
    ax_acc.legend(loc="lower right")
    ax_ips.plot([r["step"] for r in train], [r["imgs_per_s"] for r in train], color="tab:green")
    ax_ips.set_ylabel("img/s")
    ax_ips.set_xlabel("step")
    for r in stages:
        for ax in (ax_acc, ax_ips):
            ax.axvline(r["first_step"], color="k", ls=":", lw=0.8)
        ax_ips.annotate(f"{r['image_size']}px\nm={r['randaug']:.1f}\ndrop {r['dropout']:.2f}", (r["first_step"], 0),
                        xycoords=("data", "axes fraction"), xytext=(3, 4), textcoords="offset points", fontsize=8)
    fig.suptitle("effnetv2 demo: progressive learning on Fashion-MNIST")
    fig.tight_layout()
    path = out / "demo.png"
    with atomic.atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    from effnetv2.recipes.cli.train import recipe_main

    sys.exit(recipe_main("demo"))
