"""Multi-process training through ``torchrun``: process group, DDP, SyncBN, metric reduction.

``torchrun --nproc_per_node N -m effnetv2.recipes.cli.train RECIPE ...`` sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; without them the run is a single process and nothing here does
anything. NCCL on CUDA, gloo on CPU (the tests run 2 CPU processes with gloo). Each rank's loader reads
its own exactly-equal share of every epoch (``rank``/``world_size`` go to the loaders), so DDP never
waits on a rank that ran out of batches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


DEVICES = ("auto", "cpu", "cuda")


def run_local_ranks(n: int, module: str, argv: list[str], *, stdout=None, env: dict[str, str] | None = None) -> int:
    """``python -m torch.distributed.run --standalone --nproc_per_node n -m module argv...``: ``n`` ranks on
    this machine (one thread each unless OMP_NUM_THREADS says otherwise); returns torchrun's exit status."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
           "-m", module, *argv]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}
    return subprocess.run(cmd, stdout=stdout, stderr=None if stdout is None else subprocess.STDOUT,
                          env=env).returncode


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda asked for, but torch sees no CUDA GPU (see `effnetv2 doctor`)")
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise ValueError(f"unknown device {name!r}; use one of {', '.join(DEVICES)}")
    return torch.device("cpu")


def init(device: str = "auto") -> DistInfo:
    """Join the process group that torchrun describes (if any) and pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, world_size, local_rank, dev)


def wrap(model: nn.Module, info: DistInfo, *, sync_bn: bool = False) -> nn.Module:
    """DDP around ``model`` when there is more than one rank. SyncBN swaps the BN children of ``model``
    in place (new parameters), so build the optimizer and the EMA from ``model`` after this call.

    On CUDA, DDP is constructed inside :func:`~effnetv2.recipes.engine.step.step_stream`: on the
    stream every training step runs on, eager or captured, with or without CUDA graphs (see
    :mod:`effnetv2.recipes.engine.step`), so that its construction work and every step's hooks,
    allreduce and wait for it are ordered on one stream and the optimizer never reads a gradient
    before its allreduce has landed.
    """
    if not info.enabled:
        return model
    if sync_bn:
        if info.device.type != "cuda":
            raise ValueError("sync_bn needs CUDA: torch.nn.SyncBatchNorm does not run on CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # replaces the BN children in place
    if info.device.type != "cuda":
        return nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
    from .step import step_stream

    with step_stream(info.device):
        return nn.parallel.DistributedDataParallel(model, device_ids=[info.device.index],
                                                   gradient_as_bucket_view=True)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (a no-op in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather(obj: object) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: object) -> object:
    """Rank 0's ``obj`` on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    """Tear the process group down together: without the barrier a rank that exits first can close
    the sockets under another rank's teardown, and gloo aborts that process (seen on 2 CPU ranks)."""
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()
