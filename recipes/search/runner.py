"""The training-aware search of paper §3.3, run with the project's own trainer, data path and step.

Candidate 0 is the backbone itself (the reference: its reward is its accuracy); candidates ``1..N`` are
random samples of the space around it (``SearchSpace.samples(N, seed)``: candidate ``k`` is sample
``k - 1``). Each one is

- written as a model config file (``candidates/cNNN-<id>/model.json``) and trained by
  :func:`effnetv2.recipes.engine.trainer.train` from the recipe's config with ``model=`` that file
  (:func:`proxy_config`): one fixed stage at the proxy size (not the recipe's progressive plan scaled
  down: one size is what S is measured at, and a short run has no room for stages) for the proxy
  epochs, with the recipe's weakest regularisation (what Algorithm 1 pairs with small images), its LR
  schedule compressed to the proxy length and the same seed for every candidate; A is the EMA's top-1
  on the recipe's held-out split at the proxy size. The trainer's own log goes to the candidate's ``train.log``; an interrupted
  candidate resumes from its checkpoints (``resume=True``; a checkpoint every quarter of a run over
  200 steps, else it restarts);
- timed (:class:`StepTimer`): the trainer's real step (``bench.step.trainer_step``: the trainer's
  ``build_model``/``build_schedule``/``build_step``, with the in1k recipe's optimiser settings: the
  step's work does not depend on their values) on synthetic batches at the proxy size and batch,
  on the device the search runs on, with ``bench.timing.measure`` (warm-up, median of repetitions),
  interleaved with the backbone's step in the same call, so S = candidate / backbone compares the two
  under the same load (other jobs on the machine slow both, not the ratio);
- counted: P = trainable parameters with the shard set's classes.

Its line in ``results.jsonl`` is written as it finishes (see :mod:`.results`); the table, the chart
and ``best.json`` are rewritten after every candidate, so they are current even if the search is killed.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from effnetv2.model import ModelConfig, save_config
from effnetv2.model.config_file import config_to_dict
from effnetv2.model.search import (
    V_PARAMS,
    W_STEP_TIME,
    SearchSpace,
    architecture_id,
    describe,
    measure,
)
from effnetv2.model.search import reward as reward_of
from effnetv2.recipes.engine.config import TrainConfig

from . import report
from .results import SearchFileError, append_result, check_settings, read_results

RANK_CHECK = "rank_check.jsonl"


@dataclass(frozen=True)
class SearchOptions:
    """What ``effnetv2 search`` asks for (see its ``--help``)."""

    samples: int = 20
    seed: int = 0
    epochs: float = 0.5  # proxy epochs per candidate
    image_size: int | None = None  # proxy size; None = the middle of the recipe's size range
    w: float = W_STEP_TIME
    v: float = V_PARAMS
    top_k: int = 10
    layer_delta: int = 2
    rank_check: int = 0  # K: retrain the top-K and K random candidates for rank_factor x the epochs
    rank_factor: float = 3.0
    time_warmup: int = 3
    time_reps: int = 5
    time_per_rep: int = 2


# -- the proxy ------------------------------------------------------------------------------------------
def proxy_size(base: TrainConfig, backbone: ModelConfig) -> int:
    """The default proxy size: the middle of the recipe's size range (32 px for 24-40), on its rounding
    grid; the backbone's train size when the recipe leaves sizes to a plan preset."""
    lo, hi = base.image_size or (backbone.train_size, backbone.train_size)
    step = max(1, base.round_to)
    return max(step, int((lo + hi) / 2 / step + 0.5) * step)


def proxy_config(base: TrainConfig, model: str | Path, out: Path, *, epochs: float, size: int, seed: int,
                 steps_per_epoch: int = 0) -> TrainConfig:
    """``base`` (a recipe's config) turned into one candidate's short run: a single stage at ``size``, with a
    checkpoint every quarter of its steps when it has over 200 (given ``steps_per_epoch``)."""
    steps = int(epochs * steps_per_epoch)
    weakest = {}
    for key in ("randaug", "mixup", "cutmix", "dropout"):
        rng = getattr(base, key)
        if rng is None:
            raise ValueError(f"recipe {base.recipe!r} leaves {key} to its plan preset; the search trains one "
                             f"fixed stage: give the range with --set {key}=lo,hi")
        weakest[key] = (rng[0], rng[0])
    return dataclasses.replace(
        base, model=str(model), out=str(out), plan="paper", num_stages=1, epochs=epochs, total_steps=0,
        image_size=(size, size), eval_size=size, warmup_epochs=base.warmup_epochs * epochs / base.epochs,
        seed=seed, resume=True, stop_at=0, keep_last=1, ckpt_every=math.ceil(steps / 4) if steps > 200 else 0,
        progress=False, tensorboard=False, **weakest)


