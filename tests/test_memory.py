"""The memory model (counted bytes of a training step), the batch planner and budget parsing."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from effnetv2.model import create_model
from effnetv2.model.memory import (
    COUNT_BATCHES,
    _upper_envelope,
    parse_budget,
    plan_batches,
    step_memory,
)
from effnetv2.recipes.engine.step import soft_target_loss

DEMO = "efficientnetv2-demo"


@pytest.fixture
def one_thread():
    """Two OpenMP threads on a shared 2-core machine make tiny CPU steps 50x slower; bytes do not change."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def real_saved_bytes(name: str, batch: int, size: int, amp: torch.dtype | None, num_classes: int = 1000
                     ) -> int:
    """An independent count on real CPU tensors: distinct storages (by data pointer) saved by the model's
    forward and the trainer's loss, plus the logits and the loss, minus parameters, buffers and inputs."""
    torch.manual_seed(0)
    model = create_model(name, num_classes).to(memory_format=torch.channels_last).train()
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    targets = torch.full((batch, num_classes), 1.0 / num_classes)
    skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers(), images, targets)}
    seen: dict[int, int] = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None, cache_enabled=False):
            logits = model(images)
        loss = soft_target_loss(logits, targets, label_smoothing=0.1)
    for t in (logits, loss):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
    return sum(n for ptr, n in seen.items() if ptr not in skip)


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_fake_count_equals_real_cpu_count_at_a_batch_it_was_not_fitted_on(amp, one_thread):
    mem = step_memory(DEMO, 1000, 32, amp=amp)
    assert 6 not in COUNT_BATCHES
    assert mem.activations(6) == real_saved_bytes(DEMO, 6, 32, amp)


def test_linear_in_batch_and_about_quadratic_in_image_size():
    mems = {s: step_memory(DEMO, 1000, s) for s in (32, 48, 64)}
    for mem in mems.values():
        assert mem.saved_per_image > 0
        a = [mem.activations(b) for b in (8, 16, 24)]
        assert a[2] - a[1] == a[1] - a[0] == 8 * mem.saved_per_image
        assert mem.peak(512) - mem.peak(256) >= 256 * mem.saved_per_image  # grows at least as fast
    # activations scale with pixels; the 1000-class logits and loss rows do not, hence "about"
    assert 2.0 < mems[48].saved_per_image / mems[32].saved_per_image < 2.5  # (48/32)^2 = 2.25
    assert 3.5 < mems[64].saved_per_image / mems[32].saved_per_image < 4.5  # (64/32)^2 = 4
    bf16 = step_memory(DEMO, 1000, 64, amp=torch.bfloat16)
    assert 0.45 < bf16.saved_per_image / mems[64].saved_per_image < 0.65  # mostly 2-byte activations


def test_state_counts_weights_gradients_optimizer_and_ema_with_buffers():
    model = create_model(DEMO, 10)
    p = sum(t.numel() * 4 for t in model.parameters())
    b = sum(t.numel() * t.element_size() for t in model.buffers())
    mem = step_memory(DEMO, 10, 32)
    assert (mem.weights, mem.gradients, mem.optimizer, mem.ema, mem.buffers) == (p, p, 2 * p, p + b, b)
    assert mem.state == 5 * p + 2 * b


def test_backward_envelope_is_the_max_over_all_lines():
    rng = random.Random(0)
    lines = [(rng.randrange(0, 1000), rng.randrange(0, 10**6)) for _ in range(300)]
    hull = _upper_envelope(lines)
    assert set(hull) <= set(lines) and len(hull) < len(lines)
    for b in [1, 2, 3, 10, 100, 1000, 10**5]:
        assert max(a * b + c for a, c in hull) == max(a * b + c for a, c in lines)


def test_results_are_cached_and_leave_the_global_rng_alone():
    state = torch.get_rng_state()
    first = step_memory(DEMO, 7, 40)
    assert torch.equal(torch.get_rng_state(), state)
    again = step_memory(DEMO, 7, 40, margin=0.2)
    assert replace(again, margin=0.10) == first  # same count, other margin
    assert again.total(64) > first.total(64)


