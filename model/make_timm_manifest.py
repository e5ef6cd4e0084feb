"""Tool (needs timm, not a project dependency): write the manifest of timm's ``tf_efficientnetv2_*`` key
names and shapes, and check that our models reproduce timm's outputs for the same weights.

The tests cannot download the official checkpoints; the manifest lets them check that our name mapping
places every timm tensor with the right shape. Run in an environment that has timm, with this checkout
importable as ``effnetv2`` (e.g. a symlink ``/tmp/effpkg/effnetv2 -> <checkout>`` and
``PYTHONPATH=/tmp/effpkg``)::

    python -m effnetv2.model.make_timm_manifest            # rewrite model/manifests/timm_tf_efficientnetv2.json
    python -m effnetv2.model.make_timm_manifest --check    # max |ours - timm| for random weights, eval fp32
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from .efficientnetv2 import create_model, list_models
from .weights import load_weights

MANIFEST = Path(__file__).parent / "manifests" / "timm_tf_efficientnetv2.json"
OFFICIAL = [n for n in list_models() if n != "efficientnetv2-demo"]


def timm_name(ours: str) -> str:
    """``efficientnetv2-s`` -> ``tf_efficientnetv2_s``."""
    return "tf_" + ours.replace("-", "_")


def write_manifest(path: Path = MANIFEST) -> None:
    import timm

    models = {}
    for name in OFFICIAL:
        with torch.device("meta"):  # names and shapes only: no memory, no init
            state = timm.create_model(timm_name(name), pretrained=False).state_dict()
        models[timm_name(name)] = {"ours": name, "keys": {k: list(v.shape) for k, v in state.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"about": "key names and shapes of timm's tf_efficientnetv2_* state dicts; "
                    "written by effnetv2/model/make_timm_manifest.py",
           "timm": timm.__version__, "torch": torch.__version__, "models": models}
    path.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes, {sum(len(m['keys']) for m in models.values())} keys)")


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights AND BN statistics, so that a wrong mapping or padding cannot hide behind identity BN."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.copy_(0.6 + 0.4 * torch.rand(m.weight.shape, generator=g))
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


def check(names: list[str], sizes: list[int]) -> None:
    import timm

    torch.manual_seed(0)
    for name in names:
        ref = timm.create_model(timm_name(name), pretrained=False).eval()
        randomise(ref)
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / "w.pth"
            torch.save(ref.state_dict(), file)
            ours = create_model(name, tf_padding=True).eval()
            load_weights(ours, file)
        plain = create_model(name).eval()
        load_weights(plain, ref.state_dict())
        for size in sizes:
            x = torch.randn(2, 3, size, size)
            with torch.no_grad():
                want = ref(x)
                diff = (ours(x) - want).abs().max().item()
                plain_diff = (plain(x) - want).abs().max().item()
            print(f"{name} {size}px: max|ours(tf_padding) - timm| = {diff:.3g}  "
                  f"(symmetric padding: {plain_diff:.3g}; logits scale {want.abs().max().item():.3g})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare outputs instead of writing the manifest")
    parser.add_argument("--models", nargs="+", default=["efficientnetv2-b0", "efficientnetv2-s"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 225])
    args = parser.parse_args()
    if args.check:
        check(args.models, args.sizes)
    else:
        write_manifest()


if __name__ == "__main__":
    main()