# -- S: the trainer's step, timed ------------------------------------------------------------------
class StepTimer:
    """Times a model's training step against the backbone's, interleaved (``bench.timing.measure``)."""

    def __init__(self, cfg: TrainConfig, backbone: str | Path, size: int, num_classes: int, *, warmup: int,
                 reps: int, per_rep: int):
        from effnetv2.bench.step import StepCase
        from effnetv2.recipes.engine.distributed import resolve_device
        from effnetv2.recipes.engine.step import resolve_amp

        self.device = resolve_device(cfg.device)
        amp = resolve_amp(cfg.amp, self.device)
        graph = self.device.type == "cuda" and cfg.cuda_graphs
        mode = {(False, False): "eager", (True, False): "compiled", (False, True): "graph",
                (True, True): "compiled-graph"}[(cfg.compile, graph)]
        self.case = StepCase(str(backbone), size, cfg.batch_size, mode,
                             "bf16" if amp == torch.bfloat16 else "fp32", cfg.tf_padding)
        self.num_classes, self.seed = num_classes, cfg.seed
        self.warmup, self.reps, self.per_rep = warmup, reps, per_rep
        self._backbone: Callable[[], int] | None = None

    def _step(self, model: str | Path) -> Callable[[], int]:
        from effnetv2.bench.step import trainer_step

        case = dataclasses.replace(self.case, model=str(model))
        return trainer_step(case, str(self.device), self.num_classes, self.seed)

    def time(self, model: str | Path | None) -> tuple[float, float]:
        """(seconds per step of ``model``, of the backbone) from one interleaved measurement; ``None``
        times the backbone alone (both values are then its own)."""
        from effnetv2.bench.timing import measure as measure_steps

        if self._backbone is None:
            self._backbone = self._step(self.case.model)
        steps = {"backbone": self._backbone}
        if model is not None:
            steps["candidate"] = self._step(model)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else None
        t = measure_steps(steps, warmup=self.warmup, reps=self.reps, per_rep=self.per_rep, sync=sync)
        base = self.case.batch_size / t["backbone"].median
        return (self.case.batch_size / t["candidate"].median if model is not None else base), base


# -- one candidate ----------------------------------------------------------------------------------
def train_candidate(cfg: TrainConfig) -> float:
    """Train ``cfg`` with the project's trainer (log to ``<out>/train.log``); the EMA's last top-1."""
    from effnetv2.recipes.engine.trainer import train

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.log", "a", encoding="utf-8") as log, redirect_stdout(log):
        result = train(cfg)
    if not result.stages or "top1" not in result.stages[-1]:
        raise ValueError(f"{cfg.data}: no evaluation on split {cfg.eval_split!r}; the search needs a held-out "
                         f"split (--set eval_split=NAME)")
    return float(result.stages[-1]["top1"])


@dataclass(frozen=True)
class Entry:
    """A candidate of this search: its index, network and what its line records about it."""

    index: int
    config: ModelConfig
    arch: dict[str, Any]

    @property
    def id(self) -> str:
        return architecture_id(self.config)


def entries(space: SearchSpace, samples: int, seed: int) -> list[Entry]:
    """The backbone (0), then samples ``1..samples`` of ``seed``."""
    bb = space.backbone_candidate()
    first = Entry(0, space.backbone, bb.to_dict() if bb else {"backbone": space.backbone.name, "stages": None})
    return [first] + [Entry(k, c.to_config(), c.to_dict()) for k, c in enumerate(space.samples(samples, seed), 1)]


def run_dir(out: Path, e: Entry, sub: str = "candidates") -> Path:
    return out / sub / f"c{e.index:03d}-{e.id}"


