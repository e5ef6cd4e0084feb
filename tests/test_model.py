"""effnetv2.model: exact official architectures, regularisation knobs, TF padding, weights, FLOPs, speed paths."""

from __future__ import annotations

import json
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effnetv2.model import (
    CONFIGS,
    count_flops,
    count_parameters,
    create_model,
    list_models,
    load_weights,
)
from effnetv2.model.blocks import SameConv2d, SqueezeExcite, StochasticDepth, same_padding
from effnetv2.model.make_timm_manifest import MANIFEST
from effnetv2.model.weights import from_timm

OFFICIAL = {  # the official release (= timm tf_efficientnetv2_*): trainable parameters at 1000 classes, number of blocks
    "efficientnetv2-b0": (7_139_704, 21),
    "efficientnetv2-b1": (8_141_052, 27),
    "efficientnetv2-b2": (10_096_086, 28),
    "efficientnetv2-b3": (14_358_406, 32),
    "efficientnetv2-s": (21_458_488, 40),
    "efficientnetv2-m": (54_139_356, 57),
    "efficientnetv2-l": (118_515_272, 79),
    "efficientnetv2-xl": (208_119_808, 100),
}
SIZES = {  # the official release: train size, eval size, dropout
    "efficientnetv2-b0": (192, 224, 0.2), "efficientnetv2-b1": (192, 240, 0.2),
    "efficientnetv2-b2": (208, 260, 0.3), "efficientnetv2-b3": (240, 300, 0.3),
    "efficientnetv2-s": (300, 384, 0.2), "efficientnetv2-m": (384, 480, 0.3),
    "efficientnetv2-l": (384, 480, 0.4), "efficientnetv2-xl": (384, 512, 0.4),
}
DEMO = "efficientnetv2-demo"


def meta_model(name: str, **kw) -> nn.Module:
    """Shapes only: the big models cost nothing to build on the meta device."""
    with torch.device("meta"):
        return create_model(name, **kw)


