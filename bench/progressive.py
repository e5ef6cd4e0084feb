"""``effnetv2 bench progressive``: the paper's Tables 12 and 13 at this machine's scale, side by side.

One recipe (default: the demo: its data, model and epochs) trains in several *arms* that differ only in
what each stage feeds the network; schedule, optimiser, epochs and seed are the recipe's:

=====================  ==================================  ==========================================
arm                    image size per stage                regularisation per stage
=====================  ==================================  ==========================================
fixed                  the final size                      the final level (the usual baseline)
progressive            grows (the recipe's plan)           the final level (fast.ai / FFCV resizing)
progressive-adaptive   grows                               grows with the size: the recipe itself
random                 drawn per stage (random-resize)     the final level
random-adaptive        drawn per stage (random-resize)     the drawn size's level
=====================  ==================================  ==========================================

Every arm has the recipe's M stages of equal length (the fixed arm is M stages at one size; the random
arms draw a size every E/M epochs), so all are evaluated (EMA weights, eval size) at the same steps and
give accuracy-against-time points at the same step counts. Each (arm, seed) is an ordinary trainer run
(:func:`~effnetv2.recipes.engine.trainer.train`, ``resume=True``) in ``OUT/progressive/{arm}-s{seed}``:
a finished one (``result.json``) is reused, an interrupted one resumes from its checkpoint, so rerunning
the command continues the study. Times are the trainer's own per-stage records summed over stages
(``train_s``: the steps; wall = stage switches + steps + evaluation), never the command's wall time, so
a killed and resumed run counts each stage once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import statistics
import time
from pathlib import Path

from effnetv2.pipeline.format import atomic
from effnetv2.recipes.engine.config import TrainConfig, runtime_keys

from .report import Report, Row, machine
from .timing import Timing

ARMS: dict[str, str] = {
    "fixed": "the final size and regularisation in every stage (the usual baseline)",
    "progressive": "growing size, regularisation held at the final level (progressive resizing)",
    "progressive-adaptive": "growing size with regularisation growing along (Algorithm 1): the recipe's plan",
    "random": "a size drawn per stage (random-resize preset), regularisation held at the final level",
    "random-adaptive": "a size drawn per stage with that size's regularisation (random-resize preset)",
}
# Tan & Le 2021, Table 12: progressive learning with adaptive regularisation vs the same network trained
# at the final size: +0.2 to +0.5 points top-1 in 29-65% less training time. Table 13: adaptive
# regularisation over the same resizing without it, +0.8 (progressive) and +0.7 (random resize).
PAPER = {"table12": {"delta_top1_pp": [0.2, 0.5], "time_saving_pct": [29, 65]},
         "table13_progressive": {"delta_top1_pp": 0.8}, "table13_random": {"delta_top1_pp": 0.7}}
RESULT = "result.json"  # written into a run folder when the run is finished: the study reuses it
FAILED = "failed.txt"  # a run that stopped on a non-finite loss says why here (the study reports it, goes on)
ARM_CONFIG = "arm.json"  # the config the torchrun ranks of an arm read
SMALLEST = 0.7  # a recipe trained at one size (the demo) is studied growing from 70% of that size


def study_base(cfg: TrainConfig) -> TrainConfig:
    """The recipe as the study compares it: a recipe that holds one image size (the demo trains at its
    evaluation size) gets a growing range up to that size, else every arm would be the fixed one."""
    if cfg.image_size is None or cfg.image_size[0] != cfg.image_size[1]:  # None: the model's growing range
        return cfg
    hi = cfg.image_size[1]
    grown = max(8, cfg.round_to * round(SMALLEST * hi / cfg.round_to))
    return dataclasses.replace(cfg, image_size=(grown, hi))


# -- the arms ---------------------------------------------------------------------------------------
def arm_config(cfg: TrainConfig, arm: str) -> TrainConfig:
    """``cfg`` as arm ``arm`` trains it: only the plan fields change (preset, ranges, ``resize_every``).

    A held level is the last stage of the levels the arm's sizes come from: the recipe's own plan, or
    for the random arms the ``paper``-rule levels the random-resize preset draws from.
    """
    from effnetv2.recipes.engine.trainer import build_plan

    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; arms: {', '.join(ARMS)}")
    random = arm.startswith("random")
    levels = "paper" if random or cfg.plan == "random-resize" else cfg.plan
    if random:
        base = dataclasses.replace(cfg, plan="random-resize", resize_every=cfg.epochs / cfg.num_stages)
    else:
        base = dataclasses.replace(cfg, plan=levels)
    if arm.endswith("adaptive"):
        return base
    final = build_plan(dataclasses.replace(cfg, plan=levels))[-1]
    held = dict(randaug=(final.randaug_magnitude,) * 2, mixup=(final.mixup_alpha,) * 2,
                cutmix=(final.cutmix_alpha,) * 2, dropout=(final.dropout,) * 2)
    if arm == "fixed":
        held["image_size"] = (final.image_size,) * 2
    return dataclasses.replace(base, **held)


def study_configs(base: TrainConfig, arms: list[str], seeds: list[int], root: Path) -> dict[tuple[str, int], TrainConfig]:
    """The config of every (arm, seed) run, each in its own folder under ``root``; checks that every arm
    has the recipe's stage count (the same evaluation steps)."""
    from effnetv2.recipes.engine.trainer import build_plan

    configs = {}
    for seed in seeds:
        for arm in arms:
            cfg = dataclasses.replace(arm_config(dataclasses.replace(base, seed=seed), arm),
                                      out=str(root / f"{arm}-s{seed}"), resume=True)
            stages = build_plan(cfg)
            if len(stages) != base.num_stages:
                raise ValueError(f"arm {arm} plans {len(stages)} stages, the recipe {base.num_stages}")
            configs[arm, seed] = cfg
    return configs


