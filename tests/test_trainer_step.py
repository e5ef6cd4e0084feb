"""The training step: loss, fp16 loss scaling without host syncs, and (on a GPU) graph == eager."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from effnetv2.model import create_model
from effnetv2.recipes.engine.ema import EMA
from effnetv2.recipes.engine.optim import RMSpropTF, weight_decay_groups
from effnetv2.recipes.engine.schedule import LRSchedule
from effnetv2.recipes.engine.step import TrainStep, soft_target_loss


def test_soft_target_loss_matches_definitions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    one_hot = F.one_hot(labels, 5).float()
    torch.testing.assert_close(soft_target_loss(logits, one_hot, label_smoothing=0.1),
                               F.cross_entropy(logits, labels, label_smoothing=0.1))
    multi = torch.zeros(6, 5)
    multi[torch.arange(6), labels] = 1
    multi[torch.arange(6), (labels + 2) % 5] = 1
    normalised = multi / multi.sum(1, keepdim=True)  # 21k targets as the loader gives them
    want = -(normalised * logits.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(soft_target_loss(logits, normalised), want)
    bce = F.binary_cross_entropy_with_logits(logits, multi, reduction="sum") / 6
    torch.testing.assert_close(soft_target_loss(logits, normalised, kind="bce"), bce)
    with pytest.raises(ValueError, match="unknown loss"):
        soft_target_loss(logits, one_hot, kind="hinge")


def _step(model, **kw):
    opt = RMSpropTF(weight_decay_groups(model, 1e-5))
    ema = EMA(model, 0.99)
    sched = LRSchedule("exponential", 0.01, 100, warmup_steps=2, decay_steps=3.0)
    return TrainStep(model, model, opt, ema, sched, label_smoothing=0.1, **kw)


def _batches(n, size, device="cpu", classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(4, 3, size, size, generator=g).to(device).contiguous(memory_format=torch.channels_last)
        y = torch.softmax(torch.randn(4, classes, generator=g), 1).to(device)
        out.append((x, y))
    return out


def _small_model() -> torch.nn.Module:
    """A few layers, enough for the scaler's logic (CPU fp16 autocast is far too slow for the real model)."""
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.SiLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3))


def test_fp16_overflow_skips_the_update_and_backs_off_the_scale():
    torch.manual_seed(0)
    model = _small_model().eval()  # no batch-statistics updates: only the optimizer changes weights
    step = _step(model, amp_dtype=torch.float16)
    (x, y), = _batches(1, 8)
    step(x, y)
    step(x, y)  # lr > 0 from here on
    before = copy.deepcopy(model.state_dict()), copy.deepcopy(step.optimizer.state_dict())
    step.scaler.scale.fill_(2.0**120)  # the scaled loss overflows the fp16 gradients
    step(x, y)
    after = model.state_dict(), step.optimizer.state_dict()
    for k, v in before[0].items():
        assert torch.equal(v, after[0][k]), k
    for i, s in before[1]["state"].items():
        for name, t in s.items():
            assert torch.equal(t, after[1]["state"][i][name]), name
    assert float(step.scaler.scale) == 2.0**119 and int(step.step) == 3
    step.scaler.scale.fill_(1024.0)
    step(x, y)  # a finite step moves the weights again
    assert not torch.equal(before[0]["5.weight"], model.state_dict()["5.weight"])
    loss, lr, bad = step.read_stats(4)
    assert bad == -1 and loss > 0 and lr == pytest.approx(0.01 * 0.97)  # step 3: one decay of 3 steps


def test_first_non_finite_step_is_recorded_on_the_device():
    torch.manual_seed(0)
    model = _small_model()
    step = _step(model)
    batches = _batches(4, 8)
    for i, (x, y) in enumerate(batches):
        step(x if i != 2 else torch.full_like(x, float("nan")), y)
    _, _, bad = step.read_stats(4)
    assert bad == 2 and step.state_dict()["first_bad"] == 2


