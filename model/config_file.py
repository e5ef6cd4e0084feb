"""Model config files: a :class:`ModelConfig` as JSON, so a searched or scaled network is a model like any other.

``get_config`` is the one way to look a model up: a registered name (``efficientnetv2-s``) or the path
of a ``.json`` file written by :func:`save_config` (e.g. ``runs/search/best.json``). The file holds the
stage table row by row with named fields, so it can be read and edited by hand::

    {"format": "effnetv2-model-config/1", "name": "...", "train_size": 48, "eval_size": 48, "dropout": 0.1,
     "stages": [{"block": "fused", "repeats": 1, "kernel": 3, "stride": 1, "expand": 1,
                 "in_ch": 16, "out_ch": 16, "se": 0.0}, ...], ...}

An optional ``"info"`` object carries provenance (search id, reward, scaling coefficients); the builder
ignores it. Values are checked by ModelConfig/StageSpec themselves; this module adds the file name and the
field to their message.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from effnetv2.pipeline.format import atomic

from .config import CONFIGS, ModelConfig, StageSpec

FORMAT = "effnetv2-model-config/1"
_STAGE_FIELDS = tuple(f.name for f in fields(StageSpec))
_CONFIG_FIELDS = tuple(f.name for f in fields(ModelConfig))
_REQUIRED = ("name", "stages", "train_size", "eval_size", "dropout")
_FLOATS = ("dropout", "width", "depth", "se")  # JSON writes 1.0 as 1 when edited by hand: accept ints


class ConfigFileError(ValueError):
    """A model config file that cannot be used; the message names the file and the field."""


def config_to_dict(cfg: ModelConfig, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON-ready form of ``cfg`` (with ``info`` if given)."""
    d: dict[str, Any] = {"format": FORMAT}
    d.update({k: v for k, v in asdict(cfg).items() if k != "stages"})
    d["stages"] = [asdict(s) for s in cfg.stages]
    if info is not None:
        d["info"] = info
    return d


def config_from_dict(d: Any, source: str = "<dict>") -> ModelConfig:
    """Check and build a ModelConfig from its JSON form; errors say ``source: field: problem``."""
    if not isinstance(d, dict):
        raise ConfigFileError(f"{source}: expected a JSON object at the top level, got {type(d).__name__}")
    unknown = sorted(set(d) - {*_CONFIG_FIELDS, "format", "info"})
    if unknown:
        raise ConfigFileError(f"{source}: unknown field(s) {', '.join(map(repr, unknown))}; "
                              f"known: {', '.join(_CONFIG_FIELDS)}, format, info")
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise ConfigFileError(f"{source}: missing field(s) {', '.join(map(repr, missing))}")
    if d.get("format", FORMAT) != FORMAT:
        raise ConfigFileError(f"{source}: format: expected {FORMAT!r}, got {d['format']!r}")
    if "info" in d and not isinstance(d["info"], dict):
        raise ConfigFileError(f"{source}: info: expected a JSON object, got {type(d['info']).__name__}")
    rows = d["stages"]
    if not isinstance(rows, list) or not rows:
        raise ConfigFileError(f"{source}: stages: expected a non-empty list of stage objects")
    stages = []
    for i, row in enumerate(rows):
        where = f"{source}: stages[{i}]"
        if not isinstance(row, dict):
            raise ConfigFileError(f"{where}: expected a JSON object, got {type(row).__name__}")
        unknown = sorted(set(row) - set(_STAGE_FIELDS))
        missing = [k for k in _STAGE_FIELDS[:-1] if k not in row]  # se is optional (0.0)
        if unknown or missing:
            raise ConfigFileError(f"{where}: unknown field(s) {unknown}, missing field(s) {missing}; "
                                  f"a stage has {', '.join(_STAGE_FIELDS)}")
        try:
            stages.append(StageSpec(**_floats(row)))
        except ValueError as e:
            raise ConfigFileError(f"{where}: {e}") from None
    top = {k: v for k, v in d.items() if k in _CONFIG_FIELDS and k != "stages"}
    try:
        return ModelConfig(stages=tuple(stages), **_floats(top))
    except ValueError as e:
        raise ConfigFileError(f"{source}: {e}") from None


def _floats(d: dict[str, Any]) -> dict[str, Any]:
    return {k: float(v) if k in _FLOATS and type(v) is int else v for k, v in d.items()}


def save_config(cfg: ModelConfig, path: str | os.PathLike, info: dict[str, Any] | None = None) -> Path:
    """Write ``cfg`` as JSON atomically (temp name, fsync, rename): a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic.write_json(path, config_to_dict(cfg, info))


def load_config(path: str | os.PathLike) -> ModelConfig:
    """Read a model config file; any problem raises :class:`ConfigFileError` naming the file and field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigFileError(f"{path}: no such model config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigFileError(f"{path}: cannot read the model config file: {e}") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigFileError(f"{path}: not valid JSON: {e}") from None
    return config_from_dict(d, str(path))


def read_info(path: str | os.PathLike) -> dict[str, Any]:
    """The ``info`` object of a config file (empty if none); the file is checked like ``load_config``."""
    load_config(path)
    return json.loads(Path(path).read_text(encoding="utf-8")).get("info", {})


def get_config(model: str | os.PathLike | ModelConfig) -> ModelConfig:
    """A registered name, a config file path (``*.json`` or an existing file), or a ModelConfig as is."""
    if isinstance(model, ModelConfig):
        return model
    if isinstance(model, str) and model in CONFIGS:
        return CONFIGS[model]
    path = Path(model)
    if path.suffix == ".json" or path.is_file():
        return load_config(path)
    raise ValueError(f"unknown model {str(model)!r}; valid names: {', '.join(CONFIGS)}, "
                     "or the path of a model config file (.json)")