# -- one run ----------------------------------------------------------------------------------------
def _config_changes(cfg: TrainConfig, out: Path) -> list[str]:
    """What differs (outside runtime keys) between ``cfg`` and the run already in ``out``."""
    path = out / RESULT if (out / RESULT).is_file() else out / "config.json"
    if not path.is_file():
        return []
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        old = old["config"] if path.name == RESULT else old
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: unreadable run record ({e}); delete {out} to retrain that run") from None
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))
    skip = runtime_keys()
    return [f"{k}: {old[k]!r} -> {v!r}" for k, v in now.items() if k not in skip and k in old and old[k] != v]


def _eval_seconds(out: Path, stages: list[dict]) -> list[float | None]:
    """Per stage, the seconds from its last step to its record (the EMA evaluation), from metrics.jsonl."""
    path = out / "metrics.jsonl"
    records = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()] \
        if path.is_file() else []
    step_end = {r["step"]: r["time"] for r in records if r.get("event") == "train"}
    stage_end = {r["stage"]: r["time"] for r in records if r.get("event") == "stage"}
    return [round(stage_end[s["stage"]] - step_end[s["end_step"]], 3)
            if s["stage"] in stage_end and s["end_step"] in step_end else None for s in stages]


def train_arm(cfg: TrainConfig) -> tuple[dict, str]:
    """Train, resume or reuse the run of ``cfg`` (in ``cfg.out``); returns its record and what happened.

    The trainer's printout goes to ``train.log`` in the run folder (its progress bar stays on stderr).
    A recipe that trains as several CPU processes (``cpu_processes``, as ``effnetv2 train`` launches
    the demo) trains each arm the same way, through torchrun, so the study times what users run.
    """
    from effnetv2.recipes.cli.train import cpu_ranks
    from effnetv2.recipes.engine import checkpoint

    out = Path(cfg.out)
    changed = _config_changes(cfg, out)
    if changed:
        raise ValueError(f"{out} holds a run of another config ({'; '.join(changed)}); pass another --out "
                         f"or delete that folder")
    if (out / RESULT).is_file():
        return json.loads((out / RESULT).read_text(encoding="utf-8")), "reused"
    how = "resumed" if checkpoint.list_checkpoints(out) else "trained"
    out.mkdir(parents=True, exist_ok=True)
    (out / FAILED).unlink(missing_ok=True)
    if (ranks := cpu_ranks(cfg)) > 1:
        _train_ranks(cfg, ranks)
    else:
        _train_here(cfg)
    if (out / FAILED).is_file():
        from effnetv2.recipes.engine.trainer import NonFiniteLoss

        raise NonFiniteLoss((out / FAILED).read_text(encoding="utf-8").strip())
    return json.loads((out / RESULT).read_text(encoding="utf-8")), how



