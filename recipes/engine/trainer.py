"""The training loop, in named parts: :func:`train` reads them top to bottom, ``effnetv2 bench`` and
the other commands call the same parts instead of rebuilding them.

- :func:`build_run` sets a run up: data, model, EMA, optimizer, schedule, the step, the plan in steps.
- :func:`resume` continues it from the newest valid checkpoint.
- :func:`open_stage` is the stage switch: the stage's loader and dropout (the step re-captures itself).
- :func:`train_stage` trains a stage's steps, logging and checkpointing on the way.
- :func:`close_stage` frees the loader's workers/pipeline and the step's graph; :func:`train` calls it
  in ``finally``, so a :class:`NonFiniteLoss` or Ctrl-C never leaves workers or a DALI pipeline alive.

Host syncs happen only every ``log_every`` steps, at checkpoints and at stage ends; the step never waits
for the GPU. Each stage reads on from the data position (epoch, sample) where the previous one stopped,
at its own batch (:func:`~effnetv2.recipes.engine.plan.stage_spans`; with one batch, global step ``k``
reads batch ``k % steps_per_epoch`` of epoch ``k // steps_per_epoch``), so a resumed run, or a stage
starting mid-epoch, sees exactly the batches the uninterrupted run sees (:func:`stage_batches`).
With ``batch_plan=memory`` every stage gets the largest batch that fits (:mod:`.batch_plan`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from . import checkpoint, distributed
from .batch_plan import StagedLR, lr_rule, plan_stage_batches, run_budget
from .config import TrainConfig, format_config, runtime_keys, validate
from .ema import EMA
from .evaluate import eval_loader, evaluate
from .metrics import MetricsLog
from .optim import RMSpropTF, weight_decay_groups
from .plan import Span, Stage, format_plan, make_plan, stage_spans
from .schedule import LRSchedule, make_schedule
from .step import TrainStep, resolve_amp


class NonFiniteLoss(RuntimeError):
    """The loss (or the weights) became NaN/inf; the message names the step."""


@dataclass
class Run:
    """One training run as built from its config: what every part of the loop reads and updates."""

    cfg: TrainConfig
    info: distributed.DistInfo
    shards: object  # effnetv2.pipeline.format.ShardSet
    num_classes: int
    model: nn.Module  # the plain model: the optimizer and the EMA hold its parameters
    ema: EMA
    optimizer: RMSpropTF
    step_fn: TrainStep
    stages: tuple[Stage, ...]
    spans: list[Span]  # each stage in global steps, batch and data position
    steps_per_epoch: int  # at the configured batch: the LR schedule's clock
    step: int = 0  # global steps done
    reports: list[dict] = field(default_factory=list)  # one per finished stage
    memory: tuple = ()  # batch_plan=memory: each stage's StepMemory (effnetv2.model.memory)
    budget: int = 0  # batch_plan=memory: bytes per device the batches were planned for

    @property
    def bounds(self) -> list[tuple[int, int]]:
        """(first, end) global step of each stage."""
        return [(s.first, s.end) for s in self.spans]

    @property
    def total_steps(self) -> int:
        return self.spans[-1].end if self.spans else 0

    @property
    def local_batch(self) -> int:
        return self.cfg.batch_size // self.info.world_size

    @property
    def data_seed(self) -> int:
        return self.cfg.seed if self.cfg.data_seed is None else self.cfg.data_seed


@dataclass
class RunResult:
    out: Path
    checkpoint: Path | None  # the newest checkpoint written or resumed from
    step: int  # global steps done
    total_steps: int
    stages: list[dict]  # one report per finished stage (size, magnitudes, imgs/s, loss, accuracy, ...)
    finished: bool  # False when stopped early by stop_at
    resumed_from: Path | None = None
    backend: str = ""  # the loader backend the stages used ("dali", "opencv")
    cuda_graphs: bool = False  # whether the step ran as captured CUDA graphs


# -- set-up -----------------------------------------------------------------------------------------
def build_model(cfg: TrainConfig, num_classes: int, device: torch.device) -> nn.Module:
    """The network of ``cfg`` on ``device`` (channels_last), from ``init_from`` if set; seeded by ``cfg.seed``
    so that every rank starts from the same weights."""
    from effnetv2.model import create_model

    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes, drop_path_rate=cfg.drop_path_rate, bn_momentum=cfg.bn_momentum,
                         bn_eps=cfg.bn_eps, tf_padding=cfg.tf_padding)
    if cfg.init_from:
        checkpoint.load_init_weights(model, cfg.init_from, new_head=cfg.new_head)
    return model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)


def build_schedule(cfg: TrainConfig, steps_per_epoch: int, total_steps: int) -> LRSchedule:
    return make_schedule(cfg.lr_schedule, lr_per_256=cfg.lr_per_256, global_batch=cfg.batch_size,
                         steps_per_epoch=steps_per_epoch, total_steps=total_steps, warmup_epochs=cfg.warmup_epochs,
                         decay_epochs=cfg.decay_epochs, decay_rate=cfg.decay_rate, min_lr=cfg.min_lr)


def build_step(cfg: TrainConfig, model: nn.Module, info: distributed.DistInfo,
               schedule: LRSchedule) -> tuple[EMA, RMSpropTF, TrainStep]:
    """DDP (when several ranks), EMA, TF-RMSProp and the step around ``model``, as a run trains it."""
    forward = distributed.wrap(model, info, sync_bn=cfg.sync_bn)
    if cfg.freeze_bn:  # then no sample's gradient depends on the rest of its batch
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    ema = EMA(model, cfg.ema_decay, warmup=cfg.ema_warmup)
    optimizer = RMSpropTF(weight_decay_groups(model, cfg.weight_decay), rho=cfg.rmsprop_decay,
                          momentum=cfg.momentum, eps=cfg.eps)
    step_fn = TrainStep(forward, model, optimizer, ema, schedule, label_smoothing=cfg.label_smoothing,
                        loss=cfg.loss, amp_dtype=resolve_amp(cfg.amp, info.device), cuda_graph=cfg.cuda_graphs,
                        warmup_steps=11 if info.enabled else 3, compile=cfg.compile)
    return ema, optimizer, step_fn


def build_plan(cfg: TrainConfig) -> tuple[Stage, ...]:
    """The config's stages (a preset plus any ranges the config sets)."""
    return make_plan(cfg.model, cfg.plan, epochs=cfg.epochs, batch_size=cfg.batch_size,
                     num_stages=cfg.num_stages, size=cfg.image_size, randaug=cfg.randaug, mixup=cfg.mixup,
                     cutmix=cfg.cutmix, dropout=cfg.dropout, round_to=cfg.round_to,
                     resize_every=cfg.resize_every, seed=cfg.seed)


