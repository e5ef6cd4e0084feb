"""``effnetv2 bench e2e``: the trainer fed by the real loader vs the same trainer fed synthetic data.

Per stage of the model's progressive plan, three series, in this order (not interleaved: while one
series runs, the real loader's workers would otherwise fill their prefetch queue for free):

- ``trainer + loader``: the trainer's own parts (:func:`~effnetv2.recipes.engine.trainer.build_run`,
  ``open_stage``, ``stage_batches``, ``close_stage``) for the official ``in1k`` recipe of the model,
  minus logging, checkpoints and evaluation, which sit outside the steps;
- ``trainer + synthetic``: the same step on one fixed batch of the same shape, dtype and device;
- ``loader alone``: the same loader stream, nothing consuming it.

``trainer + loader`` / ``trainer + synthetic`` is the loader's cost, the number users care about
(1.0 = the loader is free). ``loader alone`` / ``trainer + synthetic`` is the loader's headroom (goal on
a GPU: >= 3x). The stage switch (close the old loader and release the step's graph, build the new
loader, first batch, the first step at the new size: with CUDA graphs the step's eager warm-up and
capture, with ``torch.compile`` the recompilation) is timed per stage and reported in seconds.

With ``--batch-plan memory --memory SIZE`` the same run also builds the trainer with every stage's batch
planned for SIZE per device (``batch_plan=memory``, :mod:`effnetv2.recipes.engine.batch_plan`) and, per
stage, times ``trainer + loader`` and ``trainer + synthetic`` at the planned batch right after the fixed
batch's series: rows ``... (planned batch)`` and the ratios planned / fixed. Both trainers live in the
process, so on a GPU give a SIZE that leaves room for the fixed one (``auto`` would count it as free).

Default on a CPU: efficientnetv2-b0's plan at batch 32 (S does ~3 img/s at 300 px on 2 cores); on a
GPU: efficientnetv2-s at batch 128, bf16, CUDA graphs.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict
from pathlib import Path

from effnetv2.pipeline.loaders.backend import ALIASES, BACKENDS
from effnetv2.recipes.engine.plan import BATCH_PLANS
from effnetv2.recipes.engine.step import AMP

from .report import Report, Row
from .timing import measure

SERIES = ("trainer + loader", "trainer + synthetic", "loader alone")
PLANNED = ("trainer + loader (planned batch)", "trainer + synthetic (planned batch)")


def bench_config(shards: Path, model_name: str, *, batch_size: int, device: str, backend: str, amp: str,
                 mode: str, workers: int | None, seed: int):
    """The official ImageNet recipe (``in1k``) for ``model_name`` on ``shards``, with the benchmark's
    batch, device, backend, precision and step mode: the trainer is then built as any run builds it."""
    import dataclasses

    from effnetv2.recipes.catalog import in1k

    return dataclasses.replace(in1k.config(model_name), data=str(shards), batch_size=batch_size, device=device,
                               backend=backend, amp=amp, cuda_graphs=mode.endswith("graph"),
                               compile=mode.startswith("compiled"), num_workers=workers, seed=seed, epochs=1.0,
                               eval_split="", progress=False, tensorboard=False)


def run_e2e_bench(shards: Path, model_name: str, *, batch_size: int, device: str, backend: str = "auto",
                  amp: str = "auto", mode: str = "eager", num_stages: int = 4, image_size: tuple[int, int] | None = None,
                  warmup: int = 2, reps: int = 3, per_rep: int = 2, workers: int | None = None,
                  seed: int = 0, plan_of: str | None = None, batch_plan: str = "fixed", memory: str = "auto",
                  max_batch: int = 0) -> Report:
    """``plan_of``: the model whose official plan sets the stages (default ``model_name``; the demo
    model has none); ``image_size`` replaces the plan's (lo, hi) sizes. ``batch_plan="memory"`` adds the
    planned-batch series (``memory``: budget per device, ``max_batch``: global cap)."""
    import dataclasses

    import torch

    from effnetv2.recipes.engine.plan import make_plan
    from effnetv2.recipes.engine.trainer import build_run, close_stage, open_stage, stage_batches

    stages = make_plan(plan_of or model_name, "official", epochs=1, batch_size=batch_size, num_stages=num_stages,
                       size=image_size)
    cfg = bench_config(shards, model_name, batch_size=batch_size, device=device, backend=backend, amp=amp,
                       mode=mode, workers=workers, seed=seed)
    run = build_run(cfg, stages)
    planned = None
    if batch_plan == "memory":
        planned = build_run(dataclasses.replace(cfg, batch_plan="memory", memory=memory, max_batch=max_batch), stages)
    step_fn = run.step_fn
    vs = f" vs planned for {memory} per device" if planned else ""
    report = Report("e2e", f"{model_name} trainer imgs/s per stage, batch {batch_size}{vs}, {device}, "
                           f"amp {step_fn.amp_dtype}, {mode}")
    report.config = {"shards": str(shards), "model": model_name, "plan_of": plan_of or model_name,
                     "batch_size": batch_size, "device": device, "backend": backend, "amp": str(step_fn.amp_dtype),
                     "mode": mode, "cuda_graph": step_fn.cuda_graph, "warmup_steps": warmup, "reps": reps,
                     "steps_per_rep": per_rep, "workers": workers, "stages": [asdict(s) for s in stages],
                     "batch_plan": batch_plan}
    if planned:
        report.config.update(memory=memory, max_batch=max_batch, budget_bytes=planned.budget,
                             planned_batches=[s.batch_size for s in planned.stages],
                             predicted_bytes=[m.total(s.local_batch) for m, s in zip(planned.memory, planned.spans)])
    sync = torch.cuda.synchronize if run.info.device.type == "cuda" else (lambda: None)
    drain = 2 * (workers or len(os.sched_getaffinity(0))) + 4
    switches, loader = [], None
    try:
        for stage in stages:
            # -- the stage switch, timed as the trainer meets it
            t0 = time.perf_counter()
            if loader is not None:
                close_stage(run, loader)
                loader = None
            t_closed = time.perf_counter()
            loader = open_stage(run, stage)
            t_built = time.perf_counter()
            span = run.spans[stage.index]
            batches = stage_batches(loader, span, span.first, 1 << 62)
            images, targets = next(batches)
            sync()
            t_first = time.perf_counter()
            fixed = (images.clone(), targets.clone())  # the synthetic batch: same shape, dtype, layout, device
            for _ in range(step_fn.warmup_steps + 1 if step_fn.cuda_graph else 1):  # + capture, or compile
                step_fn(*fixed)
            sync()
            t_ready = time.perf_counter()
            switches.append({"stage": stage.index, "image_size": stage.image_size, "backend": loader.backend_name,
                             "close_previous_s": t_closed - t0, "build_loader_s": t_built - t_closed,
                             "first_batch_s": t_first - t_built, "step_warmup_s": t_ready - t_first,
                             "total_s": t_ready - t0})
            # -- the three series
            point = f"{stage.image_size}px m{stage.randaug_magnitude:.3g}"
            timings = _measure_series(step_fn, batches, fixed, batch_size, sync, drain, warmup=warmup, reps=reps,
                                      per_rep=per_rep)
            for series, timing in timings.items():
                report.add(Row(series, point, timing, note=f"backend {loader.backend_name}", params=asdict(stage)))
            report.add_ratio("loader cost: real / synthetic", point, SERIES[0], SERIES[1])
            report.add_ratio("loader headroom: loader alone / synthetic", point, SERIES[2], SERIES[1])
            batches.close()
            if planned:
                close_stage(run, loader)  # one loader's workers at a time
                loader = None
                _planned_series(report, planned, stage, point, sync, drain, warmup=warmup, reps=reps,
                                per_rep=per_rep)
    finally:
        close_stage(run, loader)
    report.extra["stage_switch"] = switches
    report.notes += [f"stage {s['stage']} ({s['image_size']}px, {s['backend']}): switch {s['total_s']:.2f} s = close "
                     f"{s['close_previous_s']:.2f} + build loader {s['build_loader_s']:.2f} + first batch "
                     f"{s['first_batch_s']:.2f} + first step(s) {s['step_warmup_s']:.2f}" for s in switches]
    return report


def _planned_series(report: Report, run, stage, point: str, sync, drain: int, **timing_args) -> None:
    """The stage at its planned batch: trainer + loader and trainer + synthetic, and the ratios to the fixed
    batch's rows at ``point``."""
    from effnetv2.recipes.engine.trainer import close_stage, open_stage, stage_batches

    span = run.spans[stage.index]
    loader = open_stage(run, stage)
    try:
        batches = stage_batches(loader, span, span.first, 1 << 62)
        fixed = tuple(t.clone() for t in next(batches))
        for _ in range(run.step_fn.warmup_steps + 1 if run.step_fn.cuda_graph else 1):
            run.step_fn(*fixed)

        def real() -> int:
            run.step_fn(*next(batches))
            return span.batch

        def synthetic() -> int:
            run.step_fn(*fixed)
            return span.batch

        for _ in range(drain):
            next(batches)
        timings = {PLANNED[0]: measure({PLANNED[0]: real}, sync=sync, **timing_args)[PLANNED[0]],
                   PLANNED[1]: measure({PLANNED[1]: synthetic}, sync=sync, **timing_args)[PLANNED[1]]}
        batches.close()
    finally:
        close_stage(run, loader)
    mem = run.memory[stage.index].total(span.local_batch)
    for series, timing in timings.items():
        report.add(Row(series, point, timing, note=f"batch {span.batch}, predicted {mem:,} bytes per device",
                       params={**asdict(stage), "batch_size": span.batch, "predicted_bytes": mem}))
    report.add_ratio("planned / fixed batch: trainer + loader", point, PLANNED[0], SERIES[0])
    report.add_ratio("planned / fixed batch: trainer + synthetic", point, PLANNED[1], SERIES[1])