def _train_here(cfg: TrainConfig) -> None:
    """Train ``cfg`` in this process (every rank of a torchrun does this) and, on rank 0, write its record."""
    from effnetv2.recipes.engine.trainer import NonFiniteLoss, train

    out, is_main = Path(cfg.out), os.environ.get("RANK", "0") == "0"
    with open(out / "train.log", "a", encoding="utf-8") as log, contextlib.redirect_stdout(log):
        try:
            result = train(cfg)
        except NonFiniteLoss as e:
            if is_main:
                atomic.write_text(out / FAILED, f"{e}\n")
            return
    if not result.finished:
        raise RuntimeError(f"{out}: the run stopped at step {result.step} of {result.total_steps} (stop_at?)")
    if is_main:
        record = dict(config=dataclasses.asdict(cfg), stages=result.stages, eval_s=_eval_seconds(out, result.stages),
                      checkpoint=str(result.checkpoint), backend=result.backend)
        atomic.write_json(out / RESULT, record)


def _train_ranks(cfg: TrainConfig, ranks: int) -> None:
    """``cfg`` trained by ``ranks`` torchrun processes running :func:`_train_here` (``python -m`` this module)."""
    from effnetv2.recipes.engine.distributed import run_local_ranks

    out = Path(cfg.out)
    atomic.write_json(out / ARM_CONFIG, dataclasses.asdict(cfg))
    with open(out / "torchrun.log", "a", encoding="utf-8") as log:
        code = run_local_ranks(ranks, "effnetv2.bench.progressive", [str(out / ARM_CONFIG)], stdout=log)
    if code != 0 or not ((out / RESULT).is_file() or (out / FAILED).is_file()):
        raise RuntimeError(f"{out}: the {ranks}-process run failed (exit {code}); see {out / 'torchrun.log'} "
                           f"and {out / 'train.log'}")



def run_summary(record: dict) -> dict:
    """One run's curve (cumulative seconds and top-1 % at each stage end) and totals.

    A stage whose steps were split by a mid-stage resume (``steps_trained`` < its steps) has its
    ``train_s`` scaled to all its steps: the time before the kill died with the process.
    """
    batch = record["config"]["batch_size"]
    curve, train_s, wall_s, setup_s, eval_s, images = [], 0.0, 0.0, 0.0, 0.0, 0
    for s, ev in zip(record["stages"], record["eval_s"]):
        steps = s["end_step"] - s["first_step"]
        images += steps * s.get("batch_size", batch)  # a planned batch per stage (batch_plan=memory)
        t = s["train_s"] * steps / s["steps_trained"] if 0 < s["steps_trained"] < steps else s["train_s"]
        train_s += t
        setup_s += s["setup_s"]
        eval_s += ev or 0.0
        wall_s += s["setup_s"] + t + (ev or 0.0)
        curve.append(dict(step=s["end_step"], image_size=s["image_size"], randaug=s["randaug"], mixup=s["mixup"],
                          dropout=s["dropout"], train_s=train_s, wall_s=wall_s, top1_pct=100 * s["top1"]))
    return dict(top1_pct=curve[-1]["top1_pct"], train_s=train_s, wall_s=wall_s, setup_s=setup_s, eval_s=eval_s,
                imgs_per_s=images / max(train_s, 1e-9), steps=record["stages"][-1]["end_step"], curve=curve)


