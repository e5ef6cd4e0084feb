"""effnetv2.model.search (architecture side) and model config files: the sampled space, the reward, the Pareto
front, compound scaling, and ModelConfig <-> JSON with create_model accepting a file."""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from effnetv2.model import (
    CONFIGS,
    ConfigFileError,
    EfficientNetV2,
    ModelConfig,
    count_flops,
    count_parameters,
    create_model,
    get_config,
    load_config,
    save_config,
)
from effnetv2.model.config_file import config_to_dict
from effnetv2.model.search import (
    Candidate,
    Compound,
    SearchSpace,
    StageChoice,
    architecture_id,
    pareto_front,
    reward,
    scale_config,
    scale_family,
    stage_table,
)

DEMO = "efficientnetv2-demo"


def expected_params(cfg: ModelConfig, num_classes: int) -> int:
    """Trainable parameters worked out from the stage table alone (conv weights, BN scale+shift, SE and
    classifier biases), independently of the builder."""
    stages = cfg.scaled_stages()
    c0 = stages[0].in_ch
    n = 3 * 9 * c0 + 2 * c0  # stem
    for s in stages:
        for j in range(s.repeats):
            cin = s.in_ch if j == 0 else s.out_ch
            mid, k = cin * s.expand, s.kernel * s.kernel
            if s.block == "fused":
                n += k * cin * s.out_ch + 2 * s.out_ch if s.expand == 1 else \
                    k * cin * mid + 2 * mid + mid * s.out_ch + 2 * s.out_ch
            else:
                n += (cin * mid + 2 * mid if s.expand != 1 else 0) + k * mid + 2 * mid + mid * s.out_ch + 2 * s.out_ch
                if s.se:
                    sq = max(1, int(cin * s.se))
                    n += mid * sq + sq + sq * mid + mid
    head = cfg.head_channels
    return n + stages[-1].out_ch * head + 2 * head + head * num_classes + num_classes


def meta_build(cfg: ModelConfig, num_classes: int = 10) -> EfficientNetV2:
    with torch.device("meta"):
        return EfficientNetV2(cfg, num_classes)


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    return SearchSpace.around(DEMO)


# --------------------------------------------------------------------------------------------- the space

def test_every_sample_is_in_the_space_and_builds_the_network_its_table_says(space):
    base = CONFIGS[DEMO].scaled_stages()
    for c in space.samples(100, seed=0):
        assert space.contains(c)
        cfg = c.to_config()
        assert cfg.name == f"{DEMO}-search-{c.id}" and not cfg.official
        assert (cfg.head_channels, cfg.stem_stride, cfg.train_size, cfg.eval_size) == (512, 1, 28, 28)
        for i, (s, b, ch) in enumerate(zip(cfg.stages, base, c.choices)):
            assert (s.in_ch, s.out_ch, s.stride) == (b.in_ch, b.out_ch, b.stride)  # kept from the backbone
            assert (s.block, s.kernel, s.expand, s.repeats) == (ch.block, ch.kernel, ch.expand, ch.layers)
            assert s.kernel in (3, 5) and s.expand in (1, 4, 6) and s.repeats in space.layer_range(i)
            assert s.se == (0.25 if s.block == "mbconv" and ch.se else 0.0)
        m = meta_build(cfg)
        assert count_parameters(m) == expected_params(cfg, 10)
        assert len(m.blocks()) == sum(ch.layers for ch in c.choices)
    assert [len(space.layer_range(i)) for i in range(5)] == [3, 3, 3, 4, 3]  # max(1, r-2) .. r+2, r = 1,1,1,2,1


def test_samples_cover_every_choice(space):
    seen = {"block": set(), "kernel": set(), "expand": set(), "se": set()}
    layers = [set() for _ in range(5)]
    for c in space.samples(100, seed=1):
        for i, ch in enumerate(c.choices):
            for k in seen:
                seen[k].add(getattr(ch, k))
            layers[i].add(ch.layers)
            assert ch.block == "mbconv" or not ch.se
    assert seen == {"block": {"fused", "mbconv"}, "kernel": {3, 5}, "expand": {1, 4, 6}, "se": {False, True}}
    assert [sorted(s) for s in layers] == [list(space.layer_range(i)) for i in range(5)]


