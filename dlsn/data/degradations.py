"""The three SR degradations of the paper: BI, BD and DN.

All functions take an HR image as a float tensor ``[C, H, W]`` or ``[N, C, H, W]`` with values in
``[0, 1]`` (an 8-bit image divided by 255: ``dlsn.images.uint8_to_tensor``) whose height and width are
multiples of the scale (crop with ``modcrop`` first); values outside ``[0, 1]`` (a 0-255 image, NaN)
raise :class:`~dlsn.errors.UserInputError`, since the 8-bit rounding would otherwise quietly turn
them into a white image. They return the LR image
``[.., H / s, W / s]`` in ``[0, 1]``, clamped and rounded to 8-bit levels (``quantize=True``), because
LR images are stored as 8-bit files and the network is trained on exactly such values.

- **BI**: MATLAB bicubic ``imresize(HR, 1/s)`` with antialiasing (``imresize.py``).
- **BD**: 7x7 Gaussian blur, sigma 1.6 (MATLAB ``fspecial('gaussian', 7, 1.6)``, normalised), borders
  replicated (``imfilter(..., 'replicate')``), then keep one pixel in every ``s x s`` block: the pixel
  ``(s*i + s//2, s*j + s//2)``. That is the pixel MATLAB's ``imresize(blurred, 1/s, 'nearest')`` picks,
  the downsampler of the RCAN/RDN BD scripts (the block centre for odd s, just below/right of it for even s).
- **DN**: BI, rounded to 8 bits (the stored bicubic LR), plus white Gaussian noise of standard
  deviation ``noise_sigma`` on the 0-255 scale, then clamped to ``[0, 255]`` and rounded
  (as MATLAB's ``uint8(single(LR) + sigma * randn(size(LR)))`` does). Noise is drawn from ``generator``
  (``torch.Generator`` on the image's device; the global RNG when None). The paper uses levels 10-25.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from dlsn.data.imresize import bicubic_downsample
from dlsn.errors import UserInputError

DegradationName = Literal["BI", "BD", "DN"]
DEGRADATIONS: tuple[str, ...] = ("BI", "BD", "DN")

BD_SIGMA = 1.6
BD_KERNEL_SIZE = 7


def quantize_8bit(image: torch.Tensor) -> torch.Tensor:
    """Clamp a ``[0, 1]`` image and round it to the 256 levels of an 8-bit file."""
    return image.clamp(0.0, 1.0).mul(255.0).round().div(255.0)


def modcrop(image: torch.Tensor, scale: int) -> torch.Tensor:
    """Crop the bottom/right so height and width are multiples of ``scale`` (works on ``[..., H, W]``)."""
    _check_scale(scale)
    height, width = image.shape[-2] - image.shape[-2] % scale, image.shape[-1] - image.shape[-1] % scale
    if height == 0 or width == 0:
        raise ValueError(f"image of size {tuple(image.shape[-2:])} is smaller than the scale {scale}")
    return image[..., :height, :width]


def gaussian_kernel(size: int = BD_KERNEL_SIZE, sigma: float = BD_SIGMA,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Normalised 2-D Gaussian ``[size, size]`` around the middle tap (MATLAB ``fspecial('gaussian')``)."""
    if size < 1 or sigma <= 0:
        raise ValueError(f"gaussian kernel needs size >= 1 and sigma > 0, got size={size}, sigma={sigma}")
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    grid = offsets[:, None] ** 2 + offsets[None, :] ** 2
    kernel = torch.exp(-grid / (2.0 * sigma * sigma))
    return (kernel / kernel.sum()).to(dtype)


def gaussian_blur(image: torch.Tensor, size: int = BD_KERNEL_SIZE, sigma: float = BD_SIGMA) -> torch.Tensor:
    """Blur each channel of ``[C, H, W]`` / ``[N, C, H, W]`` with a Gaussian, replicating the borders."""
    batched = _as_batch(image, "image")
    channels = batched.shape[1]
    kernel = gaussian_kernel(size, sigma, batched.dtype).to(batched.device)
    weight = kernel.expand(channels, 1, size, size)
    before, after = (size - 1) // 2, size // 2
    padded = F.pad(batched, (before, after, before, after), mode="replicate")
    blurred = F.conv2d(padded, weight, groups=channels)
    return blurred if image.dim() == 4 else blurred[0]


def degrade_bi(hr: torch.Tensor, scale: int, quantize: bool = True) -> torch.Tensor:
    """BI: MATLAB bicubic downsampling by ``scale`` of ``hr`` in ``[0, 1]``; the LR is in ``[0, 1]``."""
    _check_hr(hr, scale)
    lr = bicubic_downsample(hr, scale)
    return quantize_8bit(lr) if quantize else lr


