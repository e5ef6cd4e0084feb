"""What of the GPU path can be checked without a GPU: the stream bookkeeping of the step and of DDP (with
torch.cuda's stream functions recorded), DDP's sampled iterations against a real reducer (gloo, one
process) and the warm-up that keeps every capture off them, the loaders' default thread count per rank,
and the host-to-device copies going from pinned memory. The GPU side of the same is in the ``-m gpu``
tests (test_dali.py, test_trainer.py, test_trainer_step.py)."""

from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torch import nn
from trainer_fixtures import one_thread  # noqa: F401 (autouse: one intra-op thread, see there)

from effnetv2.recipes.engine import step as step_mod
from effnetv2.recipes.engine.distributed import DistInfo, wrap
from effnetv2.recipes.engine.ema import EMA
from effnetv2.recipes.engine.optim import RMSpropTF, weight_decay_groups
from effnetv2.recipes.engine.plan import make_plan, stage_bounds
from effnetv2.recipes.engine.schedule import LRSchedule
from effnetv2.recipes.engine.step import (
    TrainStep,
    capture_stream,
    ddp_samples_stats,
    eager_steps_before_capture,
    step_stream,
)

CUDA0 = torch.device("cuda", 0)


# -- 1. one stream for DDP and every step ----------------------------------------------------------
class _Stream:
    def __init__(self, cuda: _FakeCuda, name: str):
        self.cuda, self.name = cuda, name

    def wait_stream(self, other: _Stream) -> None:
        self.cuda.log.append(("wait", self.name, other.name))


class _FakeCuda:
    """torch.cuda's stream functions, recorded: which stream is current, and every ``wait_stream``."""

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.default = self.current = _Stream(self, "default")
        self.made = 0

    def Stream(self, device=None) -> _Stream:  # noqa: N802 - torch.cuda.Stream
        self.made += 1
        return _Stream(self, f"side{self.made}")

    def current_stream(self, device=None) -> _Stream:
        return self.current

    @contextmanager
    def stream(self, s: _Stream):
        before, self.current = self.current, s
        try:
            yield
        finally:
            self.current = before


@pytest.fixture
def fake_cuda(monkeypatch) -> _FakeCuda:
    cuda = _FakeCuda()
    for name in ("Stream", "current_stream", "stream"):
        monkeypatch.setattr(torch.cuda, name, getattr(cuda, name))
    monkeypatch.setattr(step_mod, "_CAPTURE_STREAMS", {})
    return cuda


def test_step_stream_runs_work_on_the_one_side_stream_ordered_both_ways(fake_cuda):
    for _ in range(2):
        with step_stream(CUDA0):
            fake_cuda.log.append(("work", fake_cuda.current.name))
        assert fake_cuda.current is fake_cuda.default
    # the side stream waits for the batch before the step; the current stream waits for the step after it
    assert fake_cuda.log == [("wait", "side1", "default"), ("work", "side1"), ("wait", "default", "side1")] * 2
    assert fake_cuda.made == 1 and capture_stream(CUDA0).name == "side1"
    with step_stream(torch.device("cpu")):  # a no-op on the CPU
        pass
    assert len(fake_cuda.log) == 6


def test_ddp_is_constructed_on_the_stream_every_step_runs_on(fake_cuda, monkeypatch):
    built = []

    class FakeDDP(nn.Module):
        def __init__(self, module, device_ids=None, gradient_as_bucket_view=False):
            super().__init__()
            built.append((torch.cuda.current_stream(), device_ids, gradient_as_bucket_view))

    monkeypatch.setattr(nn.parallel, "DistributedDataParallel", FakeDDP)
    ddp = wrap(nn.Linear(3, 2), DistInfo(rank=0, world_size=2, local_rank=0, device=CUDA0))
    assert isinstance(ddp, FakeDDP)
    assert built == [(capture_stream(CUDA0), [0], True)]  # the object step_stream runs every step on
    assert fake_cuda.log == [("wait", "side1", "default"), ("wait", "default", "side1")]
    assert fake_cuda.current is fake_cuda.default


