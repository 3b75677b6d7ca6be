"""Tests of dlsn.metrics: Y-channel PSNR / SSIM as SR papers compute them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from dlsn.metrics import (
    SSIM_C1,
    SSIM_C2,
    bicubic_baseline,
    gaussian_window,
    psnr_y,
    quantize,
    rgb_to_y,
    shave,
    ssim_y,
)


def grey(level: int, height: int = 20, width: int = 24) -> torch.Tensor:
    """A flat grey RGB image at 8-bit level ``level``, in [0, 1]."""
    return torch.full((3, height, width), level / 255.0, dtype=torch.float64)


def random_pair(seed: int, height: int = 40, width: int = 52, noise: float = 0.08):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, height // 4, width // 4, generator=g, dtype=torch.float64)
    base = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic")[0].clamp(0, 1)
    hr = quantize(base)
    sr = (base + noise * torch.randn(3, height, width, generator=g, dtype=torch.float64)).clamp(0, 1)
    return sr, hr


def test_rgb_to_y_range_and_weights():
    assert float(rgb_to_y(grey(0))[0, 0]) == pytest.approx(16.0)
    assert float(rgb_to_y(grey(255))[0, 0]) == pytest.approx(235.0)
    red = torch.zeros(3, 1, 1, dtype=torch.float64)
    red[0] = 1.0
    assert float(rgb_to_y(red)) == pytest.approx(16 + 65.481)
    assert rgb_to_y(torch.rand(2, 3, 4, 5)).shape == (2, 4, 5)
    with pytest.raises(ValueError, match="3 channels"):
        rgb_to_y(torch.rand(4, 5, 6))


def test_identical_images_give_inf_and_one():
    sr, hr = random_pair(0)
    assert psnr_y(hr, hr, 2) == math.inf
    assert ssim_y(hr, hr, 2) == pytest.approx(1.0, abs=1e-12)


def test_constant_grey_offset_has_the_hand_computed_psnr():
    # Grey 100 vs 110: Y differs by (65.481 + 128.553 + 24.966) * 10 / 255 = 219 * 10 / 255 everywhere.
    diff = 219.0 * 10.0 / 255.0
    expected = 10 * math.log10(255.0**2 / diff**2)
    assert psnr_y(grey(110), grey(100), 4) == pytest.approx(expected, abs=1e-10)
    assert expected == pytest.approx(29.4527, abs=1e-4)  # 20 log10(255 / 8.5882)


def test_single_channel_offset():
    hr = grey(50)
    sr = hr.clone()
    sr[2] += 20 / 255.0  # blue only: Y moves by 24.966 * 20 / 255
    expected = 20 * math.log10(255.0 / (24.966 * 20 / 255.0))
    assert psnr_y(sr, hr, 0) == pytest.approx(expected, abs=1e-10)


def test_output_is_rounded_to_8_bits_first():
    hr = grey(100)
    assert psnr_y(hr + 0.4 / 255.0, hr, 2) == math.inf
    assert psnr_y(hr + 0.6 / 255.0, hr, 2) == pytest.approx(20 * math.log10(255.0 / (219.0 / 255.0)))
    assert psnr_y(hr * 0 + 1.3, grey(255), 2) == math.inf  # clamped to white


def test_border_of_scale_pixels_is_ignored():
    hr = grey(80, 30, 30)
    sr = hr.clone()
    sr[:, :3, :] = 1.0  # damage the top 3 rows only
    sr[:, :, -3:] = 0.0  # and the right 3 columns
    assert psnr_y(sr, hr, 3) == math.inf
    assert ssim_y(sr, hr, 3) == pytest.approx(1.0)
    assert psnr_y(sr, hr, 2) < 30


def test_ssim_of_two_flat_images_by_hand():
    # One 11x11 window (15 - 2*2 crop): means a, b, no variance -> (2ab + C1) / (a^2 + b^2 + C1).
    a, b = 16 + 219 * 60 / 255, 16 + 219 * 90 / 255
    expected = (2 * a * b + SSIM_C1) / (a * a + b * b + SSIM_C1)
    assert ssim_y(grey(60, 15, 15), grey(90, 15, 15), 2) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.94998, abs=1e-5)  # 12606.8 / 13270.5


def test_ssim_of_a_step_by_hand():
    # 11x11 images after cropping: y is x with one pixel raised by d at the centre. With the window w
    # (centre weight w0): mu differs by w0 d, var_y - var_x and cov follow from the weighted sums.
    x = grey(100, 13, 13)
    y = x.clone()
    y[:, 6, 6] += 50 / 255.0
    d = 219 * 50 / 255.0
    m = 16 + 219 * 100 / 255.0
    w0 = float(gaussian_window()[5, 5])
    mu_x, mu_y = m, m + w0 * d
    var_x = 0.0
    var_y = w0 * (m + d) ** 2 + (1 - w0) * m**2 - mu_y**2  # = w0 (1 - w0) d^2
    cov = w0 * m * (m + d) + (1 - w0) * m * m - mu_x * mu_y  # = 0
    expected = ((2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)
                / ((mu_x**2 + mu_y**2 + SSIM_C1) * (var_x + var_y + SSIM_C2)))
    assert ssim_y(y, x, 1) == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize("seed,scale,noise", [(1, 2, 0.05), (2, 3, 0.15), (3, 4, 0.01)])
def test_ssim_matches_skimage(seed, scale, noise):
    sr, hr = random_pair(seed, noise=noise)
    y_sr = rgb_to_y(shave(quantize(sr), scale)).numpy()
    y_hr = rgb_to_y(shave(quantize(hr), scale)).numpy()
    reference = structural_similarity(y_sr, y_hr, gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False, data_range=255)
    assert ssim_y(sr, hr, scale) == pytest.approx(reference, abs=1e-10)
    mse = float(np.mean((y_sr - y_hr) ** 2))
    assert psnr_y(sr, hr, scale) == pytest.approx(10 * math.log10(255**2 / mse), abs=1e-10)


def test_batched_inputs_give_one_value_per_image():
    pairs = [random_pair(s, 24, 24) for s in range(3)]
    sr = torch.stack([p[0] for p in pairs])
    hr = torch.stack([p[1] for p in pairs])
    psnr, ssim = psnr_y(sr, hr, 2), ssim_y(sr, hr, 2)
    assert psnr.shape == (3,) and ssim.shape == (3,)
    for i, (s, h) in enumerate(pairs):
        assert float(psnr[i]) == pytest.approx(psnr_y(s, h, 2))
        assert float(ssim[i]) == pytest.approx(ssim_y(s, h, 2))


def test_float32_and_float64_agree():
    sr, hr = random_pair(5)
    assert psnr_y(sr.float(), hr.float(), 2) == pytest.approx(psnr_y(sr, hr, 2), abs=1e-6)
    assert ssim_y(sr.float(), hr.float(), 2) == pytest.approx(ssim_y(sr, hr, 2), abs=1e-7)


def test_metric_errors():
    with pytest.raises(ValueError, match="shapes differ"):
        psnr_y(torch.rand(3, 10, 10), torch.rand(3, 10, 12), 2)
    with pytest.raises(ValueError, match="too small"):
        psnr_y(torch.rand(3, 8, 8), torch.rand(3, 8, 8), 4)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim_y(torch.rand(3, 14, 14), torch.rand(3, 14, 14), 2)
    with pytest.raises(ValueError, match="scale"):
        psnr_y(torch.rand(3, 10, 10), torch.rand(3, 10, 10), -1)


def test_bicubic_baseline_is_8_bit_and_sized():
    lr = torch.rand(3, 7, 9)
    sr = bicubic_baseline(lr, 3)
    assert sr.shape == (3, 21, 27)
    torch.testing.assert_close(sr * 255, (sr * 255).round())
