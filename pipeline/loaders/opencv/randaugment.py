"""The official EfficientNetV2 RandAugment, on uint8 RGB images (H, W, 3), with numpy and OpenCV.

Semantics follow the official TensorFlow code (google/automl ``efficientnetv2/autoaugment.py``):
``num_layers`` layers, each picks one of the 16 ops in :data:`OPS` uniformly and always applies it at the stage's magnitude ``L`` (a float; 10 is the nominal maximum, larger values
extrapolate, nothing is clipped); rotate/shear/translate get a random sign; empty pixels are 128.

=============  ===============================================  ==================================
op             argument from level L                            effect of L > 10 (extrapolation)
=============  ===============================================  ==================================
Rotate         ±L/10·30 degrees, nearest, about the centre      larger angle (L=30: ±90°)
ShearX/Y       ±L/10·0.3, nearest, about the top-left corner    stronger shear
TranslateX/Y   ±L/10·100 px (absolute pixels, any image size)   larger shift
Cutout         square of half-size int(L/10·40), random centre  larger square
Color, ...     enhance factor L/10·1.8 + 0.1 (no sign)          factor further from 1 (L=20: 3.7)
Posterize      keep int(L/10·4) bits                            **weaker**: L≥20 keeps 8 bits = identity
Solarize       invert pixels ≥ int(L/10·256)                    **none**: L≥10 gives threshold ≥ 256 =
                                                                identity (L=0 inverts everything)
SolarizeAdd    +int(L/10·110) to pixels < 128, saturating       larger addition, saturates at 255
=============  ===============================================  ==================================

Posterize below 1 bit: TensorFlow clamps a shift of 8 to 7, so 0 bits (L < 2.5) keeps 1 bit; we do
the same. AutoContrast, Equalize and Invert ignore the level.

Where this suite deliberately differs from the TensorFlow code, and why:

* Contrast blends towards the *mean grey level* of the image (PIL's ``ImageEnhance.Contrast``, which
  the official docstring says it is equivalent to). The TF code computes ``sum(histogram) / 256``,
  i.e. ``H·W/256`` clipped to 255, not a mean: a constant that depends on the image size (64 at
  128 px, 196 at 224 px, 255 from 256 px up). That is a known bug we do not reproduce.
* Blends (Color, Sharpness) round to nearest (``cv2.addWeighted``) where TF truncates; Brightness,
  Contrast and the smoothing kernel of Sharpness truncate/round as TF/PIL do. Differences are at most
  one grey level. Grey is ``cv2.COLOR_RGB2GRAY`` (0.299/0.587/0.114) vs TF's 0.2989/0.587/0.114.

Everything runs at the target size on uint8: point ops are one ``cv2.LUT`` (tables for fixed levels
are built once), geometric ops one ``cv2.warpAffine`` with nearest interpolation, so a whole layer
costs tens of microseconds at 224 px.
"""

from __future__ import annotations

import cv2
import numpy as np

OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color", "Contrast",
       "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout", "SolarizeAdd")
MAX_LEVEL = 10.0
FILL = 128
TRANSLATE_CONST = 100.0
CUTOUT_CONST = 40.0

_RAMP = np.arange(256, dtype=np.float64)
_IDENTITY = np.arange(256, dtype=np.uint8)
_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0  # PIL's ImageFilter.SMOOTH


def _apply_lut(img: np.ndarray, lut: np.ndarray) -> np.ndarray:
    return cv2.LUT(img, lut)


def _float_lut(values: np.ndarray) -> np.ndarray:
    """Clip to [0, 255] and truncate, as TF's ``cast(clip(x), uint8)`` does."""
    return np.clip(values, 0.0, 255.0).astype(np.uint8)


# -- point ops -------------------------------------------------------------------------------------
def invert(img: np.ndarray) -> np.ndarray:
    return cv2.bitwise_not(img)


def posterize_lut(bits: int) -> np.ndarray:
    shift = min(max(8 - int(bits), 0), 7)  # TF clamps shifts to [0, 7]
    return ((_IDENTITY >> shift) << shift).astype(np.uint8)


def posterize(img: np.ndarray, bits: int) -> np.ndarray:
    return _apply_lut(img, posterize_lut(bits))


def solarize_lut(threshold: int) -> np.ndarray:
    return np.where(_IDENTITY < threshold, _IDENTITY, 255 - _IDENTITY).astype(np.uint8)