def _small_step(model: nn.Module, forward: nn.Module | None = None, **kw) -> TrainStep:
    opt = RMSpropTF(weight_decay_groups(model, 1e-5))
    sched = LRSchedule("constant", 0.01, 1000)
    return TrainStep(forward or model, model, opt, EMA(model, 0.99), sched, **kw)


def _batch(n: int = 4, size: int = 6, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.softmax(torch.randn(n, classes, generator=g), 1)


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def test_every_eager_step_runs_inside_step_stream(monkeypatch):
    """The eager path (``cuda_graphs=False`` on a GPU, and the warm-up) enters the same step_stream that
    DDP is built in; here on the CPU, where step_stream is a no-op, with step_stream recorded."""
    seen = []

    @contextmanager
    def recorded(device):
        seen.append(("enter", device, step.forwards))
        yield
        seen.append(("exit", device, step.forwards))

    monkeypatch.setattr(step_mod, "step_stream", recorded)
    torch.manual_seed(0)
    step = _small_step(_tiny(), cuda_graph=False)
    for _ in range(2):
        step(*_batch())
    cpu = torch.device("cpu")
    assert seen == [("enter", cpu, 0), ("exit", cpu, 1), ("enter", cpu, 1), ("exit", cpu, 2)]


# -- 3. DDP's runtime statistics and the capture schedule -------------------------------------------
@pytest.fixture
def one_process_group():
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_samples_exactly_the_iterations_the_schedule_avoids(one_process_group):
    """A real DDP (gloo, one process) trained through TrainStep: the iterations whose statistics DDP's
    logger records (it stores the iteration number when it reads them, at the next forward) are exactly
    those ddp_samples_stats names, and one TrainStep call is one DDP iteration."""
    torch.manual_seed(0)
    model = _tiny()
    ddp = nn.parallel.DistributedDataParallel(model)
    step = _small_step(model, ddp)
    assert step.ddp
    x, y = _batch()
    recorded, steps = set(), 205
    for _ in range(steps):
        step(x, y)
        recorded.add(ddp._get_ddp_logging_data().get("iteration", 0))
    assert step.forwards == steps
    assert recorded - {0} == {n for n in range(1, steps) if ddp_samples_stats(n)} == {*range(1, 11), 100, 200}


def _captures(stage_steps, minimum: int, pad: bool, every: int = 100) -> list[int]:
    """DDP's iteration number of each stage's captured step, as TrainStep schedules them (eager steps,
    then one capture per stage; replays do not run DDP's Python and do not count)."""
    done, captured = 0, []
    for n in stage_steps:
        eager = eager_steps_before_capture(done, minimum, every) if pad else minimum
        if n <= eager:  # a stage too short to reach its capture
            done += n
            continue
        done += eager + 1
        captured.append(done)
    return captured


def test_no_capture_lands_on_a_sampled_iteration_in_the_random_resize_plan():
    stages = make_plan("efficientnetv2-s", "random-resize", epochs=350, batch_size=4096)
    assert len(stages) == 35
    steps = [end - first for first, end in stage_bounds(stages, 350 * (1_281_167 // 4096))]
    bad = [n for n in _captures(steps, 11, pad=False) if ddp_samples_stats(n) or ddp_samples_stats(n - 1)]
    assert bad == [300]  # 11 warm-ups + 1 capture per stage: stage 25's capture is DDP's 300th iteration
    captures = _captures(steps, 11, pad=True)
    assert len(captures) == 35
    assert not [n for n in captures if ddp_samples_stats(n) or ddp_samples_stats(n - 1)]
    # the price: stage 25 runs two more eager steps (its capture, 302, follows 301, not the sampled 300)
    assert [c - p - 1 for p, c in zip([0, *captures], captures)] == [11] * 24 + [13] + [11] * 10


@pytest.mark.parametrize("every", [100, 7, 3])
def test_the_padded_warm_up_avoids_sampled_iterations_for_any_stage_lengths(every):
    rng = np.random.default_rng(every)
    for minimum in (0, 1, 3, 11):
        steps = rng.integers(1, 40, 300).tolist()
        captures = _captures(steps, minimum, pad=True, every=every)
        assert captures and not [n for n in captures if ddp_samples_stats(n, every) or ddp_samples_stats(n - 1, every)]
    for done in range(0, 400):
        e = eager_steps_before_capture(done, 3, every)
        assert e >= 3 and (e == 3 or ddp_samples_stats(done + e - 1, every) or ddp_samples_stats(done + e, every))


# -- 2. threads per rank ---------------------------------------------------------------------------
@pytest.mark.parametrize("cores,local_world,want", [(16, "4", 4), (2, "4", 1), (16, None, 16), (17, "8", 2)])
def test_default_threads_are_this_ranks_share_of_the_cores(small_shards, monkeypatch, cores, local_world, want):
    from effnetv2.pipeline.loaders.backend import AugmentSpec, default_workers, make_backend
    from effnetv2.pipeline.loaders.sampler import SampleTable

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    if local_world is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
    assert default_workers() == want
    table = SampleTable.from_shards(small_shards, "train")
    spec = AugmentSpec(32, True, randaug_magnitude=5.0)
    for name, count in (("dali", lambda b: b.cfg.num_threads), ("opencv", lambda b: b.num_workers)):
        backend = make_backend(name, table, spec, torch.device("cpu"), None)  # num_workers=None: the default
        assert count(backend) == want, name
        backend.close()
    table.close()


def test_a_bad_local_world_size_is_named(monkeypatch):
    from effnetv2.pipeline.loaders.backend import default_workers

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "four")
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE='four'"):
        default_workers()


# -- 4. host-to-device copies ----------------------------------------------------------------------
def test_copies_to_cuda_go_from_pinned_memory_and_cpu_stays_copy_free(monkeypatch):
    from effnetv2.pipeline.loaders.mix import to_device

    t = torch.arange(6.0)
    assert to_device(t, torch.device("cpu")) is t  # no copy at all on the CPU
    pinned, calls = set(), []

    def pin_memory(self):
        out = self.clone()
        pinned.add(out.data_ptr())
        calls.append("pin")
        return out

    def to(self, device, non_blocking=False):
        calls.append(("to", str(device), non_blocking, self.data_ptr() in pinned))
        return self

    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: self.data_ptr() in pinned)
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "to", to)
    to_device(t, CUDA0)
    assert calls == ["pin", ("to", "cuda:0", True, True)]
    calls.clear()
    already = pin_memory(torch.ones(3))
    calls.clear()
    to_device(already, CUDA0)  # pinned already (the DataLoader's pin-memory thread): no second copy
    assert calls == [("to", "cuda:0", True, True)]


def test_every_host_tensor_the_loaders_send_to_the_device_goes_through_to_device(small_shards, monkeypatch):
    from effnetv2.pipeline.loaders import build_eval_loader, build_train_loader
    from effnetv2.pipeline.loaders import loader as loader_mod
    from effnetv2.pipeline.loaders import mix as mix_mod

    sent = []
    real = mix_mod.to_device

    def recorded(t, device):
        sent.append((t.dtype, tuple(t.shape)))
        return real(t, device)

    monkeypatch.setattr(loader_mod, "to_device", recorded)
    monkeypatch.setattr(mix_mod, "to_device", recorded)
    train = build_train_loader(small_shards, 8, 32, 5.0, 0.2, 0.2, backend="opencv", num_workers=0)
    images, targets = next(iter(train))
    train.close()
    assert images.shape == (8, 3, 32, 32) and torch.allclose(targets.sum(1), torch.ones(8))
    # images, the one-hot index and values, the mixup half's lambdas, the cutmix half's boxes
    assert sent == [(torch.uint8, (8, 32, 32, 3)), (torch.int64, (2, 8)), (torch.float32, (8,)),
                    (torch.float32, (4,)), (torch.float32, (4, 5))]
    sent.clear()
    evaluation = build_eval_loader(small_shards, 8, 32, backend="opencv", num_workers=0)
    next(iter(evaluation))
    evaluation.close()
    # the validity mask, then images, index and values
    assert sent == [(torch.bool, (8,)), (torch.uint8, (8, 32, 32, 3)), (torch.int64, (2, 8)), (torch.float32, (8,))]
