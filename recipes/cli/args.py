"""Argument types the commands share: a bad value is one argparse error naming the option (exit 2)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def _number(text: str, kind: type, ok: Callable[[float], bool], rule: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {'a whole number' if kind is int else 'a number'}") from None
    if not ok(value):  # `not >` also rejects nan
        raise argparse.ArgumentTypeError(f"{text}: must be {rule}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v > 0, "positive")


def non_negative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, ">= 0")


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: v > 0, "positive")
