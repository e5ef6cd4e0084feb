"""The crop and cutout rules both backends share (pipeline/geometry.py)."""

from __future__ import annotations

import numpy as np
import pytest

from effnetv2.pipeline.loaders.geometry import (
    centre_crop_window,
    check_policy,
    eval_crop_ratio,
    noise_cutout,
    random_crop_window,
)


def _crops(rng, sizes, **kw) -> np.ndarray:
    return np.array([random_crop_window(rng, h, w, **kw) for h, w in sizes])


def test_random_crop_windows_follow_the_area_and_aspect_ranges():
    hw = np.array([[360, 480], [500, 333], [64, 64], [30, 400]] * 500)
    x0, y0, w, h = _crops(np.random.default_rng(0), hw).T
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= hw[:, 1]).all() and (y0 + h <= hw[:, 0]).all()
    regular = hw[:, 0] >= 64
    area = (w * h / (hw[:, 0] * hw[:, 1]))[regular]
    aspect = (w / h)[regular]
    assert area.min() > 0.04 and area.max() <= 1.0
    # small areas always fit, so below 0.5 the area is uniform (large ones are rejected more often)
    low, high = ((area >= 0.05) & (area < 0.275)).mean(), ((area >= 0.275) & (area < 0.5)).mean()
    assert abs(low - high) < 0.05 and low + high > 0.45
    assert aspect.min() > 0.7 and aspect.max() < 1.4
    square = (hw[:, 0] == 64) & (hw[:, 1] == 64)  # rejections are symmetric in aspect on a square
    assert np.mean(np.log((w / h)[square])) == pytest.approx(0.0, abs=0.05)
    assert np.array_equal(_crops(np.random.default_rng(0), hw), np.stack([x0, y0, w, h], 1))


def test_a_crop_that_never_fits_falls_back_to_the_centred_window_clamped_to_the_aspect_range():
    rng = np.random.default_rng(0)
    # a 1000x50 strip cannot hold half its area at aspect >= 3/4: every draw fails
    assert random_crop_window(rng, 1000, 50, area=(0.5, 1.0)) == (0, 466, 50, 67)
    assert random_crop_window(rng, 50, 1000, area=(0.5, 1.0)) == (466, 0, 67, 50)
    assert random_crop_window(rng, 100, 110, area=(2.0, 3.0)) == (0, 0, 110, 100)


def test_eval_crop_is_the_official_centre_square_or_the_whole_image():
    assert eval_crop_ratio(224) == pytest.approx(224 / 256)
    assert eval_crop_ratio(384) == 1.0 and eval_crop_ratio(224, 0.5) == 0.5
    with pytest.raises(ValueError, match="crop_ratio"):
        eval_crop_ratio(224, 1.5)
    assert centre_crop_window(375, 500, 224 / 256) == (86, 24, 328, 328)
    assert centre_crop_window(375, 500, 1.0) == (0, 0, 500, 375)


def test_noise_cutouts_are_clipped_squares_of_half_size_s_over_4_filled_with_uniform_noise():
    size, rng = 64, np.random.default_rng(0)
    cuts = [noise_cutout(rng, size) for _ in range(400)]
    x0, y0, w, h = np.array([c[0] for c in cuts]).T
    assert (np.minimum(x0, y0) >= 0).all() and (np.minimum(w, h) >= 1).all()
    assert (x0 + w <= size).all() and (y0 + h <= size).all()
    full = 2 * (size // 4)
    assert max(w.max(), h.max()) == full and ((w == full) & (h == full)).mean() > 0.2  # inner centres
    for start, side in ((x0, w), (y0, h)):  # clipped only at the borders
        assert ((side == full) | (start == 0) | (start + side == size)).all()
    assert all(n.shape == (hh, ww, 3) and n.dtype == np.uint8 for (_, n), ww, hh in zip(cuts, w, h))
    pixels = np.concatenate([n.ravel() for _, n in cuts]).astype(np.float64)
    assert pixels.mean() == pytest.approx(127.5, abs=1.0) and pixels.std() == pytest.approx(73.9, abs=1.0)
    again = noise_cutout(np.random.default_rng(0), size)
    assert again[0] == cuts[0][0] and np.array_equal(again[1], cuts[0][1])


def test_an_unknown_policy_is_refused_with_the_choices():
    assert check_policy("finetune") == "finetune"
    with pytest.raises(ValueError, match="randaugment"):
        check_policy("autoaugment")
