"""The training loop: for each stage, build its loader, set its dropout, (re)capture, train, evaluate
with the EMA weights, log, checkpoint. Read :func:`train` top to bottom.

Host syncs happen only every ``log_every`` steps (loss, LR, non-finite check, progress), at
checkpoints and at stage ends; the step itself never waits for the GPU. Global step ``k`` reads
sample position ``k % steps_per_epoch`` of epoch ``k // steps_per_epoch``, so a run resumed from any
checkpoint, or a stage starting mid-epoch, sees exactly the batches the uninterrupted run sees.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from . import checkpoint, distributed
from .config import TrainConfig, format_config, validate
from .ema import EMA
from .optim import RMSpropTF, weight_decay_groups
from .plan import Stage, format_plan, make_plan, stage_bounds
from .schedule import make_schedule
from .step import TrainStep

_RUNTIME_KEYS = {"out", "resume", "progress", "stop_at", "log_every", "ckpt_every", "keep_last", "tensorboard",
                 "device", "backend", "num_workers", "cuda_graphs", "compile"}


class NonFiniteLoss(RuntimeError):
    """The loss (or the weights) became NaN/inf; the message names the step."""


@dataclass
class RunResult:
    out: Path
    checkpoint: Path | None  # the newest checkpoint written or resumed from
    step: int  # global steps done
    total_steps: int
    stages: list[dict]  # one report per finished stage (size, magnitudes, imgs/s, loss, accuracy, ...)
    finished: bool  # False when stopped early by stop_at
    resumed_from: Path | None = None


def train(cfg: TrainConfig) -> RunResult:
    """Run ``cfg`` to the end (or to ``cfg.stop_at``); rank 0 prints, logs and writes checkpoints."""
    from effnetv2.model import create_model
    from effnetv2.pipeline.format.shards import read_shard_set
    from effnetv2.pipeline.loaders.loader import build_train_loader

    validate(cfg)
    info = distributed.init(cfg.device)
    device, main = info.device, info.is_main
    out = Path(cfg.out_dir())
    say = _printer(main)
    say(f"effnetv2 train {cfg.recipe}: resolved config\n{format_config(cfg)}")
    if cfg.batch_size % info.world_size:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {info.world_size} ranks")
    local_batch = cfg.batch_size // info.world_size
    data_seed = cfg.seed if cfg.data_seed is None else cfg.data_seed
    amp_dtype = resolve_amp(cfg.amp, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)

    # -- data, model, EMA, optimizer (same initial weights on every rank: same seed, then DDP broadcast)
    shards = read_shard_set(cfg.data)
    num_classes = cfg.num_classes or shards.num_classes
    if cfg.eval_split and cfg.eval_split not in shards.splits:
        say(f"note: {cfg.data} has no split {cfg.eval_split!r} (it has {sorted(shards.splits)}); no evaluation")
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes, drop_path_rate=cfg.drop_path_rate,
                         bn_momentum=cfg.bn_momentum, bn_eps=cfg.bn_eps, tf_padding=cfg.tf_padding)
    if cfg.init_from:
        say(f"initial weights: {checkpoint.load_init_weights(model, cfg.init_from, new_head=cfg.new_head)}")
    model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    forward = distributed.wrap(model, info, sync_bn=cfg.sync_bn)
    if cfg.freeze_bn:  # then no sample's gradient depends on the rest of its batch
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    ema = EMA(model, cfg.ema_decay, warmup=cfg.ema_warmup)
    optimizer = RMSpropTF(weight_decay_groups(model, cfg.weight_decay), rho=cfg.rmsprop_decay,
                          momentum=cfg.momentum, eps=cfg.eps)
    torch.manual_seed(cfg.seed + 1 + info.rank)  # dropout / stochastic-depth masks differ per rank

    # -- the plan, in steps
    stages = build_plan(cfg)
    steps_per_epoch = shards.split(cfg.train_split).num_samples // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{cfg.data}: split {cfg.train_split!r} has fewer samples than one batch "
                         f"({cfg.batch_size})")
    total = cfg.total_steps or int(sum(s.epochs for s in stages) * steps_per_epoch + 1e-9)
    bounds = stage_bounds(stages, total)
    schedule = make_schedule(cfg.lr_schedule, lr_per_256=cfg.lr_per_256, global_batch=cfg.batch_size,
                             steps_per_epoch=steps_per_epoch, total_steps=total,
                             warmup_epochs=cfg.warmup_epochs, decay_epochs=cfg.decay_epochs,
                             decay_rate=cfg.decay_rate, min_lr=cfg.min_lr)
    step_fn = TrainStep(forward, model, optimizer, ema, schedule, label_smoothing=cfg.label_smoothing,
                        loss=cfg.loss, amp_dtype=amp_dtype, cuda_graph=cfg.cuda_graphs,
                        warmup_steps=11 if info.enabled else 3, compile=cfg.compile)
    say(f"plan: {len(stages)} stages, {total} steps of {cfg.batch_size} images ({steps_per_epoch} steps/epoch), "
        f"{info.world_size} rank(s) on {device}, amp {amp_dtype}, cuda graphs {step_fn.cuda_graph}")
    say(format_plan(stages))

    # -- resume
    step, reports, resumed, ckpt_path = 0, [], None, None
    found = _find_resume(out, cfg, main)
    if found is not None:
        resumed, state = found
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step_fn.load_state_dict(state["train_step"])
        step, reports, ckpt_path = int(state["step"]), list(state["reports"]), resumed
        rngs = state["rng"]
        checkpoint.set_rng_state(rngs[info.rank] if len(rngs) == info.world_size else rngs[0])
        _note_config_changes(state["config"], cfg, say)
        say(f"resumed from {resumed} at step {step} ({len(reports)} of {len(stages)} stages finished)")
        if len(reports) == len(stages):
            say(f"nothing left to train: the run in {out} is complete")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
    log = _MetricsLog(out, main, cfg.tensorboard, keep_until=step if resumed else None)
    bar = tqdm(total=total, initial=step, unit="step", disable=not (main and cfg.progress), dynamic_ncols=True)

    def save(stage_index: int) -> Path | None:
        """Checkpoint after ``step`` (all ranks call it: it gathers every rank's RNG state)."""
        _check_finite_weights(model, ema, step)
        rngs = distributed.gather(checkpoint.rng_state())
        if not main:
            return None
        state = dict(model=model.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                     train_step=step_fn.state_dict(), step=step, stage=stage_index, reports=reports,
                     data_position={"epoch": step // steps_per_epoch, "step": step % steps_per_epoch},
                     schedule=dataclasses.asdict(schedule),
                     rng=rngs, config=dataclasses.asdict(cfg))
        return checkpoint.save(out, state, cfg.keep_last)

    # -- the stages
    for stage, (first, end) in zip(stages, bounds):
        if stage.index < len(reports):
            continue  # trained and evaluated before the resume
        t_setup = time.perf_counter()
        loader = build_train_loader(
            shards, local_batch, stage.image_size,
            stage.randaug_magnitude if cfg.randaug_layers > 0 else None, stage.mixup_alpha,
            stage.cutmix_alpha, num_classes=num_classes, device=str(device), backend=cfg.backend,
            rank=info.rank, world_size=info.world_size, seed=data_seed, randaug_layers=cfg.randaug_layers,
            split=cfg.train_split, num_workers=cfg.num_workers, crop_area=cfg.crop_area,
            augment=cfg.augment)
        if len(loader) != steps_per_epoch:
            raise RuntimeError(f"loader has {len(loader)} steps per epoch, the plan assumed {steps_per_epoch}")
        model.set_dropout(stage.dropout)
        setup_s = time.perf_counter() - t_setup
        bar.set_description(f"stage {stage.index + 1}/{len(stages)} {stage.image_size}px")
        t_stage = t_last = time.perf_counter()
        stage_first, last_step, losses = step, step, []
        for images, targets in stage_batches(loader, step, end, steps_per_epoch):
            step_fn(images, targets)
            step += 1
            bar.update(1)
            ckpt_due = cfg.ckpt_every and step % cfg.ckpt_every == 0 and step != end
            stop = cfg.stop_at and step >= cfg.stop_at
            if step % cfg.log_every == 0 or step == end or ckpt_due or stop:
                loss, lr = _sync_stats(step_fn, step - last_step, stage)
                now = time.perf_counter()
                ips = (step - last_step) * cfg.batch_size / max(now - t_last, 1e-9)
                t_last, last_step = now, step
                losses.append(loss)
                bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.3g} {ips:,.0f} img/s")
                log.write(dict(event="train", step=step, stage=stage.index, loss=loss, lr=lr, imgs_per_s=ips))
            if ckpt_due or stop:
                ckpt_path = save(stage.index) or ckpt_path
            if stop:
                loader.close()
                step_fn.release()
                bar.close()
                log.close()
                say(f"stopped at step {step} (stop_at); resume with --resume")
                return RunResult(out, ckpt_path, step, total, reports, False, resumed)
        train_s = time.perf_counter() - t_stage
        loader.close()
        step_fn.release()

        metrics = {}
        if cfg.eval_split and cfg.eval_split in shards.splits:
            metrics = evaluate(ema.module, shards, cfg, info, amp_dtype, num_classes)
        report = dict(stage=stage.index, image_size=stage.image_size, randaug=stage.randaug_magnitude,
                      mixup=stage.mixup_alpha, cutmix=stage.cutmix_alpha, dropout=stage.dropout,
                      first_step=first, end_step=end, steps_trained=step - stage_first,
                      imgs_per_s=(step - stage_first) * cfg.batch_size / max(train_s, 1e-9),
                      train_s=train_s, setup_s=setup_s, loss=losses[-1] if losses else math.nan, **metrics)
        reports.append(report)
        log.write(dict(event="stage", step=step, **report))
        say(format_report(report, len(stages)))
        ckpt_path = save(stage.index) or ckpt_path

    bar.close()
    say(f"done: {step} steps; checkpoint {ckpt_path}")
    log.close()
    return RunResult(out, ckpt_path, step, total, reports, True, resumed)


def build_plan(cfg: TrainConfig) -> tuple[Stage, ...]:
    """The config's stages (a preset plus any ranges the config sets)."""
    return make_plan(cfg.model, cfg.plan, epochs=cfg.epochs, batch_size=cfg.batch_size,
                     num_stages=cfg.num_stages, size=cfg.image_size, randaug=cfg.randaug, mixup=cfg.mixup,
                     cutmix=cfg.cutmix, dropout=cfg.dropout, round_to=cfg.round_to,
                     resize_every=cfg.resize_every, seed=cfg.seed)


def resolve_amp(name: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 on a GPU that supports it, else full precision (CPU autocast is slower than fp32)."""
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    choices = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
    if name not in choices:
        raise ValueError(f"unknown amp {name!r}; use auto, bf16, fp16 or none")
    return choices[name]


def stage_batches(loader, step: int, end: int, steps_per_epoch: int) -> Iterator[tuple]:
    """The batches of global steps ``[step, end)``: the loader starts at the exact sample position of
    ``step`` and rolls over into the following epochs."""
    while step < end:
        epoch, k = divmod(step, steps_per_epoch)
        loader.load_state_dict({"epoch": epoch, "step": k})
        for batch in loader:
            yield batch
            step += 1
            if step >= end:
                return


@torch.no_grad()
def evaluate(model: nn.Module, shards, cfg: TrainConfig, info: distributed.DistInfo,
             amp_dtype: torch.dtype | None, num_classes: int) -> dict[str, float]:
    """Top-1/top-5 and cross-entropy (no smoothing) of ``model`` (the EMA) on the eval split at the eval
    size, summed over ranks.

    A prediction is correct when it is one of the sample's labels, so the same code scores multi-label
    data; there ``precision@k`` (labels among the top k, divided by k) is reported too.
    """
    from effnetv2.pipeline.loaders.loader import build_eval_loader

    size = cfg.eval_size or model.config.eval_size
    batch = (cfg.eval_batch_size or cfg.batch_size) // info.world_size
    loader = build_eval_loader(shards, max(batch, 1), size, crop_ratio=cfg.eval_crop, split=cfg.eval_split,
                               device=str(info.device), backend=cfg.backend, rank=info.rank,
                               world_size=info.world_size, num_classes=num_classes)
    sums = torch.zeros(5, dtype=torch.float64, device=info.device)  # top1, top5, hits in top5, loss, count
    k = min(5, num_classes)
    for images, targets, valid in loader:
        with torch.autocast(info.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images).float()
        hit = targets.gather(1, logits.topk(k, dim=1).indices) > 0
        soft = targets / targets.sum(1, keepdim=True).clamp_min(1.0)  # multi-hot -> sums to 1, as in training
        loss = -(soft * logits.log_softmax(1)).sum(1)
        v = valid.to(torch.float64)
        sums += torch.stack([(hit[:, 0] * v).sum(), (hit.any(1) * v).sum(), (hit.sum(1) * v).sum(),
                             (loss * v).sum(), v.sum()])
    loader.close()
    top1, top5, hits, loss_sum, n = distributed.all_reduce_sum(sums).tolist()
    n = max(n, 1.0)
    metrics = {"top1": top1 / n, "top5": top5 / n, "eval_loss": loss_sum / n, "eval_samples": int(n),
               "eval_size": size}
    if shards.multilabel:
        metrics.update({"precision@1": top1 / n, "precision@5": hits / (k * n)})
    return metrics


def format_report(r: dict, num_stages: int) -> str:
    acc = f" | top1 {100 * r['top1']:.2f}% top5 {100 * r['top5']:.2f}%" if "top1" in r else ""
    return (f"stage {r['stage'] + 1}/{num_stages} | {r['image_size']}px randaug {r['randaug']:.1f} "
            f"mixup {r['mixup']:.2f} cutmix {r['cutmix']:.2f} dropout {r['dropout']:.2f} | steps "
            f"{r['first_step']}-{r['end_step']} | {r['imgs_per_s']:,.0f} img/s | loss {r['loss']:.4f}{acc} | "
            f"{r['train_s']:.1f} s")


def _sync_stats(step_fn: TrainStep, steps: int, stage: Stage) -> tuple[float, float]:
    """Mean loss and LR since the last sync, over all ranks; raise if any step's loss was not finite."""
    stats = distributed.gather(step_fn.read_stats(steps))
    bad = [b for _, _, b in stats if b >= 0]
    if bad:
        raise NonFiniteLoss(f"non-finite loss at step {min(bad)} (stage {stage.index + 1}, "
                            f"{stage.image_size}px); stopped without writing a checkpoint after it")
    return sum(s[0] for s in stats) / len(stats), stats[0][1]


def _check_finite_weights(model: nn.Module, ema: EMA, step: int) -> None:
    """Parameters and BN statistics of the model and the EMA: a checkpoint must never hold NaN/inf
    (the loss of step k is finite while the update it makes may not be)."""
    tensors = [t for m in (model, ema.module) for t in m.state_dict().values() if t.is_floating_point()]
    if not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        raise NonFiniteLoss(f"weights or BN statistics became non-finite by step {step}; "
                            f"stopped without writing a checkpoint")


def _find_resume(out: Path, cfg: TrainConfig, main: bool) -> tuple[Path, dict] | None:
    """Rank 0 picks the checkpoint, every rank loads that file."""
    existing = checkpoint.list_checkpoints(out)
    if existing and not cfg.resume:
        raise FileExistsError(f"{out} already holds checkpoints (newest {existing[0].name}); pass --resume to "
                              f"continue that run, --fresh to start over, or another --out")
    if not cfg.resume:
        return None
    found = checkpoint.find_latest(out) if main else None
    path = distributed.broadcast(None if found is None else str(found[0]))
    if path is None:
        return None
    return found if main else (Path(path), checkpoint.load(path))


def _note_config_changes(saved: dict, cfg: TrainConfig, say) -> None:
    now = dataclasses.asdict(cfg)
    changed = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in now
               if k in saved and k not in _RUNTIME_KEYS and _norm(saved[k]) != _norm(now[k])]
    if changed:
        say("note: config differs from the checkpoint's: " + "; ".join(changed))


def _norm(v):
    return list(v) if isinstance(v, tuple | list) else v


def _printer(main: bool):
    def say(msg: str) -> None:
        if main:
            tqdm.write(msg)
    return say


class _MetricsLog:
    """JSON lines in ``out/metrics.jsonl`` (and TensorBoard scalars if tensorboard is installed). A resumed
    run first drops the records of steps after its checkpoint, so that the file tells one history."""

    def __init__(self, out: Path, main: bool, tensorboard: bool, keep_until: int | None = None) -> None:
        path = out / "metrics.jsonl"
        if main and keep_until is not None and path.is_file():  # resumed: drop what the checkpoint lost
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            path.write_text("".join(x for x in lines if x.strip() and json.loads(x)["step"] <= keep_until),
                            encoding="utf-8")
        self.file = open(path, "a", encoding="utf-8") if main else None
        self.tb = None
        if main and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"))
            except ImportError:
                pass

    def write(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, float) and k != "step":
                    self.tb.add_scalar(f"{record['event']}/{k}", v, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