def _measure_series(step_fn, batches, fixed, batch_size: int, sync, drain: int, **timing_args) -> dict:
    """The three series of one stage, one after the other (see the module docstring for why).

    Before each series that reads the loader, ``drain`` batches are thrown away untimed: the loader's
    prefetch queues (DataLoader: 2 batches per worker; DALI: a few) fill up while nothing reads them,
    and batches that were ready before the clock started would flatter the loader.
    """

    def real() -> int:
        step_fn(*next(batches))
        return batch_size

    def synthetic() -> int:
        step_fn(*fixed)
        return batch_size

    def alone() -> int:
        next(batches)
        return batch_size

    timings = {}
    for series, fn in zip(SERIES, (real, synthetic, alone)):
        if fn is not synthetic:
            for _ in range(drain):
                next(batches)
        timings[series] = measure({series: fn}, sync=sync, **timing_args)[series]
    return timings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("shards", type=Path, help="shard set (e.g. made by 'effnetv2 bench corpus')")
    p.add_argument("--model", default=None, help="default: efficientnetv2-b0 on a CPU, efficientnetv2-s on a GPU")
    p.add_argument("--batch-size", type=int, default=None, help="default: 32 on a CPU, 128 on a GPU")
    p.add_argument("--stages", type=int, default=4, help="stages of the official plan (default 4)")
    p.add_argument("--plan-of", default=None, help="follow this model's official plan (default: --model's)")
    p.add_argument("--sizes", default=None, help="LO,HI image sizes of the plan (default: the model's)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--backend", default="auto", choices=BACKENDS + tuple(ALIASES))
    p.add_argument("--amp", default="auto", choices=tuple(AMP))
    p.add_argument("--mode", default=None, choices=("eager", "compiled", "graph", "compiled-graph"),
                   help="trainer step mode (default: graph on a GPU, eager on a CPU, where graphs do not exist)")
    p.add_argument("--workers", type=int, default=None, help="loader workers/threads (default: all cores)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per series and stage")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--per-rep", type=int, default=2, help="steps per timed repetition")
    p.add_argument("--batch-plan", default="fixed", choices=BATCH_PLANS,
                   help="memory: also time every stage at the batch planned for --memory (batch_plan=memory)")
    p.add_argument("--memory", default="auto", help="with --batch-plan memory: budget per device, e.g. 2GiB "
                                                    "(auto: the GPU's free memory)")
    p.add_argument("--max-batch", type=int, default=0, help="with --batch-plan memory: cap on the global batch")


def run(args: argparse.Namespace) -> Report:
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    gpu = device == "cuda"
    sizes = tuple(int(s) for s in args.sizes.split(",")) if args.sizes else None
    return run_e2e_bench(args.shards, args.model or ("efficientnetv2-s" if gpu else "efficientnetv2-b0"),
                         batch_size=args.batch_size or (128 if gpu else 32), device=device, backend=args.backend,
                         amp=args.amp, mode=args.mode or ("graph" if gpu else "eager"), num_stages=args.stages, image_size=sizes, warmup=args.warmup,
                         reps=args.reps, per_rep=args.per_rep, workers=args.workers, plan_of=args.plan_of,
                         batch_plan=args.batch_plan, memory=args.memory, max_batch=args.max_batch)