def degrade_bd(hr: torch.Tensor, scale: int, sigma: float = BD_SIGMA, kernel_size: int = BD_KERNEL_SIZE,
               quantize: bool = True) -> torch.Tensor:
    """BD: Gaussian blur (``kernel_size`` square, ``sigma``), then keep pixel ``(s*i + s//2, s*j + s//2)``.

    ``hr`` in ``[0, 1]``; the LR is in ``[0, 1]``.
    """
    _check_hr(hr, scale)
    batched = _as_batch(hr, "hr")
    channels = batched.shape[1]
    weight = gaussian_kernel(kernel_size, sigma, batched.dtype).to(batched.device)
    weight = weight.expand(channels, 1, kernel_size, kernel_size)
    before, after = (kernel_size - 1) // 2, kernel_size // 2
    padded = F.pad(batched, (before, after, before, after), mode="replicate")
    # Blur only the kept pixels: a strided convolution starting at the offset equals
    # gaussian_blur(hr)[..., s//2::s, s//2::s] at 1/s^2 of the cost.
    offset = scale // 2
    lr = F.conv2d(padded[..., offset:, offset:], weight, stride=scale, groups=channels)
    lr = lr if hr.dim() == 4 else lr[0]
    return quantize_8bit(lr) if quantize else lr


def degrade_dn(hr: torch.Tensor, scale: int, noise_sigma: float, generator: torch.Generator | None = None,
               quantize: bool = True) -> torch.Tensor:
    """DN: 8-bit bicubic LR plus Gaussian noise of std ``noise_sigma`` (0-255 scale), clamped and rounded.

    ``hr`` in ``[0, 1]``; the LR is in ``[0, 1]``.
    """
    _check_hr(hr, scale)
    return add_noise(degrade_bi(hr, scale, quantize=True), noise_sigma, generator, quantize)


def add_noise(image: torch.Tensor, noise_sigma: float, generator: torch.Generator | None = None,
              quantize: bool = True) -> torch.Tensor:
    """Add white Gaussian noise of std ``noise_sigma`` on the 0-255 scale to a ``[0, 1]`` image; the
    result is clamped to ``[0, 1]``."""
    _check_unit_range(image, "image")
    if noise_sigma is None or noise_sigma < 0:
        raise ValueError(f"noise_sigma must be a non-negative number (0-255 scale), got {noise_sigma!r}")
    noise = torch.randn(image.shape, generator=generator, device=image.device, dtype=image.dtype)
    noisy = image + noise * (noise_sigma / 255.0)
    return quantize_8bit(noisy) if quantize else noisy.clamp(0.0, 1.0)


def degrade(
    hr: torch.Tensor,
    scale: int,
    kind: str = "BI",
    *,
    noise_sigma: float | None = None,
    blur_sigma: float = BD_SIGMA,
    generator: torch.Generator | None = None,
    quantize: bool = True,
) -> torch.Tensor:
    """Make the LR image of ``hr`` (values in ``[0, 1]``) with degradation ``kind`` ("BI", "BD" or "DN";
    case-insensitive); the LR is in ``[0, 1]``.

    ``noise_sigma`` is required for DN (0-255 scale); ``generator`` seeds its noise.
    """
    name = normalize_degradation(kind)
    if name == "BI":
        return degrade_bi(hr, scale, quantize)
    if name == "BD":
        return degrade_bd(hr, scale, blur_sigma, BD_KERNEL_SIZE, quantize)
    if noise_sigma is None:
        raise ValueError("degradation DN needs noise_sigma (std on the 0-255 scale; the paper uses 10-25)")
    return degrade_dn(hr, scale, noise_sigma, generator, quantize)


def normalize_degradation(kind: str) -> str:
    """Upper-case name of a known degradation, or ValueError listing the choices."""
    name = str(kind).upper()
    if name not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {kind!r}; choose one of {', '.join(DEGRADATIONS)}")
    return name


def _check_scale(scale: int) -> None:
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")


def _check_hr(hr: torch.Tensor, scale: int) -> None:
    _check_scale(scale)
    if not isinstance(hr, torch.Tensor) or not hr.is_floating_point():
        raise TypeError(f"hr must be a floating point tensor in [0, 1], got {getattr(hr, 'dtype', type(hr))}")
    if hr.dim() not in (3, 4):
        raise ValueError(f"hr must have shape [C, H, W] or [N, C, H, W], got {list(hr.shape)}")
    height, width = hr.shape[-2:]
    if height % scale or width % scale:
        raise ValueError(f"hr size {height}x{width} is not a multiple of scale {scale}; "
                         "crop it with modcrop() first")
    _check_unit_range(hr, "hr")


def _check_unit_range(image: torch.Tensor, name: str) -> None:
    """Values must lie in [0, 1]: a 0-255 image would be clamped to white and score a plausible PSNR."""
    if image.numel() == 0:
        return
    low, high = (float(v) for v in torch.aminmax(image.detach()))
    if not (low >= 0.0 and high <= 1.0):  # also false for NaN
        hint = "; divide 8-bit values by 255 (dlsn.images.uint8_to_tensor does)" if high > 1.0 else ""
        raise UserInputError(f"{name} values must lie in [0, 1], got min {low:g}, max {high:g}{hint}")


def _as_batch(image: torch.Tensor, name: str) -> torch.Tensor:
    if image.dim() == 3:
        return image[None]
    if image.dim() == 4:
        return image
    raise ValueError(f"{name} must have shape [C, H, W] or [N, C, H, W], got {list(image.shape)}")