def image(b: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- architecture

@pytest.mark.parametrize("name", list(OFFICIAL))
def test_parameter_count_is_official(name):
    m = meta_model(name)
    params, blocks = OFFICIAL[name]
    assert count_parameters(m) == params
    assert len(m.blocks()) == blocks


@pytest.mark.parametrize("num_classes", [10, 21_843])
def test_parameter_count_for_any_head(num_classes):
    for name, (params, _) in OFFICIAL.items():
        m = meta_model(name, num_classes=num_classes)
        head = m.num_features
        assert head == {"efficientnetv2-b2": 1408, "efficientnetv2-b3": 1536}.get(name, 1280)
        assert count_parameters(m) == params - 1000 * (head + 1) + num_classes * (head + 1)


def test_names_configs_and_defaults():
    assert list_models() == [*OFFICIAL, DEMO, f"{DEMO}-base"]  # the demo and the backbone its search started from
    for name, (train, evaluate, dropout) in SIZES.items():
        c = CONFIGS[name]
        assert (c.train_size, c.eval_size, c.dropout, c.official) == (train, evaluate, dropout, True)
        assert meta_model(name).dropout.p == dropout
    demo = CONFIGS[DEMO]
    assert not demo.official and demo.train_size == demo.eval_size == 28  # Fashion-MNIST at its native size
    base = CONFIGS[f"{DEMO}-base"]
    assert not base.official and [(s.in_ch, s.out_ch, s.stride) for s in base.stages] == [
        (s.in_ch, s.out_ch, s.stride) for s in demo.stages]  # the search kept the backbone's widths and strides
    m = create_model(DEMO, num_classes=10)
    assert 300_000 <= count_parameters(m) <= 1_500_000
    assert {type(b).__name__ for b in m.blocks()} == {"FusedMBConv", "MBConv"}


def test_forward_shapes_all_models_on_meta():
    for name in OFFICIAL:
        m = meta_model(name, num_classes=7)
        x = torch.empty(2, 3, 64, 64, device="meta")
        assert m(x).shape == (2, 7)
        assert m.forward_features(x).shape == (2, m.num_features, 2, 2)  # stride 32


@pytest.mark.parametrize("name,size", [("efficientnetv2-b0", 64), ("efficientnetv2-s", 64), (DEMO, 32)])
def test_forward_real(name, size):
    m = create_model(name, num_classes=5).eval()
    x = image(2, size)
    with torch.no_grad():
        feats = m.forward_features(x)
        logits = m(x)
    stride = 32 if name != DEMO else 16  # the demo has three stride-2 stages after its stride-2 stem
    assert feats.shape == (2, m.num_features, size // stride, size // stride)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    assert torch.equal(logits, m.forward_head(feats))
    assert not torch.allclose(logits[0], logits[1])  # the two images are told apart


def test_layer_settings_and_init():
    m = create_model("efficientnetv2-b0", bn_momentum=0.01)
    bns = [x for x in m.modules() if isinstance(x, nn.BatchNorm2d)]
    assert all(b.eps == 1e-3 and b.momentum == 0.01 for b in bns)
    assert create_model(DEMO).stem.bn.momentum == 0.1  # official TF decay 0.9 by default
    assert all(b.weight.eq(1).all() and b.bias.eq(0).all() for b in bns)
    m.eval()
    x = image(1, 32)
    with torch.no_grad():  # conv -> BN -> SiLU
        assert torch.allclose(m.stem(x), F.silu(m.stem.bn(m.stem.conv(x))))
    # conv normal(0, sqrt(2 / fan_out)), fan_out = k*k*out/groups (TF's depthwise kernel has one output)
    head = m.head.conv.weight  # 1x1, 192 -> 1280: fan_out 1280
    assert head.std().item() == pytest.approx(math.sqrt(2 / 1280), rel=0.02)
    dw = m.stages[5][0].dw.conv  # depthwise 3x3: fan_out 9
    assert dw.weight.std().item() == pytest.approx(math.sqrt(2 / 9), rel=0.05)
    w = m.classifier.weight
    assert w.abs().max().item() <= 1 / math.sqrt(1000) and w.abs().max().item() > 0.9 / math.sqrt(1000)
    assert m.classifier.bias.eq(0).all()


def test_squeeze_width_uses_block_input_channels():
    m = create_model("efficientnetv2-b0")
    first, second = m.stages[3][0], m.stages[3][1]  # 48 -> 96, expansion 4
    assert first.se.reduce.out_channels == 12 and first.se.reduce.in_channels == 192
    assert second.se.reduce.out_channels == 24 and second.se.reduce.in_channels == 384
    assert not any(isinstance(x, SqueezeExcite) for x in m.stages[:3].modules())  # fused: no SE


# ---------------------------------------------------------------------------------- regularisation knobs

def test_set_dropout_changes_the_head_dropout():
    m = create_model(DEMO, num_classes=4).train()
    seen = []
    m.classifier.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    x = image(64, 32)
    m.set_dropout(0.5)
    m(x)
    zero_frac = (seen[-1] == 0).float().mean().item()
    assert 0.4 < zero_frac < 0.6
    m.set_dropout(0.0)
    m(x)
    assert (seen[-1] == 0).float().mean().item() < 0.05
    with pytest.raises(ValueError, match="dropout"):
        m.set_dropout(1.0)


def test_reset_classifier_keeps_features():
    m = create_model(DEMO, num_classes=10).eval()
    x = image(2, 32)
    with torch.no_grad():
        before = m.forward_features(x)
        m.reset_classifier(3)
        assert m(x).shape == (2, 3) and m.num_classes == 3
        assert torch.equal(m.forward_features(x), before)
    assert m.classifier.weight.abs().max().item() <= 1 / math.sqrt(3)
    with pytest.raises(ValueError, match="num_classes"):
        m.reset_classifier(0)


@pytest.mark.parametrize("rate", [0.2, 0.5])
def test_drop_path_linear_rule(rate):
    m = meta_model("efficientnetv2-s", drop_path_rate=rate)
    blocks = m.blocks()
    n = len(blocks)
    for i, b in enumerate(blocks):
        expected = rate * i / n if b.has_skip else 0.0
        assert b.drop_path.p == pytest.approx(expected), i
    # residual exactly where stride 1 and in == out: the first block of each stage but the first has none
    starts = {sum(len(s) for s in m.stages[:k]) for k in range(1, len(m.stages))}
    assert [i for i, b in enumerate(blocks) if not b.has_skip] == sorted(starts)


def test_stochastic_depth_drops_whole_samples_and_rescales():
    sd = StochasticDepth(0.25).train()
    torch.manual_seed(0)
    y = sd(torch.ones(20_000, 2, 3, 3))
    per_sample = y.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1)).all()  # whole samples, scaled 1/p
    kept = (per_sample[:, 0] > 0).float().mean().item()
    assert kept == pytest.approx(0.75, abs=0.015)
    sd.eval()
    x = torch.randn(4, 2, 3, 3)
    assert sd(x) is x


