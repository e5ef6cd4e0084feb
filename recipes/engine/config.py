"""Every knob of a training run, in one dataclass; ``--set key=value`` overrides with type checks.

A recipe is a function returning a :class:`TrainConfig`; the trainer reads nothing else. Fields that
default to ``None`` (or 0 where noted) take their value from the model or the plan preset, so one
recipe serves S to XL. ``format_config`` prints the full resolved config at the start of every run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field

from effnetv2.pipeline.loaders.backend import ALIASES, BACKENDS
from effnetv2.pipeline.loaders.geometry import AREA, POLICIES

from .distributed import DEVICES
from .plan import BATCH_PLANS, PRESETS
from .schedule import KINDS
from .step import AMP, LOSSES

Range = tuple[float, float]
_RUNTIME = {"runtime": True}  # how a run executes, not what it computes: may change across a resume


def runtime(default):
    """A field that only says how a run executes (a resume may change it without a note)."""
    return field(default=default, metadata=_RUNTIME)


@dataclass
class TrainConfig:
    # -- what to train, on what, where to write
    recipe: str = "custom"
    model: str = "efficientnetv2-s"
    data: str = ""  # shard set folder (made by `effnetv2 shard`)
    out: str = runtime("")  # run folder: checkpoints, metrics.jsonl, config.json; "" = runs/<recipe>
    train_split: str = "train"
    eval_split: str = "val"  # "" = no evaluation
    num_classes: int = 0  # 0 = the shard set's class count
    init_from: str = ""  # a checkpoint / run folder (its EMA weights) or a weights file
    new_head: bool = False  # re-initialise the classifier after init_from (another label set)
    # -- model
    drop_path_rate: float = 0.2
    bn_momentum: float = 0.1  # PyTorch convention: TF's 0.9
    bn_eps: float = 1e-3
    tf_padding: bool = False
    sync_bn: bool = False
    freeze_bn: bool = False  # BN layers normalise with (and keep) their running statistics: fine-tuning
    # -- progressive plan (Algorithm 1); a range None = the preset's (lo, hi)
    plan: str = "official"  # official | paper | random-resize
    epochs: float = 350.0
    total_steps: int = 0  # > 0: train exactly this many steps (of batch_size) instead of epochs * steps/epoch
    num_stages: int = 4
    batch_size: int = 4096  # global, over all ranks
    batch_plan: str = "fixed"  # fixed: every stage at batch_size | memory: each stage's largest batch that fits
    memory: str = "auto"  # batch_plan=memory: budget per device, e.g. 80GiB; auto = what the GPU has free
    max_batch: int = 0  # batch_plan=memory: cap on a stage's global batch; 0 = only the data's
    memory_margin: float = 0.10  # batch_plan=memory: on top of the counted step memory (workspaces, allocator)
    lr_ramp_epochs: float = 0.5  # batch_plan=memory: LR ramp when a stage's batch (so its LR) rises
    image_size: tuple[int, int] | None = None
    randaug: Range | None = None
    mixup: Range | None = None
    cutmix: Range | None = None
    dropout: Range | None = None
    round_to: int = 1  # image sizes to a multiple of 8/16/32
    resize_every: float = 10.0  # random-resize: epochs between size draws
    randaug_layers: int = 2  # 0 = no RandAugment
    crop_area: tuple[float, float] = AREA  # random-resized-crop area range (official 0.05-1)
    augment: str = "randaugment"  # randaugment (crop, flip, RandAugment) | finetune (whole image, flip, noise cutout)
    eval_size: int = 0  # 0 = the model's eval size
    eval_crop: float | None = None  # None = the loader's rule (S/(S+32) below 320 px, else whole image)
    eval_batch_size: int = 0  # global; 0 = batch_size
    # -- optimisation
    lr_per_256: float = 0.016
    lr_schedule: str = "exponential"  # exponential | cosine | constant
    warmup_epochs: float = 5.0
    decay_epochs: float = 2.4
    decay_rate: float = 0.97
    min_lr: float = 0.0
    rmsprop_decay: float = 0.9
    momentum: float = 0.9
    eps: float = 1e-3
    weight_decay: float = 1e-5
    label_smoothing: float = 0.1
    loss: str = "softmax"  # softmax | bce
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    # -- runtime
    device: str = runtime("auto")  # auto | cpu | cuda
    amp: str = "auto"  # auto (bf16 on a GPU that has it, else none) | bf16 | fp16 | none
    cuda_graphs: bool = runtime(True)
    compile: bool = runtime(False)
    channels_last: bool = True
    backend: str = runtime("auto")  # loader backend
    num_workers: int | None = runtime(None)  # loader workers/threads; None = the loader's default
    torch_threads: int = 0  # intra-op CPU threads for the model; 0 = torch's default (leave cores to the loader)
    # on a CPU-only machine, `effnetv2 train` launches this many processes (at most one per core; 0 = one per
    # core) through torchrun, data prepared once first: a small model trains faster as N one-thread ranks
    # than as one process of N threads
    cpu_processes: int = runtime(1)
    seed: int = 0  # initial weights, dropout masks, and (unless data_seed is set) data order/augmentation
    data_seed: int | None = None  # another data order with the same initial weights
    log_every: int = runtime(50)  # steps between host syncs (loss, NaN check, progress)
    ckpt_every: int = runtime(0)  # steps between checkpoints; 0 = at stage ends only
    keep_last: int = runtime(3)
    stop_at: int = runtime(0)  # > 0: checkpoint and stop after this global step (train in pieces)
    resume: bool = runtime(False)  # continue from the newest valid checkpoint in `out` if there is one
    progress: bool = runtime(True)
    tensorboard: bool = runtime(True)  # if installed

    def out_dir(self) -> str:
        return self.out or f"runs/{self.recipe}"


CHOICES = {"plan": PRESETS, "batch_plan": BATCH_PLANS, "lr_schedule": KINDS, "loss": LOSSES, "amp": tuple(AMP),
           "device": DEVICES, "backend": BACKENDS + tuple(ALIASES), "augment": POLICIES}


def runtime_keys() -> frozenset[str]:
    """The fields marked :func:`runtime`."""
    return frozenset(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("runtime"))


# (field, rule, what the rule says): every numeric field a run reads, checked before anything is built
_NUMBERS: tuple[tuple[str, typing.Callable[[float], bool], str], ...] = (
    ("epochs", lambda v: v >= 0, ">= 0"), ("total_steps", lambda v: v >= 0, ">= 0"),
    ("batch_size", lambda v: v >= 1, ">= 1"), ("num_stages", lambda v: v >= 1, ">= 1"),
    ("num_classes", lambda v: v >= 0, ">= 0 (0: the shard set's)"), ("round_to", lambda v: v >= 1, ">= 1"),
    ("resize_every", lambda v: v > 0, "> 0"), ("randaug_layers", lambda v: v >= 0, ">= 0"),
    ("eval_size", lambda v: v == 0 or v >= 8, ">= 8 (or 0: the model's)"),
    ("eval_batch_size", lambda v: v >= 0, ">= 0 (0: batch_size)"),
    ("drop_path_rate", lambda v: 0 <= v < 1, "in [0, 1)"), ("bn_momentum", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("bn_eps", lambda v: v > 0, "> 0"), ("lr_per_256", lambda v: v > 0, "> 0"),
    ("warmup_epochs", lambda v: v >= 0, ">= 0"), ("decay_epochs", lambda v: v > 0, "> 0"),
    ("decay_rate", lambda v: 0 < v <= 1, "in (0, 1]"), ("min_lr", lambda v: v >= 0, ">= 0"),
    ("rmsprop_decay", lambda v: 0 <= v < 1, "in [0, 1)"), ("momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("eps", lambda v: v > 0, "> 0"), ("weight_decay", lambda v: v >= 0, ">= 0"),
    ("label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"), ("ema_decay", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("num_workers", lambda v: v >= 0, ">= 0 (or None: one per core)"), ("torch_threads", lambda v: v >= 0, ">= 0"),
    ("cpu_processes", lambda v: v >= 0, ">= 0 (0: one per core)"),
    ("log_every", lambda v: v >= 1, ">= 1"), ("ckpt_every", lambda v: v >= 0, ">= 0"),
    ("keep_last", lambda v: v >= 1, ">= 1"), ("stop_at", lambda v: v >= 0, ">= 0"),
    ("max_batch", lambda v: v == 0 or v >= 8, ">= 8 (batches are multiples of 8), or 0: no cap"),
    ("memory_margin", lambda v: v >= 0, ">= 0"), ("lr_ramp_epochs", lambda v: v >= 0, ">= 0"),
)
# (lo, hi) ranges: each end checked, and lo <= hi
_RANGES = {"image_size": (lambda v: v >= 8, ">= 8 px"), "randaug": (lambda v: v >= 0, ">= 0"),
           "mixup": (lambda v: v >= 0, ">= 0"), "cutmix": (lambda v: v >= 0, ">= 0"),
           "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"), "crop_area": (lambda v: 0 < v <= 1, "in (0, 1]")}


def validate(cfg: TrainConfig, *, inputs: bool = True) -> None:
    """Reject a config that cannot run, before anything is built: one ValueError naming the field.

    ``inputs=False`` (a dry run) skips the checks of what the run reads (``data``, ``init_from``)."""
    for key, choices in CHOICES.items():
        if getattr(cfg, key) not in choices:
            raise ValueError(f"{key}={getattr(cfg, key)!r}: choose one of {', '.join(choices)}")
    for key, ok, rule in _NUMBERS:
        value = getattr(cfg, key)
        if value is not None and not ok(value):
            raise ValueError(f"{key}={value!r}: must be {rule}")
    for key, (ok, rule) in _RANGES.items():
        pair = getattr(cfg, key)
        if pair is None:
            continue
        bad = [v for v in pair if not ok(v)]
        if bad:
            raise ValueError(f"{key}={','.join(map(str, pair))}: {bad[0]} is out of range; each end must be {rule}")
        if pair[0] > pair[1]:
            raise ValueError(f"{key}={','.join(map(str, pair))}: the first (stage 1) end exceeds the last")
    if cfg.batch_plan == "memory" and cfg.memory.strip().lower() != "auto":
        from effnetv2.model.memory import parse_budget

        try:  # 'auto' is read on the device, when the run is built
            parse_budget(cfg.memory)
        except ValueError as e:
            raise ValueError(f"memory={cfg.memory!r}: {e}") from None
    if cfg.eval_crop is not None and not 0 < cfg.eval_crop <= 1:
        raise ValueError(f"eval_crop={cfg.eval_crop!r}: must be in (0, 1] (or None: the official rule)")
    from effnetv2.model import get_config

    get_config(cfg.model)  # an unknown name or a bad config file: its own clear error
    if inputs and not cfg.data:
        raise ValueError("data is not set: pass --data DIR (a shard set made by 'effnetv2 shard')")
    if inputs and cfg.new_head and not cfg.init_from:
        raise ValueError(f"recipe {cfg.recipe!r} fine-tunes: set init_from=RUN_DIR|CHECKPOINT|WEIGHTS "
                         f"(a new head on random weights is training from scratch)")
    if cfg.augment == "finetune" and cfg.randaug_layers > 0:
        raise ValueError("augment=finetune (whole image, flip, noise cutout) has no RandAugment: "
                         "set randaug_layers=0")
    if cfg.epochs <= 0 and cfg.total_steps <= 0:
        raise ValueError("set epochs > 0 or total_steps > 0")
    if cfg.stop_at and cfg.total_steps and cfg.stop_at > cfg.total_steps:
        raise ValueError(f"stop_at={cfg.stop_at} is after the run's last step ({cfg.total_steps})")


def field_types() -> dict[str, object]:
    return typing.get_type_hints(TrainConfig)


def parse_value(key: str, text: str, kind: object) -> object:
    """``text`` as a value of type ``kind`` (int, float, str, bool, tuple[...], X | None)."""
    args = typing.get_args(kind)
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        if text.lower() == "none":
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return parse_value(key, text, inner)
    if typing.get_origin(kind) is tuple:
        parts = [p for p in text.replace("(", "").replace(")", "").split(",") if p.strip()]
        if len(parts) != len(args):
            raise ValueError(f"--set {key}={text}: expected {len(args)} comma-separated values, e.g. "
                             f"{key}=" + ",".join(["1"] * len(args)))
        return tuple(parse_value(key, p.strip(), a) for p, a in zip(parts, args))
    if kind is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--set {key}={text}: expected a boolean (true/false)")
    try:
        return kind(text)  # type: ignore[operator]
    except ValueError:
        raise ValueError(f"--set {key}={text}: expected {kind.__name__}") from None  # type: ignore[union-attr]


def apply_overrides(cfg: TrainConfig, items: list[str]) -> TrainConfig:
    """A copy of ``cfg`` with ``key=value`` items applied; unknown keys and bad values raise ValueError."""
    types_ = field_types()
    changes = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise ValueError(f"--set {item!r}: expected key=value")
        if key not in types_:
            close = [k for k in types_ if key in k or k in key]
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"--set {key}: no such config key{hint} (see the printed config)")
        changes[key] = parse_value(key, text.strip(), types_[key])
    return dataclasses.replace(cfg, **changes)


def format_config(cfg: TrainConfig) -> str:
    """One ``key = value`` line per field, in declaration order."""
    items = dataclasses.asdict(cfg)
    width = max(map(len, items))
    return "\n".join(f"  {k:<{width}} = {v!r}" for k, v in items.items())
