"""The bytes one training step needs, per image size and batch, and the largest batch per stage that fits.

Progressive learning trains early stages at small images, where a much larger batch fits (paper §3.2,
Table 2). :func:`step_memory` counts what the project's training step (``recipes.engine.step``)
holds at its peak, without a GPU:

* **State**, exact from the tensors: weights, gradients, TF-RMSProp's two tensors per parameter
  (``square_avg``, ``momentum_buffer``), the EMA's copy of every parameter AND buffer, the model's
  buffers (BN statistics).
* **Saved activations**, counted, not estimated: the real forward and loss run once in train mode
  (under autocast when ``amp`` is set) inside ``torch.autograd.graph.saved_tensors_hooks``, on fake
  CPU tensors (meta kernels: no arithmetic, no memory, under a second for S at 384 px). Every tensor
  autograd keeps for backward is taken once per storage (a saved view keeps its whole storage alive);
  parameters, buffers and the input batch are excluded (counted elsewhere); the logits and the loss
  are added (alive until the step ends). Counted at two batches, the bytes are exactly
  ``a * batch + c`` (``c``: amp's weight copies, BN's per-channel statistics), so a plan for batch 512
  costs nothing more.
* **Backward**: nodes run in reverse order, freeing their saved tensors while the gradients, freed by
  ``zero_grad(set_to_none=True)`` at the step's start, are made again; the peak of (saved tensors
  still alive + gradients made) over those moments is kept as a few lines in the batch. On top, a
  stated bound for the gradients flowing between layers: twice the largest saved activation.
* **Update**: TF-RMSProp's foreach update holds three parameter-sized temporaries (four with fp16
  loss scaling); the EMA's one is smaller. The step's peak is the larger of backward's and the
  update's (activations are freed before the update).
* **Input batches**: ``input_batches`` float batches (images + one-hot targets) live at once (the
  batch being trained on, the next one being made, the CUDA-graph step's static copy: 3) plus the
  uint8 staging of the next batch.
* **Margin**: ``margin`` (default 0.10) on top of the counted peak, for what the count does not see:
  kernel workspaces (cuDNN's; on the CPU e.g. a depthwise conv's column buffer) and allocator rounding.

CPU vs CUDA: both autocasts put this model's ops in the same classes (conv/linear low precision, the rest
keep their dtype) and autograd saves the same tensors; only dropout's mask differs (CPU float, CUDA bool).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .config import CONFIGS, ModelConfig
from .efficientnetv2 import EfficientNetV2

COUNT_BATCHES = (2, 4)  # the two batches the linear fit is counted at (BN needs > 1 value per channel)
_AMP_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class StepMemory:
    """Bytes of one training step: fixed state, per-image terms, and how they combine into a peak."""

    model: str
    image_size: int
    amp: str  # fp32 | bf16 | fp16
    weights: int
    gradients: int
    optimizer: int  # TF-RMSProp: square_avg + momentum_buffer
    ema: int  # the EMA module's parameters and buffers
    buffers: int  # the model's own buffers (BN running statistics)
    update_transient: int  # optimizer-update temporaries
    saved_fixed: int  # bytes alive when backward starts (saved tensors + logits), independent of the batch
    saved_per_image: int  # ... and those that do, per image
    backward_lines: tuple[tuple[int, int], ...]  # (per image, fixed): saved still alive + gradients made, at
    # the moments of backward that can be its peak (the upper envelope over all moments, for batch >= 1)
    backward_per_image: int  # backward's transient gradients: 2 x the largest saved activation, per image
    image_bytes: int  # one float32 image + its one-hot float32 target
    staging_bytes: int  # one uint8 image (the loader's copy before the float conversion)
    input_batches: int = 3
    margin: float = 0.10
    ddp: bool = False  # DDP's gradient buckets (gradient_as_bucket_view) hold every gradient all step long

    @property
    def state(self) -> int:
        """Bytes that do not depend on the batch or the image size."""
        return self.weights + self.gradients + self.optimizer + self.ema + self.buffers

    def activations(self, batch: int) -> int:
        """Bytes the forward and the loss leave for backward: saved tensors and the logits."""
        return self.saved_fixed + batch * self.saved_per_image

    def inputs(self, batch: int) -> int:
        return batch * (self.input_batches * self.image_bytes + self.staging_bytes)

    def backward(self, batch: int) -> int:
        """The most bytes of activations and gradients alive at once during backward."""
        if self.ddp:
            alive = self.gradients + self.activations(batch)
        else:  # gradients are made (zero_grad(set_to_none) freed them) while saved tensors are freed
            alive = max(a * batch + c for a, c in self.backward_lines)
        return alive + batch * self.backward_per_image

    def peak(self, batch: int) -> int:
        """The counted peak of one step, without the margin: backward's or the update's, the larger."""
        update = self.gradients + self.update_transient
        return self.state - self.gradients + max(self.backward(batch), update) + self.inputs(batch)

    def total(self, batch: int) -> int:
        """What the planner budgets: the peak plus the margin."""
        return math.ceil(self.peak(batch) * (1.0 + self.margin))

    def largest_batch(self, budget: int) -> int:
        """The largest batch with ``total(batch) <= budget`` (0 when not even one image fits)."""
        hi = 1
        while self.total(hi) <= budget and hi < 1 << 40:
            hi *= 2
        lo = 0  # total(lo) fits (or lo == 0), total(hi) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.total(mid) <= budget else (lo, mid)
        return lo

    def format(self, batch: int | None = None) -> str:
        """A readable breakdown; with ``batch``, the step's totals at that batch."""
        head = f"{self.model} {self.image_size}px {self.amp}"
        lines = [f"{head}: state {fmt_bytes(self.state)} (weights {fmt_bytes(self.weights)}, "
                 f"gradients {fmt_bytes(self.gradients)}, optimizer {fmt_bytes(self.optimizer)}, "
                 f"EMA {fmt_bytes(self.ema)}, buffers {fmt_bytes(self.buffers)}), "
                 f"update temporaries {fmt_bytes(self.update_transient)}",
                 f"  per image: activations {fmt_bytes(self.saved_per_image)}, "
                 f"backward transient {fmt_bytes(self.backward_per_image)}, "
                 f"inputs {fmt_bytes(self.inputs(1))} ({self.input_batches} batches); "
                 f"activations independent of batch {fmt_bytes(self.saved_fixed)}"]
        if batch is not None:
            lines.append(f"  batch {batch}: activations {fmt_bytes(self.activations(batch))}, backward peak "
                         f"{fmt_bytes(self.backward(batch))}, step peak {fmt_bytes(self.peak(batch))}, with "
                         f"{self.margin:.0%} margin {fmt_bytes(self.total(batch))}")
        return "\n".join(lines)


