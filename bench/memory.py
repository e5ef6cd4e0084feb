"""``effnetv2 bench memory``: the memory model's prediction (:mod:`effnetv2.model.memory`) against the bytes
a real training step allocates.

Per case (model, image size, batch, fp32/bf16) the project's real :class:`TrainStep` (TF RMSprop, EMA,
label smoothing; eager, or with ``--graph`` a CUDA graph) is built and run, and compared:

- **activations**: the counted saved-for-backward bytes plus logits and loss (``StepMemory.activations``)
  against the bytes the forward and the loss leave allocated when ``loss.backward()`` is called
  (allocated then, minus allocated when the forward starts; last step);
- **peak**: the counted peak of the step (``StepMemory.peak``: no margin, one input batch as here)
  against the most bytes allocated at any moment of the run; and the planner's ``total`` (the peak
  plus the margin) against the same measurement: ``measured / planned <= 1`` is what keeps a planned
  batch from running out of memory.

How bytes are measured. CPU: ``torch.profiler`` with ``profile_memory=True`` records every allocation
and free of PyTorch's CPU allocator with its size and time; the whole run (model, EMA, optimizer, inputs,
steps) happens inside the profiler, so the running sum is the exact number of live bytes (checked: at the
end it equals the bytes of every tensor the run still holds; ``unaccounted`` in the JSON is 0). CUDA:
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` and ``memory_allocated`` at the two
moments, with ``cudnn.benchmark`` on as in the trainer. Rows hold MiB in the ``Timing`` slot (one value,
unit MiB); the ratios are predicted / measured.

``--budget 80GiB`` (or ``auto`` on a GPU) replaces each case's batch by the planner's batch for that
budget (:func:`~effnetv2.model.memory.plan_batches`) and reports whether the step stayed within it.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

from .report import Report, Row
from .timing import Timing

MIB = 2**20
CPU_CASES = "demo:32:32,demo:48:32,demo:64:32,b0:128:16,s:128:8"
GPU_CASES = "s:171:128,s:214:128,s:257:128,s:300:128"  # S at its four official stage sizes
AMPS = ("fp32", "bf16")
_MARKS = ("effnetv2.bench.memory: forward", "effnetv2.bench.memory: backward")


@dataclass(frozen=True)
class MemoryCase:
    model: str
    size: int
    batch: int
    amp: str = "fp32"  # fp32 | bf16
    graph: bool = False  # the step captured in a CUDA graph (GPU only)

    @property
    def label(self) -> str:
        name = self.model.removeprefix("efficientnetv2-")
        return f"{name} {self.size}px b{self.batch} {self.amp}" + (" graph" if self.graph else "")


@dataclass(frozen=True)
class Measured:
    peak: int  # most bytes allocated at once during the run
    activations: int  # bytes allocated by forward + loss and still alive when backward starts
    end: int  # bytes allocated after the last step
    unaccounted: int  # end minus the bytes of every tensor the run still holds (0: the measurement sees all)
    where: str  # the operation running at the peak (CPU), or ""


def _step(case: MemoryCase, device, num_classes: int):
    """The model, the project's real step and one batch, built the way the trainer builds them."""
    import torch

    from effnetv2.model import create_model
    from effnetv2.recipes.engine.ema import EMA
    from effnetv2.recipes.engine.optim import RMSpropTF, weight_decay_groups
    from effnetv2.recipes.engine.schedule import LRSchedule
    from effnetv2.recipes.engine.step import TrainStep

    amp = torch.bfloat16 if case.amp == "bf16" else None
    model = create_model(case.model, num_classes).to(device, memory_format=torch.channels_last)
    step = TrainStep(model, model, RMSpropTF(weight_decay_groups(model, 1e-5)), EMA(model, 0.9999),
                     LRSchedule("constant", 0.016 * case.batch / 256, total_steps=1 << 30),
                     label_smoothing=0.1, amp_dtype=amp, cuda_graph=case.graph)
    images = torch.randn(case.batch, 3, case.size, case.size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.nn.functional.one_hot(torch.randint(0, num_classes, (case.batch,), device=device),
                                          num_classes).float()
    return model, step, images, targets


@contextmanager
def _moments(model, on_forward, on_backward):
    """Call ``on_forward()`` when the model's forward starts and ``on_backward()`` when ``loss.backward()``
    is called (the step's forward and loss are done, nothing is freed yet)."""
    import torch

    backward = torch.Tensor.backward

    def patched(self, *args, **kwargs):
        on_backward()
        return backward(self, *args, **kwargs)

    hook = model.register_forward_pre_hook(lambda module, args: on_forward())
    torch.Tensor.backward = patched
    try:
        yield
    finally:
        torch.Tensor.backward = backward
        hook.remove()


def measure_cpu(case: MemoryCase, num_classes: int = 1000, steps: int = 2) -> Measured:
    """Live CPU bytes over a whole run (build + ``steps`` steps), from the profiler's allocation events."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    def marker(name):
        def mark():
            with record_function(name):
                pass
        return mark

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model, step, images, targets = _step(case, "cpu", num_classes)
        with _moments(model, *map(marker, _MARKS)):
            for _ in range(steps):
                step(images, targets)
    events = prof.profiler.kineto_results.events()  # prof.events() merges some memory events into ops
    cpu = torch.autograd.DeviceType.CPU
    allocs = sorted((e.start_ns(), e.nbytes()) for e in events
                    if e.name() == "[memory]" and e.device_type() == cpu)
    ops = [e for e in events if e.name() != "[memory]"]
    forward_at, backward_at = (max(e.start_ns() for e in ops if e.name() == m) for m in _MARKS)  # last step's
    live = peak = peak_at = 0
    at_forward = at_backward = None
    for t, n in allocs:
        if at_forward is None and t > forward_at:
            at_forward = live
        if at_backward is None and t > backward_at:
            at_backward = live
        live += n
        if live > peak:
            peak, peak_at = live, t
    running = sorted((e.start_ns(), e.name()) for e in ops if e.start_ns() <= peak_at <= e.end_ns())
    where = " > ".join(n for _, n in running if not n.startswith(("aten::empty", "aten::to", "aten::_to")))
    held = _held_bytes(model, step, images, targets)
    return Measured(peak, at_backward - at_forward, live, live - held, where)


def _held_bytes(model, step, images, targets) -> int:
    """Bytes of the distinct storages of every tensor the run holds after its last step."""
    import torch

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    tensors = [*model.parameters(), *model.buffers(), *grads,
               *step.ema.module.parameters(), *step.ema.module.buffers(), images, targets, *(step._static or ())]
    tensors += [t for state in step.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    tensors += [t for obj in (step, step.schedule, step.ema) for t in vars(obj).values()
                if torch.is_tensor(t)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def measure_cuda(case: MemoryCase, num_classes: int = 1000, steps: int = 2) -> Measured:
    """``torch.cuda.max_memory_allocated`` over build + steps; allocated bytes at the two moments."""
    import torch

    torch.backends.cudnn.benchmark = True  # as the trainer runs (its search allocates workspaces too)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model, step, images, targets = _step(case, "cuda", num_classes)
    at: dict[str, int] = {}
    with _moments(model, lambda: at.__setitem__("forward", torch.cuda.memory_allocated()),
                  lambda: at.__setitem__("backward", torch.cuda.memory_allocated())):
        for _ in range(steps + (step.warmup_steps + 1 if step.cuda_graph else 0)):  # + warm-up and capture
            step(images, targets)
    torch.cuda.synchronize()
    end = torch.cuda.memory_allocated() - base
    out = Measured(torch.cuda.max_memory_allocated() - base, at["backward"] - at["forward"], end,
                   end - _held_bytes(model, step, images, targets), "")
    step.release()
    del model, step, images, targets
    torch.cuda.empty_cache()
    return out


def run_memory_bench(cases: list[MemoryCase], *, device: str, num_classes: int = 1000,
                     budget: int | None = None, margin: float = 0.10, max_batch: int = 4096) -> Report:
    import torch

    from effnetv2.model.memory import fmt_bytes, plan_batches, step_memory

    report = Report("memory", f"training-step memory: predicted vs measured ({device})", unit="MiB")
    measure = measure_cuda if device == "cuda" else measure_cpu
    results = []
    for case in cases:
        amp = torch.bfloat16 if case.amp == "bf16" else None
        mem = step_memory(case.model, num_classes, case.size, amp=amp, margin=margin)
        # the bench holds one float batch (two with a graph: its static copy) and no uint8 staging
        here = replace(mem, input_batches=2 if case.graph else 1, staging_bytes=0)
        params = {**asdict(case), "memory": asdict(mem)}
        try:
            if budget is not None:
                case = replace(case, batch=plan_batches([mem], budget, max_batch=max_batch)[0])
                params["batch"] = case.batch
            got = measure(case, num_classes)
        except Exception as e:  # noqa: BLE001 - too small a budget, out of memory: report, measure the rest
            for series in ("measured activations", "measured peak"):
                report.add(Row(series, case.label, None, "error", f"{type(e).__name__}: {e}"[:300], params))
            continue
        b = case.batch
        rows = {"counted activations": here.activations(b), "measured activations": got.activations,
                "predicted peak": here.peak(b), "measured peak": got.peak,
                "planned (with margin)": here.total(b)}
        for series, value in rows.items():
            note = f"at {got.where}" if series == "measured peak" and got.where else ""
            report.add(Row(series, case.label, Timing((value / MIB,), 0.0), note=note, params=params))
        report.add_ratio("activations: counted / measured", case.label, "counted activations",
                         "measured activations")
        report.add_ratio("peak: predicted / measured", case.label, "predicted peak", "measured peak")
        report.add_ratio("peak: measured / planned (<= 1 fits)", case.label, "measured peak",
                         "planned (with margin)")
        result = {"case": asdict(case), "measured": asdict(got), "counted_activations": here.activations(b),
                  "predicted_peak": here.peak(b), "planned_total": here.total(b), "state": mem.state}
        if budget is not None:
            result["budget"] = budget
            verdict = "within" if got.peak <= budget else "OVER"
            report.notes.append(f"{case.label}: batch planned for {fmt_bytes(budget)}; measured peak "
                                f"{fmt_bytes(got.peak)} ({verdict} the budget)")
        results.append(result)
    report.config = {"device": device, "num_classes": num_classes, "budget": budget, "margin": margin,
                     "cases": [asdict(c) for c in cases], "threads": torch.get_num_threads()}
    report.extra["cases"] = results
    report.notes.append("predicted peak: state + max(backward: saved alive + gradients made + 2 x largest "
                        "activation, update temporaries) + one input batch, no margin")
    report.notes.append("activations: saved for backward + logits + loss; planned: predicted peak + margin")
    return report


def parse_cases(text: str, amps: list[str], graph: bool = False) -> list[MemoryCase]:
    """``MODEL:SIZE:BATCH,...`` (``s``, ``b0``, ``demo`` or full names), one case per amp."""
    cases = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            raise SystemExit(f"effnetv2 bench memory: case {item!r} is not MODEL:SIZE:BATCH")
        model = parts[0] if parts[0].startswith("efficientnetv2-") else f"efficientnetv2-{parts[0]}"
        cases += [MemoryCase(model, int(parts[1]), int(parts[2]), amp, graph) for amp in amps]
    return cases


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cases", default=None,
                   help=f"comma-separated MODEL:SIZE:BATCH (default on a CPU: {CPU_CASES}; on a GPU: "
                        f"{GPU_CASES}, S at its four official stage sizes)")
    p.add_argument("--amps", default=None, help="fp32 and/or bf16 (default: both on a CPU; bf16 on a GPU)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--graph", action="store_true",
                   help="capture the step in a CUDA graph, as the trainer does (GPU only)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--budget", default=None,
                   help="plan each case's batch for this budget (80GiB; auto on a GPU), check it fits")
    p.add_argument("--margin", type=float, default=0.10, help="the planner's margin (default 0.10)")
    p.add_argument("--max-batch", type=int, default=4096)


def run(args: argparse.Namespace) -> Report:
    import torch

    from effnetv2.model.memory import parse_budget

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    amps = (args.amps or ("bf16" if device == "cuda" else "fp32,bf16")).split(",")
    for a in amps:
        if a not in AMPS:
            raise SystemExit(f"effnetv2 bench memory: unknown amp {a!r}; choose from {', '.join(AMPS)}")
    if args.graph and device != "cuda":
        raise SystemExit("effnetv2 bench memory: --graph needs a CUDA GPU")
    cases = parse_cases(args.cases or (GPU_CASES if device == "cuda" else CPU_CASES), amps, args.graph)
    try:
        budget = parse_budget(args.budget, device) if args.budget else None
    except ValueError as e:
        raise SystemExit(f"effnetv2 bench memory: {e}") from None
    return run_memory_bench(cases, device=device, num_classes=args.num_classes, budget=budget,
                            margin=args.margin, max_batch=args.max_batch)
