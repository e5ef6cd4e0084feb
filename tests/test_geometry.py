"""The crop and cutout rules both backends share (pipeline/geometry.py)."""

from __future__ import annotations

import numpy as np
import pytest

from effnetv2.pipeline.geometry import (
    centre_crop_windows,
    check_policy,
    eval_crop_ratio,
    noise_cutouts,
    random_crop_windows,
)


def test_random_crop_windows_follow_the_area_and_aspect_ranges():
    rng = np.random.default_rng(0)
    hw = np.array([[360, 480], [500, 333], [64, 64], [30, 400]] * 500)
    x0, y0, w, h = random_crop_windows(rng, hw).T
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
    assert np.array_equal(random_crop_windows(np.random.default_rng(0), hw), np.stack([x0, y0, w, h], 1))


def test_a_crop_that_never_fits_falls_back_to_the_centred_window_clamped_to_the_aspect_range():
    rng = np.random.default_rng(0)
    # a 1000x50 strip cannot hold half its area at aspect >= 3/4: every draw fails
    hw = np.array([[1000, 50], [50, 1000], [100, 110]])
    wins = random_crop_windows(rng, hw, area=(0.5, 1.0))
    assert wins[:2].tolist() == [[0, 466, 50, 67], [466, 0, 67, 50]]
    assert random_crop_windows(rng, hw[2:], area=(2.0, 3.0)).tolist() == [[0, 0, 110, 100]]


def test_eval_crop_is_the_official_centre_square_or_the_whole_image():
    assert eval_crop_ratio(224) == pytest.approx(224 / 256)
    assert eval_crop_ratio(384) == 1.0 and eval_crop_ratio(224, 0.5) == 0.5
    with pytest.raises(ValueError, match="crop_ratio"):
        eval_crop_ratio(224, 1.5)
    hw = np.array([[375, 500]])
    assert centre_crop_windows(hw, 224 / 256).tolist() == [[86, 24, 328, 328]]
    assert centre_crop_windows(hw, 1.0).tolist() == [[0, 0, 500, 375]]


def test_noise_cutouts_are_clipped_squares_of_half_size_s_over_4_filled_with_uniform_noise():
    size = 64
    anchor, shape, noise = noise_cutouts(np.random.default_rng(0), 400, size)
    assert anchor.dtype == shape.dtype == np.int32
    assert (anchor >= 0).all() and (shape >= 1).all() and (anchor + shape <= size).all()
    assert shape.max() == 2 * (size // 4) and (shape == 2 * (size // 4)).all(1).mean() > 0.2  # inner centres
    assert ((anchor == 0) | (shape == 32) | (anchor + shape == size)).all()  # clipped only at the borders
    assert all(n.shape == (h, w, 3) and n.dtype == np.uint8 for n, (h, w) in zip(noise, shape))
    pixels = np.concatenate([n.ravel() for n in noise]).astype(np.float64)
    assert pixels.mean() == pytest.approx(127.5, abs=1.0) and pixels.std() == pytest.approx(73.9, abs=1.0)
    again = noise_cutouts(np.random.default_rng(0), 400, size)
    assert np.array_equal(again[0], anchor) and all(np.array_equal(a, b) for a, b in zip(again[2], noise))


def test_an_unknown_policy_is_refused_with_the_choices():
    assert check_policy("finetune") == "finetune"
    with pytest.raises(ValueError, match="randaugment"):
        check_policy("autoaugment")
