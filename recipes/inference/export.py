"""Export a trained EfficientNetV2 to what other tools load: timm, safetensors, ONNX, TorchScript.

Every export is two files: the model file and ``<file>.json`` beside it (:func:`sidecar_path`) with what it
takes to feed the model: class names, preprocessing (size, crop ratio, mean/std, RGB), the architecture and
its config. Both are written atomically (temp name, fsync, rename; the JSON last), so a crash never leaves a
half-written file under a real name. The caller's model is left as it was: a copy is exported, in fp32 on
the CPU, in eval mode.

- ``timm``: safetensors in timm's ``tf_efficientnetv2_*`` layout, the inverse of the name mapping that
  ``load_weights`` reads (:func:`effnetv2.model.weights.timm_module_names`), checked against the committed
  manifest of timm's names and shapes. Official architectures only: timm has no model of any other shape.
  A model trained with ``tf_padding=False`` (the trainer's default) loads into the same timm model with
  ``pad_type=""``, which pads symmetrically as we do; timm's plain ``efficientnetv2_*`` names are no
  alternative (no B0-B3, BN eps 1e-5, no pretrained config). The JSON's ``timm`` entry is the
  ``timm.create_model`` call: name, ``num_classes``, and a ``pretrained_cfg_overlay`` that holds the file,
  the class names and our preprocessing.
- ``safetensors``: our own layout, for :func:`effnetv2.model.load_weights`.
- ``onnx``: torch's ``torch.export``-based exporter (its default since torch 2.9; needs ``onnx`` and
  ``onnxscript``), opset 18, dynamic batch, H x W fixed at the export size. Input ``images`` (B, 3, S, S)
  normalised float32, output ``logits`` (B, classes); the JSON is also stored in the model's metadata.
- ``torchscript``: traced, not scripted. ``torch.jit.script`` cannot compile the model (its input check
  formats the shape into its error message), and a trace records exactly the eval graph. A trace bakes the
  TF "SAME" padding amounts of the export size into the graph, so a ``tf_padding`` model is wrapped in a
  scripted guard that rejects other sizes instead of padding them wrongly; a symmetric-padding export takes
  any batch and size. The JSON is also stored in the archive (``extra_files``, ``effnetv2.json``).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import effnetv2
from effnetv2.model import CONFIGS, EfficientNetV2, ModelConfig
from effnetv2.model.config_file import config_to_dict
from effnetv2.model.make_timm_manifest import MANIFEST, timm_name
from effnetv2.model.weights import timm_module_names
from effnetv2.pipeline.format import atomic
from effnetv2.pipeline.loaders.geometry import eval_crop_ratio

FORMATS = ("timm", "safetensors", "onnx", "torchscript")
SIDECAR_FORMAT = "effnetv2-export/1"
ONNX_OPSET = 18  # the lowest the torch.export-based exporter writes; onnxruntime runs it since 1.14
INPUT_NAME, OUTPUT_NAME = "images", "logits"
TORCHSCRIPT_EXTRA = "effnetv2.json"
# The loaders feed the network (u8 - 128) / 128 on RGB (effnetv2.pipeline.loaders.loader). On 0..1 inputs,
# the way timm and most tools state it, that is (x - mean) / std with mean = std = 128/255.
PIXEL_MEAN = PIXEL_STD = 128 / 255
_TIMM_BN_EPS = 1e-3  # what timm's tf_efficientnetv2_* build by default (TF's BN epsilon)


class ExportError(ValueError):
    """An export that cannot be made; the message names the file or the model and the problem."""


@dataclass(frozen=True)
class ExportMeta:
    """What travels with the weights. ``image_size=None`` is the model's official eval size and
    ``crop_ratio=None`` the official eval crop for that size, the loaders' own rule."""

    classes: Sequence[str] | None = None  # name of class i at position i
    image_size: int | None = None
    crop_ratio: float | None = None
    source: str | None = None  # provenance, e.g. "runs/s/ckpt-5000.pt (ema)"


