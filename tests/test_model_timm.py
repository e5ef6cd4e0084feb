"""Exact equivalence with timm's tf_efficientnetv2_* for the same weights. timm is not a project
dependency: this runs only where it is installed (the name mapping itself is always checked against the
committed manifest in test_model.py)."""

from __future__ import annotations

import pytest
import torch

from effnetv2.model import create_model, load_weights
from effnetv2.model.make_timm_manifest import randomise, timm_name

timm = pytest.importorskip("timm", reason="timm is not installed (optional; only for the equivalence check)")


@pytest.mark.parametrize("name", ["efficientnetv2-b0", "efficientnetv2-s"])
def test_outputs_equal_timm_for_the_same_weights(name):
    torch.manual_seed(0)
    ref = timm.create_model(timm_name(name), pretrained=False, num_classes=10).eval()
    randomise(ref)
    ours = create_model(name, num_classes=10, tf_padding=True).eval()
    load_weights(ours, ref.state_dict())
    plain = create_model(name, num_classes=10).eval()  # symmetric padding: must differ on even sizes
    plain.load_state_dict(ours.state_dict())
    for size in (64, 65):  # even sizes need TF's asymmetric padding, odd ones do not
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            want, got, sym = ref(x), ours(x), plain(x)
        assert (got - want).abs().max().item() <= 1e-4
        assert ((sym - want).abs().max().item() > 1e-3) == (size % 2 == 0)
