"""The progressive-learning planner against Table 6 and the released code's formulas."""

from __future__ import annotations

import numpy as np
import pytest

from effnetv2.recipes.cli import plan as plan_cli
from effnetv2.recipes.engine.plan import make_plan, stage_bounds


def _column(stages, name):
    return [getattr(s, name) for s in stages]


def test_official_s_matches_released_formulas():
    stages = make_plan("s", "official", epochs=350, batch_size=4096)
    assert _column(stages, "image_size") == [171, 214, 257, 300]
    assert _column(stages, "randaug_magnitude") == list(np.linspace(5, 10, 4))  # floats, not rounded
    assert _column(stages, "mixup_alpha") == _column(stages, "cutmix_alpha") == [0.0] * 4
    assert _column(stages, "dropout") == [0.2] * 4  # not scheduled
    assert _column(stages, "epochs") == [87.5] * 4
    assert {s.batch_size for s in stages} == {4096}


@pytest.mark.parametrize("model, final_size, randaug, mix, dropout", [
    ("m", 384, 15, 0.2, 0.3), ("l", 384, 20, 0.5, 0.4), ("xl", 384, 20, 0.5, 0.4)])
def test_official_m_l_xl(model, final_size, randaug, mix, dropout):
    stages = make_plan(f"efficientnetv2-{model}", "official", epochs=350, batch_size=4096)
    assert _column(stages, "image_size") == [192, 256, 320, 384]
    assert 128 not in _column(stages, "image_size")
    assert _column(stages, "randaug_magnitude") == list(np.linspace(5, randaug, 4))
    assert _column(stages, "mixup_alpha") == _column(stages, "cutmix_alpha") == list(np.linspace(0, mix, 4))
    assert _column(stages, "dropout") == [dropout] * 4


@pytest.mark.parametrize("model, size, randaug, mixup, dropout", [
    ("s", (128, 300), (5, 15), (0, 0), (0.1, 0.3)),
    ("m", (128, 380), (5, 20), (0, 0.2), (0.1, 0.4)),
    ("l", (128, 380), (5, 25), (0, 0.4), (0.1, 0.5))])
def test_paper_table6(model, size, randaug, mixup, dropout):
    stages = make_plan(model, "paper", epochs=350, batch_size=4096)
    # first stage at the minimum, last at the maximum, linear in between (dropout scheduled too)
    assert _column(stages, "image_size") == [round(v) for v in np.linspace(*size, 4)]
    assert (stages[0].image_size, stages[-1].image_size) == size
    assert _column(stages, "randaug_magnitude") == list(np.linspace(*randaug, 4))
    assert _column(stages, "mixup_alpha") == list(np.linspace(*mixup, 4))
    assert _column(stages, "dropout") == list(np.linspace(*dropout, 4))
    assert _column(stages, "cutmix_alpha") == [0.0] * 4  # Table 6 has no cutmix


def test_paper_s_sizes_and_rounding():
    assert _column(make_plan("s", "paper", epochs=1, batch_size=8), "image_size") == [128, 185, 243, 300]
    for multiple in (8, 16, 32):
        sizes = _column(make_plan("s", "paper", epochs=1, batch_size=8, round_to=multiple), "image_size")
        assert all(s % multiple == 0 for s in sizes)
        assert all(abs(s - r) <= multiple / 2 for s, r in zip(sizes, [128, 185.33, 242.67, 300]))


def test_overrides_and_stage_count():
    stages = make_plan("s", "paper", epochs=8, batch_size=16, num_stages=2, size=(32, 64), randaug=(0, 4),
                       mixup=(0, 0.2), dropout=(0.0, 0.1))
    assert [(s.image_size, s.randaug_magnitude, s.mixup_alpha, s.dropout) for s in stages] == [
        (32, 0.0, 0.0, 0.0), (64, 4.0, 0.2, 0.1)]
    single = make_plan("s", "paper", epochs=8, batch_size=16, num_stages=1)
    assert len(single) == 1 and single[0].image_size == 300  # one stage trains at the final values


def test_random_resize_draws_paper_levels():
    levels = {(s.image_size, s.randaug_magnitude, s.dropout) for s in make_plan("s", "paper", epochs=1,
                                                                              batch_size=8)}
    stages = make_plan("s", "random-resize", epochs=35, batch_size=8, resize_every=2, seed=3)
    assert len(stages) == 18 and stages[-1].epochs == 1  # 17 chunks of 2 epochs and one of 1
    assert [s.index for s in stages] == list(range(18))
    drawn = {(s.image_size, s.randaug_magnitude, s.dropout) for s in stages}
    assert drawn <= levels and len(drawn) > 1  # regularisation stays matched to the drawn size
    again = make_plan("s", "random-resize", epochs=35, batch_size=8, resize_every=2, seed=3)
    assert again == stages


def test_stage_bounds_follow_released_code():
    stages = make_plan("s", "official", epochs=350, batch_size=4096)
    total = 109_475
    assert stage_bounds(stages, total) == [(0, 27368), (27368, 54737), (54737, 82106), (82106, 109475)]
    assert [e for _, e in stage_bounds(stages, total)] == [int((i + 1) / 4 * total) for i in range(4)]


def test_unknown_model_and_preset():
    with pytest.raises(ValueError, match="no progressive-learning preset for model 'resnet50'"):
        make_plan("resnet50", epochs=1, batch_size=1)
    with pytest.raises(ValueError, match="unknown plan preset"):
        make_plan("s", "fancy", epochs=1, batch_size=1)


def test_plan_cli_prints_table(capsys):
    import argparse

    parser = argparse.ArgumentParser()
    plan_cli.add_arguments(parser)
    assert plan_cli.run(parser.parse_args(["--model", "s", "--preset", "paper", "--epochs", "350"])) == 0
    out = capsys.readouterr().out.splitlines()
    assert "preset paper" in out[0] and "312 steps/epoch" in out[0]
    rows = [line.split() for line in out[2:]]
    assert [r[1] for r in rows] == ["128", "185", "243", "300"]
    assert [r[5] for r in rows] == ["0.10", "0.17", "0.23", "0.30"]
