"""One training step, and the machinery that captures it in a CUDA graph.

:class:`TrainStep` is the only place that computes a step: forward under autocast, label-smoothed
soft-target cross-entropy, backward, (fp16: unscale and overflow check), TF RMSProp, EMA, and the
bookkeeping the loop reads at log time (summed loss, first non-finite step). Every quantity that
changes from step to step (step counter, learning rate, EMA decay, loss scale) is a device tensor
updated in place, and nothing in the step reads a value back to the host. So on CUDA the whole step
is captured once per stage shape in a ``torch.cuda.CUDAGraph`` and replayed, the loader's batch being
copied into static input buffers; on CPU the same :meth:`TrainStep._compute` runs eagerly.

One stream per device (:func:`capture_stream`). On CUDA every step that Python runs (eager with
``cuda_graph=False``, the warm-up, the capture) runs on that side stream, entered through
:func:`step_stream` (the side stream waits for the current one before, the current one for it after),
and DDP is built there too (:func:`~effnetv2.recipes.engine.distributed.wrap`): DDP makes the
gradient-accumulator nodes that carry its hooks at construction, and autograd runs a node on the stream
that was current when it was made, so its hooks, allreduce and the wait for it share the step's stream,
with or without graphs. Replays are launched on the current stream.

Capture protocol (per stage): the first batches of a stage run eagerly on the side stream (lazy
cuDNN/cuBLAS handles are per stream; autocast, DDP buckets (>= 11 iterations), cuDNN autotuning and
``torch.compile`` settle here). These are real training steps on real batches, so the weights,
optimizer state and BN statistics they change are the correct training updates and nothing has to be
restored (warm-up on dummy data would have to restore them). The next batch is captured and replayed.
Capture uses ``capture_error_mode="thread_local"``: the loader's own threads (DALI, the pin-memory
thread) keep issuing CUDA calls meanwhile, which the default global mode would reject. :meth:`release`
drops the graph, its memory pool and the static buffers at a stage switch.

DDP's runtime statistics: the reducer records CUDA timing events during the iterations it samples
(1-10 and every 100th forward with grad) and reads them back at the next forward (c10d's
``Reducer::should_collect_runtime_stats``, ``Logger::set_runtime_stats_and_log``). Inside a capture
that breaks the capture or the next stage's first step, and the count only advances on Python-level
steps (replays skip DDP's Python), so with many stages (``random-resize``: 35) a capture would meet a
sampled iteration; under DDP each stage's warm-up is lengthened by :func:`eager_steps_before_capture`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .ema import EMA
from .optim import RMSpropTF
from .schedule import LRSchedule

LOSSES = ("softmax", "bce")
AMP = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "none": None}  # auto: see resolve_amp


def resolve_amp(name: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 on a GPU that supports it, else full precision (CPU autocast is slower than fp32)."""
    if name not in AMP:
        raise ValueError(f"unknown amp {name!r}; use one of {', '.join(AMP)}")
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return AMP[name]


def soft_target_loss(logits: torch.Tensor, targets: torch.Tensor, *, label_smoothing: float = 0.0,
                     kind: str = "softmax") -> torch.Tensor:
    """Mean over the batch of the loss against soft targets (rows summing to 1: mixup, multi-label).

    ``softmax``: cross-entropy ``-sum(t * log_softmax(z))`` (the official loss, also for 21k's
    normalised multi-hot targets). ``bce``: sigmoid binary cross-entropy summed over classes, against
    the targets rescaled so that each row's largest entry is 1 (multi-hot 1/k -> 1). Label smoothing
    mixes ``t`` with the uniform distribution: ``t (1 - s) + s / C``. Computed in float32.
    """
    logits = logits.float()
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / targets.shape[-1]
    if kind == "softmax":
        return -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()
    if kind == "bce":
        binary = targets / targets.amax(dim=-1, keepdim=True).clamp_min(1e-12)
        return F.binary_cross_entropy_with_logits(logits, binary, reduction="none").sum(-1).mean()
    raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")


