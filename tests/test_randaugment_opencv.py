"""The numpy/OpenCV RandAugment suite against direct references (numpy formulas, PIL) on real photos."""

from __future__ import annotations

from collections import Counter

import cv2
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from effnetv2.pipeline.loaders.opencv import randaugment as ra


@pytest.fixture(scope="module")
def imgs(photos) -> list[np.ndarray]:
    """Real photos at training-like sizes, one non-square."""
    sizes = [(96, 96), (128, 112), (160, 160), (120, 144)]
    return [np.ascontiguousarray(cv2.resize(p, sizes[i % len(sizes)], interpolation=cv2.INTER_AREA))
            for i, p in enumerate(photos[:8])]


def _max_diff(a: np.ndarray, b) -> int:
    return int(np.abs(a.astype(np.int16) - np.asarray(b).astype(np.int16)).max())


# -- point ops ----------------------------------------------------------------------------------------
def test_invert_solarize_posterize_solarize_add_match_their_formulas(imgs):
    for img in imgs:
        np.testing.assert_array_equal(ra.invert(img), 255 - img)
        for t in (0, 77, 128, 200, 256):
            np.testing.assert_array_equal(ra.solarize(img, t), np.where(img < t, img, 255 - img))
        for bits in range(1, 9):
            np.testing.assert_array_equal(ra.posterize(img, bits), (img >> (8 - bits)) << (8 - bits))
        for add in (0, 30, 110, 220):
            want = np.where(img < 128, np.minimum(img.astype(int) + add, 255), img)
            np.testing.assert_array_equal(ra.solarize_add(img, add), want)


