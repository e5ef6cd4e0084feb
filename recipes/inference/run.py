"""A trained run, loaded for inference: the network its config describes, its EMA or raw weights, and the
class names that go with it. ``effnetv2 eval``, ``predict`` and ``export`` start here.

- The source is a checkpoint file or a run folder (its newest valid checkpoint, ``checkpoint.find_latest``).
  Checkpoints are data: ``checkpoint.load`` reads them with ``torch.load(weights_only=True)``.
- The config is the checkpoint's own ``config`` entry (the one that trained these weights), completed by
  the run folder's ``config.json`` for keys an older checkpoint lacks; the network is the trainer's
  :func:`~effnetv2.recipes.engine.trainer.build_model` of it (without ``init_from``: the weights come next).
- Class names live in the run folder as ``classes.json``: the trainer writes it at the start of a run
  (:func:`~effnetv2.recipes.engine.checkpoint.write_classes`), so prediction works after the shards are gone. An older run gets it from its
  shard set's manifest the first time the manifest is readable; when neither exists the names are
  ``class_0 ...`` and :attr:`ClassNames.note` says why.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from effnetv2.model import EfficientNetV2, load_weights
from effnetv2.recipes.engine import checkpoint
from effnetv2.recipes.engine.checkpoint import CLASSES_FILE, write_classes
from effnetv2.recipes.engine.config import TrainConfig
from effnetv2.recipes.engine.trainer import build_model

WEIGHTS = ("ema", "model")


class RunError(ValueError):
    """A run that cannot be loaded as asked; the message names the file and the problem, on one line."""


@dataclass(frozen=True)
class ClassNames:
    """The name of class i at position i, whether the labels are multi-label, and where they came from."""

    names: tuple[str, ...]
    multilabel: bool = False
    source: str = ""  # the file they were read from; "" for generic names
    note: str = ""  # why the names are generic, for the user

    @property
    def generic(self) -> bool:
        return not self.source


@dataclass
class LoadedRun:
    model: EfficientNetV2  # eval mode, on the device asked for
    cfg: TrainConfig  # the run's config (``model`` replaced when another was asked for)
    checkpoint: Path
    step: int
    weights: str  # "ema" | "model"
    classes: ClassNames

    @property
    def folder(self) -> Path:
        return self.checkpoint.parent

    @property
    def eval_size(self) -> int:
        """The size the trainer evaluated at: ``eval_size`` of the config, else the model's."""
        return self.cfg.eval_size or self.model.config.eval_size

    @property
    def source(self) -> str:
        return f"{self.checkpoint} ({self.weights} weights, step {self.step})"


def find_checkpoint(source: str | Path) -> tuple[Path, dict]:
    """The checkpoint ``source`` names (a file, or a run folder's newest valid one) and its contents."""
    path = Path(source)
    if path.is_dir():
        found = checkpoint.list_checkpoints(path)
        if not found:
            raise RunError(f"{path}: no checkpoint (ckpt-*.pt) in this folder; train into it first or name a "
                           "checkpoint file")
        latest = checkpoint.find_latest(path)
        if latest is None:
            raise RunError(f"{path}: none of its {len(found)} checkpoint(s) is readable (see above)")
        return latest
    if not path.exists():
        raise RunError(f"{path}: no such checkpoint or run folder")
    try:
        return path, checkpoint.load(path)
    except ValueError as e:
        cause = e.__cause__
        if cause is None:
            raise RunError(str(e)) from None
        first = str(cause).strip().split(". ")[0].splitlines()[0]  # torch's own messages run to a page
        raise RunError(f"{path}: not a checkpoint that loads as data ({type(cause).__name__}: {first})") from None