def build_run(cfg: TrainConfig, stages: tuple[Stage, ...] | None = None) -> Run:
    """Everything a run needs before its first step; writes nothing. ``stages`` replaces the config's
    plan (a benchmark following another model's plan)."""
    from effnetv2.pipeline.format import read_shard_set
    from effnetv2.pipeline.loaders.sampler import SampleTable

    validate(cfg)
    info = distributed.init(cfg.device)
    if cfg.batch_size % info.world_size:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {info.world_size} ranks")
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    shards = read_shard_set(cfg.data)
    num_classes = cfg.num_classes or shards.num_classes
    if cfg.eval_split in shards.splits:  # a bad eval index fails now, not after a stage of training
        SampleTable.from_shards(shards, cfg.eval_split, num_classes)
    stages = stages or build_plan(cfg)
    num_samples = shards.split(cfg.train_split).num_samples
    steps_per_epoch = num_samples // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{cfg.data}: split {cfg.train_split!r} has fewer samples than one batch "
                         f"({cfg.batch_size})")
    memory, budget = (), 0
    if cfg.batch_plan == "memory":
        from effnetv2.model import get_config

        budget = min(distributed.gather(run_budget(cfg.memory, info.device)))  # ranks agree on the batches
        stages, memory = plan_stage_batches(
            stages, model=get_config(cfg.model), num_classes=num_classes, budget=budget,
            amp=resolve_amp(cfg.amp, info.device), channels_last=cfg.channels_last, tf_padding=cfg.tf_padding,
            world_size=info.world_size, max_batch=cfg.max_batch, num_samples=num_samples, margin=cfg.memory_margin)
    total = cfg.total_steps or int(sum(s.epochs for s in stages) * steps_per_epoch + 1e-9)
    spans = stage_spans(stages, total, num_samples=num_samples, batch_size=cfg.batch_size,
                        world_size=info.world_size)
    model = build_model(cfg, num_classes, info.device)
    schedule = build_schedule(cfg, steps_per_epoch, total)
    if cfg.batch_plan == "memory":
        schedule = StagedLR(schedule, cfg.batch_size, info.device)
    ema, optimizer, step_fn = build_step(cfg, model, info, schedule)
    torch.manual_seed(cfg.seed + 1 + info.rank)  # dropout / stochastic-depth masks differ per rank
    return Run(cfg, info, shards, num_classes, model, ema, optimizer, step_fn, stages, spans, steps_per_epoch,
               memory=memory, budget=budget)