# -- the search -----------------------------------------------------------------------------------
def run_search(base: TrainConfig, backbone: ModelConfig, out: Path, opts: SearchOptions,
               say: Callable[[str], None] = print, settings_extra: dict | None = None) -> list[dict]:
    """Train and time every candidate not yet in ``out/results.jsonl``; write the table, chart and best.json."""
    from effnetv2.pipeline.format import read_shard_set
    from effnetv2.recipes.engine.trainer import NonFiniteLoss, build_plan

    shards = read_shard_set(base.data)
    if not base.eval_split or base.eval_split not in shards.splits:
        raise ValueError(f"{base.data}: the search evaluates every candidate on a held-out split, and split "
                         f"{base.eval_split!r} is not there (it has {sorted(shards.splits)}): --set eval_split=NAME")
    num_classes = base.num_classes or shards.num_classes
    spe = shards.split(base.train_split).num_samples // base.batch_size
    asked = opts.image_size or proxy_size(base, backbone)  # the plan rounds it to the recipe's grid:
    size = build_plan(proxy_config(base, backbone.name, out, epochs=opts.epochs, size=asked, seed=0))[0].image_size
    space = SearchSpace(backbone, layer_delta=opts.layer_delta)
    todo = entries(space, opts.samples, opts.seed)
    device = str(_device(base))
    check_settings(out, {"recipe": base.recipe, "backbone_id": architecture_id(backbone),
                         "data": str(base.data), "epochs": opts.epochs, "image_size": size,
                         "batch_size": base.batch_size, "seed": opts.seed, "layer_delta": opts.layer_delta,
                         "device": device, **(settings_extra or {})}, labels={"backbone": backbone.name})
    if base.torch_threads:
        torch.set_num_threads(base.torch_threads)
    done = {r["index"]: r for r in read_results(out)}
    for e in todo:
        if e.index in done and done[e.index].get("id") != e.id:
            raise SearchFileError(f"{out / 'results.jsonl'}: candidate {e.index} is {done[e.index].get('id')} "
                                  f"there but {e.id} now: the space or its sampling changed; use another --out")
    p0 = measure(backbone, num_classes, size)[0]
    backbone_file = save_config(backbone, run_dir(out, todo[0]) / "model.json", info={"search_index": 0})
    timer = StepTimer(dataclasses.replace(base, seed=opts.seed), backbone_file, size, num_classes,
                      warmup=opts.time_warmup, reps=opts.time_reps, per_rep=opts.time_per_rep)
    say(f"effnetv2 search: {len(todo)} candidates (backbone {backbone.name} + {opts.samples} samples of seed "
        f"{opts.seed}, space of {space.size():,}), proxy {opts.epochs:g} epochs at {size} px, batch "
        f"{base.batch_size}, on {device}; {len([e for e in todo if e.index in done])} already done in {out}")
    bar = tqdm(total=len(todo), initial=sum(e.index in done for e in todo), unit="cand", dynamic_ncols=True)
    _postfix(bar, list(done.values()), opts)
    try:
        for e in todo:
            if e.index in done:
                continue
            same = next((r for r in done.values() if r.get("id") == e.id), None)
            if same is not None:
                rec = {"index": e.index, "id": e.id, "status": "duplicate", "duplicate_of": same["index"],
                       "describe": describe(e.config), "arch": e.arch}
            else:
                rec = _train_and_time(e, base, out, opts, size, spe, timer, num_classes, p0, (NonFiniteLoss,))
            append_result(out, rec)
            done[e.index] = rec
            bar.update(1)
            _postfix(bar, list(done.values()), opts)
            report.write_all(out, sorted(done.values(), key=lambda r: r["index"]), opts.top_k, opts.w, opts.v, title=_title(opts, size, device))
    finally:
        bar.close()
    records = sorted(done.values(), key=lambda r: r["index"])
    say(report.format_table(records, opts.top_k, opts.w, opts.v))
    say(f"results: {out / 'results.jsonl'}\ntable:   {out / report.TABLE}\nchart:   {out / report.CHART}\n"
        f"best:    {out / report.BEST}  (train it: effnetv2 train demo --set model={out / report.BEST})")
    if opts.rank_check:
        rank_check(base, records, out, opts, size, spe, say)
    return records