def test_train_mode_is_random_only_through_regularisation():
    x = image(8, 32)
    m = create_model(DEMO, num_classes=10, drop_path_rate=0.5, drop_rate=0.0).train()
    assert not torch.equal(m(x), m(x))  # stochastic depth
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(x), m(x))
    quiet = create_model(DEMO, num_classes=10, drop_path_rate=0.0, drop_rate=0.0).train()
    assert torch.equal(quiet(x), quiet(x))  # BN batch statistics alone are deterministic


# ------------------------------------------------------------------------------------------- TF padding

def test_same_padding_arithmetic():
    assert same_padding(8, 3, 2) == (0, 1)  # even: the extra pixel goes after
    assert same_padding(7, 3, 2) == (1, 1)
    assert same_padding(8, 3, 1) == (1, 1)
    assert same_padding(9, 1, 2) == (0, 0)
    conv = SameConv2d(3, 4, 3, 2)
    for size in (7, 8, 15, 16):
        x = torch.randn(1, 3, size, size + 1)
        y = conv(x)
        assert y.shape[-2:] == (math.ceil(size / 2), math.ceil((size + 1) / 2))
    x = torch.randn(1, 3, 8, 8)
    assert torch.allclose(conv(x), F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, stride=2))


def test_tf_padding_equals_symmetric_only_on_odd_sizes():
    tf = create_model("efficientnetv2-b0", tf_padding=True, num_classes=10).eval()
    plain = create_model("efficientnetv2-b0", num_classes=10).eval()
    plain.load_state_dict(tf.state_dict())
    with torch.no_grad():
        odd = image(1, 33)  # 33 -> 17 -> 9 -> 5 -> 3: every stride-2 layer sees an odd size
        assert torch.allclose(tf(odd), plain(odd), atol=1e-5)
        even = image(1, 32)
        assert tf(even).shape == plain(even).shape
        assert not torch.allclose(tf(even), plain(even), atol=1e-3)


# -------------------------------------------------------------------------------------------- bad input

def test_bad_input_errors():
    with pytest.raises(ValueError, match="unknown model 'efficientnetv2-q'.*efficientnetv2-b0.*efficientnetv2-demo"):
        create_model("efficientnetv2-q")
    with pytest.raises(ValueError, match="num_classes"):
        create_model(DEMO, num_classes=0)
    m = create_model(DEMO)
    for bad in (torch.randn(3, 32, 32), torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.randn(1, 1, 32, 32)):
        with pytest.raises(ValueError, match=r"float image batch of shape \(B, 3, H, W\)"):
            m(bad)


# ----------------------------------------------------------------------------------------------- weights

def _manifest() -> dict:
    doc = json.loads(MANIFEST.read_text())
    assert MANIFEST.stat().st_size < 1_000_000
    return doc["models"]


def test_manifest_covers_all_official_models():
    assert {m["ours"] for m in _manifest().values()} == set(OFFICIAL)


@pytest.mark.parametrize("timm_name", [f"tf_efficientnetv2_{s}" for s in ("b0", "b1", "b2", "b3", "s", "m", "l", "xl")])
def test_timm_names_map_onto_ours_with_shapes(timm_name):
    entry = _manifest()[timm_name]
    model = meta_model(entry["ours"])
    fake = {k: torch.empty(shape, device="meta") for k, shape in entry["keys"].items()}
    mapped, unplaced = from_timm(fake, model)
    assert unplaced == []
    own = model.state_dict()
    assert set(mapped) == set(own)  # every timm tensor has a place and every one of ours is filled
    assert all(mapped[k].shape == own[k].shape for k in own)