def resume(run: Run, out: Path, say: Callable[[str], None]) -> Path | None:
    """Load the newest valid checkpoint of ``out`` into ``run`` (with ``cfg.resume``); returns its path.

    Rank 0 picks the file and every rank loads it. Without ``resume``, existing checkpoints are an error:
    a run never silently overwrites another.
    """
    cfg, main = run.cfg, run.info.is_main
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
    state = found[1] if main else checkpoint.load(path)
    checkpoint.load_run_state(path, state, run.model, run.ema, run.optimizer, run.step_fn)
    run.step, run.reports = int(state["step"]), list(state["reports"])
    if cfg.batch_plan == "memory" and state["config"].get("batch_plan") == "memory":
        _resume_batches(run, state.get("stage_batches"), say)
    rngs = state["rng"]
    checkpoint.set_rng_state(rngs[run.info.rank] if len(rngs) == run.info.world_size else rngs[0])
    now = dataclasses.asdict(cfg)
    changed = [f"{k}: {state['config'][k]!r} -> {now[k]!r}" for k in now
               if k in state["config"] and k not in runtime_keys() and _norm(state["config"][k]) != _norm(now[k])]
    if changed:
        say("note: config differs from the checkpoint's: " + "; ".join(changed))
    say(f"resumed from {path} at step {run.step} ({_evaluated(run.reports)} of {len(run.stages)} stages finished)")
    if _evaluated(run.reports) == len(run.stages):
        say(f"nothing left to train: the run in {out} is complete")
    return Path(path)


def _resume_batches(run: Run, batches: list[int] | None, say: Callable[[str], None]) -> None:
    """A planned run goes on at the batches its checkpoint trained with (the budget, e.g. ``auto`` on
    another GPU, may plan others now): the data positions and the LR follow from them."""
    now = [s.batch_size for s in run.stages]
    if not batches or list(batches) == now:
        return
    if len(batches) != len(run.stages):
        raise ValueError(f"the checkpoint's plan has {len(batches)} stages, this one {len(run.stages)}")
    run.stages = tuple(dataclasses.replace(s, batch_size=b) for s, b in zip(run.stages, batches))
    run.spans = stage_spans(run.stages, run.spans[-1].ref_end, batch_size=run.cfg.batch_size,
                            num_samples=run.shards.split(run.cfg.train_split).num_samples,
                            world_size=run.info.world_size)
    say(f"note: keeping the checkpoint's stage batches {list(batches)} (this budget plans {now})\n"
        + describe_plan(run))


