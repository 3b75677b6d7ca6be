"""MATLAB-style bicubic ``imresize`` in PyTorch.

SR data sets (DIV2K, Set5, ...) were made with MATLAB's ``imresize(img, 1/s, 'bicubic')``; PIL and
``torch.nn.functional.interpolate`` differ from it at the borders or in antialiasing, which costs
tenths of a dB when comparing with published numbers. This module reproduces MATLAB's rule:

- cubic kernel with a = -0.5 (Keys):
  ``1.5|x|^3 - 2.5|x|^2 + 1`` for ``|x| <= 1``, ``-0.5|x|^3 + 2.5|x|^2 - 4|x| + 2`` for ``1 < |x| <= 2``;
- output pixel ``i`` (1-based) samples input coordinate ``u = i / scale + 0.5 * (1 - 1 / scale)``;
- when shrinking (``scale < 1``) with antialiasing, the kernel is stretched:
  ``h(x) = scale * cubic(scale * x)``, and its support grows to ``4 / scale`` input pixels;
- the taps of each output pixel are normalised to sum to 1, then indices outside the image are mirrored
  symmetrically (``... 2 1 | 1 2 ... n | n n-1 ...``, the edge pixel repeated);
- output size ``ceil(in * scale)`` when a scale is given.

The resize is separable and linear, so each axis becomes one dense ``[out, in]`` matrix and the image is
``M_h @ x @ M_w^T``, computed in the input's float dtype (matrices are built in float64).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's ``cubic``)."""
    absx = x.abs()
    absx2 = absx * absx
    absx3 = absx2 * absx
    near = (1.5 * absx3 - 2.5 * absx2 + 1.0) * (absx <= 1)
    far = (-0.5 * absx3 + 2.5 * absx2 - 4.0 * absx + 2.0) * ((absx > 1) & (absx <= 2))
    return near + far


def resize_matrix(in_length: int, out_length: int, scale: float, antialias: bool = True) -> torch.Tensor:
    """The ``[out_length, in_length]`` float64 matrix that resizes one axis the MATLAB way.

    ``scale`` is the factor the kernel is built for (``out / in`` when sizes are given); shrinking with
    ``antialias`` widens the kernel by ``1 / scale``.
    """
    if in_length < 1 or out_length < 1:
        raise ValueError(f"resize lengths must be positive, got in_length={in_length}, "
                         f"out_length={out_length}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    shrink = scale < 1 and antialias
    kernel_width = 4.0 / scale if shrink else 4.0

    out_pos = torch.arange(1, out_length + 1, dtype=torch.float64)
    # Input coordinate (1-based) that each output pixel centre maps to.
    u = out_pos / scale + 0.5 * (1.0 - 1.0 / scale)
    left = torch.floor(u - kernel_width / 2.0)
    taps = math.ceil(kernel_width) + 2
    index = left[:, None] + torch.arange(taps, dtype=torch.float64)[None, :]  # 1-based, may fall outside
    distance = u[:, None] - index
    weight = scale * cubic(scale * distance) if shrink else cubic(distance)
    weight = weight / weight.sum(dim=1, keepdim=True)

    # Symmetric mirror of out-of-range indices: period 2n over [0..n-1, n-1..0] (0-based).
    zero_based = index.long() - 1
    period = torch.remainder(zero_based, 2 * in_length)
    mirrored = torch.where(period < in_length, period, 2 * in_length - 1 - period)

    matrix = torch.zeros(out_length, in_length, dtype=torch.float64)
    matrix.scatter_add_(1, mirrored, weight)  # mirrored taps can land on the same pixel: add them
    return matrix


def _pair(value: float | Sequence[float], name: str) -> tuple[float, float]:
    if isinstance(value, (int, float)):
        return float(value), float(value)
    values = tuple(float(v) for v in value)
    if len(values) != 2:
        raise ValueError(f"{name} must be a number or a pair (height, width), got {value!r}")
    return values  # type: ignore[return-value]


def output_size(in_size: tuple[int, int], scale: float | Sequence[float]) -> tuple[int, int]:
    """MATLAB's output size ``ceil(in * scale)``, tolerant of float error (``300 * (1/3)`` gives 100)."""
    scale_h, scale_w = _pair(scale, "scale")
    return (math.ceil(in_size[0] * scale_h - 1e-9), math.ceil(in_size[1] * scale_w - 1e-9))


def imresize(
    image: torch.Tensor,
    scale: float | Sequence[float] | None = None,
    size: Sequence[int] | None = None,
    antialias: bool = True,
) -> torch.Tensor:
    """Resize like MATLAB ``imresize(image, scale, 'bicubic')`` (give ``scale`` or ``size``, not both).

    image: float tensor ``[..., H, W]`` (``[C, H, W]`` or ``[N, C, H, W]``), any range; the result is not
        clamped (bicubic overshoots a little near edges; quantise afterwards to get 8-bit images).
    scale: factor, or ``(factor_h, factor_w)``; ``0.5`` halves. The kernel uses this exact factor.
    size: ``(out_h, out_w)``; the factor per axis is then ``out / in``.
    """
    if not isinstance(image, torch.Tensor) or not image.is_floating_point():
        raise TypeError(f"imresize needs a floating point tensor, got "
                        f"{getattr(image, 'dtype', type(image).__name__)}")
    if image.dim() < 2:
        raise ValueError(f"image must have at least 2 dimensions [..., H, W], got shape {list(image.shape)}")
    if (scale is None) == (size is None):
        raise ValueError("give exactly one of scale or size")
    in_h, in_w = image.shape[-2], image.shape[-1]
    if size is not None:
        if len(size) != 2 or any(int(s) < 1 for s in size):
            raise ValueError(f"size must be (out_h, out_w) with positive values, got {size!r}")
        out_h, out_w = int(size[0]), int(size[1])
        scale_h, scale_w = out_h / in_h, out_w / in_w
    else:
        scale_h, scale_w = _pair(scale, "scale")
        if scale_h <= 0 or scale_w <= 0:
            raise ValueError(f"scale must be positive, got {scale!r}")
        out_h, out_w = output_size((in_h, in_w), (scale_h, scale_w))

    # An axis kept at factor 1 is the identity (the cubic is 1 at 0 and 0 at other integers): skip it.
    result = image
    if out_h != in_h or scale_h != 1:
        rows = resize_matrix(in_h, out_h, scale_h, antialias).to(device=image.device, dtype=image.dtype)
        result = torch.matmul(rows, result)
    if out_w != in_w or scale_w != 1:
        cols = resize_matrix(in_w, out_w, scale_w, antialias).to(device=image.device, dtype=image.dtype)
        result = torch.matmul(result, cols.transpose(0, 1))
    return result.contiguous() if result is not image else image.clone()


def bicubic_downsample(image: torch.Tensor, factor: int) -> torch.Tensor:
    """``imresize(image, 1 / factor)``: MATLAB bicubic shrink by an integer factor (``ceil(H / factor)``)."""
    _check_factor(factor)
    return imresize(image, scale=1.0 / factor)


def bicubic_upsample(image: torch.Tensor, factor: int) -> torch.Tensor:
    """``imresize(image, factor)``: MATLAB bicubic enlargement by an integer factor (the SR baseline)."""
    _check_factor(factor)
    return imresize(image, scale=float(factor))


def _check_factor(factor: int) -> None:
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor!r}")