def test_planner_never_exceeds_the_budget_and_respects_caps():
    mems = [step_memory(DEMO, 1000, s) for s in (32, 40, 48, 64)]
    for gib in (0.25, 0.5, 1, 3, 10):
        budget = int(gib * 2**30)
        batches = plan_batches(mems, budget, max_batch=4096)
        assert list(batches) == sorted(batches, reverse=True)  # larger images, smaller batches
        for mem, b in zip(mems, batches):
            assert b % 8 == 0 and 8 <= b <= 4096
            assert mem.total(b) <= budget
            assert b == 4096 or mem.total(b + 8) > budget  # the largest multiple of 8 that fits
    assert plan_batches(mems, 10 * 2**30, max_batch=1000) == (1000 // 8 * 8,) * 4
    assert plan_batches(mems, 10 * 2**30, max_batch=4096, data_limit=300) == (296,) * 4
    assert plan_batches(mems, 10 * 2**30, max_batch=4096, multiple=32)[0] % 32 == 0


def test_largest_batch_is_exact():
    mem = step_memory(DEMO, 1000, 48)
    for budget in (mem.total(1) - 1, mem.total(1), mem.total(37), mem.total(37) + 1, 2**34):
        b = mem.largest_batch(budget)
        assert (b == 0 or mem.total(b) <= budget) and mem.total(b + 1) > budget


def test_a_budget_too_small_for_the_last_stage_names_it():
    mems = [step_memory(DEMO, 1000, s) for s in (32, 48, 64)]
    budget = mems[2].total(8) - 1  # enough for batch 8 at 32 and 48 px, not at 64 px
    with pytest.raises(ValueError, match=r"stage 2 \(64px\): a batch of 8 needs .*\(([\d,]+) bytes") as e:
        plan_batches(mems, budget, max_batch=512)
    assert f"{mems[2].total(8):,} bytes" in str(e.value) and f"{budget:,} bytes" in str(e.value)
    with pytest.raises(ValueError, match="data .*5 samples per rank"):
        plan_batches(mems, 2**40, max_batch=512, data_limit=5)


def test_parse_budget():
    assert parse_budget("80GiB") == 80 * 2**30
    assert parse_budget("512MiB") == 512 * 2**20
    assert parse_budget(" 1.5 gb ") == 1_500_000_000
    assert parse_budget("123456") == 123456
    assert parse_budget("2TiB") == 2 * 2**40
    for bad in ("", "GiB", "80 GiBs", "-1GiB", "0", "eighty"):
        with pytest.raises(ValueError, match="memory budget"):
            parse_budget(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'auto' needs a CUDA GPU"):
            parse_budget("auto")
    with pytest.raises(ValueError, match="'auto' needs a CUDA GPU"):
        parse_budget("auto", "cpu")


def test_prediction_matches_the_bytes_a_real_step_allocates(one_thread):
    """The project's TrainStep, run under the profiler: the activations are counted to the byte, the
    peak (here the optimizer update's) within 10% and never below the measurement."""
    from effnetv2.bench.memory import MemoryCase, measure_cpu

    got = measure_cpu(MemoryCase(DEMO, 32, 8))
    mem = replace(step_memory(DEMO, 1000, 32), input_batches=1, staging_bytes=0)
    assert got.unaccounted == 0  # the profiler saw every byte the run still holds
    assert mem.activations(8) == got.activations
    assert 1.0 <= mem.peak(8) / got.peak <= 1.10


def test_ddp_buckets_keep_every_gradient_through_backward():
    mem = step_memory(DEMO, 1000, 48)
    ddp = step_memory(DEMO, 1000, 48, ddp=True)
    for b in (8, 64, 512):
        assert mem.backward(b) < ddp.backward(b) <= mem.backward(b) + mem.gradients
        assert ddp.backward(b) == ddp.gradients + ddp.activations(b) + b * ddp.backward_per_image


def test_bench_memory_command_writes_the_comparison(tmp_path, one_thread, capsys):
    import json

    from effnetv2.recipes.cli.main import main as cli_main

    rc = cli_main(["bench", "memory", "--cases", "demo:32:8", "--amps", "fp32", "--threads", "1",
                   "--budget", "96MiB", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads(next(tmp_path.glob("memory-*.json")).read_text())
    (case,) = data["extra"]["cases"]
    assert case["case"]["batch"] % 8 == 0 and case["case"]["batch"] > 8  # planned for 96 MiB
    assert case["measured"]["peak"] <= case["budget"] == 96 * 2**20
    ratios = {r["name"]: r["value"] for r in data["ratios"]}
    assert ratios["activations: counted / measured"] == 1.0
    # never much below what a step takes (that would run out of memory), and not wasteful; the count's
    # stated bound for the gradients between layers (2x the largest activation) errs on the high side
    assert 0.9 <= ratios["peak: predicted / measured"] <= 1.15
    assert "within the budget" in capsys.readouterr().out