_CAPTURE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The one side stream per device on which DDP is built and every Python-level step runs (eager,
    warm-up, capture); see the module docstring."""
    if device not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[device] = torch.cuda.Stream(device)
    return _CAPTURE_STREAMS[device]


@contextmanager
def step_stream(device: torch.device) -> Iterator[None]:
    """Run the enclosed work on :func:`capture_stream`, ordered after everything already queued on the
    current stream and before everything queued on it later (``wait_stream`` both ways; no host
    sync). A no-op on CPU."""
    if device.type != "cuda":
        yield
        return
    side, current = capture_stream(device), torch.cuda.current_stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        yield
    current.wait_stream(side)


DDP_STATS_FIRST = 10  # DDP samples its runtime statistics on iterations 1..10 ...
DDP_STATS_EVERY = 100  # ... and every 100th (kDDPRuntimeLoggingSampleRate in c10d's reducer.hpp)


def ddp_samples_stats(iteration: int, every: int = DDP_STATS_EVERY) -> bool:
    """Whether DDP's reducer records timing events during its ``iteration``-th forward + backward (counted
    from 1, one per forward with grad), and reads them back at the start of the next one."""
    return iteration > 0 and (iteration <= DDP_STATS_FIRST or iteration % every == 0)


def eager_steps_before_capture(done: int, minimum: int, every: int = DDP_STATS_EVERY) -> int:
    """Eager steps to run before capturing, when DDP has seen ``done`` forwards so far: at least
    ``minimum``, and more where needed so that the captured forward (number ``done + e + 1``) records no
    timing event and the one before it (``done + e``) leaves none to read back during the capture.
    Needs ``every >= 3`` (two unsampled iterations in a row)."""
    if every < 3:
        raise ValueError(f"DDP statistics sampled every {every} iterations leave no two unsampled in a row")
    eager = minimum
    while ddp_samples_stats(done + eager, every) or ddp_samples_stats(done + eager + 1, every):
        eager += 1
    return eager


class LossScaler:
    """Dynamic fp16 loss scaling with the scale in a device tensor (``torch.amp.GradScaler`` reads
    ``found_inf`` on the host to skip a step; here the optimizer skips on the device)."""

    def __init__(self, device: torch.device, init_scale: float = 2.0**16, growth_interval: int = 2000) -> None:
        self.scale = torch.tensor(init_scale, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self.growth_interval = growth_interval

    def unscale_(self, params: list[torch.Tensor]) -> torch.Tensor:
        """Divide the gradients by the scale in place; returns a 0-dim bool: some gradient overflowed."""
        found = torch.zeros((), dtype=torch.float32, device=self.scale.device)
        grads = [p.grad for p in params if p.grad is not None]
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, self.scale.reciprocal())
        return found > 0

    def update(self, skip: torch.Tensor) -> None:
        """Halve the scale after an overflow, double it after ``growth_interval`` good steps."""
        torch._amp_update_scale_(self.scale, self.growth_tracker, skip.to(torch.float32), 2.0, 0.5,
                                 self.growth_interval)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"scale": self.scale, "growth_tracker": self.growth_tracker}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.scale.copy_(state["scale"])
        self.growth_tracker.copy_(state["growth_tracker"])


class TrainStep:
    """``step(images, targets)`` trains on one batch; ``read_stats()`` syncs once to report.

    ``model`` is what the forward calls (possibly DDP-wrapped; compiled here with ``compile``);
    ``module`` is the plain model whose parameters the optimizer and the EMA hold. ``warmup_steps``:
    eager steps per stage before the capture (under DDP at least this many, see
    :func:`eager_steps_before_capture`).
    """

    def __init__(self, model: nn.Module, module: nn.Module, optimizer: RMSpropTF, ema: EMA,
                 schedule: LRSchedule, *, label_smoothing: float = 0.0, loss: str = "softmax",
                 amp_dtype: torch.dtype | None = None, cuda_graph: bool = True, warmup_steps: int = 3,
                 compile: bool = False) -> None:
        self.device = next(module.parameters()).device
        self.ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        self.model = torch.compile(model) if compile else model
        self.module, self.optimizer, self.ema, self.schedule = module, optimizer, ema, schedule
        self.label_smoothing, self.loss_kind, self.amp_dtype = label_smoothing, loss, amp_dtype
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.scaler = LossScaler(self.device) if amp_dtype == torch.float16 else None
        self.cuda_graph = cuda_graph and self.device.type == "cuda"
        self.warmup_steps = warmup_steps
        dev = dict(device=self.device)
        self.step = torch.zeros((), dtype=torch.int64, **dev)  # optimizer steps taken (global)
        self.loss_sum = torch.zeros((), dtype=torch.float32, **dev)  # since the last read_stats()
        self.first_bad = torch.full((), -1, dtype=torch.int64, **dev)  # first step with a non-finite loss
        self.lr = torch.zeros((), dtype=torch.float32, **dev)  # LR of the last step
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static: tuple[torch.Tensor, torch.Tensor] | None = None
        self._eager_left: int | None = None  # eager steps before this stage's capture; None: not planned yet
        self.forwards = 0  # Python-level runs of the step (eager and captures): DDP's iteration count
        self.captures = 0  # graphs captured so far (one per stage shape): proof that graphs ran
        self._side = capture_stream(self.device) if self.device.type == "cuda" else None

    def _compute(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        """The step itself; runs eagerly or is recorded into the graph, unchanged."""
        self.forwards += 1
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.schedule(self.step)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None,
                            cache_enabled=False):  # the weight-cast cache must not outlive a capture
            logits = self.model(images)
        loss = soft_target_loss(logits, targets, label_smoothing=self.label_smoothing, kind=self.loss_kind)
        skip = None
        if self.scaler is None:
            loss.backward()
        else:
            (loss * self.scaler.scale).backward()
            skip = self.scaler.unscale_(self.params)
        self.optimizer.step(lr, skip)
        if self.scaler is not None:
            self.scaler.update(skip)
        loss = loss.detach()
        self.first_bad.copy_(torch.where((self.first_bad < 0) & ~torch.isfinite(loss), self.step, self.first_bad))
        self.loss_sum.add_(loss)
        self.lr.copy_(lr)
        self.step.add_(1)
        self.ema.update(self.module, self.step)  # TF: num_updates is the step counter after the update

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        if self._graph is not None:
            self._static[0].copy_(images, non_blocking=True)
            self._static[1].copy_(targets, non_blocking=True)
            self._graph.replay()
            return
        if self.cuda_graph:
            if self._eager_left is None:  # the stage's first step
                self._eager_left = (eager_steps_before_capture(self.forwards, self.warmup_steps) if self.ddp
                                    else self.warmup_steps)
            if self._eager_left == 0:
                self._capture(images, targets)
                self._graph.replay()
                return
            self._eager_left -= 1
        with step_stream(self.device):
            self._compute(images, targets)

    def _capture(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        self._static = (images.clone(), targets.clone())  # clone keeps channels_last strides
        self.optimizer.zero_grad(set_to_none=True)  # grads are then allocated inside the graph's pool
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self._side, capture_error_mode="thread_local"):
            self._compute(*self._static)
        self._graph = graph
        self.captures += 1

    @property
    def captured(self) -> bool:
        return self._graph is not None

    @property
    def captured_once(self) -> bool:
        """Whether any stage of this run has replayed a captured CUDA graph."""
        return self.captures > 0

    def release(self) -> None:
        """Forget this stage's graph, its memory pool and buffers (stage switch: the shape changes)."""
        self.optimizer.zero_grad(set_to_none=True)  # the grads live in the graph's pool
        self._static = None
        if self._graph is not None:
            self._graph.reset()
        self._graph = None
        self._eager_left = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def read_stats(self, steps: int) -> tuple[float, float, int]:
        """(mean loss over the last ``steps`` steps, last LR, first non-finite step or -1), then reset the
        loss sum. The only host sync of the loop; call it at log intervals."""
        loss_sum, lr, bad = torch.stack([self.loss_sum.double(), self.lr.double(), self.first_bad.double()]).tolist()
        self.loss_sum.zero_()
        return loss_sum / max(steps, 1), lr, int(bad)

    def state_dict(self) -> dict:
        state = {"step": self.step, "first_bad": self.first_bad}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step.copy_(state["step"])
        self.first_bad.copy_(state["first_bad"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