def _timm_state_from_manifest(timm_name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in _manifest()[timm_name]["keys"].items():
        out[k] = torch.tensor(7) if k.endswith("num_batches_tracked") else torch.randn(shape, generator=g)
    return out


def test_load_timm_layout_places_every_tensor():
    state = _timm_state_from_manifest("tf_efficientnetv2_b0")
    m = create_model("efficientnetv2-b0", tf_padding=True)
    load_weights(m, state)
    own = m.state_dict()
    assert torch.equal(own["stem.conv.weight"], state["conv_stem.weight"])
    assert torch.equal(own["stages.0.0.fused.conv.weight"], state["blocks.0.0.conv.weight"])
    assert torch.equal(own["stages.1.1.project.bn.running_var"], state["blocks.1.1.bn2.running_var"])
    assert torch.equal(own["stages.3.2.dw.conv.weight"], state["blocks.3.2.conv_dw.weight"])
    assert torch.equal(own["stages.5.7.se.expand.bias"], state["blocks.5.7.se.conv_expand.bias"])
    assert torch.equal(own["head.bn.weight"], state["bn2.weight"])
    assert torch.equal(own["classifier.weight"], state["classifier.weight"])
    # every value arrived: the multiset of numbers is the same
    total = lambda d: sum(v.double().sum().item() for k, v in d.items() if "num_batches" not in k)  # noqa: E731
    assert total(own) == pytest.approx(total(state))


@pytest.mark.parametrize("fmt", ["dict", "pth", "safetensors", "wrapped"])
def test_load_own_layout_roundtrip(tmp_path, fmt):
    src = create_model(DEMO, num_classes=10).eval()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.01)
    state = src.state_dict()
    if fmt == "dict":
        source = state
    elif fmt == "pth":
        source = tmp_path / "w.pth"
        torch.save(state, source)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        source = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(source))
    else:  # a checkpoint of a DDP-wrapped, compiled model
        source = {"model": {f"module._orig_mod.{k}": v for k, v in state.items()}, "epoch": 3}
    dst = create_model(DEMO, num_classes=10).eval()
    load_weights(dst, source)
    x = image(2, 32)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))