def test_sampled_networks_run_and_learn_on_real_photos(space, photos):
    """A forward and backward pass at 32 px for a few candidates, including the corner cases of the
    builder (expansion 1 in a fused block that changes stride and channels, 5x5 depthwise, SE)."""
    x = torch.stack([torch.from_numpy(np.array(Image.fromarray(p).resize((32, 32)))).permute(2, 0, 1)
                     for p in photos[:4]]).float().div(255)
    corner = Candidate(space.backbone, (StageChoice("fused", 5, 1, 1), StageChoice("fused", 3, 1, 2),
                                        StageChoice("mbconv", 5, 1, 1, True), StageChoice("mbconv", 5, 6, 2, True),
                                        StageChoice("fused", 3, 6, 1)))
    assert space.contains(corner)
    for c in [corner, *space.samples(3, seed=7)]:
        torch.manual_seed(0)
        m = create_model(c.to_config(), num_classes=4, drop_path_rate=0.0).train()
        logits = m(x)
        assert logits.shape == (4, 4) and torch.isfinite(logits).all()
        torch.nn.functional.cross_entropy(logits, torch.arange(4)).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
        assert not torch.allclose(logits[0], logits[1])


def test_same_seed_same_candidates_other_seed_others(space):
    a, b = space.samples(20, seed=3), SearchSpace.around(DEMO).samples(20, seed=3)
    assert a == b and [c.id for c in a] == [c.id for c in b]
    assert space.samples(5, seed=3) == a[:5]  # more samples extend the same list (resume, --samples N)
    other = space.samples(20, seed=4)
    assert not {c.id for c in other} & {c.id for c in a}
    assert len({c.id for c in a}) == 20
    # sample(rng) itself is reproducible from the generator's state
    assert space.sample(random.Random(11)) == space.sample(random.Random(11))


def test_candidate_id_is_stable_across_processes(space):
    """The id keys the results file: it must not depend on Python's per-process hash seed."""
    here = [c.id for c in space.samples(3, seed=0)]
    code = ("from effnetv2.model.search import SearchSpace; "
            "print(','.join(c.id for c in SearchSpace.around('efficientnetv2-demo').samples(3, seed=0)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"}).stdout.strip()
    assert out.split(",") == here and all(re.fullmatch(r"[0-9a-f]{10}", i) for i in here)


def test_candidate_record_describe_and_round_trip(space):
    c = space.samples(1, seed=0)[0]
    d = json.loads(json.dumps(c.to_dict()))
    assert space.from_dict(d) == c
    parts = c.describe().split(" | ")
    assert len(parts) == 5
    for part, s in zip(parts, c.to_config().stages):
        assert re.fullmatch(r"(Fused-MBConv|MBConv)[146] k[35]x[35]( SE0\.25)? x\d", part)
        assert part.startswith("Fused" if s.block == "fused" else "MBConv") and part.endswith(f"x{s.repeats}")
    d["stages"][0]["kernel"] = 7
    with pytest.raises(ValueError, match="not in the space"):
        space.from_dict(d)


def test_backbone_is_a_point_of_its_space(tmp_path):
    for name in (DEMO, "efficientnetv2-b1"):  # b1: depth 1.1, resolved before the search sees it
        sp = SearchSpace.around(name)
        b = sp.backbone_candidate()
        assert b is not None and sp.contains(b)
        assert b.id == architecture_id(CONFIGS[name])
        assert count_parameters(meta_build(b.to_config(), 1000)) == count_parameters(meta_build(CONFIGS[name], 1000))
    odd = replace(CONFIGS[DEMO], name="k7", stages=(replace(CONFIGS[DEMO].stages[0], kernel=7),
                                                     *CONFIGS[DEMO].stages[1:]))
    path = save_config(odd, tmp_path / "k7.json")
    sp = SearchSpace.around(str(path))  # a config file as the backbone
    assert sp.backbone == odd and sp.backbone_candidate() is None
    assert all(sp.contains(c) for c in sp.samples(5))


# -------------------------------------------------------------------------------------------- the reward

