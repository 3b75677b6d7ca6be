"""PSNR and SSIM on the Y channel, the way SR papers report them.

For an SR output ``sr`` and its ground truth ``hr`` (float RGB in ``[0, 1]``, ``[3, H, W]`` or
``[N, 3, H, W]``):

1. both are rounded to 8-bit levels (clamp to [0, 1], ``round(255 x) / 255``): the network output as it
   would be saved, the HR unchanged when it came from an 8-bit file;
2. ``scale`` pixels are cropped from every border (the upsampler's edge effects are not scored);
3. ``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` (ITU-R BT.601, 0-255 scale, not rounded);
4. PSNR = ``10 log10(255^2 / MSE)`` on Y (``inf`` for identical images);
   SSIM = mean of the SSIM map of Wang et al. with an 11x11 Gaussian window (sigma 1.5), C1 = (0.01*255)^2,
   C2 = (0.03*255)^2, computed only where the window fits inside the image ('valid' filtering), like the
   reference MATLAB ``ssim_index`` and ``skimage.metrics.structural_similarity(gaussian_weights=True,
   sigma=1.5, use_sample_covariance=False, data_range=255)``.

Everything is computed in float64 on the CPU.

An output holding a non-finite value (NaN, +-inf: a diverged network) is not an image: its PSNR and
SSIM are NaN (never the ``inf`` of identical images, and not what clamping to [0, 1] would make of it).
A NaN compares false with every score, so it can never be the best one; ``isfinite`` tells it apart.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Y_WEIGHTS = (65.481, 128.553, 24.966)
Y_OFFSET = 16.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = (0.01 * 255.0) ** 2
SSIM_C2 = (0.03 * 255.0) ** 2


def quantize(image: torch.Tensor) -> torch.Tensor:
    """Round a ``[0, 1]`` image to 8-bit levels (clamped), as saving it to a PNG would."""
    return image.clamp(0.0, 1.0).mul(255.0).round().div(255.0)


def rgb_to_y(image: torch.Tensor) -> torch.Tensor:
    """Luma of RGB in ``[0, 1]`` (channel dim -3: ``[3, H, W]`` or ``[N, 3, H, W]``) on the 0-255 scale."""
    if image.dim() < 3 or image.shape[-3] != 3:
        raise ValueError(f"image must have 3 channels in dim -3 ([3, H, W] or [N, 3, H, W]), "
                         f"got shape {list(image.shape)}")
    red, green, blue = image.unbind(dim=-3)
    return Y_OFFSET + Y_WEIGHTS[0] * red + Y_WEIGHTS[1] * green + Y_WEIGHTS[2] * blue


def shave(image: torch.Tensor, border: int) -> torch.Tensor:
    """Crop ``border`` pixels from every side of the last two dims."""
    if border < 0:
        raise ValueError(f"border must be >= 0, got {border}")
    if border == 0:
        return image
    height, width = image.shape[-2:]
    if height <= 2 * border or width <= 2 * border:
        raise ValueError(f"image {height}x{width} is too small to crop {border} border pixels")
    return image[..., border:height - border, border:width - border]


def _prepare_y(sr: torch.Tensor, hr: torch.Tensor, scale: int,
               name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both images as ``[N, H', W']`` float64 Y after rounding and border cropping, and ``[N]`` bool:
    which images of either input hold a non-finite value (before rounding, which would clamp inf)."""
    if not isinstance(sr, torch.Tensor) or not isinstance(hr, torch.Tensor):
        raise TypeError(f"{name}: sr and hr must be tensors")
    if sr.shape != hr.shape:
        raise ValueError(f"{name}: sr and hr shapes differ: {list(sr.shape)} vs {list(hr.shape)}")
    if sr.dim() not in (3, 4) or sr.shape[-3] != 3:
        raise ValueError(f"{name}: images must be [3, H, W] or [N, 3, H, W], got {list(sr.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 0:
        raise ValueError(f"{name}: scale (border to crop) must be a non-negative integer, got {scale!r}")
    sr64 = sr.detach().to("cpu", torch.float64)
    hr64 = hr.detach().to("cpu", torch.float64)
    batched = sr64 if sr.dim() == 4 else sr64[None]
    hr_batched = hr64 if hr.dim() == 4 else hr64[None]
    not_finite = ~(batched.isfinite().flatten(1).all(dim=1) & hr_batched.isfinite().flatten(1).all(dim=1))
    sr_y = rgb_to_y(shave(quantize(sr64), scale))
    hr_y = rgb_to_y(shave(quantize(hr64), scale))
    if sr.dim() == 3:
        sr_y, hr_y = sr_y[None], hr_y[None]
    return sr_y, hr_y, not_finite


def _per_image(values: torch.Tensor, batched: bool) -> float | torch.Tensor:
    return values if batched else float(values[0])


def psnr_y(sr: torch.Tensor, hr: torch.Tensor, scale: int) -> float | torch.Tensor:
    """Y-channel PSNR in dB (see module doc). ``scale`` is also the border cropped (0: none).

    Returns a float for ``[3, H, W]`` inputs and a float64 tensor ``[N]`` (one per image) for batches;
    NaN for an image holding a non-finite value (see the module doc).
    """
    sr_y, hr_y, not_finite = _prepare_y(sr, hr, scale, "psnr_y")
    mse = (sr_y - hr_y).pow(2).flatten(1).mean(dim=1)
    # ``mse == 0`` (not ``mse > 0``): a NaN MSE must stay NaN, not become the inf of identical images.
    psnr = torch.where(mse == 0, torch.full_like(mse, math.inf), 10.0 * torch.log10(255.0**2 / mse))
    psnr = psnr.masked_fill(not_finite, math.nan)
    return _per_image(psnr, sr.dim() == 4)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised ``[size, size]`` float64 Gaussian (MATLAB ``fspecial('gaussian', size, sigma)``)."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    line = torch.exp(-(offsets**2) / (2.0 * sigma * sigma))
    line = line / line.sum()
    return line[:, None] * line[None, :]


def ssim_map(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor | None = None,
             c1: float = SSIM_C1, c2: float = SSIM_C2) -> torch.Tensor:
    """SSIM map of two ``[N, H, W]`` float64 images (0-255 scale), 'valid' filtering: ``[N, H-10, W-10]``."""
    window = gaussian_window() if window is None else window
    size = window.shape[-1]
    if x.shape[-2] < size or x.shape[-1] < size:
        raise ValueError(f"SSIM needs images of at least {size}x{size} after cropping, "
                         f"got {x.shape[-1]}x{x.shape[-2]}")
    weight = window.to(x.dtype)[None, None]

    def filt(image: torch.Tensor) -> torch.Tensor:
        return F.conv2d(image[:, None], weight)[:, 0]

    mu_x, mu_y = filt(x), filt(y)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    var_x = filt(x * x) - mu_xx
    var_y = filt(y * y) - mu_yy
    cov_xy = filt(x * y) - mu_xy
    numerator = (2.0 * mu_xy + c1) * (2.0 * cov_xy + c2)
    denominator = (mu_xx + mu_yy + c1) * (var_x + var_y + c2)
    return numerator / denominator


def ssim_y(sr: torch.Tensor, hr: torch.Tensor, scale: int) -> float | torch.Tensor:
    """Y-channel SSIM (see module doc). ``scale`` is also the border cropped (0: none).

    Returns a float for ``[3, H, W]`` inputs and a float64 tensor ``[N]`` (one per image) for batches;
    NaN for an image holding a non-finite value (see the module doc).
    """
    sr_y, hr_y, not_finite = _prepare_y(sr, hr, scale, "ssim_y")
    values = ssim_map(sr_y, hr_y).flatten(1).mean(dim=1)
    return _per_image(values.masked_fill(not_finite, math.nan), sr.dim() == 4)


def min_scorable_size(scale: int) -> int:
    """The smallest HR side both scores accept at ``scale``: the SSIM window after ``scale`` border
    pixels are cropped from each side."""
    return SSIM_WINDOW + 2 * scale


def bicubic_baseline(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """The plain bicubic SR result: MATLAB-style ``imresize(lr, scale)`` rounded to 8-bit levels."""
    from dlsn.data.imresize import bicubic_upsample

    return quantize(bicubic_upsample(lr, scale))