def config_from_record(record: dict) -> TrainConfig:
    """A :class:`TrainConfig` from a saved one (``config.json`` or a checkpoint's ``config``): JSON lists
    back to tuples; keys this version does not know are ignored, missing ones take their defaults."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in record.items() if k in names})


def run_config(path: Path, state: dict) -> TrainConfig:
    """The config of the run that wrote checkpoint ``path``: its own entry over ``config.json``."""
    record: dict = {}
    saved = path.parent / "config.json"
    try:
        loaded = json.loads(saved.read_text(encoding="utf-8"))
        record.update(loaded if isinstance(loaded, dict) else {})
    except (OSError, ValueError):
        pass  # the checkpoint's own config is the one that counts; config.json only fills gaps
    if not isinstance(state["config"], dict):
        raise RunError(f"{path}: its config entry is a {type(state['config']).__name__}, not a dict")
    record.update(state["config"])
    try:
        return config_from_record(record)
    except TypeError as e:
        raise RunError(f"{path}: unusable config ({e})") from None


def load_run(source: str | Path, *, weights: str = "ema", device: str | torch.device = "cpu",
             model: str | None = None, store_classes: bool = True) -> LoadedRun:
    """Load ``source`` (checkpoint or run folder) for inference.

    ``model`` asks for an architecture (a name or a model config file): weights of another one are refused
    naming both. ``store_classes`` lets this call write ``classes.json`` into an older run's folder (only
    one process of a multi-process job should).
    """
    if weights not in WEIGHTS:
        raise RunError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    path, state = find_checkpoint(source)
    cfg = run_config(path, state)
    saved_model = cfg.model
    cfg = dataclasses.replace(cfg, init_from="", model=model or cfg.model)
    state_dict = state[weights]
    head = state_dict.get("classifier.weight") if isinstance(state_dict, dict) else None
    num_classes = int(head.shape[0]) if isinstance(head, torch.Tensor) and head.dim() == 2 else cfg.num_classes
    if not num_classes:
        raise RunError(f"{path}: its {weights} weights have no classifier; not an effnetv2 classifier checkpoint")
    try:
        net = build_model(cfg, num_classes, torch.device(device))
    except (ValueError, OSError) as e:  # an unknown model name, a model config file that moved
        raise RunError(f"{path}: cannot build its model {cfg.model!r}: {e}") from None
    try:
        load_weights(net, state_dict)
    except ValueError as e:  # load_weights lists every key; the counts say enough here
        why = ", ".join(f"{n} {what}" for what, n in re.findall(r"(missing|unexpected|shape mismatch) \((\d+)\)",
                                                                  str(e))) or str(e)
        raise RunError(f"{path}: its {weights} weights are of model {saved_model!r} ({num_classes} classes) "
                       f"and do not fit {cfg.model!r} (tensors: {why})") from None
    classes = read_classes(path.parent, cfg.data, num_classes, store=store_classes)
    return LoadedRun(net.eval(), cfg, path, int(state["step"]), weights, classes)


# -- class names ---------------------------------------------------------------------------------------
def read_classes(folder: str | Path, data: str, num_classes: int, *, store: bool = True) -> ClassNames:
    """The class names of the run in ``folder``: its ``classes.json``, else the manifest of shard set ``data``
    (then stored as ``classes.json`` when ``store``), else generic names with a note saying why."""
    folder, why = Path(folder), []
    path = folder / CLASSES_FILE
    if path.is_file():
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            names = record["classes"]
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError("'classes' is not a list of strings")
        except (OSError, ValueError, KeyError, TypeError) as e:
            why.append(f"{path} is unusable ({e})")
        else:
            if len(names) == num_classes:
                return ClassNames(tuple(names), bool(record.get("multilabel")), str(path))
            why.append(f"{path} names {len(names)} classes, the model has {num_classes}")
    if data:
        from effnetv2.pipeline.format import read_shard_set

        try:
            shards = read_shard_set(data)
        except (OSError, ValueError) as e:
            why.append(f"the shard set is unreadable ({e})")
        else:
            if len(shards.classes) == num_classes:
                if store:
                    try:
                        write_classes(folder, shards)
                    except OSError:
                        pass  # a read-only run folder: the names are still right for this call
                return ClassNames(shards.classes, shards.multilabel, str(shards.root))
            why.append(f"{data} names {len(shards.classes)} classes, the model has {num_classes}")
    else:
        why.append("the run's config names no shard set")
    note = (f"no class names for the run in {folder}: {'; '.join(why)}; using class_0 .. class_{num_classes - 1}")
    return ClassNames(tuple(f"class_{i}" for i in range(num_classes)), False, "", note)
