"""The search's record: ``results.jsonl`` (one line per finished candidate) and ``search.json`` (its settings).

A line is appended, flushed and fsynced the moment a candidate finishes, so after a ``kill -9`` the file
holds every finished candidate and a rerun skips them. The only damage a kill can do is a torn last line
(the process died inside ``write``); :func:`read_results` drops it, rewriting the file atomically, and
the candidate it belonged to is trained again. A bad line anywhere else is an error naming the line:
the file was edited, not interrupted.

``search.json`` pins what makes lines comparable (backbone, data, proxy length and size, seed, batch);
a rerun that asks for something else is refused instead of mixing two searches in one table. The
number of samples, the reward exponents and the table size may change between runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from effnetv2.pipeline.format import atomic

RESULTS = "results.jsonl"
SETTINGS = "search.json"


class SearchFileError(ValueError):
    """A results or settings file that cannot be continued; the message names the file and the problem."""


def read_results(out: Path, name: str = RESULTS) -> list[dict[str, Any]]:
    """The lines of ``out/name`` (empty if none), after dropping a torn last line."""
    path = out / name
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    body, newline, torn = text.rpartition("\n")  # ``torn``: what follows the last newline (a cut write)
    records: list[dict[str, Any]] = []
    for n, line in enumerate(body.split("\n") if newline else [], 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise SearchFileError(f"{path}: line {n} is not valid JSON ({e}); remove that line to continue") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("index"), int):
            raise SearchFileError(f"{path}: line {n} is not a candidate record (no integer 'index')")
        records.append(rec)
    if torn:
        atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return records


def append_result(out: Path, record: dict[str, Any], name: str = RESULTS) -> None:
    """Append one line to ``out/name`` and make it durable before returning (fsync of the file)."""
    with open(out / name, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def check_settings(out: Path, settings: dict[str, Any], labels: dict[str, Any] | None = None) -> None:
    """Write ``search.json`` on the first run; on a rerun, refuse settings that differ from it.

    ``labels`` (e.g. the backbone's name) are recorded but not compared: a backbone renamed with the
    same architecture id is the same search."""
    path = out / SETTINGS
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        atomic.write_json(path, {**settings, **(labels or {})})
        return
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise SearchFileError(f"{path}: cannot read the search settings: {e}") from None
    changed = [f"{k}: {before.get(k)!r} -> {v!r}" for k, v in settings.items() if before.get(k) != v]
    if changed:
        raise SearchFileError(f"{path}: this folder holds a search with other settings ({'; '.join(changed)}); "
                              f"rerun with the same settings to continue it, or pass another --out")
