"""``effnetv2 bench step``: training-step imgs/s per model on synthetic data, ours beside timm's.

Two kinds of rows, both on random images of the case's size (no loader involved):

- ``ours`` and ``timm``: the *same* plain step for both implementations, the way the reference
  numbers were taken (channels_last, one ``torch.optim.RMSprop`` step of softmax cross-entropy, batch
  32, 128 px): eager or ``torch.compile``-d, fp32 or bf16 autocast. Both models are built with the
  same dropout and drop-path rate, and their repetitions are interleaved in one process, so the
  ratio ours/timm compares the networks and nothing else. When timm does not import here, this
  pair runs in ``--peer-python`` (any interpreter with torch and timm; our package is linked in),
  and ``ours (this env)`` adds our model in the project's own environment for reference.
- ``ours trainer``: the project's real training step (:mod:`effnetv2.recipes.step`: TF RMSprop,
  EMA, label smoothing, L2) in each mode it offers: eager, compiled, and a CUDA graph on a GPU.

Reference (2 cores, fp32, batch 32, 128 px): timm ``tf_efficientnetv2_s`` 17.2 img/s, ``_b0`` 40.8.
Goal: ours/timm >= 1.0 on CPU and GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

from .timing import Timing, measure

DTYPES = ("fp32", "bf16")


@dataclass(frozen=True)
class StepCase:
    """One training-step configuration."""

    model: str  # our name, e.g. "efficientnetv2-s"
    size: int = 128
    batch_size: int = 32
    mode: str = "eager"  # eager | compiled | graph (graph: CUDA only, trainer step only)
    dtype: str = "fp32"  # fp32 | bf16 (autocast)

    @property
    def label(self) -> str:
        return f"{self.model.removeprefix('efficientnetv2-')} {self.size}px {self.mode} {self.dtype}"


def timm_name(model: str) -> str | None:
    """timm's port of the official weights' architecture (TF padding), or None for our demo model."""
    suffix = model.removeprefix("efficientnetv2-")
    return None if suffix == "demo" else f"tf_efficientnetv2_{suffix}"


def _build(impl: str, case: StepCase, num_classes: int):
    import torch

    if impl == "timm":
        import timm

        from effnetv2.model import create_model

        dropout = create_model(case.model, num_classes).config.dropout
        model = timm.create_model(timm_name(case.model), pretrained=False, num_classes=num_classes,
                                  drop_rate=dropout, drop_path_rate=0.2)
    else:
        from effnetv2.model import create_model

        model = create_model(case.model, num_classes, drop_path_rate=0.2)
    return model.to(memory_format=torch.channels_last)


def plain_step(impl: str, case: StepCase, device: str, num_classes: int = 1000, seed: int = 0) -> Callable[[], int]:
    """A callable doing one plain training step (forward, CE loss, backward, RMSprop) of ``impl``."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    model = _build(impl, case, num_classes).to(device).train()
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-4, alpha=0.9, eps=1e-3, momentum=0.9)
    forward = torch.compile(model) if case.mode == "compiled" else model
    images = torch.randn(case.batch_size, 3, case.size, case.size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (case.batch_size,), device=device)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=case.dtype == "bf16")

    def step() -> int:
        with autocast:
            loss = F.cross_entropy(forward(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return case.batch_size

    return step


def compare(cases: list[StepCase], impls: list[str], *, device: str, warmup: int, reps: int,
            per_rep: int) -> list[dict]:
    """Time ``impls`` side by side (interleaved) for each case: ``{"series", "point", "status", ...}`` rows."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else None
    rows = []
    for case in cases:
        steps, skipped = {}, []
        for impl in impls:
            if impl == "timm" and timm_name(case.model) is None:
                skipped.append((impl, "timm has no counterpart of this model"))
                continue
            try:
                steps[impl] = plain_step(impl, case, device)
            except Exception as e:  # noqa: BLE001 - report, keep measuring the rest
                skipped.append((impl, f"{type(e).__name__}: {e}"))
        timings: dict[str, Timing] = {}
        try:
            timings = measure(steps, warmup=warmup, reps=reps, per_rep=per_rep, sync=sync) if steps else {}
        except Exception as e:  # noqa: BLE001
            skipped += [(impl, f"{type(e).__name__}: {e}") for impl in steps]
        for impl, timing in timings.items():
            rows.append({"series": impl, "point": case.label, "status": "ok", "note": "",
                         "timing": timing.to_dict(), "params": asdict(case)})
        for impl, why in skipped:
            status = "n/a" if "counterpart" in why else "error"
            rows.append({"series": impl, "point": case.label, "status": status, "note": why, "timing": None,
                         "params": asdict(case)})
    return rows


def main(argv: list[str] | None = None) -> int:
    """Entry point for another interpreter (``--peer-python``): compare, print one JSON line."""
    p = argparse.ArgumentParser(description="effnetv2 bench step worker")
    p.add_argument("--cases", required=True, help="JSON list of StepCase fields")
    p.add_argument("--impls", default="ours,timm")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--per-rep", type=int, default=2)
    args = p.parse_args(argv)
    import torch

    from .peers import interpreter_versions

    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [StepCase(**c) for c in json.loads(args.cases)]
    rows = compare(cases, args.impls.split(","), device=args.device, warmup=args.warmup, reps=args.reps,
                   per_rep=args.per_rep)
    print(json.dumps({"versions": interpreter_versions(), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