def test_point_ops_match_pil(imgs):
    for img in imgs:
        pil = Image.fromarray(img)
        np.testing.assert_array_equal(ra.posterize(img, 3), ImageOps.posterize(pil, 3))
        np.testing.assert_array_equal(ra.solarize(img, 100), ImageOps.solarize(pil, 100))
        np.testing.assert_array_equal(ra.equalize(img), ImageOps.equalize(pil))
        low = (img // 2 + 40).astype(np.uint8)  # a narrow range, so the stretch does something
        np.testing.assert_array_equal(ra.autocontrast(low), ImageOps.autocontrast(Image.fromarray(low)))


def test_autocontrast_stretches_each_channel_to_full_range(imgs):
    low = (imgs[0] // 3 + 60).astype(np.uint8)
    out = ra.autocontrast(low)
    assert out.reshape(-1, 3).min(0).tolist() == [0, 0, 0]
    assert out.reshape(-1, 3).max(0).min() >= 254  # 255 up to float truncation, as in TF and PIL
    flat = np.full((8, 8, 3), 77, np.uint8)
    np.testing.assert_array_equal(ra.autocontrast(flat), flat)  # hi == lo: left alone


def test_equalize_gives_a_flat_histogram(imgs):
    for img in imgs[:4]:
        dull = (img // 4 + 90).astype(np.uint8)  # a photo squeezed into 64 grey levels
        out = ra.equalize(dull)
        for c in range(3):
            after = np.bincount(out[..., c].ravel() // 32, minlength=8) / out[..., c].size
            before = np.bincount(dull[..., c].ravel() // 32, minlength=8) / dull[..., c].size
            assert np.abs(after - 1 / 8).max() < 0.08  # 8 coarse bins, each ~1/8 of the pixels
            assert np.abs(before - 1 / 8).max() > 0.3


def test_enhance_ops_identity_at_1_degenerate_at_0_and_match_pil(imgs):
    for img in imgs:
        pil = Image.fromarray(img)
        for op in (ra.color, ra.contrast, ra.brightness, ra.sharpness):
            np.testing.assert_array_equal(op(img, 1.0), img)
        np.testing.assert_array_equal(ra.brightness(img, 0.0), np.zeros_like(img))
        grey = ra.color(img, 0.0)
        assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
        flat = ra.contrast(img, 0.0)
        assert np.unique(flat).size == 1
        mean = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).mean()
        assert abs(int(flat[0, 0, 0]) - mean) <= 1
        smooth = np.asarray(pil.filter(ImageFilter.SMOOTH))
        assert _max_diff(ra.sharpness(img, 0.0), smooth) <= 1
        for f in (0.1, 0.55, 1.9, 3.7):
            assert _max_diff(ra.brightness(img, f), ImageEnhance.Brightness(pil).enhance(f)) <= 1
            assert _max_diff(ra.contrast(img, f), ImageEnhance.Contrast(pil).enhance(f)) <= 1
            assert _max_diff(ra.color(img, f), ImageEnhance.Color(pil).enhance(f)) <= 3
            assert _max_diff(ra.sharpness(img, f), ImageEnhance.Sharpness(pil).enhance(f)) <= 1


# -- geometric ops ------------------------------------------------------------------------------------
def test_rotate_30_levels_is_a_quarter_turn_either_way(imgs):
    img = imgs[2]  # square
    policy = ra.RandAugment(magnitude=30)  # 30/10 * 30 degrees = 90
    seen = set()
    for seed in range(12):
        out = policy.apply("Rotate", img, np.random.default_rng(seed))
        k = 1 if np.array_equal(out, np.rot90(img, 1)) else -1 if np.array_equal(out, np.rot90(img, -1)) else 0
        assert k != 0, f"seed {seed}: not a quarter turn"
        seen.add(k)
    assert seen == {1, -1}  # random sign


def test_rotate_keeps_centre_and_fills_corners(imgs):
    img = imgs[2]
    out = ra.rotate(img, 30.0)
    c = img.shape[0] // 2
    assert _max_diff(out[c - 1 : c + 1, c - 1 : c + 1], img[c - 1 : c + 1, c - 1 : c + 1]) == 0
    assert (out[0, 0] == 128).all() and (out[-1, -1] == 128).all()
    pil = np.asarray(Image.fromarray(img).rotate(30.0, resample=Image.NEAREST, fillcolor=(128, 128, 128)))
    assert np.mean(np.any(out != pil, axis=-1)) < 0.03  # PIL's pixel-centre convention differs by < 1 px


def test_translate_moves_content_by_k_pixels_with_fill(imgs):
    img = imgs[1]
    for k in (1, 7, 40):
        out = ra.translate_x(img, k)  # official sign: output(x) = input(x + k), content moves left
        np.testing.assert_array_equal(out[:, :-k], img[:, k:])
        assert (out[:, -k:] == 128).all()
        out = ra.translate_y(img, -k)
        np.testing.assert_array_equal(out[k:], img[:-k])
        assert (out[:k] == 128).all()
    policy = ra.RandAugment(magnitude=3)  # 30 px
    shifts = set()
    for seed in range(10):
        out = policy.apply("TranslateX", img, np.random.default_rng(seed))
        for k in (30, -30):
            if np.array_equal(out, ra.translate_x(img, k)):
                shifts.add(k)
    assert shifts == {30, -30}


def _shear_reference(img: np.ndarray, level: float, axis: str) -> np.ndarray:
    h, w = img.shape[:2]
    y, x = np.mgrid[0:h, 0:w]
    if axis == "x":
        x = np.floor(x + level * y + 0.5).astype(int)
    else:
        y = np.floor(y + level * x + 0.5).astype(int)
    inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    out = np.full_like(img, 128)
    out[inside] = img[y[inside], x[inside]]
    return out


def test_shear_matches_the_official_transform(imgs):
    for img in imgs[:4]:
        for level in (0.2937, -0.2713, 0.4321):  # no exact .5 ties (TF rounds them away from 0, OpenCV to even)
            for op, axis in ((ra.shear_x, "x"), (ra.shear_y, "y")):
                out, want = op(img, level), _shear_reference(img, level, axis)
                assert np.mean(np.any(out != want, axis=-1)) < 0.005


def test_cutout_fills_a_square_of_twice_the_pad(imgs):
    img = imgs[2]
    out = ra.cutout(img, 10, 50, 60)
    mask = np.zeros(img.shape[:2], bool)
    mask[40:60, 50:70] = True
    assert (out[mask] == 128).all()
    np.testing.assert_array_equal(out[~mask], img[~mask])
    edge = ra.cutout(img, 10, 3, 0)  # clipped at the border
    assert (edge[:13, :10] == 128).all() and (edge[13:] == img[13:]).all()
    np.testing.assert_array_equal(ra.cutout(img, 0, 50, 60), img)


# -- the policy ---------------------------------------------------------------------------------------
def test_level_scale_and_extrapolation():
    p10, p20 = ra.RandAugment(10), ra.RandAugment(20)
    assert (p10.degrees, p10.shear, p10.translate, p10.cutout_pad) == (30.0, 0.3, 100.0, 40)
    assert (p20.degrees, p20.cutout_pad) == (60.0, 80) and p20.factor == pytest.approx(3.7)
    assert ra.RandAugment(6.67).factor == pytest.approx(6.67 / 10 * 1.8 + 0.1)  # fractional levels
    x = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(p20.apply("Posterize", x, rng), x)  # 8 bits: identity
    np.testing.assert_array_equal(p10.apply("Solarize", x, rng), x)  # threshold 256: identity
    np.testing.assert_array_equal(ra.RandAugment(0).apply("Solarize", x, rng), 255 - x)
    np.testing.assert_array_equal(ra.RandAugment(1).apply("Posterize", x, rng), (x >> 7) << 7)  # 0 bits -> 1


class _Recording(ra.RandAugment):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[str] = []

    def apply(self, op, img, rng):
        self.calls.append(op)
        return super().apply(op, img, rng)


def test_layers_always_apply_uniformly_chosen_ops(imgs):
    policy = _Recording(9, num_layers=2)
    rng = np.random.default_rng(0)
    small = np.ascontiguousarray(imgs[0][:32, :32])
    for _ in range(1600):
        policy(small, rng)
    assert len(policy.calls) == 3200
    counts = Counter(policy.calls)
    assert set(counts) == set(ra.OPS) and len(ra.OPS) == 16
    expected = 3200 / 16
    chi2 = sum((counts[o] - expected) ** 2 / expected for o in ra.OPS)
    assert chi2 < 37.7  # p = 0.001 at 15 degrees of freedom


def test_same_generator_state_gives_same_result(imgs):
    policy = ra.RandAugment(12.5)
    for seed in range(20):
        a = policy(imgs[seed % 4], np.random.default_rng(seed))
        b = policy(imgs[seed % 4], np.random.default_rng(seed))
        np.testing.assert_array_equal(a, b)


def test_magnitude_0_moves_no_pixel(imgs):
    """At level 0 every op is pointwise or a symmetric local filter: it commutes with flips/transposes."""
    def commutes(policy, img, seed):
        for f in (lambda a: a[:, ::-1], lambda a: a[::-1], lambda a: a.transpose(1, 0, 2)):
            a = f(policy(img, np.random.default_rng(seed)))
            b = policy(np.ascontiguousarray(f(img)), np.random.default_rng(seed))
            if not np.array_equal(a, b):
                return False
        return True

    square = [i for i in imgs if i.shape[0] == i.shape[1]]
    zero, nine = ra.RandAugment(0), ra.RandAugment(9)
    assert all(commutes(zero, img, s) for img in square for s in range(24))
    assert not all(commutes(nine, img, s) for img in square for s in range(24))  # the check can fail


def test_magnitude_20_changes_images_more_than_5(imgs):
    def change(m):
        policy = ra.RandAugment(m)
        return np.mean([np.abs(policy(img, np.random.default_rng(s)).astype(float) - img).mean()
                        for s in range(40) for img in imgs[:4]])

    assert change(20) > 1.3 * change(5)