def test_reward_formula():
    # the backbone, normalised to itself, scores its accuracy
    assert reward(0.87, 0.25, 1.2e6, base_step_time=0.25, base_params=1.2e6) == pytest.approx(0.87)
    slow = reward(0.87, 0.5, 1.2e6, base_step_time=0.25, base_params=1.2e6)
    assert 1 - slow / 0.87 == pytest.approx(1 - 2 ** -0.07) and 0.046 < 1 - slow / 0.87 < 0.048
    big = reward(0.87, 0.25, 2.4e6, base_step_time=0.25, base_params=1.2e6)
    assert big / 0.87 == pytest.approx(2 ** -0.05)
    assert reward(0.9, 0.5, 2e6, base_step_time=1.0, base_params=1e6, w=0.0, v=0.0) == pytest.approx(0.9)
    # a faster, smaller network with the same accuracy beats the backbone
    assert reward(0.87, 0.2, 1e6, base_step_time=0.25, base_params=1.2e6) > 0.87
    # the unit of P does not change how candidates compare, only the constant factor
    pts = [(0.88, 0.3, 2e6), (0.86, 0.2, 0.8e6), (0.87, 0.25, 1.5e6)]
    for unit in (1.0, 1e6):
        r = [reward(a, s, p / unit, base_step_time=0.25, base_params=1.2e6 / unit) for a, s, p in pts]
        assert r[1] > r[2] > r[0]
    for bad in (dict(accuracy=87.0), dict(step_time=0.0), dict(params=-1.0), dict(base_step_time=math.nan)):
        args = dict(accuracy=0.8, step_time=0.2, params=1e6, base_step_time=0.2, base_params=1e6) | bad
        with pytest.raises(ValueError, match=next(iter(bad))):
            reward(args.pop("accuracy"), args.pop("step_time"), args.pop("params"), **args)


def test_pareto_front():
    acc = [0.80, 0.85, 0.84, 0.90, 0.70, 0.90, 0.85]
    time = [0.10, 0.20, 0.30, 0.40, 0.05, 0.50, 0.20]
    assert pareto_front(acc, time) == [4, 0, 1, 3]  # by step time; 2, 5 and the duplicate 6 are dominated
    rng = np.random.default_rng(0)
    a, t = rng.uniform(0.5, 1, 60).tolist(), rng.uniform(0.1, 1, 60).tolist()
    front = pareto_front(a, t)
    beats = lambda i, j: a[i] >= a[j] and t[i] <= t[j] and (a[i], t[i]) != (a[j], t[j])  # noqa: E731
    assert not any(beats(j, i) for i in front for j in range(60))
    assert all(any(beats(i, j) for i in front) for j in set(range(60)) - set(front))
    with pytest.raises(ValueError):
        pareto_front([0.1], [])


# ------------------------------------------------------------------------------------ model config files

def test_config_file_round_trip(tmp_path, space):
    path = save_config(CONFIGS[DEMO], tmp_path / "demo.json")
    assert load_config(path) == CONFIGS[DEMO]
    assert get_config(str(path)) == CONFIGS[DEMO] and get_config(DEMO) is CONFIGS[DEMO]
    assert count_parameters(create_model(str(path), 10)) == count_parameters(create_model(DEMO, 10))
    # a searched candidate, as the runner will write it, with provenance in "info"
    c = space.samples(1, seed=5)[0]
    best = save_config(c.to_config(), tmp_path / "search" / "best.json", info={"id": c.id, "reward": 0.9})
    assert json.loads(best.read_text())["info"] == {"id": c.id, "reward": 0.9}
    m = create_model(best, num_classes=10)  # a Path works too
    assert m.config == c.to_config() and count_parameters(m) == expected_params(c.to_config(), 10)
    # the same architecture written with multipliers has the same id as its explicit table
    b1 = load_config(save_config(CONFIGS["efficientnetv2-b1"], tmp_path / "b1.json"))
    assert b1.depth == 1.1 and architecture_id(b1) == SearchSpace.around(b1).backbone_candidate().id
    save_config(CONFIGS["efficientnetv2-s"], path)  # overwritten in place, no temporary file left behind
    assert load_config(path).name == "efficientnetv2-s"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b1.json", "demo.json", "search"]


def _bad(doc: dict, **changes) -> dict:
    return {**doc, **changes}


def _stage(doc: dict, i: int, **changes) -> dict:
    stages = [dict(s) for s in doc["stages"]]
    stages[i].update(changes)
    return {**doc, "stages": stages}


