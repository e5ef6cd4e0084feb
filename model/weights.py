"""Loading weights: our own layout, or timm's ``tf_efficientnetv2_*`` ports of the official checkpoints.

Files are data, never code: ``.pth``/``.pt``/``.bin`` go through ``torch.load(weights_only=True)`` and
``.safetensors`` through safetensors. Every key must find its place and shape; otherwise the error names
the missing, unexpected and mismatched keys. Only the classifier may differ, and only when the caller asks
for a new head.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from .blocks import MBConv
from .efficientnetv2 import EfficientNetV2

# timm module name -> ours, at the top level and inside each kind of block.
_TIMM_TOP = {"conv_stem": "stem.conv", "bn1": "stem.bn", "conv_head": "head.conv", "bn2": "head.bn",
             "classifier": "classifier"}
_TIMM_FUSED_E1 = {"conv": "fused.conv", "bn1": "fused.bn"}  # timm ConvBnAct
_TIMM_FUSED = {"conv_exp": "fused.conv", "bn1": "fused.bn", "conv_pwl": "project.conv", "bn2": "project.bn"}
_TIMM_MBCONV = {"conv_pw": "expand.conv", "bn1": "expand.bn", "conv_dw": "dw.conv", "bn2": "dw.bn",
                "se.conv_reduce": "se.reduce", "se.conv_expand": "se.expand",
                "conv_pwl": "project.conv", "bn3": "project.bn"}
_HEAD_KEYS = ("classifier.weight", "classifier.bias")
_WRAPPERS = ("state_dict", "model")
_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
_SHOWN = 12


def timm_module_names(model: EfficientNetV2) -> dict[str, str]:
    """Map each of timm's module names (``blocks.3.0.conv_dw``) to ours (``stages.3.0.dw.conv``)."""
    ours = {name for name, _ in model.named_modules()}
    names = dict(_TIMM_TOP)
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage):
            if isinstance(block, MBConv):
                table = _TIMM_MBCONV
            else:
                table = _TIMM_FUSED if block.project is not None else _TIMM_FUSED_E1
            names.update({f"blocks.{i}.{j}.{t}": f"stages.{i}.{j}.{o}" for t, o in table.items()
                          if f"stages.{i}.{j}.{o}" in ours})
    return names


def from_timm(state: Mapping[str, torch.Tensor], model: EfficientNetV2) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a timm ``tf_efficientnetv2_*`` state dict to our layout; also returns the keys with no place."""
    names = timm_module_names(model)
    out, unplaced = {}, []
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        if module in names:
            out[f"{names[module]}.{leaf}"] = value
        else:
            unplaced.append(key)
    return out, unplaced


def read_state_dict(source: str | Path | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict from a mapping or a file, unwrapped from ``{"state_dict": ...}``/``{"model": ...}`` and
    stripped of DDP/compile prefixes."""
    if isinstance(source, Mapping):
        state = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such weights file")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path), device="cpu")
            elif path.suffix in (".pth", ".pt", ".bin"):
                state = torch.load(path, map_location="cpu", weights_only=True)
            else:
                raise ValueError(f"unknown file type {path.suffix!r}; use .pth, .pt, .bin or .safetensors")
        except Exception as e:
            raise ValueError(f"{path}: cannot read weights: {e}") from e
        if not isinstance(state, Mapping):
            raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict")
    for wrapper in _WRAPPERS:
        if wrapper in state and isinstance(state[wrapper], Mapping):
            state = dict(state[wrapper])
            break
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{_describe(source)}: not a state dict, these entries are not tensors: {_list(bad)}")
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise ValueError(f"{_describe(source)}: holds NaN or infinite values in {_list(nonfinite)}; "
                         f"refusing to load weights a diverged run left behind")
    return state


def load_weights(model: EfficientNetV2, source: str | Path | Mapping[str, torch.Tensor], *,
                 new_head: bool = False) -> None:
    """Load weights in our layout or timm's ``tf_efficientnetv2_*`` layout into ``model``, in place.

    Every model tensor must be present with the same shape (BN ``num_batches_tracked`` may be absent) and
    every file tensor must have a place, else a ValueError names the offending keys. With
    ``new_head=True`` the file's classifier is skipped (with a warning saying so) and the model's is
    re-initialised for ``model.num_classes``: the way to fine-tune a 21k checkpoint on another label set.
    Load official weights into a model built with ``tf_padding=True`` to reproduce their outputs.
    """
    state = read_state_dict(source)
    layout = "timm" if "conv_stem.weight" in state else "ours"
    unexpected: list[str] = []
    if layout == "timm":
        state, unexpected = from_timm(state, model)
    own = model.state_dict()
    if new_head:
        skipped = [f"{k} {tuple(state.pop(k).shape)}" for k in _HEAD_KEYS if k in state]
        if skipped:
            warnings.warn(f"{_describe(source)}: skipped {', '.join(skipped)}; the classifier is "
                          f"re-initialised for {model.num_classes} classes", stacklevel=2)
    unexpected += [k for k in state if k not in own]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")
               and not (new_head and k in _HEAD_KEYS)]
    mismatched = [f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and v.shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = [f"{what} ({len(keys)}): {_list(keys)}" for what, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if keys]
        hint = ""
        if not new_head and any(m.startswith("classifier.") for m in mismatched):
            hint = "; the classifier differs in size: pass new_head=True to re-initialise it"
        raise ValueError(f"{_describe(source)} ({layout} layout) does not fit {model.config.name}: "
                         + "; ".join(parts) + hint)
    model.load_state_dict(state, strict=False)
    if new_head:
        model.reset_classifier(model.num_classes)


def _describe(source: object) -> str:
    return "state dict" if isinstance(source, Mapping) else str(source)


def _list(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f", ... and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")