# -- the study --------------------------------------------------------------------------------------
def time_to_reach(points: list[tuple[float, float]], target: float) -> float | None:
    """The first time the (time, accuracy) polyline reaches ``target``, linear between evaluations;
    None when it never does. Reached at the first evaluation: that evaluation's time (none is earlier)."""
    prev = None
    for t, acc in points:
        if acc >= target:
            if prev is None:
                return t
            t0, a0 = prev
            return t0 + (t - t0) * (target - a0) / (acc - a0)
        prev = (t, acc)
    return None


def _less(pct: float) -> str:
    return f"{pct:.0f}% less" if pct >= 0 else f"{-pct:.0f}% more"


def _secs(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def _spread(values: list[float]) -> dict:
    return dict(mean=statistics.fmean(values), min=min(values), max=max(values), values=values)


def summarise(runs: dict[tuple[str, int], dict], arms: list[str]) -> dict:
    """Per arm: top-1, times, imgs/s over seeds, the mean curve and the time to the fixed arm's final top-1."""
    out = {}
    for arm in arms:
        seeds = {seed: run_summary(rec) for (a, seed), rec in sorted(runs.items()) if a == arm}
        if not seeds:
            continue
        curves = [s["curve"] for s in seeds.values()]
        mean_curve = [dict(step=pts[0]["step"], **{k: statistics.fmean(p[k] for p in pts)
                                                   for k in ("train_s", "wall_s", "top1_pct")})
                      for pts in zip(*curves)]
        out[arm] = dict(description=ARMS[arm], **{k: _spread([s[k] for s in seeds.values()])
                                                  for k in ("top1_pct", "train_s", "wall_s", "imgs_per_s")},
                        curve=mean_curve, seeds={str(k): v for k, v in seeds.items()})
    fixed = out.get("fixed")
    for a in out.values():
        if fixed is None:
            a["to_fixed_top1"] = a["fixed_to_this_top1"] = None
            continue
        target, total = fixed["top1_pct"]["mean"], fixed["train_s"]["mean"]
        t = time_to_reach([(p["train_s"], p["top1_pct"]) for p in a["curve"]], target)
        per_seed = {}
        for seed, s in a["seeds"].items():
            f = fixed["seeds"].get(seed)
            per_seed[seed] = None if f is None else time_to_reach(
                [(p["train_s"], p["top1_pct"]) for p in s["curve"]], f["top1_pct"])
        a["to_fixed_top1"] = dict(target_pct=target, train_s=t, reached=t is not None,
                                  saving_pct=None if t is None else 100 * (1 - t / total), per_seed_train_s=per_seed)
        # the other way round, informative when the arm ends below the fixed arm: the fixed arm's time to this
        # arm's final top-1 (None: never) against this arm's own first time there
        final = a["top1_pct"]["mean"]
        t = time_to_reach([(p["train_s"], p["top1_pct"]) for p in fixed["curve"]], final)
        own = time_to_reach([(p["train_s"], p["top1_pct"]) for p in a["curve"]], final)
        a["fixed_to_this_top1"] = dict(target_pct=final, train_s=t, this_arm_train_s=own,
                                       saving_pct=None if t is None else 100 * (1 - own / t))
    return out


def compare_with_paper(arms: dict) -> dict:
    """The measured counterparts of Table 12 (progressive-adaptive vs fixed) and Table 13 (adaptive vs
    the same resizing without it), next to the paper's numbers; ``measured`` is None without both arms."""

    def delta(a: str, b: str) -> dict | None:
        if a not in arms or b not in arms:
            return None
        paired = [arms[a]["seeds"][s]["top1_pct"] - arms[b]["seeds"][s]["top1_pct"]
                  for s in arms[a]["seeds"] if s in arms[b]["seeds"]]
        return dict(delta_top1_pp=arms[a]["top1_pct"]["mean"] - arms[b]["top1_pct"]["mean"], per_seed_pp=paired)

    t12 = delta("progressive-adaptive", "fixed")
    if t12:
        a, f = arms["progressive-adaptive"], arms["fixed"]
        t12.update(time_saving_pct=100 * (1 - a["train_s"]["mean"] / f["train_s"]["mean"]),
                   wall_saving_pct=100 * (1 - a["wall_s"]["mean"] / f["wall_s"]["mean"]),
                   to_fixed_top1_saving_pct=a["to_fixed_top1"]["saving_pct"],
                   fixed_to_this_top1_saving_pct=a["fixed_to_this_top1"]["saving_pct"])
    return {
        "table12": dict(compares=["progressive-adaptive", "fixed"], paper=PAPER["table12"], measured=t12),
        "table13_progressive": dict(compares=["progressive-adaptive", "progressive"],
                                    paper=PAPER["table13_progressive"],
                                    measured=delta("progressive-adaptive", "progressive")),
        "table13_random": dict(compares=["random-adaptive", "random"], paper=PAPER["table13_random"],
                               measured=delta("random-adaptive", "random")),
    }


def paper_notes(paper: dict) -> list[str]:
    """The comparison with the paper as sentences (the table's notes)."""
    def pp(m: dict) -> str:
        seeds = ", ".join(f"{d:+.2f}" for d in m["per_seed_pp"])
        return f"{m['delta_top1_pp']:+.2f} pp (per seed {seeds})"

    notes = []
    t12 = paper["table12"]["measured"]
    if t12:
        reach = t12["to_fixed_top1_saving_pct"]
        reach = "never reaches fixed's final top-1" if reach is None else \
            f"reaches fixed's final top-1 in {_less(reach)} training time"
        back = t12["fixed_to_this_top1_saving_pct"]
        reach += "; fixed never reaches its final top-1" if back is None else \
            f"; reaches its own final top-1 in {_less(back)} time than fixed needs for it"
        notes.append(f"Table 12 (progressive-adaptive vs fixed): paper +0.2 to +0.5 pp top-1 in 29-65% less training "
                     f"time; measured {pp(t12)} in {_less(t12['time_saving_pct'])} training time "
                     f"({_less(t12['wall_saving_pct'])} wall); {reach}")
    for key, what in (("table13_progressive", "progressive"), ("table13_random", "random")):
        m, p = paper[key]["measured"], paper[key]["paper"]["delta_top1_pp"]
        if m:
            notes.append(f"Table 13 ({what} resize, adaptive vs not): paper +{p} pp; measured {pp(m)}")
    return notes


def format_table(arms: dict) -> str:
    """The study as a plain-text table, one line per arm (means over seeds, top-1 min-max)."""
    fixed = arms.get("fixed")
    reach_head = f"to fixed's {fixed['top1_pct']['mean']:.2f}%" if fixed else "to fixed's top-1"
    head = ("arm", "seeds", "top-1 %", "min-max", "train s", "wall s", "imgs/s", reach_head, "fixed to this top-1")
    lines = []
    for arm, a in arms.items():
        r, back = a["to_fixed_top1"], a["fixed_to_this_top1"]
        reach = "n/a (no fixed arm)" if r is None else "not reached" if not r["reached"] else \
            f"{r['train_s']:,.1f} s ({_less(r['saving_pct'])})"
        back = "n/a" if back is None else "never" if back["train_s"] is None else \
            f"{back['train_s']:,.1f} s (this arm {_less(back['saving_pct'])})"
        t = a["top1_pct"]
        lines.append((arm, str(len(a["seeds"])), f"{t['mean']:.2f}", f"{t['min']:.2f}-{t['max']:.2f}",
                      f"{a['train_s']['mean']:,.1f}", f"{a['wall_s']['mean']:,.1f}", f"{a['imgs_per_s']['mean']:,.0f}",
                      reach, back))
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*x) for x in lines])


