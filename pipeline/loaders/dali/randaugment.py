"""The official EfficientNetV2 RandAugment as a DALI graph whose random choices are runtime inputs.

Semantics (the official release's ``autoaugment.py`` RandAugment, the same table as
:mod:`effnetv2.pipeline.loaders.opencv.randaugment`): ``layers`` layers, each picks one of the 16 :data:`OPS` uniformly and always applies it at level ``L`` (10 nominal,
larger extrapolates); rotate/shear/translate get a random sign; empty pixels are 128; geometric ops
sample nearest (as TensorFlow's ``image.transform`` does). Clamps, documented: posterize keeps
``int(L/10*4)`` bits clamped to [1, 8] (TF clamps the shift to 7; L >= 20 is the identity), solarize's
threshold ``int(L/10*256)`` is clamped to [0, 256] (L >= 10 is the identity), solarize-add's addition to
[0, 255] (the sum saturates at 255 anyway). Contrast blends towards the mean grey level (PIL; the TF
code's ``sum(hist)/256`` is a known bug).

All randomness is drawn on the host with numpy (:func:`sample_params`, seeded per step) and fed as
per-sample inputs, so the magnitude and every choice are runtime data. A rotate/shear/translate is its
inverse map applied by one nearest-neighbour warp; each layer is a colour stage then a warp, and two
geometric layers stay two warps (sequential, as the official ops); each op runs inside a DALI ``if``
on its per-sample code. Why this design and not DALI's ``auto_aug.rand_augment``, and what each choice
costs: docs/pipeline.md ("The DALI backend and its RandAugment").

Known small differences from the TF code: Sharpness smooths the one-pixel border too (TF keeps it);
Equalize is DALI's (OpenCV's table: ``round((cdf - cdf_min) * 255 / (n - cdf_min))``), not PIL's
exclusive-cumsum table, so an equalized image differs from the TF one by ~10 grey levels on
average; the blends round where TF truncates (at most one grey level).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color", "Contrast",
       "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout", "SolarizeAdd")
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
CODE = {name: i for i, name in enumerate(OPS)}
NONE = -1  # colour-stage code where the layer drew a geometric op
FILL = 128
_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0  # PIL's ImageFilter.SMOOTH
_GREY = np.array([0.299, 0.587, 0.114], np.float32)
_IS_GEOMETRIC = np.array([op in GEOMETRIC for op in OPS])


@dataclass(frozen=True)
class Levels:
    """The op arguments at level ``L`` (official formulas, clamps in the module docstring)."""

    magnitude: float

    @property
    def ratio(self) -> float:
        return self.magnitude / 10.0

    @property
    def degrees(self) -> float:
        return self.ratio * 30.0

    @property
    def shear(self) -> float:
        return self.ratio * 0.3

    @property
    def translate(self) -> float:
        return self.ratio * 100.0

    @property
    def cutout_pad(self) -> int:
        return int(self.ratio * 40.0)

    @property
    def factor(self) -> float:
        return self.ratio * 1.8 + 0.1

    @property
    def bits(self) -> int:
        return min(max(int(self.ratio * 4), 1), 8)

    @property
    def threshold(self) -> int:
        return min(max(int(self.ratio * 256), 0), 256)

    @property
    def addition(self) -> int:
        return min(max(int(self.ratio * 110), 0), 255)


def param_names(layers: int) -> list[str]:
    """Names of the per-sample inputs the graph reads, in the order :func:`sample_params` fills them."""
    names = ["mask", "thr", "add"] if layers else []
    for k in range(layers):
        names += [f"op{k}", f"fac{k}", f"mix{k}", f"kern{k}", f"cut_a{k}", f"cut_s{k}", f"warp{k}", f"geo{k}"]
    return names


def _shift(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def _inverse_map(op: str, value: float, size: int) -> np.ndarray:
    """3x3 map from output to input pixel (pixel centres at integers, as TF's ``image.transform``)."""
    m = np.eye(3)
    if op == "Rotate":
        c = (size - 1) / 2.0
        t = np.deg2rad(value)
        m[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
        return _shift(c, c) @ m @ _shift(-c, -c)
    if op == "ShearX":
        m[0, 1] = value
    elif op == "ShearY":
        m[1, 0] = value
    elif op == "TranslateX":
        m[0, 2] = value
    elif op == "TranslateY":
        m[1, 2] = value
    return m


def sample_params(rng: np.random.Generator, batch: int, size: int, magnitude: float | None, layers: int,
                  ops: np.ndarray | None = None, sign: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-sample inputs for :func:`apply`: op codes, factors, kernels, cutout boxes, warp matrices.

    ``magnitude=None`` (no RandAugment) gives identity stages and no warps. ``ops`` (indices into
    :data:`OPS`, shape (batch, layers)) and ``sign`` (+-1.0) replace the random draws when given,
    to replay a known policy.
    """
    lv = Levels(float(magnitude or 0.0))
    drawn = rng.integers(0, len(OPS), (batch, layers)) if magnitude is not None else np.full((batch, layers), -1)
    drawn_sign = np.where(rng.random((batch, layers)) < 0.5, -1.0, 1.0)
    centre = rng.integers(0, size, (batch, layers, 2))
    ops = drawn if ops is None else np.asarray(ops)
    sign = drawn_sign if sign is None else np.asarray(sign, np.float64)
    full = lambda v, dt: np.full(batch, v, dt)  # noqa: E731
    p: dict[str, np.ndarray] = {"mask": full((0xFF << (8 - lv.bits)) & 0xFF, np.uint8),
                                "thr": full(lv.threshold, np.int16), "add": full(lv.addition, np.int16)}
    warps = np.tile(np.eye(3), (batch, layers, 1, 1))
    used = np.zeros((batch, layers), bool)
    f = lv.factor
    smooth = (1.0 - f) * _SMOOTH
    smooth[1, 1] += f
    values = {"Rotate": lv.degrees, "ShearX": lv.shear, "ShearY": lv.shear,
              "TranslateX": lv.translate, "TranslateY": lv.translate}
    for k in range(layers):
        code = ops[:, k]
        geo = (code >= 0) & _IS_GEOMETRIC[code % len(OPS)]
        p[f"op{k}"] = np.where(geo, NONE, code).astype(np.int32)
        p[f"fac{k}"] = full(f, np.float32)
        p[f"mix{k}"] = full(round(f * 256), np.int32)
        p[f"kern{k}"] = np.broadcast_to(smooth, (batch, 3, 3)).astype(np.float32)
        lo = np.clip(centre[:, k] - lv.cutout_pad, 0, size)
        hi = np.clip(centre[:, k] + lv.cutout_pad, 0, size)
        p[f"cut_a{k}"] = lo.astype(np.float32)  # (y, x), axis_names "HW"
        p[f"cut_s{k}"] = (hi - lo).astype(np.float32)
        for i in np.flatnonzero(geo):
            op = OPS[code[i]]
            warps[i, k] = _inverse_map(op, sign[i, k] * values[op], size)
            used[i, k] = True
        p[f"warp{k}"] = warps[:, k].astype(np.float32)
        p[f"geo{k}"] = used[:, k]
    return p


def apply(x, p: dict, layers: int, device: str):
    """RandAugment on a batch of uint8 HWC images ``x``; ``p`` maps :func:`param_names` to nodes.

    Must be traced inside a pipeline built with ``enable_conditionals=True``.
    """
    for k in range(layers):
        x = _colour_stage(x, p, k, device)
        if p[f"geo{k}"]:
            x = warp(x, p[f"warp{k}"], nearest=True)
    return x


def warp(x, matrix, nearest: bool, size: int | None = None):
    """Apply 3x3 inverse maps given in pixel-index coordinates (pixel centres at integers, as OpenCV
    and TensorFlow's ``image.transform``). Nearest: RandAugment's ops, outside pixels are 128.
    Bilinear (``size`` given): the crop's resize, edge pixels replicated."""
    from nvidia.dali import fn, types

    if nearest:
        kw = {"interp_type": types.INTERP_NN, "border_mode": "constant", "fill_value": float(FILL)}
    else:
        kw = {"interp_type": types.INTERP_LINEAR, "border_mode": "replicate", "size": (size, size)}
    return fn.experimental.warp_perspective(x, matrix=matrix, pixel_origin="center", **kw)


def _colour_stage(x, p: dict, k: int, device: str):
    """One layer's colour op, each behind an ``if`` on the per-sample op code (one branch runs)."""
    from nvidia.dali import fn, types

    def dev(node):  # per-sample operands of arithmetic and filters live where the images are
        return node.gpu() if device == "gpu" else node

    op = p[f"op{k}"]
    if op == CODE["AutoContrast"]:
        x = _autocontrast(x)
    if op == CODE["Equalize"]:
        x = fn.equalize(x)
    if op == CODE["Invert"]:
        x = x ^ np.uint8(255)
    if op == CODE["Posterize"]:
        x = x & dev(p["mask"])
    if op == CODE["Solarize"]:
        x = x ^ ((x >= dev(p["thr"])) * np.uint8(255))
    if op == CODE["SolarizeAdd"]:
        x = fn.cast(x + (x < np.uint8(128)) * dev(p["add"]), dtype=types.UINT8)
    if op == CODE["Color"]:
        x = _blend_int(x, fn.color_space_conversion(x, image_type=types.RGB, output_type=types.GRAY),
                       dev(p[f"mix{k}"]))
    if op == CODE["Contrast"]:
        x = fn.brightness_contrast(x, contrast=p[f"fac{k}"], contrast_center=_grey_mean(x, device))
    if op == CODE["Brightness"]:
        x = fn.brightness_contrast(x, brightness=p[f"fac{k}"])
    if op == CODE["Sharpness"]:
        x = fn.filter(x, dev(p[f"kern{k}"]), border="clamp")
    if op == CODE["Cutout"]:
        x = fn.erase(x, anchor=p[f"cut_a{k}"], shape=p[f"cut_s{k}"], axis_names="HW", fill_value=float(FILL))
    return x


def _blend_int(x, degenerate, weight):
    """PIL's ``blend(degenerate, x, f)`` in int32 fixed point (DALI's CPU float arithmetic is ~5x
    slower): ``weight`` holds ``round(f * 256)`` per sample; the cast saturates to [0, 255]."""
    from nvidia.dali import fn, types

    return fn.cast((x * weight + degenerate * (np.int32(256) - weight)) // np.int32(256), dtype=types.UINT8)


def _grey_mean(x, device: str):
    """The image's mean grey level rounded to an integer (PIL's Contrast centre), as a per-sample
    scalar on the CPU (an argument input of ``brightness_contrast``)."""
    from nvidia.dali import fn
    from nvidia.dali import math as dmath

    m = fn.reductions.mean(x, axes=(0, 1))
    m = dmath.floor(m[0] * float(_GREY[0]) + m[1] * float(_GREY[1]) + m[2] * float(_GREY[2]) + 0.5)
    return m.cpu() if device == "gpu" else m


def _autocontrast(x):
    """Stretch each channel to [0, 255] (a flat channel stays as it is), in int32 fixed point:
    ``(x - lo) * floor(255 * 2**23 / (hi - lo)) // 2**23`` cannot overflow since x - lo <= hi - lo."""
    from nvidia.dali import fn, types

    lo = fn.cast(fn.reductions.min(x, axes=(0, 1)), dtype=types.INT32)
    hi = fn.cast(fn.reductions.max(x, axes=(0, 1)), dtype=types.INT32)
    flat = fn.cast(hi <= lo, dtype=types.INT32)
    one = np.int32(1 << 23)
    scale = (np.int32(255) * one) // (hi - lo + flat) * (np.int32(1) - flat) + one * flat
    lo = lo * (np.int32(1) - flat)
    return fn.cast(((x - lo) * scale) // one, dtype=types.UINT8)