def _graph_vs_eager(size_steps, amp=None):
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.manual_seed(0)
    base = create_model("efficientnetv2-demo", 3, drop_path_rate=0.0).cuda()
    base.set_dropout(0.0)  # random masks would differ between the eager and the graph RNG streams
    base = base.to(memory_format=torch.channels_last)
    runs = {}
    for graph in (False, True):
        model = copy.deepcopy(base)
        step = _step(model, cuda_graph=graph, warmup_steps=2, amp_dtype=amp)
        for size, n in size_steps:  # stages: (image size, steps)
            for x, y in _batches(n, size, "cuda", seed=size):
                step(x, y)
            assert step.captured == (graph and n > 2)
            step.release()
            assert all(p.grad is None for p in model.parameters())
        torch.cuda.synchronize()
        runs[graph] = (model.state_dict(), step.ema.state_dict(), step.read_stats(sum(n for _, n in size_steps)))
    return runs


@pytest.mark.gpu
def test_cuda_graph_step_equals_eager_across_a_stage_switch():
    runs = _graph_vs_eager([(32, 6), (48, 5)])
    for part in (0, 1):
        for k, v in runs[False][part].items():
            torch.testing.assert_close(runs[True][part][k], v, rtol=1e-4, atol=1e-5, msg=k)
    assert runs[True][2][0] == pytest.approx(runs[False][2][0], rel=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_cuda_graph_step_with_autocast_trains(amp):
    runs = _graph_vs_eager([(32, 6)], amp=amp)
    loss_graph, loss_eager = runs[True][2][0], runs[False][2][0]
    assert runs[True][2][2] == -1 and loss_graph == pytest.approx(loss_eager, rel=2e-2)


@pytest.fixture
def one_rank_nccl():
    """A one-process NCCL group: DDP's reducer, its hooks, allreduce and timing events all run."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda", 0))
    yield
    dist.destroy_process_group()


@pytest.mark.gpu
def test_ddp_trains_like_the_plain_model_eager_and_captured_across_many_stages(one_rank_nccl):
    """DDP as ``distributed.wrap`` builds it, eager (``cuda_graphs=False``: DDP and the step on one stream)
    and with one capture per stage through 26 stages, matches the plain model. Stage 25's capture would
    be DDP's 300th iteration, one it samples for its runtime statistics, without the padded warm-up."""
    from effnetv2.recipes.engine.distributed import DistInfo, wrap
    from effnetv2.recipes.engine.step import ddp_samples_stats, eager_steps_before_capture

    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.manual_seed(0)
    base = _small_model().cuda()
    # 26 stages of 15 steps at changing sizes (a new graph each), as the trainer runs them
    stages = [_batches(15, 8 + 2 * (k % 3), "cuda", seed=k) for k in range(26)]
    # wrap() builds DDP only for several ranks; the one-process group stands in for them
    info = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cuda", 0))
    runs = {}
    for name, ddp, graph in (("plain", False, False), ("ddp eager", True, False), ("ddp graph", True, True)):
        model = copy.deepcopy(base)
        forward = wrap(model, info) if ddp else model
        step = TrainStep(forward, model, RMSpropTF(weight_decay_groups(model, 1e-5)), EMA(model, 0.99),
                         LRSchedule("constant", 0.01, 1000), cuda_graph=graph, warmup_steps=11)
        for batches in stages:
            for x, y in batches:
                step(x, y)
            step.release()
        torch.cuda.synchronize()
        runs[name] = (model.state_dict(), step)
    graph_step = runs["ddp graph"][1]
    assert graph_step.ddp and graph_step.captures == 26
    done = 0
    for _ in range(26):  # the schedule the step followed: no capture on or right after a sampled iteration
        done += eager_steps_before_capture(done, 11) + 1
        assert not ddp_samples_stats(done) and not ddp_samples_stats(done - 1)
    assert graph_step.forwards == done > 300
    # one rank: the allreduce leaves the gradients as they are, so this shows that DDP's hooks, allreduce
    # and captures run on the step's stream and change nothing; the race between ranks needs two GPUs
    for name in ("ddp eager", "ddp graph"):
        for k, v in runs["plain"][0].items():
            torch.testing.assert_close(runs[name][0][k], v, rtol=1e-3, atol=1e-4, msg=f"{name}: {k}")
