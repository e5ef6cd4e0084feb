"""Checkpoints that survive ``kill -9``: written atomically, read back with ``weights_only=True``.

A checkpoint is one file ``ckpt-{step:09d}.pt`` in the run folder holding only tensors and primitive
containers (so ``torch.load(weights_only=True)`` reads it and a file from elsewhere cannot run code):
model, EMA, optimizer, step state (counter, loss scale), stage, data position, RNG states of every
rank, the per-stage reports so far and the config. It is written to a hidden temporary name, fsynced,
renamed, and the folder fsynced, so a crash leaves either the old set of files or the new one. The
newest ``keep_last`` are kept. :func:`find_latest` returns the newest file that loads and has every
field, saying which newer ones it skipped (a file truncated by a full disk, say).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
from torch import nn

from effnetv2.pipeline.format import atomic

FORMAT = "effnetv2-checkpoint-v1"
REQUIRED = ("format", "model", "ema", "optimizer", "train_step", "step", "stage", "config")
_NAME = re.compile(r"^ckpt-(\d{9})\.pt$")


def checkpoint_path(out: str | Path, step: int) -> Path:
    return Path(out) / f"ckpt-{step:09d}.pt"


def list_checkpoints(out: str | Path) -> list[Path]:
    """Checkpoint files in ``out``, newest (highest step) first."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def save(out: str | Path, state: dict, keep_last: int = 3) -> Path:
    """Write ``state`` (with ``state["step"]``) atomically as ``ckpt-{step}.pt``; prune old ones."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(out, int(state["step"]))
    with atomic.atomic_open(final, "wb") as f:
        torch.save({"format": FORMAT, **state}, f)
    for old in list_checkpoints(out)[max(keep_last, 1):]:
        old.unlink(missing_ok=True)
    return final


def load(path: str | Path) -> dict:
    """Read and check one checkpoint; a ValueError names the file and what is wrong with it."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, bad pickle, ...: all mean "unusable"
        first = str(e).strip().split(". ")[0].splitlines()[0] if str(e).strip() else ""  # torch's run to a page
        raise ValueError(f"{path}: unreadable checkpoint ({type(e).__name__}: {first})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not an effnetv2 checkpoint (format {FORMAT} expected)")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return state


def load_run_state(path: str | Path, state: dict, model: nn.Module, ema, optimizer, step_fn) -> None:
    """Restore a run's model, EMA, optimizer and step from a loaded checkpoint; a checkpoint of another
    architecture or class count is one clear error naming the file, not a raw ``load_state_dict`` one."""
    saved = state["config"]
    try:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        lines = str(e).strip().splitlines()
        why = lines[1].strip() if len(lines) > 1 else lines[0][:200]
        classes = saved.get("num_classes") or "the shard set's"
        raise ValueError(f"{path}: this checkpoint is of model {saved.get('model')!r} with {classes} classes "
                         f"and does not fit the model being resumed ({why}); resume with the same model and "
                         f"data, or start over with --fresh or another --out") from None
    step_fn.load_state_dict(state["train_step"])


def write_json(path: str | Path, obj) -> Path:
    """A run record (``config.json``), atomically."""
    return atomic.write_json(path, obj)


CLASSES_FILE = "classes.json"
CLASSES_FORMAT = "effnetv2-classes/1"


def write_classes(out: str | Path, shards) -> Path:
    """``out/classes.json``: the class names (and multi-label flag) of shard set ``shards`` (a ShardSet),
    so a run can name its predictions after its data has moved. Atomic; the trainer calls it at start."""
    return atomic.write_json(Path(out) / CLASSES_FILE, {
        "format": CLASSES_FORMAT, "data": str(shards.root), "num_classes": len(shards.classes),
        "multilabel": bool(shards.multilabel), "classes": [str(c) for c in shards.classes]})


def find_latest(out: str | Path) -> tuple[Path, dict] | None:
    """The newest valid checkpoint in ``out`` and its contents, or None; invalid ones are reported."""
    for path in list_checkpoints(out):
        try:
            return path, load(path)
        except ValueError as e:
            print(f"effnetv2: skipping {e}", file=sys.stderr)
    return None


def load_init_weights(model: nn.Module, source: str | Path, *, new_head: bool) -> str:
    """Start ``model`` from ``source``: one of our checkpoints or run folders (its EMA weights, as the
    official fine-tune does), else any weights file ``effnetv2.model.load_weights`` reads.
    Returns a description of what was loaded."""
    from effnetv2.model import load_weights

    path = Path(source)
    if path.is_dir():
        latest = find_latest(path)
        if latest is None:
            raise FileNotFoundError(f"{path}: no valid checkpoint to initialise from")
        path, state = latest
        weights = state["ema"]
    elif path.name.startswith("ckpt-") and path.suffix == ".pt":
        weights = load(path)["ema"]
    else:
        load_weights(model, path, new_head=new_head)
        return str(path)
    load_weights(model, weights, new_head=new_head)
    return f"{path} (EMA weights)"


def rng_state() -> dict:
    """This process's torch RNG states (CPU and, if present, every CUDA device)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
