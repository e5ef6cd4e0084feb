"""TF-semantics RMSProp, LR schedules and the EMA, against values computed by hand."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from effnetv2.recipes.engine.ema import EMA
from effnetv2.recipes.engine.optim import RMSpropTF, weight_decay_groups
from effnetv2.recipes.engine.schedule import LRSchedule, make_schedule


def _reference_rmsprop(p, grads, lrs, wd, rho=0.9, momentum=0.9, eps=1e-3):
    """TF ApplyRMSProp on plain floats, one element at a time."""
    p = list(p)
    ms = [1.0] * len(p)
    mom = [0.0] * len(p)
    for g_step, lr in zip(grads, lrs):
        for i, g in enumerate(g_step):
            g = g + wd * p[i]
            ms[i] = rho * ms[i] + (1 - rho) * g * g
            mom[i] = momentum * mom[i] + lr * g / math.sqrt(ms[i] + eps)
            p[i] = p[i] - mom[i]
    return p, ms, mom


def test_rmsprop_tf_matches_hand_computation_with_warmup_and_weight_decay():
    p0 = [1.0, -2.0, 0.5, 3.0]
    grads = [[0.3, -0.1, 2.0, 0.0], [-0.5, 0.2, 1.0, 0.01], [0.1, 0.1, -3.0, -0.2]]
    sched = LRSchedule("constant", base_lr=0.1, total_steps=10, warmup_steps=2)
    lrs = [sched.at(t) for t in range(3)]
    assert lrs == pytest.approx([0.0, 0.05, 0.1])
    wd = 0.01
    param = nn.Parameter(torch.tensor(p0))
    opt = RMSpropTF([param], weight_decay=wd)
    step = torch.zeros((), dtype=torch.int64)
    for g in grads:
        param.grad = torch.tensor(g)
        opt.step(sched(step))
        step += 1
    want_p, want_ms, want_mom = _reference_rmsprop(p0, grads, lrs, wd)
    torch.testing.assert_close(param.detach(), torch.tensor(want_p), rtol=0, atol=1e-6)
    torch.testing.assert_close(opt.state[param]["square_avg"], torch.tensor(want_ms), rtol=0, atol=1e-6)
    torch.testing.assert_close(opt.state[param]["momentum_buffer"], torch.tensor(want_mom), rtol=0, atol=1e-6)
    # torch.optim.RMSprop (eps outside the root, ms from 0, lr after momentum) lands elsewhere
    other = nn.Parameter(torch.tensor(p0))
    ref = torch.optim.RMSprop([other], lr=0.1, alpha=0.9, eps=1e-3, momentum=0.9, weight_decay=wd)
    for g in grads:
        other.grad = torch.tensor(g)
        ref.step()
    assert not torch.allclose(other.detach(), param.detach(), atol=1e-3)


def test_weight_decay_skips_biases_and_norms():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    decay, no_decay = weight_decay_groups(model, 1e-5)
    assert decay["weight_decay"] == 1e-5 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert len(no_decay["params"]) == 4  # conv bias, BN weight and bias, linear bias


def test_skip_is_an_exact_no_op_and_state_dict_round_trips():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(3))]
    opt = RMSpropTF([{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}])
    lr = torch.tensor(0.01)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step(lr)
    before = [p.detach().clone() for p in params] + [t.clone() for s in opt.state.values() for t in s.values()]
    params[0].grad = torch.full_like(params[0], float("inf"))
    params[1].grad = torch.randn_like(params[1])
    opt.step(lr, skip=torch.tensor(True))
    after = [p.detach() for p in params] + [t for s in opt.state.values() for t in s.values()]
    for a, b in zip(before, after):
        assert torch.equal(a, b)
    # a saved state continues exactly like the original
    saved = copy.deepcopy(opt.state_dict())  # state_dict() returns live tensors
    clone = [nn.Parameter(p.detach().clone()) for p in params]
    opt2 = RMSpropTF([{"params": clone[:1], "weight_decay": 0.1}, {"params": clone[1:], "weight_decay": 0.0}])
    opt2.load_state_dict(saved)
    for p, q in zip(params, clone):
        p.grad = q.grad = torch.randn_like(p)
    opt.step(lr, skip=torch.tensor(False))
    opt2.step(lr)
    for p, q in zip(params, clone):
        assert torch.equal(p, q)


def test_exponential_schedule_staircase_and_batch_scaling():
    s = make_schedule("exponential", lr_per_256=0.016, global_batch=4096, steps_per_epoch=100,
                      total_steps=35000, warmup_epochs=5)
    assert s.base_lr == pytest.approx(0.256)
    assert s.at(0) == 0.0
    assert s.at(250) == pytest.approx(0.256 * 250 / 500)  # linear warm-up over 5 epochs
    # after warm-up the decay counts from step 0: 0.97 every 2.4 epochs (240 steps), staircase
    assert s.at(500) == pytest.approx(0.256 * 0.97 ** 2, rel=1e-6)
    assert s.at(719) == pytest.approx(0.256 * 0.97 ** 2, rel=1e-6)
    assert s.at(720) == pytest.approx(0.256 * 0.97 ** 3, rel=1e-6)
    assert s.at(34999) == pytest.approx(0.256 * 0.97 ** 145, rel=1e-5)


def test_cosine_and_constant_schedules():
    c = make_schedule("cosine", lr_per_256=0.008, global_batch=512, steps_per_epoch=10, total_steps=1000,
                      warmup_epochs=1)
    assert c.at(5) == pytest.approx(0.016 * 5 / 10)
    assert c.at(500) == pytest.approx(0.016 * 0.5, rel=1e-6)
    assert c.at(250) == pytest.approx(0.016 * 0.5 * (1 + math.cos(math.pi / 4)), rel=1e-6)
    assert c.at(1000) == pytest.approx(0.0, abs=1e-9)
    k = make_schedule("constant", lr_per_256=0.0005, global_batch=512, steps_per_epoch=10, total_steps=100)
    assert [k.at(t) for t in (0, 50, 99)] == pytest.approx([0.001] * 3)
    with pytest.raises(ValueError, match="unknown lr schedule"):
        LRSchedule("step", 0.1, 10)


def test_ema_warmup_rule_and_bn_buffers():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.9999)
    assert float(ema.decay_at(torch.tensor(0))) == pytest.approx(1 / 10)
    assert float(ema.decay_at(torch.tensor(90))) == pytest.approx(91 / 100)
    assert float(ema.decay_at(torch.tensor(10**6))) == pytest.approx(0.9999)
    w0 = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(2.0)
    model[1].num_batches_tracked.fill_(7)
    ema.update(model, torch.tensor(0))  # d = 0.1: 10% old + 90% new
    torch.testing.assert_close(ema.module[0].weight, 0.1 * w0 + 0.9 * (w0 + 1.0))
    torch.testing.assert_close(ema.module[1].running_mean, torch.full((2,), 1.8))
    assert int(ema.module[1].num_batches_tracked) == 7
    assert not any(p.requires_grad for p in ema.module.parameters())