def solarize(img: np.ndarray, threshold: int) -> np.ndarray:
    return _apply_lut(img, solarize_lut(threshold))


def solarize_add_lut(addition: int, threshold: int = 128) -> np.ndarray:
    added = np.clip(_IDENTITY.astype(np.int64) + int(addition), 0, 255)
    return np.where(_IDENTITY < threshold, added, _IDENTITY).astype(np.uint8)


def solarize_add(img: np.ndarray, addition: int, threshold: int = 128) -> np.ndarray:
    return _apply_lut(img, solarize_add_lut(addition, threshold))


def brightness_lut(factor: float) -> np.ndarray:
    return _float_lut(factor * _RAMP)  # blend(black, img, factor)


def brightness(img: np.ndarray, factor: float) -> np.ndarray:
    return img if factor == 1.0 else _apply_lut(img, brightness_lut(factor))


def _gray(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)


def contrast(img: np.ndarray, factor: float) -> np.ndarray:
    """Blend with a flat image at the rounded mean grey level (PIL semantics; see module notes)."""
    if factor == 1.0:
        return img
    mean = int(cv2.mean(_gray(img))[0] + 0.5)
    return _apply_lut(img, _float_lut(mean + factor * (_RAMP - mean)))


def color(img: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the image's own grey version (saturation)."""
    if factor == 1.0:
        return img
    grey = cv2.cvtColor(_gray(img), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(img, factor, grey, 1.0 - factor, 0.0)


def sharpness(img: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the 3x3 SMOOTH-filtered image whose one-pixel border is the original (as TF/PIL)."""
    if factor == 1.0:
        return img
    smooth = cv2.filter2D(img, -1, _SMOOTH, borderType=cv2.BORDER_REPLICATE)
    smooth[0], smooth[-1], smooth[:, 0], smooth[:, -1] = img[0], img[-1], img[:, 0], img[:, -1]
    return cv2.addWeighted(img, factor, smooth, 1.0 - factor, 0.0)


def _hist(img: np.ndarray, c: int) -> np.ndarray:
    return cv2.calcHist([img], [c], None, [256], [0, 256]).ravel().astype(np.int64)


def autocontrast(img: np.ndarray) -> np.ndarray:
    """Stretch each channel so its lowest value becomes 0 and its highest 255 (flat channels kept)."""
    lut = np.empty((1, 256, 3), np.uint8)
    for c, plane in enumerate(cv2.split(img)):
        lo, hi = cv2.minMaxLoc(plane)[:2]
        if hi > lo:
            scale = 255.0 / (hi - lo)
            lut[0, :, c] = _float_lut(_RAMP * scale - lo * scale)
        else:
            lut[0, :, c] = _IDENTITY
    return _apply_lut(img, lut)


def equalize(img: np.ndarray) -> np.ndarray:
    """PIL's histogram equalisation per channel (the official op is a port of it)."""
    lut = np.empty((1, 256, 3), np.uint8)
    for c in range(3):
        hist = _hist(img, c)
        nonzero = hist[hist != 0]
        step = (int(nonzero.sum()) - int(nonzero[-1])) // 255
        if step == 0:
            lut[0, :, c] = _IDENTITY
            continue
        cum = (np.cumsum(hist) + step // 2) // step
        lut[0, 0, c] = 0
        lut[0, 1:, c] = np.clip(cum[:-1], 0, 255)
    return _apply_lut(img, lut)


# -- geometric ops (nearest, fill 128) --------------------------------------------------------------
def _warp_inverse(img: np.ndarray, m: np.ndarray, fill: int = FILL) -> np.ndarray:
    """``m`` maps output pixel (x, y) to input pixel coordinates, as TF's ``image.transform``."""
    h, w = img.shape[:2]
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(fill, fill, fill))


def rotate(img: np.ndarray, degrees: float, fill: int = FILL) -> np.ndarray:
    """Rotate counter-clockwise (as displayed) by ``degrees`` about the image centre."""
    h, w = img.shape[:2]
    if degrees == 0:
        return img
    m = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), degrees, 1.0)
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=(fill, fill, fill))


def shear_x(img: np.ndarray, level: float, fill: int = FILL) -> np.ndarray:
    """Output (x, y) reads input (x + level·y, y)."""
    return img if level == 0 else _warp_inverse(img, np.array([[1.0, level, 0.0], [0.0, 1.0, 0.0]]), fill)


