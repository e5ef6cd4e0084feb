"""``effnetv2 bench step``: training-step imgs/s per model on synthetic data, ours beside timm's.

Two kinds of rows, both on random images of the case's size (no loader involved):

- ``ours`` and ``timm``: the *same* plain step for both implementations, the way the reference
  numbers were taken (channels_last, one ``torch.optim.RMSprop`` step of softmax cross-entropy, batch
  32, 128 px): eager or ``torch.compile``-d, fp32 or bf16 autocast. Both models are built with the
  same dropout and drop-path rate, and their repetitions are interleaved in one process, so the
  ratio ours/timm compares the networks and nothing else. When timm does not import here, this
  pair runs in ``--peer-python`` (any interpreter with torch and timm; our package is linked in),
  and ``ours (this env)`` adds our model in the project's own environment for reference. Ours is
  built as it is trained, with symmetric padding; ``--tf-padding`` gives it timm's TF "SAME" padding.
- ``ours trainer``: the project's real training step, built by the trainer's parts for the official
  ``in1k`` recipe (TF RMSprop, EMA, label smoothing, L2), in each mode it offers: eager, compiled, and
  a CUDA graph on a GPU.

Reference (2 cores, fp32, batch 32, 128 px): timm ``tf_efficientnetv2_s`` 17.2 img/s, ``_b0`` 40.8.
Goal: ours/timm >= 1.0 on CPU and GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

from .report import Report, Row, machine
from .timing import Timing, measure

DTYPES = ("fp32", "bf16")
MODES = ("eager", "compiled", "graph", "compiled-graph")


@dataclass(frozen=True)
class StepCase:
    """One training-step configuration."""

    model: str  # our name, e.g. "efficientnetv2-s"
    size: int = 128
    batch_size: int = 32
    mode: str = "eager"  # one of MODES; the graph modes need CUDA and run only the trainer step
    dtype: str = "fp32"  # fp32 | bf16 (autocast)
    tf_padding: bool = False  # ours with TF "SAME" padding, as timm's tf_ ports have (slower)

    @property
    def label(self) -> str:
        text = f"{self.model.removeprefix('efficientnetv2-')} {self.size}px {self.mode} {self.dtype}"
        return text + (" tf-pad" if self.tf_padding else "")


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

        model = create_model(case.model, num_classes, drop_path_rate=0.2, tf_padding=case.tf_padding)
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
        steps, skipped = {}, []  # skipped: (impl, status, why)
        for impl in impls:
            if impl == "timm" and timm_name(case.model) is None:
                skipped.append((impl, "n/a", "timm has no counterpart of this model"))
                continue
            try:
                steps[impl] = plain_step(impl, case, device)
            except Exception as e:  # noqa: BLE001 - report, keep measuring the rest
                skipped.append((impl, "error", f"{type(e).__name__}: {e}"))
        timings: dict[str, Timing] = {}
        try:
            timings = measure(steps, warmup=warmup, reps=reps, per_rep=per_rep, sync=sync) if steps else {}
        except Exception as e:  # noqa: BLE001
            skipped += [(impl, "error", f"{type(e).__name__}: {e}") for impl in steps]
        for impl, timing in timings.items():
            rows.append({"series": impl, "point": case.label, "status": "ok", "note": "",
                         "timing": timing.to_dict(), "params": asdict(case)})
        for impl, status, why in skipped:
            rows.append({"series": impl, "point": case.label, "status": status, "note": why, "timing": None,
                         "params": asdict(case)})
    return rows


def trainer_step(case: StepCase, device: str, num_classes: int = 1000, seed: int = 0) -> Callable[[], int]:
    """A callable doing one step of the project's real training step, built by the trainer's own parts
    for the official ``in1k`` recipe (TF RMSprop, EMA, label smoothing, L2) with the case's settings."""
    import dataclasses

    import torch

    from effnetv2.recipes.catalog import in1k
    from effnetv2.recipes.engine.distributed import DistInfo
    from effnetv2.recipes.engine.trainer import build_model, build_schedule, build_step

    cfg = dataclasses.replace(in1k.config(case.model), seed=seed, batch_size=case.batch_size,
                              tf_padding=case.tf_padding, amp="bf16" if case.dtype == "bf16" else "none",
                              cuda_graphs=case.mode.endswith("graph"), compile=case.mode.startswith("compiled"))
    dev = torch.device(device)
    model = build_model(cfg, num_classes, dev)
    _, _, step = build_step(cfg, model, DistInfo(0, 1, 0, dev), build_schedule(cfg, 1000, 1 << 30))
    images = torch.randn(case.batch_size, 3, case.size, case.size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.nn.functional.one_hot(torch.randint(0, num_classes, (case.batch_size,), device=device),
                                          num_classes).float()

    def run_one() -> int:
        step(images, targets)
        return case.batch_size

    if step.cuda_graph:  # its own eager warm-up, then the capture: never inside a timed repetition
        for _ in range(step.warmup_steps + 1):
            run_one()
    return run_one


def _row(d: dict, **changes) -> Row:
    d = {**d, **changes}
    timing = Timing.from_dict(d["timing"]) if d.get("timing") else None
    return Row(d["series"], d["point"], timing, d["status"], d.get("note", ""), d.get("params", {}))


def run_step_bench(cases: list[StepCase], *, device: str, warmup: int = 2, reps: int = 5, per_rep: int = 2,
                   peer_python: str | None = None, threads: int | None = None) -> Report:
    """Ours vs timm (plain step, side by side) and the project's trainer step, for every case."""
    import importlib.util

    import torch

    from .peers import run_elsewhere

    report = Report("step", f"training step imgs/s on synthetic data ({device})")
    report.config = {"cases": [asdict(c) for c in cases], "device": device, "warmup_steps": warmup, "reps": reps,
                     "steps_per_rep": per_rep, "peer_python": peer_python, "threads": torch.get_num_threads()}
    sync = torch.cuda.synchronize if device == "cuda" else None
    plain = [c for c in cases if c.mode in ("eager", "compiled")]
    peer_versions = None
    if importlib.util.find_spec("timm") is not None:
        rows = [_row(d) for d in compare(plain, ["ours", "timm"], device=device, warmup=warmup, reps=reps,
                                         per_rep=per_rep)]
    else:
        rows = [_row(d, series="ours (this env)") for d in compare(plain, ["ours"], device=device, warmup=warmup,
                                                                   reps=reps, per_rep=per_rep)]
        if peer_python:
            argv = ["--cases", json.dumps([asdict(c) for c in plain]), "--device", device, "--warmup", str(warmup),
                    "--reps", str(reps), "--per-rep", str(per_rep), "--threads", str(threads or torch.get_num_threads())]
            try:
                out = run_elsewhere(peer_python, "bench.step", argv)
                peer_versions = out["versions"]
                where = f"in {peer_python} (torch {peer_versions.get('torch')}, timm {peer_versions.get('timm')})"
                rows += [_row(d, note=(d["note"] + " " + where).strip()) for d in out["rows"]]
            except (OSError, RuntimeError, ValueError) as e:
                rows += [Row(impl, c.label, None, "error", str(e)[-300:]) for c in plain for impl in ("ours", "timm")]
        else:
            rows += [Row("timm", c.label, None, "n/a", "timm does not import here; pass --peer-python PYTHON "
                         "naming an interpreter with torch and timm") for c in plain]
    for row in rows:
        report.add(row)
    for case in cases:
        params = asdict(case)
        if case.mode.endswith("graph") and device != "cuda":
            report.add(Row("ours trainer", case.label, None, "n/a", "CUDA graphs need a GPU", params))
            continue
        try:
            timing = measure({"t": trainer_step(case, device)}, warmup=warmup, reps=reps, per_rep=per_rep,
                             sync=sync)["t"]
            report.add(Row("ours trainer", case.label, timing, params=params))
        except Exception as e:  # noqa: BLE001 - report it, measure the rest
            report.add(Row("ours trainer", case.label, None, "error", f"{type(e).__name__}: {e}", params))
    for case in plain:
        report.add_ratio("ours / timm (same step, same interpreter)", case.label, "ours", "timm")
    report.notes.append("reference, 2 cores, fp32, batch 32, 128 px: timm tf_efficientnetv2_s 17.2 img/s, "
                        "b0 40.8 img/s; goal ours/timm >= 1.0")
    report.machine = machine({"peer_interpreter": peer_versions} if peer_versions else None)
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="efficientnetv2-s,efficientnetv2-b0")
    p.add_argument("--sizes", default="128", help="comma-separated image sizes (default 128, the reference)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--modes", default=None,
                   help="comma-separated of eager, compiled, graph, compiled-graph (default: eager on a CPU; "
                        "eager,graph,compiled-graph on a GPU). Graph modes run only the trainer step; each "
                        "compiled case costs a compilation (minutes on few cores)")
    p.add_argument("--dtypes", default=None, help="fp32 and/or bf16 (default: fp32 on CPU, both on a GPU)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--tf-padding", action="store_true",
                   help="build ours with TF 'SAME' padding like timm's tf_ ports (default: symmetric, as trained)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per case (compilation happens here)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--per-rep", type=int, default=2, help="steps per timed repetition")
    p.add_argument("--peer-python", default=None,
                   help="a Python with torch + timm for the timm side, e.g. /tmp/side/bin/python")


def run(args: argparse.Namespace) -> Report:
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    gpu = device == "cuda"
    modes = (args.modes or ("eager,graph,compiled-graph" if gpu else "eager")).split(",")
    dtypes = (args.dtypes or ("fp32,bf16" if gpu else "fp32")).split(",")
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"effnetv2 bench step: unknown mode {m!r}; choose from {', '.join(MODES)}")
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"effnetv2 bench step: unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    cases = [StepCase(model, int(size), args.batch_size, mode, dtype, args.tf_padding) for model in args.models.split(",")
             for size in args.sizes.split(",") for mode in modes for dtype in dtypes]
    return run_step_bench(cases, device=device, warmup=args.warmup, reps=args.reps, per_rep=args.per_rep,
                          peer_python=args.peer_python, threads=args.threads)


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