def describe_plan(run: Run) -> str:
    """The printed plan: a line on the run, the table; with planned batches also the steps, the predicted
    memory per device and the peak LR per stage, and the LR rule."""
    cfg, info, step_fn = run.cfg, run.info, run.step_fn
    where = f"{info.world_size} rank(s) on {info.device}, amp {step_fn.amp_dtype}, cuda graphs {step_fn.cuda_graph}"
    if not run.memory:
        return (f"plan: {len(run.stages)} stages, {run.total_steps} steps of {cfg.batch_size} images "
                f"({run.steps_per_epoch} steps/epoch), {where}\n{format_plan(run.stages)}")
    from effnetv2.model.memory import fmt_bytes

    memory = [fmt_bytes(m.total(s.batch_size // info.world_size)) for m, s in zip(run.memory, run.stages)]
    return "\n".join([
        f"plan: {len(run.stages)} stages, {run.total_steps} steps, batches planned for {fmt_bytes(run.budget)} "
        f"per device (memory={cfg.memory}), {where}",
        format_plan(run.stages, spans=run.spans, memory=memory, lr_per_256=cfg.lr_per_256),
        lr_rule(cfg.lr_per_256, cfg.batch_size, run.steps_per_epoch, cfg.lr_ramp_epochs)])


def save(run: Run, out: Path, stage_index: int) -> Path | None:
    """Checkpoint after ``run.step`` (every rank calls it: it gathers every rank's RNG state)."""
    _check_finite_weights(run.model, run.ema, run.step)
    rngs = distributed.gather(checkpoint.rng_state())
    if not run.info.is_main:
        return None
    span = run.spans[stage_index]
    epoch, sample = span.position(run.step)
    schedule = run.step_fn.schedule
    state = dict(model=run.model.state_dict(), ema=run.ema.state_dict(), optimizer=run.optimizer.state_dict(),
                 train_step=run.step_fn.state_dict(), step=run.step, stage=stage_index, reports=run.reports,
                 data_position={"epoch": epoch, "step": sample // span.local_batch, "sample": sample},
                 stage_batches=[s.batch_size for s in run.stages],
                 schedule=dataclasses.asdict(getattr(schedule, "base", schedule)), rng=rngs,
                 config=dataclasses.asdict(run.cfg))
    return checkpoint.save(out, state, run.cfg.keep_last)


# -- one stage --------------------------------------------------------------------------------------
def open_stage(run: Run, stage: Stage):
    """The stage switch: this stage's training loader (size, RandAugment, mixup) and dropout."""
    from effnetv2.pipeline.loaders import build_train_loader

    cfg, span = run.cfg, run.spans[stage.index]
    loader = build_train_loader(
        run.shards, span.local_batch, stage.image_size,
        stage.randaug_magnitude if cfg.randaug_layers > 0 else None, stage.mixup_alpha, stage.cutmix_alpha,
        num_classes=run.num_classes, device=str(run.info.device), backend=cfg.backend, rank=run.info.rank,
        world_size=run.info.world_size, seed=run.data_seed, randaug_layers=cfg.randaug_layers,
        split=cfg.train_split, num_workers=cfg.num_workers, crop_area=cfg.crop_area, augment=cfg.augment)
    if len(loader) != span.steps_per_epoch:
        loader.close()
        raise RuntimeError(f"loader has {len(loader)} steps per epoch, the plan assumed {span.steps_per_epoch}")
    run.model.set_dropout(stage.dropout)
    if isinstance(run.step_fn.schedule, StagedLR):  # this stage's batch and clock, before its first step
        run.step_fn.schedule.set_stage(span, run.spans[stage.index - 1] if stage.index else None,
                                       cfg.lr_ramp_epochs)
    return loader


def close_stage(run: Run, loader) -> None:
    """Free the stage's loader (workers, DALI pipeline) and the step's graph and memory pool."""
    try:
        if loader is not None:
            loader.close()
    finally:
        run.step_fn.release()


def stage_batches(loader, span: Span, step: int, end: int) -> Iterator[tuple]:
    """The batches of global steps ``[step, end)`` of ``span``: the loader starts at the exact sample
    position of ``step`` and rolls over into the following epochs."""
    while step < end:
        epoch, sample = span.position(step)
        loader.load_state_dict({"epoch": epoch, "step": sample // span.local_batch, "sample": sample})
        for batch in loader:
            yield batch
            step += 1
            if step >= end:
                return


@dataclass
class StageProgress:
    """What :func:`train_stage` hands back: steps trained, seconds, the last logged loss, whether it stopped."""

    steps: int = 0
    seconds: float = 0.0
    loss: float = math.nan
    stopped: bool = False
    checkpoint: Path | None = None


def train_stage(run: Run, stage: Stage, loader, end: int, *, out: Path, log: MetricsLog, bar: tqdm) -> StageProgress:
    """Train global steps ``[run.step, end)`` of ``stage``; sync, log and checkpoint at their intervals.

    Stops early (``stopped``) after ``cfg.stop_at``, with a checkpoint.
    """
    cfg, progress = run.cfg, StageProgress()
    t_start = t_last = time.perf_counter()
    last_step = run.step
    for images, targets in stage_batches(loader, run.spans[stage.index], run.step, end):
        run.step_fn(images, targets)
        run.step += 1
        progress.steps += 1
        bar.update(1)
        ckpt_due = cfg.ckpt_every and run.step % cfg.ckpt_every == 0 and run.step != end
        stop = cfg.stop_at and run.step >= cfg.stop_at
        if run.step % cfg.log_every == 0 or run.step == end or ckpt_due or stop:
            progress.loss, lr = _sync_stats(run.step_fn, run.step - last_step, stage)
            now = time.perf_counter()
            ips = (run.step - last_step) * stage.batch_size / max(now - t_last, 1e-9)
            t_last, last_step = now, run.step
            bar.set_postfix_str(f"loss {progress.loss:.4f} lr {lr:.3g} {ips:,.0f} img/s")
            log.write(dict(event="train", step=run.step, stage=stage.index, loss=progress.loss, lr=lr,
                           imgs_per_s=ips))
        if ckpt_due or stop:
            progress.checkpoint = save(run, out, stage.index) or progress.checkpoint
        if stop:
            progress.stopped = True
            break
    progress.seconds = time.perf_counter() - t_start
    return progress


def stage_report(run: Run, stage: Stage, first: int, end: int, progress: StageProgress, setup_s: float,
                 metrics: dict) -> dict:
    """The record of a finished stage: its plan, speed, loss and evaluation."""
    return dict(stage=stage.index, image_size=stage.image_size, randaug=stage.randaug_magnitude,
                mixup=stage.mixup_alpha, cutmix=stage.cutmix_alpha, dropout=stage.dropout, first_step=first,
                end_step=end, steps_trained=progress.steps,
                batch_size=stage.batch_size,
                imgs_per_s=progress.steps * stage.batch_size / max(progress.seconds, 1e-9),
                train_s=progress.seconds, setup_s=setup_s, loss=progress.loss, **metrics)


def evaluate_ema(run: Run) -> dict[str, float]:
    """The EMA weights on the eval split at the eval size ({} when the shard set has no such split)."""
    cfg = run.cfg
    if not cfg.eval_split or cfg.eval_split not in run.shards.splits:
        return {}
    size = cfg.eval_size or run.model.config.eval_size
    loader = eval_loader(cfg, run.shards, run.info, run.num_classes, size)
    return evaluate(run.ema.module, loader, amp_dtype=run.step_fn.amp_dtype, multilabel=run.shards.multilabel)


# -- the whole run ----------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> RunResult:
    """Run ``cfg`` to the end (or to ``cfg.stop_at``); rank 0 prints, logs and writes checkpoints."""
    run = build_run(cfg)
    out, main = Path(cfg.out_dir()), run.info.is_main
    say = _printer(main)
    say(f"effnetv2 train {cfg.recipe}: resolved config\n{format_config(cfg)}")
    if cfg.eval_split and cfg.eval_split not in run.shards.splits:
        say(f"note: {cfg.data} has no split {cfg.eval_split!r} (it has {sorted(run.shards.splits)}); no evaluation")
    say(describe_plan(run))
    resumed = ckpt_path = resume(run, out, say)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.write_json(out / "config.json", dataclasses.asdict(cfg))
        checkpoint.write_classes(out, run.shards)  # class names stay with the run when the shards move
    log = MetricsLog(out, main, cfg.tensorboard, keep_until=run.step if resumed else None)
    bar = tqdm(total=run.total_steps, initial=run.step, unit="step", disable=not (main and cfg.progress),
               dynamic_ncols=True)
    loader, backend = None, ""
    try:
        for stage, (first, end) in zip(run.stages, run.bounds):
            if stage.index < _evaluated(run.reports):
                continue  # trained and evaluated before the resume
            if stage.index == len(run.reports):  # else trained before the resume, its evaluation failed
                t_setup = time.perf_counter()
                loader = open_stage(run, stage)
                backend = loader.backend_name
                setup_s = time.perf_counter() - t_setup
                bar.set_description(f"stage {stage.index + 1}/{len(run.stages)} {stage.image_size}px")
                progress = train_stage(run, stage, loader, end, out=out, log=log, bar=bar)
                ckpt_path = progress.checkpoint or ckpt_path
                close_stage(run, loader)
                loader = None
                if progress.stopped:
                    say(f"stopped at step {run.step} (stop_at); resume with --resume")
                    return _result(run, out, ckpt_path, resumed, backend, finished=False)
                run.reports.append({**stage_report(run, stage, first, end, progress, setup_s, {}), _PENDING: True})
                ckpt_path = save(run, out, stage.index) or ckpt_path  # no evaluation failure loses the stage
            report = run.reports[stage.index]
            report.update(evaluate_ema(run))
            del report[_PENDING]
            ckpt_path = save(run, out, stage.index) or ckpt_path
            log.write(dict(event="stage", step=run.step, **report))
            say(format_report(report, len(run.stages)))
    finally:
        if loader is not None:  # an exception mid-stage: free workers, pipeline and graph before leaving
            close_stage(run, loader)
        bar.close()
        log.close()
    say(f"done: {run.step} steps; checkpoint {ckpt_path}")
    return _result(run, out, ckpt_path, resumed, backend, finished=True)


def format_report(r: dict, num_stages: int) -> str:
    acc = f" | top1 {100 * r['top1']:.2f}% top5 {100 * r['top5']:.2f}%" if "top1" in r else ""
    return (f"stage {r['stage'] + 1}/{num_stages} | {r['image_size']}px randaug {r['randaug']:.1f} "
            f"mixup {r['mixup']:.2f} cutmix {r['cutmix']:.2f} dropout {r['dropout']:.2f} | steps "
            f"{r['first_step']}-{r['end_step']} | {r['imgs_per_s']:,.0f} img/s | loss {r['loss']:.4f}{acc} | "
            f"{r['train_s']:.1f} s")


def _result(run: Run, out: Path, ckpt: Path | None, resumed: Path | None, backend: str, *,
            finished: bool) -> RunResult:
    return RunResult(out, ckpt, run.step, run.total_steps, run.reports, finished, resumed, backend,
                     run.step_fn.captured_once)


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


_PENDING = "evaluation_pending"  # in the report of a stage checkpointed before its evaluation


def _evaluated(reports: list[dict]) -> int:
    """Stages trained and evaluated (the last report may await its evaluation: a resume redoes it)."""
    return sum(_PENDING not in r for r in reports)


def _norm(v):
    return list(v) if isinstance(v, tuple | list) else v


def _printer(main: bool) -> Callable[[str], None]:
    def say(msg: str) -> None:
        if main:
            tqdm.write(msg)
    return say