@pytest.mark.parametrize("make,field,problem", [
    (lambda d: "{not json", None, "not valid JSON"),
    (lambda d: [d], None, "JSON object at the top level"),
    (lambda d: _bad(d, widht=1.0), "'widht'", "unknown field"),
    (lambda d: {k: v for k, v in d.items() if k != "eval_size"}, "'eval_size'", "missing field"),
    (lambda d: _bad(d, train_size="48"), "train_size", "positive int"),
    (lambda d: _bad(d, eval_size=0), "eval_size", "positive int"),
    (lambda d: _bad(d, width=-1.0), "width", "positive number"),
    (lambda d: _bad(d, dropout=1.5), "dropout", r"\[0, 1\)"),
    (lambda d: _bad(d, official="no"), "official", "true or false"),
    (lambda d: _bad(d, stages=[]), "stages", "non-empty list"),
    (lambda d: _stage(d, 2, kernal=3), r"stages\[2\]", "unknown field"),
    (lambda d: _stage(d, 1, kernel="3"), r"stages\[1\]: kernel", "positive int"),
    (lambda d: _stage(d, 1, kernel=4), r"stages\[1\]: kernel", "odd"),
    (lambda d: _stage(d, 3, repeats=0), r"stages\[3\]: repeats", "positive int"),
    (lambda d: _stage(d, 0, block="conv"), r"stages\[0\]: block", "'fused' or 'mbconv'"),
    (lambda d: _stage(d, 0, se=0.25), r"stages\[0\]", "fused block has no squeeze-excitation"),
    (lambda d: _stage(d, 2, in_ch=40), r"stages\[1\].out_ch = 32 but stages\[2\].in_ch = 40", "do not chain"),
])
def test_bad_config_file_gives_one_clear_error(tmp_path, make, field, problem):
    doc = make(config_to_dict(CONFIGS[DEMO]))
    path = tmp_path / "bad.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(ConfigFileError) as e:
        create_model(str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and re.search(problem, msg), msg
    if field:
        assert re.search(field, msg), msg


def test_unknown_model_or_missing_file():
    with pytest.raises(ValueError, match="unknown model 'efficientnetv2-q'.*or the path of a model config file"):
        get_config("efficientnetv2-q")
    with pytest.raises(ConfigFileError, match=r"runs/nowhere/best\.json: no such model config file"):
        create_model("runs/nowhere/best.json")


# ------------------------------------------------------------------------------------------------ scaling

def test_scaling_grows_params_and_flops_and_caps_the_size(tmp_path):
    base = CONFIGS[DEMO]
    x0 = scale_config(base, 0)
    assert architecture_id(x0) == architecture_id(base) and (x0.train_size, x0.eval_size) == (28, 28)
    family = scale_family(base, (1, 2, 3, 4), num_classes=10, max_size=40)
    assert [m.config.name for m in family] == [f"{DEMO}-x{i}" for i in (1, 2, 3, 4)]
    params = [count_parameters(meta_build(base))] + [m.params for m in family]
    flops = [count_flops(meta_build(base), 28)] + [m.flops for m in family]
    assert all(a < b for a, b in zip(params, params[1:])), params
    assert all(a < b for a, b in zip(flops, flops[1:])), flops
    sizes = [(m.config.train_size, m.config.eval_size) for m in family]
    assert sizes[0] == (32, 32) and sizes[-1] == (40, 40)  # 28 * 1.15^phi, rounded to 4, capped at 40
    assert all(t <= e <= 40 and e % 4 == 0 for t, e in sizes)
    x1 = family[0]
    m = create_model(load_config(save_config(x1.config, tmp_path / "x1.json")), 10)  # built for real
    assert count_parameters(m) == x1.params == expected_params(x1.config, 10)
    assert x1.config.dropout == pytest.approx(0.2) and family[-1].config.dropout == 0.5


def test_scaling_adds_layers_to_the_last_two_stages():
    s = CONFIGS["efficientnetv2-s"]
    plain = scale_config(s, 2, coeffs=Compound(late_depth=1.0))
    late = scale_config(s, 2)
    assert [a.repeats for a in plain.stages[:4]] == [b.repeats for b in late.stages[:4]]
    assert all(b.repeats > a.repeats for a, b in zip(plain.stages[4:], late.stages[4:]))
    assert [a.out_ch for a in plain.stages] == [b.out_ch for b in late.stages]
    assert late.eval_size == 480 and late.train_size == 376  # 384 * 1.15^2 = 508 -> capped; train 300/384 of it
    assert "MBConv6 k3x3 SE0.25" in stage_table(late) and str(late.stages[-1].repeats) in stage_table(late)