def step_memory(model: str | ModelConfig, num_classes: int, image_size: int, *,
                amp: torch.dtype | None = None, channels_last: bool = True, tf_padding: bool = False,
                margin: float = 0.10, input_batches: int = 3, ddp: bool = False) -> StepMemory:
    """The memory of one training step of ``model`` at ``image_size`` (any batch: see :class:`StepMemory`).

    Counted once per (model, classes, size, amp, layout, padding) and cached: the first call for a key
    runs the forward twice on fake tensors (no arithmetic; S at 384 px in under a second).
    """
    config = _config(model)
    if amp not in _AMP_NAMES:
        raise ValueError(f"amp must be None, torch.bfloat16 or torch.float16, got {amp!r}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if input_batches < 1:
        raise ValueError(f"input_batches must be >= 1, got {input_batches}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    base = _step_memory(config, num_classes, image_size, amp, channels_last, tf_padding)
    return replace(base, margin=margin, input_batches=input_batches, ddp=ddp)


@functools.lru_cache(maxsize=512)
def _step_memory(config: ModelConfig, num_classes: int, image_size: int, amp: torch.dtype | None,
                 channels_last: bool, tf_padding: bool) -> StepMemory:
    with torch.device("meta"):  # shapes only: no initialisation, no memory
        model = EfficientNetV2(config, num_classes, tf_padding=tf_padding).train()
    (b1, c1), (b2, c2) = ((b, _count(model, b, image_size, num_classes, amp, channels_last))
                          for b in COUNT_BATCHES)
    if len(c1.saved) != len(c2.saved) or c1.starts != c2.starts:
        raise RuntimeError(f"{config.name}: the forward saved {len(c1.saved)} tensors at batch {b1} but "
                           f"{len(c2.saved)} at batch {b2}; the count assumes one graph for every batch")
    slopes = [(y - x) // (b2 - b1) for x, y in zip(c1.saved, c2.saved)]
    fixed = [x - b1 * a for x, a in zip(c1.saved, slopes)]
    held = (c2.held - c1.held) // (b2 - b1)
    held_fixed = c1.held - b1 * held
    # Backward runs the nodes in reverse order. Moment m (0..n): every node that saved storage m or a
    # later one has run, so storages 0..m-1 are still saved and the modules that started at or after m
    # have their gradients made.
    n = len(slopes)
    grads_from = [0] * (n + 2)
    for start, nbytes in c1.starts:
        grads_from[start] += nbytes
    for m in range(n - 1, -1, -1):
        grads_from[m] += grads_from[m + 1]
    moments, a, c = [], held, held_fixed
    for m in range(n + 1):
        moments.append((a, c + grads_from[m]))
        if m < n:
            a, c = a + slopes[m], c + fixed[m]
    trainable = sum(_nbytes(p) for p in model.parameters() if p.requires_grad)
    weights = sum(_nbytes(p) for p in model.parameters())
    buffers = sum(_nbytes(b) for b in model.buffers())
    return StepMemory(
        model=config.name, image_size=image_size, amp=_AMP_NAMES[amp], weights=weights, gradients=trainable,
        optimizer=2 * trainable, ema=weights + buffers, buffers=buffers,
        update_transient=(4 if amp == torch.float16 else 3) * trainable,
        saved_fixed=sum(fixed) + held_fixed, saved_per_image=sum(slopes) + held,
        backward_lines=_upper_envelope(moments),
        backward_per_image=2 * max(slopes), image_bytes=3 * image_size**2 * 4 + num_classes * 4,
        staging_bytes=3 * image_size**2)


@dataclass(frozen=True)
class _Count:
    saved: list[int]  # bytes of each storage saved for backward, in the order first saved
    starts: list[tuple[int, int]]  # per module with parameters: (storages saved before it, its grad bytes)
    held: int  # bytes of the logits and the loss, alive until the step ends


def _count(model: torch.nn.Module, batch: int, size: int, num_classes: int, amp: torch.dtype | None,
           channels_last: bool) -> _Count:
    """Run the step's forward and loss on fake CPU tensors (CPU dispatch and CPU autocast, meta kernels:
    no arithmetic, no memory) and record what autograd saves. Storages are told apart by their
    ``StorageImpl`` (fake tensors have no data pointer); all stay alive until the count ends."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from effnetv2.recipes.engine.step import soft_target_loss  # the trainer's own loss

    saved: dict[int, int] = {}
    starts: list[tuple[int, int]] = []
    in_bn = [False]

    def pre(module: torch.nn.Module, args) -> None:
        grads = sum(_nbytes(p) for p in module.parameters(recurse=False) if p.requires_grad)
        starts.append((len(saved), grads))
        in_bn[0] = isinstance(module, torch.nn.BatchNorm2d)

    def post(module: torch.nn.Module, args, output) -> None:
        in_bn[0] = False

    leaves = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    hooks = [h for m in leaves for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        with FakeTensorMode():
            tensors = {k: torch.empty(v.shape, dtype=v.dtype, requires_grad=isinstance(v, torch.nn.Parameter))
                       for k, v in (*model.named_parameters(), *model.named_buffers())}
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            images = torch.empty(batch, 3, size, size).contiguous(memory_format=fmt)
            targets = torch.empty(batch, num_classes)
            known = {t.untyped_storage()._cdata for t in (*tensors.values(), images, targets)}

            def pack(t: torch.Tensor) -> torch.Tensor:
                storage = t.untyped_storage()
                if storage.nbytes() and storage._cdata not in known and storage._cdata not in saved:
                    # meta kernels give BN's saved mean / inverse std the input dtype; CPU and CUDA keep fp32
                    low = in_bn[0] and t.dim() == 1 and t.dtype in (torch.bfloat16, torch.float16)
                    saved[storage._cdata] = t.numel() * 4 if low else storage.nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                autocast = torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None,
                                          cache_enabled=False)  # the step's autocast
                with autocast:
                    logits = torch.func.functional_call(model, tensors, (images,))
                loss = soft_target_loss(logits, targets, label_smoothing=0.1)
            held = sum(t.untyped_storage().nbytes() for t in (logits, loss)
                       if t.untyped_storage()._cdata not in saved)
    finally:
        for h in hooks:
            h.remove()
    return _Count(list(saved.values()), starts, held)


def _upper_envelope(lines: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """The lines ``(a, c)`` that are the maximum of ``a * b + c`` for some ``b >= 1`` (convex hull trick)."""
    best: dict[int, int] = {}
    for a, c in lines:
        best[a] = max(best.get(a, c), c)
    hull: list[tuple[int, int]] = []
    for a3, c3 in sorted(best.items()):
        # the last line is useless if the new one overtakes the one before it no later than it does
        while len(hull) >= 2 and (hull[-2][1] - c3) * (hull[-1][0] - hull[-2][0]) <= \
                (hull[-2][1] - hull[-1][1]) * (a3 - hull[-2][0]):
            hull.pop()
        hull.append((a3, c3))
    while len(hull) >= 2 and hull[0][1] - hull[1][1] <= hull[1][0] - hull[0][0]:  # overtaken by b = 1
        hull.pop(0)
    return tuple(hull)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _config(model: str | ModelConfig) -> ModelConfig:
    if isinstance(model, ModelConfig):
        return model
    if model not in CONFIGS:
        raise ValueError(f"unknown model {model!r}; valid names: {', '.join(CONFIGS)}")
    return CONFIGS[model]


# -- the planner ---------------------------------------------------------------------------------------------


def plan_batches(stages: Sequence[StepMemory], budget: int, *, max_batch: int, multiple: int = 8,
                 data_limit: int | None = None) -> tuple[int, ...]:
    """The largest batch per stage whose :meth:`StepMemory.total` fits ``budget`` bytes, rounded down to
    ``multiple`` and capped at ``max_batch`` and at ``data_limit`` (samples per rank).

    Batches are per device (per rank): a budget is one device's memory. Raises ``ValueError`` naming the
    stage (index, image size) and the bytes it needs when not even a batch of ``multiple`` fits.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    cap = max_batch if data_limit is None else min(max_batch, data_limit)
    if cap < multiple:
        why = (f"max_batch {max_batch}" if cap == max_batch else f"the data ({data_limit} samples per rank)")
        raise ValueError(f"{why} allows no batch of {multiple} (batches are multiples of {multiple})")
    batches = []
    for i, mem in enumerate(stages):
        b = min(mem.largest_batch(budget), cap) // multiple * multiple
        if b == 0:
            raise ValueError(f"stage {i} ({mem.image_size}px): a batch of {multiple} needs "
                             f"{fmt_bytes(mem.total(multiple))} ({mem.total(multiple):,} bytes, "
                             f"{mem.margin:.0%} margin included) but the budget is {fmt_bytes(budget)} "
                             f"({budget:,} bytes)")
        batches.append(b)
    return tuple(batches)


# -- budgets -------------------------------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_budget(text: str, device: torch.device | str | None = None) -> int:
    """Bytes from ``"80GiB"``, ``"512MiB"``, ``"1.5 GB"``, ``"123456"`` (binary/decimal units) or ``"auto"``.

    ``auto`` is what ``device`` (default: the current CUDA device) can give this process: the free
    memory the GPU reports plus what PyTorch's caching allocator already holds here (the model's own
    weights are counted by :func:`step_memory`). On a CPU it is an error: host RAM is shared with the
    loader's workers, so a CPU budget is given explicitly.
    """
    s = text.strip().lower()
    if s == "auto":
        dev = torch.device(device if device is not None else "cuda")
        if dev.type != "cuda" or not torch.cuda.is_available():
            raise ValueError("memory budget 'auto' needs a CUDA GPU (it reads the free memory the GPU "
                             "reports); on a CPU give a size, e.g. 16GiB")
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free + torch.cuda.memory_reserved(dev))
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)", s)
    if m is None or m.group(2) not in _UNITS:
        raise ValueError(f"cannot read memory budget {text!r}: give a number with a unit (B, KB, MB, GB, TB "
                         f"or KiB, MiB, GiB, TiB), e.g. 80GiB, or 'auto' on a GPU")
    value = int(float(m.group(1)) * _UNITS[m.group(2)])
    if value <= 0:
        raise ValueError(f"memory budget {text!r} is not positive")
    return value


def fmt_bytes(n: float) -> str:
    """``1.50 GiB``, ``12.0 MiB``, ``512 B``."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if abs(n) < 10 * size else f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