@dataclass(frozen=True)
class Exported:
    """What :func:`export_model` wrote: the model file, its JSON, and the JSON's content."""

    path: Path
    sidecar: Path
    info: dict[str, Any]

    @property
    def files(self) -> list[Path]:
        return [self.path, self.sidecar]

    def describe(self) -> str:
        """A few lines for a person: the files, the preprocessing, and for timm the call that loads it."""
        p = self.info["preprocess"]
        lines = [f"wrote {self.path} ({self.info['export']}, {self.info['architecture']}, "
                 f"{self.info['num_classes']} classes) and {self.sidecar.name}",
                 f"preprocess: RGB, centre crop {p['crop_ratio']:.4g} of the shorter side "
                 f"({'whole image' if p['crop_ratio'] >= 1 else 'square'}), {p['interpolation']} resize to "
                 f"{p['image_size']}x{p['image_size']}, (x/255 - {p['mean'][0]:.5f}) / {p['std'][0]:.5f} "
                 f"= (u8 - 128) / 128"]
        if "timm" in self.info:
            t = self.info["timm"]
            kwargs = {**t["create_model"], "pretrained_cfg_overlay": {
                **t["create_model"]["pretrained_cfg_overlay"], "file": str(self.path.resolve())}}
            args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
            lines.append(f"timm: timm.create_model({t['model_name']!r}, {args})")
        return "\n".join(lines)


def sidecar_path(out: str | os.PathLike) -> Path:
    """The JSON that goes with an export: ``model.onnx`` -> ``model.onnx.json``."""
    out = Path(out)
    return out.with_name(out.name + ".json")