def shear_y(img: np.ndarray, level: float, fill: int = FILL) -> np.ndarray:
    """Output (x, y) reads input (x, level·x + y)."""
    return img if level == 0 else _warp_inverse(img, np.array([[1.0, 0.0, 0.0], [level, 1.0, 0.0]]), fill)


def translate_x(img: np.ndarray, pixels: float, fill: int = FILL) -> np.ndarray:
    """Output (x, y) reads input (x + pixels, y): content moves LEFT by ``pixels`` (official sign)."""
    return img if pixels == 0 else _warp_inverse(img, np.array([[1.0, 0.0, pixels], [0.0, 1.0, 0.0]]), fill)


def translate_y(img: np.ndarray, pixels: float, fill: int = FILL) -> np.ndarray:
    """Output (x, y) reads input (x, y + pixels): content moves UP by ``pixels``."""
    return img if pixels == 0 else _warp_inverse(img, np.array([[1.0, 0.0, 0.0], [0.0, 1.0, pixels]]), fill)


def cutout(img: np.ndarray, pad: int, cy: int, cx: int, fill: int = FILL) -> np.ndarray:
    """Fill rows ``[cy-pad, cy+pad)`` x cols ``[cx-pad, cx+pad)`` (clipped to the image) with ``fill``."""
    if pad <= 0:
        return img
    out = img.copy()
    out[max(0, cy - pad) : cy + pad, max(0, cx - pad) : cx + pad] = fill
    return out


# -- the policy ------------------------------------------------------------------------------------
class RandAugment:
    """``num_layers`` uniformly chosen ops at magnitude ``magnitude``; call with an image and a Generator.

    All randomness comes from the Generator passed in (op choice, sign, cutout centre), so a caller
    that seeds one Generator per sample gets results independent of batching and worker count.
    Returns a new array or the input itself (ops never write into their input).
    """

    def __init__(self, magnitude: float, num_layers: int = 2, fill: int = FILL):
        if magnitude < 0 or num_layers < 0:
            raise ValueError(f"RandAugment needs magnitude >= 0 and num_layers >= 0, got {magnitude}, {num_layers}")
        self.magnitude = float(magnitude)
        self.num_layers = int(num_layers)
        self.fill = int(fill)
        r = self.magnitude / MAX_LEVEL
        self.degrees = r * 30.0
        self.shear = r * 0.3
        self.translate = r * TRANSLATE_CONST
        self.cutout_pad = int(r * CUTOUT_CONST)
        self.factor = r * 1.8 + 0.1
        self.bits = int(r * 4)
        self.threshold = int(r * 256)
        self.addition = int(r * 110)
        self._luts = {"Posterize": posterize_lut(self.bits), "Solarize": solarize_lut(self.threshold),
                      "SolarizeAdd": solarize_add_lut(self.addition), "Brightness": brightness_lut(self.factor)}

    def __repr__(self) -> str:
        return f"RandAugment(magnitude={self.magnitude:g}, num_layers={self.num_layers})"

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        for _ in range(self.num_layers):
            img = self.apply(OPS[int(rng.integers(len(OPS)))], img, rng)
        return img

    def apply(self, op: str, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Apply one named op at this policy's magnitude (random sign / centre drawn from ``rng``)."""
        if op in self._luts:
            return _apply_lut(img, self._luts[op])
        if op in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"):
            sign = -1.0 if rng.random() < 0.5 else 1.0
            if op == "Rotate":
                return rotate(img, sign * self.degrees, self.fill)
            if op == "ShearX":
                return shear_x(img, sign * self.shear, self.fill)
            if op == "ShearY":
                return shear_y(img, sign * self.shear, self.fill)
            if op == "TranslateX":
                return translate_x(img, sign * self.translate, self.fill)
            return translate_y(img, sign * self.translate, self.fill)
        if op == "Cutout":
            h, w = img.shape[:2]
            cy, cx = int(rng.integers(h)), int(rng.integers(w))
            return cutout(img, self.cutout_pad, cy, cx, self.fill)
        if op in _PLAIN:
            return _PLAIN[op](img)
        if op in _ENHANCE:
            return _ENHANCE[op](img, self.factor)
        raise ValueError(f"unknown RandAugment op {op!r}; expected one of {OPS}")



_PLAIN = {"AutoContrast": autocontrast, "Equalize": equalize, "Invert": invert}
_ENHANCE = {"Color": color, "Contrast": contrast, "Sharpness": sharpness}