def _train_and_time(e: Entry, base: TrainConfig, out: Path, opts: SearchOptions, size: int, spe: int,
                    timer: StepTimer, num_classes: int, p0: int, failures: tuple[type[BaseException], ...]) -> dict:
    folder = run_dir(out, e)
    model_file = save_config(e.config, folder / "model.json", info={"search_index": e.index, "id": e.id})
    cfg = proxy_config(base, model_file, folder, epochs=opts.epochs, size=size, seed=opts.seed, steps_per_epoch=spe)
    t0 = time.perf_counter()
    step_s, base_s = timer.time(None if e.index == 0 else model_file)
    params, flops = measure(e.config, num_classes, size)
    rec: dict[str, Any] = {"index": e.index, "id": e.id, "describe": describe(e.config), "arch": e.arch,
                           "step_s": step_s, "backbone_step_s": base_s, "s_norm": step_s / base_s,
                           "params": params, "flops": flops, "model": str(model_file),
                           "config": config_to_dict(e.config)}
    try:
        top1 = train_candidate(cfg)
    except (*failures, torch.OutOfMemoryError) as err:  # the candidate, not the search, failed
        return {**rec, "status": "failed", "error": f"{type(err).__name__}: {err}",
                "wall_s": time.perf_counter() - t0}
    r = reward_of(top1, rec["s_norm"], params, base_step_time=1.0, base_params=p0, w=opts.w, v=opts.v)
    return {**rec, "status": "ok", "top1": top1, "reward": r, "w": opts.w, "v": opts.v,
            "wall_s": time.perf_counter() - t0}


def _device(base: TrainConfig) -> torch.device:
    from effnetv2.recipes.engine.distributed import resolve_device

    return resolve_device(base.device)


def _title(opts: SearchOptions, size: int, device: str) -> str:
    return f"proxy {opts.epochs:g} epochs at {size} px on {device}, seed {opts.seed}"


def _postfix(bar: tqdm, records: list[dict], opts: SearchOptions) -> None:
    ranked = report.ranked(records, opts.w, opts.v)
    if ranked:
        r, best = ranked[0]
        bar.set_postfix_str(f"best reward {best:.4f} (c{r['index']:03d}, top-1 {100 * r['top1']:.2f}%)")


# -- bonus: does the proxy rank like a longer training? ---------------------------------------------
def rank_check(base: TrainConfig, records: list[dict], out: Path, opts: SearchOptions, size: int, spe: int,
               say: Callable[[str], None] = print) -> dict:
    """Retrain the top-K by reward and K random others for ``rank_factor`` x the proxy epochs; Kendall tau
    of proxy top-1 against the longer run's top-1 (lines in ``rank_check.jsonl``, resumable the same way)."""
    from scipy.stats import kendalltau

    ranked = [r for r, _ in report.ranked(records, opts.w, opts.v)]
    top = ranked[:opts.rank_check]
    rest = [r for r in ranked if r not in top]
    picked = top + random.Random(f"effnetv2-rank-check:{opts.seed}").sample(rest, min(opts.rank_check, len(rest)))
    epochs = opts.epochs * opts.rank_factor
    done = {r["index"]: r for r in read_results(out, RANK_CHECK) if r.get("epochs") == epochs}
    for r in tqdm(picked, desc=f"rank check ({epochs:g} epochs)", unit="cand", dynamic_ncols=True):
        if r["index"] in done:
            continue
        folder = out / "rank-check" / f"c{r['index']:03d}-{r['id']}-{epochs:g}ep"
        cfg = proxy_config(base, r["model"], folder, epochs=epochs, size=size, seed=opts.seed, steps_per_epoch=spe)
        t0 = time.perf_counter()
        rec = {"index": r["index"], "id": r["id"], "epochs": epochs, "proxy_top1": r["top1"],
               "top1": train_candidate(cfg), "wall_s": time.perf_counter() - t0}
        append_result(out, rec, RANK_CHECK)
        done[r["index"]] = rec
    rows = [done[r["index"]] for r in picked]
    tau, p = kendalltau([x["proxy_top1"] for x in rows], [x["top1"] for x in rows]) if len(rows) > 1 else (math.nan,) * 2
    summary = {"k": opts.rank_check, "epochs": epochs, "proxy_epochs": opts.epochs, "n": len(rows),
               "kendall_tau": float(tau), "p_value": float(p), "rows": rows}
    say(report.write_rank_check(out, summary))
    return summary