def export_model(model: EfficientNetV2, fmt: str, out: str | os.PathLike, *,
                 meta: ExportMeta | None = None) -> Exported:
    """Write ``model`` as ``fmt`` (one of :data:`FORMATS`) to ``out``, and its JSON beside it.

    Everything that can be refused is refused before any file is touched (format, architecture, suffix,
    class names, preprocessing, a path that cannot be written) with an :class:`ExportError`.
    """
    meta = meta or ExportMeta()
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    if not isinstance(model, EfficientNetV2):
        raise ExportError(f"export takes an EfficientNetV2, got {type(model).__name__} "
                          "(unwrap DistributedDataParallel or torch.compile first: .module / ._orig_mod)")
    out = Path(out)
    if fmt in ("timm", "safetensors") and out.suffix != ".safetensors":
        raise ExportError(f"{out}: a {fmt} export must be named *.safetensors: timm and load_weights "
                          "choose their reader by the suffix")
    info = export_info(model, fmt, out, meta)
    if fmt == "onnx":
        _need("onnx", "onnxscript", why="ONNX export (torch's exporter)")
    sidecar = sidecar_path(out)
    for path in (out, sidecar):
        _check_writable(path)
    net = copy.deepcopy(model).to("cpu", torch.float32).eval()
    writer: Callable[[EfficientNetV2, Path, dict[str, Any]], None] = {
        "timm": _write_timm, "safetensors": _write_safetensors, "onnx": _write_onnx,
        "torchscript": _write_torchscript}[fmt]
    _write_atomically(out, lambda tmp: writer(net, tmp, info))
    text = json.dumps(info, indent=1) + "\n"
    _write_atomically(sidecar, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return Exported(out, sidecar, info)


def export_info(model: EfficientNetV2, fmt: str, out: Path, meta: ExportMeta) -> dict[str, Any]:
    """The JSON written beside an export (checks the metadata and, for timm, the architecture)."""
    n = model.num_classes
    if meta.classes is not None and len(meta.classes) != n:
        raise ExportError(f"{len(meta.classes)} class names for a model with {n} classes")
    size = model.config.eval_size if meta.image_size is None else meta.image_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ExportError(f"image_size must be a positive int, got {size!r}")
    try:
        ratio = eval_crop_ratio(size, meta.crop_ratio)
    except ValueError as e:
        raise ExportError(str(e)) from None
    info: dict[str, Any] = {
        "format": SIDECAR_FORMAT,
        "export": fmt,
        "file": out.name,
        "architecture": model.config.name,
        "official": _is_official(model),
        "num_classes": n,
        "classes": None if meta.classes is None else [str(c) for c in meta.classes],
        "tf_padding": model.tf_padding,
        "bn_eps": _bn_eps(model),
        "preprocess": {
            "image_size": size, "crop_ratio": ratio,
            "crop": "centre square of side int(crop_ratio * min(height, width)); the whole image when "
                    "crop_ratio >= 1; then resized to image_size x image_size",
            "interpolation": "bilinear", "channels": "RGB", "layout": "NCHW",
            "mean": [PIXEL_MEAN] * 3, "std": [PIXEL_STD] * 3,
            "scale": "mean/std apply to pixel / 255; on uint8 pixels this is (x - 128) / 128",
        },
        "config": config_to_dict(model.config),
        "source": meta.source,
        "versions": {"effnetv2": effnetv2.__version__, "torch": torch.__version__},
    }
    if fmt in ("onnx", "torchscript"):
        any_size = fmt == "torchscript" and not model.tf_padding
        info["input"] = {"name": INPUT_NAME, "dtype": "float32",
                         "shape": ["batch", 3, "height" if any_size else size, "width" if any_size else size]}
        info["output"] = {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", n]}
    if fmt == "timm":
        info["timm"] = timm_spec(model, info)
    return info


def timm_spec(model: EfficientNetV2, info: dict[str, Any]) -> dict[str, Any]:
    """How timm builds this export: ``timm.create_model(model_name, **create_model)``, where the overlay's
    ``file`` is relative to the JSON's folder. timm's ``crop_mode="squash"`` resizes the whole image to
    S x S as our loaders do at ``crop_ratio`` 1; ``"center"`` cuts the same centre square as ours below 1."""
    name = _official_name(model)
    if info["bn_eps"] is None:
        raise ExportError(f"{name}: the BatchNorm layers have different eps; timm's model has one for all")
    p, n = info["preprocess"], model.num_classes
    overlay: dict[str, Any] = {
        "file": info["file"], "num_classes": n,  # timm drops the classifier when these two differ
        "input_size": [3, p["image_size"], p["image_size"]], "test_input_size": [3, p["image_size"], p["image_size"]],
        "crop_pct": p["crop_ratio"], "test_crop_pct": p["crop_ratio"],
        "crop_mode": "squash" if p["crop_ratio"] >= 1 else "center",
        "interpolation": p["interpolation"], "mean": p["mean"], "std": p["std"],
    }
    if info["classes"] is not None:
        overlay["label_names"] = info["classes"]
    kwargs: dict[str, Any] = {"pretrained": True, "num_classes": n}
    if not model.tf_padding:
        kwargs["pad_type"] = ""  # timm's symmetric padding, which is ours
    if info["bn_eps"] != _TIMM_BN_EPS:
        kwargs["bn_eps"] = info["bn_eps"]
    return {"model_name": timm_name(name), "create_model": {**kwargs, "pretrained_cfg_overlay": overlay}}


def to_timm(model: EfficientNetV2) -> dict[str, torch.Tensor]:
    """``model``'s state dict under timm's ``tf_efficientnetv2_*`` names: the inverse of ``from_timm``,
    from the same table. Raises if a tensor has no timm name or the result differs from timm's manifest."""
    name = _official_name(model)
    ours_to_timm = {ours: theirs for theirs, ours in timm_module_names(model).items()}
    state, unplaced = {}, []
    for key, value in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if module in ours_to_timm:
            state[f"{ours_to_timm[module]}.{leaf}"] = value.detach().contiguous()
        else:
            unplaced.append(key)
    want = json.loads(MANIFEST.read_text())["models"][timm_name(name)]["keys"]
    head = ("classifier.weight", "classifier.bias")  # sized for the model's own classes
    wrong = sorted(set(want) ^ set(state)) + [
        f"{k} {list(v.shape)} vs timm {want[k]}" for k, v in state.items()
        if k in want and k not in head and list(v.shape) != want[k]]
    if unplaced or wrong:
        raise ExportError(f"{name}: the timm layout does not fit (no timm name: {unplaced[:8]}; "
                          f"differs from {MANIFEST.name}: {wrong[:8]})")
    return state


def _official_name(model: EfficientNetV2) -> str:
    """The model's name if it is one of the official architectures, else an ExportError saying why."""
    name = model.config.name
    official = CONFIGS.get(name)
    if official is None or not official.official:
        raise ExportError(f"{name} is not an official EfficientNetV2 architecture: timm has no "
                          "tf_efficientnetv2_* model of its shape; export it as safetensors, onnx or torchscript")
    if _architecture(official) != _architecture(model.config):
        raise ExportError(f"{name}: this model's stage table or multipliers differ from the official {name} (a "
                          "custom config under an official name), so timm would build another network; export "
                          "it as safetensors, onnx or torchscript")
    return name


def _architecture(c: ModelConfig) -> tuple:
    """The fields that shape the network (not the image sizes or dropout, which only train it)."""
    return c.stages, c.width, c.depth, c.head_ch, c.stem_stride


def _is_official(model: EfficientNetV2) -> bool:
    config = CONFIGS.get(model.config.name)
    return config is not None and config.official and _architecture(config) == _architecture(model.config)


def _bn_eps(model: nn.Module) -> float | None:
    eps = {m.eps for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    return eps.pop() if len(eps) == 1 else None


# -- writers: each writes one file at the temp path it is given ------------------------------------------
def _write_safetensors(net: EfficientNetV2, path: Path, info: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt", "effnetv2": json.dumps(info)})


def _write_timm(net: EfficientNetV2, path: Path, info: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    save_file(to_timm(net), str(path), metadata={"format": "pt"})


def _write_onnx(net: EfficientNetV2, path: Path, info: dict[str, Any]) -> None:
    size = info["preprocess"]["image_size"]
    example = torch.zeros(2, 3, size, size)  # batch 2: torch.export would specialise a batch of 1
    # torch's exporter warns once per torchvision op it cannot register when torchvision is absent, and
    # about its own internal deprecations: nothing the user can act on
    quiet = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(net, (example,), None, dynamo=True, opset_version=ONNX_OPSET,
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    finally:
        quiet.setLevel(level)
    program.model.metadata_props["effnetv2"] = json.dumps(info)
    program.save(str(path), external_data=False)


class _SizeGuard(nn.Module):
    """Rejects inputs of another H x W than the one a ``tf_padding`` trace was recorded at."""

    def __init__(self, traced: nn.Module, size: int) -> None:
        super().__init__()
        self.traced, self.size = traced, size
        self.message = (f"this TorchScript export pads for {size}x{size} inputs only "
                        "(TF 'SAME' padding, fixed when traced); resize the images to that size")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] != self.size or x.shape[-1] != self.size:
            raise RuntimeError(self.message)
        return self.traced(x)


def _write_torchscript(net: EfficientNetV2, path: Path, info: dict[str, Any]) -> None:
    size = info["preprocess"]["image_size"]
    with warnings.catch_warnings():
        # torch.jit is deprecated (still the format torch.jit.load reads), and the trace of the input check
        # (a Python bool) is a constant by design: both expected
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        module = torch.jit.trace(net, torch.zeros(2, 3, size, size), check_trace=False)
        if net.tf_padding:
            module = torch.jit.script(_SizeGuard(module, size))
        torch.jit.save(module, str(path), _extra_files={TORCHSCRIPT_EXTRA: json.dumps(info)})


# -- files ------------------------------------------------------------------------------------------------
def _need(*modules: str, why: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"{why} needs {', '.join(missing)}: pip install {' '.join(missing)}")


def _check_writable(path: Path) -> None:
    """Fail before the (slow) export if ``path`` cannot be written, naming it."""
    if path.is_dir():
        raise ExportError(f"{path}: is a folder; give the name of the file to write")
    tmp = atomic.partial_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb"):
            pass
    except OSError as e:
        raise ExportError(f"{path}: cannot write here: {e.strerror or e}") from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` the file at a hidden temp name, fsync, rename over ``path``; the temp goes on failure."""
    try:
        with atomic.atomic_path(path) as tmp:
            write(tmp)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600; an export is for others to read
    except OSError as e:
        raise ExportError(f"{path}: cannot write: {e.strerror or e}") from e