def plot(arms: dict, path: Path, title: str, facts: dict) -> Path:
    """Test top-1 against cumulative training time: per arm the seed-mean (thick) and each seed (thin)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (arm, a) in enumerate(arms.items()):
        for s in a["seeds"].values():
            ax.plot([p["train_s"] for p in s["curve"]], [p["top1_pct"] for p in s["curve"]], color=f"C{i}", lw=0.8,
                    alpha=0.35)
        ax.plot([p["train_s"] for p in a["curve"]], [p["top1_pct"] for p in a["curve"]], "o-", color=f"C{i}", lw=2,
                label=f"{arm}: {a['top1_pct']['mean']:.2f}% in {_secs(a['train_s']['mean'])} s")
    if "fixed" in arms:
        ax.axhline(arms["fixed"]["top1_pct"]["mean"], color="k", ls=":", lw=0.8, label="fixed arm's final top-1")
    ax.set_xlabel("training time (s, cumulative over stages; excludes stage switches and evaluation)")
    ax.set_ylabel("test top-1 (%, EMA weights)")
    ax.set_title(f"{title}\n{facts.get('cpu', '')} x{facts.get('cpu_count', '?')}, GPU {facts.get('gpu') or 'none'}",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic.write_bytes(path, buf.getvalue())


# -- command line -----------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default="demo", help="the recipe every arm trains (default demo)")
    p.add_argument("--epochs", type=float, default=None, help="total epochs of every arm (default: the recipe's)")
    p.add_argument("--seeds", type=int, default=2, help="runs per arm, seeds 0..N-1 (default 2)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma list (default all: {','.join(ARMS)})")
    p.add_argument("--data", default=None, help="shard set (default: the recipe's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe config field in every arm (repeatable); seed, out and resume "
                        "are the study's")


def base_config(args: argparse.Namespace):
    """The recipe module and its config with --data, --set and --epochs, as ``effnetv2 train`` resolves it."""
    from effnetv2.recipes.cli.train import load_recipe, resolve_config

    recipe = load_recipe(args.recipe)
    given = argparse.Namespace(recipe=args.recipe, overrides=list(args.overrides), data=args.data, out=None,
                               resume=False, fresh=False)
    cfg = resolve_config(given, recipe)
    if args.epochs is not None:
        cfg = dataclasses.replace(cfg, epochs=args.epochs)
    return recipe, study_base(cfg)


def run(args: argparse.Namespace) -> Report:
    from tqdm import tqdm

    from effnetv2.pipeline.format import read_shard_set
    from effnetv2.recipes.engine.config import validate
    from effnetv2.recipes.engine.trainer import NonFiniteLoss

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms or args.seeds < 1:
        raise SystemExit(f"effnetv2 bench progressive: --arms takes a comma list of {', '.join(ARMS)} "
                         f"(got {args.arms!r}) and --seeds >= 1 (got {args.seeds})")
    arms = [a for a in ARMS if a in arms]
    seeds = list(range(args.seeds))
    root = Path(args.out) / "progressive"
    try:
        recipe, base = base_config(args)
        if hasattr(recipe, "prepare"):
            base = recipe.prepare(base, args)
        validate(base)
        if base.stop_at:
            raise ValueError("stop_at stops every run early; the study needs whole runs")
        splits = read_shard_set(base.data).splits
        if not base.eval_split or base.eval_split not in splits:
            raise ValueError(f"{base.data} has no split {base.eval_split!r} to evaluate on (it has {sorted(splits)}); "
                             f"pass --set eval_split=NAME")
        configs = study_configs(base, arms, seeds, root)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"effnetv2 bench progressive: {e}") from None

    records, failed = {}, {}
    todo = [(arm, seed) for seed in seeds for arm in arms]  # seed-major: drift hits every arm alike
    bar = tqdm(total=len(todo), unit="run", desc="study", dynamic_ncols=True, disable=not base.progress)
    try:
        for arm, seed in todo:
            bar.set_description(f"study: {arm} seed {seed}")
            try:
                record, how = train_arm(configs[arm, seed])
            except NonFiniteLoss as e:
                failed[arm, seed] = str(e)
                tqdm.write(f"{arm} seed {seed}: failed: {e}")
            except ValueError as e:
                raise SystemExit(f"effnetv2 bench progressive: {e}") from None
            else:
                records[arm, seed] = record
                s = run_summary(record)
                tqdm.write(f"{arm} seed {seed} ({how}): top-1 {s['top1_pct']:.2f}%, train {s['train_s']:,.1f} s, "
                           f"wall {s['wall_s']:,.1f} s, {s['imgs_per_s']:,.0f} img/s  [{configs[arm, seed].out}]")
            bar.update(1)
    finally:
        bar.close()

    summary = summarise(records, arms)
    paper = compare_with_paper(summary)
    facts = machine()
    sizes = [s.image_size for s in _plan(base)]
    title = (f"progressive learning study: recipe {base.recipe}, {base.model}, {base.epochs:g} epochs in "
             f"{base.num_stages} stages, {sizes[0]}-{sizes[-1]} px, {len(seeds)} seed(s)")
    chart = plot(summary, Path(args.out) / f"progressive-accuracy-{time.strftime('%Y%m%d-%H%M%S')}.png", title, facts)
    report = Report("progressive", title, machine=facts)
    report.config = dict(recipe=args.recipe, model=base.model, data=base.data, epochs=base.epochs,
                         num_stages=base.num_stages, batch_size=base.batch_size, seeds=seeds, arms=arms,
                         overrides=list(args.overrides), runs=str(root),
                         plans={f"{a}-s{s}": [dataclasses.asdict(x) for x in _plan(c)]
                                for (a, s), c in configs.items()})
    for arm in arms:
        a = summary.get(arm)
        errors = [f"seed {s}: {msg}" for (x, s), msg in failed.items() if x == arm]
        if a is None:
            report.add(Row(arm, f"{base.epochs:g} epochs", None, "error", "; ".join(errors) or "no run"))
            continue
        t = a["top1_pct"]
        report.add(Row(arm, f"{base.epochs:g} epochs",
                       Timing(tuple(a["imgs_per_s"]["values"]), statistics.fmean(
                           s["setup_s"] for s in a["seeds"].values())),
                       note=f"top-1 {t['mean']:.2f}% ({t['min']:.2f}-{t['max']:.2f}), train {_secs(a['train_s']['mean'])} s"
                            + (f"; failed {'; '.join(errors)}" if errors else ""),
                       params={k: v for k, v in a.items() if k not in ("seeds", "curve")}))
    report.notes = paper_notes(paper) + [
        "imgs/s and train s count the training steps only (the trainer's per-stage train_s, summed); wall s adds "
        "stage switches and the EMA evaluation after each stage"]
    report.extra = dict(arms=summary, paper=paper, failed={f"{a}-s{s}": m for (a, s), m in failed.items()},
                        accuracy_chart=str(chart))
    print(f"\n{title}\n{format_table(summary)}\naccuracy vs time: {chart}\n")
    return report


def _plan(cfg: TrainConfig):
    from effnetv2.recipes.engine.trainer import build_plan

    return build_plan(cfg)


if __name__ == "__main__":  # one torchrun rank of an arm: python -m effnetv2.bench.progressive OUT/arm.json
    import sys

    from effnetv2.recipes.engine import distributed
    from effnetv2.recipes.inference.run import config_from_record

    _train_here(config_from_record(json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))))
    distributed.shutdown()
