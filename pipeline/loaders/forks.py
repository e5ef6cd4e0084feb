"""Loaders that a forked child inherits must never be cleaned up there.

A loader dropped without ``close()`` is garbage until the parent's next full collection; a child forked
in between (a DataLoader worker, the OpenCV backend's own) holds a copy of it, and if the child collects
it first, the finalisers run there: a DALI pipeline runs or shuts down with threads that the child does
not have (it hangs), a DataLoader iterator joins workers that are not the child's (``AssertionError: can
only test a child process``), and its shutdown even tells the parent's workers to stop.

So every object that owns workers or a pipeline calls :func:`register` when it is made, and cleans up
only where :func:`owned` says it may. In a forked child the objects alive at the fork are also pinned
(kept referenced, even through interpreter exit), so that the finalisers of third-party objects they
hold (torch's DataLoader iterator, DALI's ``Pipeline``) never run there either, and DALI's exit hook
forgets the parent's pipelines; the child's copy is memory the fork shares anyway.
"""

from __future__ import annotations

import ctypes
import os
import sys
import weakref

_live: weakref.WeakSet = weakref.WeakSet()
_inherited: list[object] = []  # in a forked child: the parent's loaders, never finalised here
ctypes.pythonapi.Py_IncRef(ctypes.py_object(_inherited))  # never freed, not even when the interpreter exits


def register(obj: object) -> int:
    """Note ``obj`` as owned by this process; returns the pid to compare with :func:`owned`."""
    _live.add(obj)
    return os.getpid()


def owned(pid: int) -> bool:
    """Whether this is the process that made the object (``pid`` from :func:`register`)."""
    return pid == os.getpid()


def _pin_in_child() -> None:
    _inherited.extend(_live)
    _live.clear()
    dali = sys.modules.get("nvidia.dali.pipeline")
    if dali is not None:  # every pipeline that exists at the fork is the parent's: DALI's atexit must skip it
        dali.Pipeline._pipes.clear()


os.register_at_fork(after_in_child=_pin_in_child)