def test_load_errors_name_the_problem(tmp_path):
    m = create_model(DEMO, num_classes=10)
    good = m.state_dict()
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_weights(m, tmp_path / "nope.pth")
    (tmp_path / "w.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"w.txt.*unknown file type"):
        load_weights(m, tmp_path / "w.txt")
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"junk.pth: cannot read weights"):
        load_weights(m, tmp_path / "junk.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"list.pth: holds a list"):
        load_weights(m, tmp_path / "list.pth")

    broken = dict(good)
    del broken["stages.3.1.project.conv.weight"]
    broken["stages.9.0.extra.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError) as e:
        load_weights(m, tmp_path / "broken.pth")
    msg = str(e.value)
    assert "broken.pth" in msg and "efficientnetv2-demo" in msg
    assert "missing (1): stages.3.1.project.conv.weight" in msg
    assert "unexpected (1): stages.9.0.extra.weight" in msg

    other = create_model("efficientnetv2-b0")  # a different architecture
    with pytest.raises(ValueError, match=r"shape mismatch .*stem.conv.weight \(32, 3, 3, 3\) vs model \(16, 3, 3, 3\)"):
        load_weights(m, other.state_dict())

    m.train()
    bad_value = dict(good)
    bad_value["stem.bn.weight"] = "oops"
    with pytest.raises(ValueError, match="not tensors: stem.bn.weight"):
        load_weights(m, bad_value)


def test_new_head_is_the_only_way_past_a_classifier_of_another_size():
    state = _timm_state_from_manifest("tf_efficientnetv2_b0")
    state["classifier.weight"] = torch.randn(21_843, 1280)  # an ImageNet-21k head
    state["classifier.bias"] = torch.randn(21_843)
    m = create_model("efficientnetv2-b0", num_classes=10, tf_padding=True)
    with pytest.raises(ValueError, match=r"classifier.weight \(21843, 1280\) vs model \(10, 1280\).*new_head=True"):
        load_weights(m, state)
    with pytest.warns(UserWarning, match=r"skipped classifier.weight \(21843, 1280\).*re-initialised for 10 classes"):
        load_weights(m, state, new_head=True)
    assert torch.equal(m.stem.conv.weight, state["conv_stem.weight"])
    assert m.classifier.weight.shape == (10, 1280) and m.classifier.bias.eq(0).all()
    assert m.classifier.weight.abs().max().item() <= 1 / math.sqrt(10)
    with warnings.catch_warnings():  # without new_head a matching head loads silently
        warnings.simplefilter("error")
        load_weights(create_model("efficientnetv2-b0", tf_padding=True), _timm_state_from_manifest("tf_efficientnetv2_b0"))


# ------------------------------------------------------------------------------------------------ FLOPs

def test_count_flops_counts_convs_and_classifier():
    m = create_model(DEMO, num_classes=10).eval()
    macs = 0

    def hook(mod, inp, out):
        nonlocal macs
        if isinstance(mod, nn.Conv2d):
            macs += out.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, nn.Linear):
            macs += out.numel() * mod.in_features

    handles = [x.register_forward_hook(hook) for x in m.modules() if isinstance(x, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        m(image(1, 40))
    for h in handles:
        h.remove()
    assert count_flops(m, 40) == macs
    assert not m.training
    m.train()
    assert count_flops(m, (40, 40)) == macs and m.training  # the mode is restored
    # spatial work grows with the pixel count (4x from 32 to 64 px, where every stride divides evenly);
    # only the SE and classifier layers, on pooled features, do not grow
    assert 3.9 < count_flops(m, 64) / count_flops(m, 32) < 4


def test_flops_of_s_at_384_is_the_papers():
    flops = count_flops(meta_model("efficientnetv2-s"), 384)
    assert flops == pytest.approx(8.4e9, rel=0.03)  # paper Table 7: 8.8B (TF profiler), 8.4G multiply-adds


# --------------------------------------------------------------------------------------------- speed paths

def test_channels_last_and_bf16_autocast_forward_backward():
    torch.manual_seed(0)
    m = create_model(DEMO, num_classes=10, drop_path_rate=0.0, drop_rate=0.0).to(memory_format=torch.channels_last)
    x = image(4, 32).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 2, 3])
    ref = m(x.contiguous())
    out = m(x)
    assert torch.allclose(out, ref, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = m(x)
        F.cross_entropy(low, y).backward()
    assert low.dtype == torch.bfloat16
    assert torch.allclose(low.float(), ref, atol=0.1 * ref.abs().max().item())
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert m.stem.conv.weight.grad.abs().sum() > 0


def test_no_graph_breaks_and_no_host_sync():
    import torch._dynamo

    torch._dynamo.reset()
    m = create_model(DEMO, num_classes=10, drop_path_rate=0.3, tf_padding=True).train()
    x = image(4, 32)
    explained = torch._dynamo.explain(m)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    # fullgraph: any graph break (e.g. a .item() host sync) raises; aot_eager traces the backward too
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    F.cross_entropy(out, torch.arange(4)).backward()
    assert m.stem.conv.weight.grad is not None and torch.isfinite(m.stem.conv.weight.grad).all()
    torch._dynamo.reset()


@pytest.mark.gpu
def test_gpu_compile_bf16_without_host_sync():
    m = create_model("efficientnetv2-b0", num_classes=10).cuda().to(memory_format=torch.channels_last).train()
    x = torch.randn(8, 3, 128, 128, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.arange(8, device="cuda")
    compiled = torch.compile(m, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        F.cross_entropy(compiled(x), y).backward()  # compile outside the sync check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for model in (m, compiled):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                F.cross_entropy(model(x), y).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(m.stem.conv.weight.grad).all()


def test_module_names_read_like_the_blocks():
    names = [n for n, _ in create_model("efficientnetv2-b0").named_parameters()]
    assert names[0] == "stem.conv.weight" and names[-1] == "classifier.bias"
    assert any(re.fullmatch(r"stages\.3\.0\.se\.reduce\.weight", n) for n in names)
