"""The upsampling tail in horizontal bands at inference: the same output with a fraction of the memory.

A network's tail (sub-pixel convolution C -> s^2 C, PixelShuffle, conv to RGB) holds the largest tensors of
an inference call: at x2 the convolution's output and the shuffled copy are each 4x a feature map, about
134 MB together for a 256-channel 128x128 image and 8.6 GB at 1024x1024, more than the whole body needs.
Without autograd the tail runs on bands of LR rows, each with a halo of the rows its convolutions read
(one row per 3x3 convolution, counted at the LR resolution, where it is widest), and writes the band's rows
into the output. Rows inside a band see exactly the inputs they see in the whole image (zero padding only at
the image's own borders), so the result is the whole-image tail's up to the convolution's summation order.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["BAND_PIXELS", "run_tail", "tail_halo"]

# LR pixels per band: 8192 keeps a 256-channel x2 band's largest tensor near 34 MB (float32) while the
# convolutions stay large enough to run at full speed; bands get at least MIN_BAND_ROWS rows so that the halo
# (2 rows each side at x2) adds at most a quarter to the tail's work, about 1% of a DLSN call.
BAND_PIXELS = 8192
MIN_BAND_ROWS = 16

_POINTWISE = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity)


def tail_halo(tail: nn.Module) -> int | None:
    """LR rows a band must borrow on each side (the sum of the convolutions' vertical reach), or None when the
    tail holds a layer whose rows are not local (then it runs whole)."""
    halo = 0
    for module in tail.modules():
        if isinstance(module, nn.Conv2d):
            if module.stride[0] != 1 or module.dilation[0] != 1 or module.padding[0] != module.kernel_size[0] // 2:
                return None
            halo += module.kernel_size[0] // 2
        elif not isinstance(module, (nn.Sequential, nn.PixelShuffle, *_POINTWISE)):
            return None
    return halo


def run_tail(tail: nn.Module, x: Tensor, scale: int, band_pixels: int | None = None) -> Tensor:
    """``tail(x)`` for ``x [N, C, H, W]``: whole under autograd or when ``x`` fits one band, else band by band
    (``band_pixels`` LR pixels each, default ``BAND_PIXELS``)."""
    height, width = x.shape[-2:]
    rows = max(MIN_BAND_ROWS, math.ceil((band_pixels or BAND_PIXELS) / max(width, 1)))
    halo = tail_halo(tail)
    if torch.is_grad_enabled() or halo is None or height <= rows:
        return tail(x)
    out: Tensor | None = None
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        lo, hi = max(0, top - halo), min(height, bottom + halo)
        band = tail(x[:, :, lo:hi])
        if out is None:
            out = band.new_empty((*band.shape[:2], height * scale, width * scale))
        out[:, :, top * scale:bottom * scale] = band[:, :, (top - lo) * scale:(bottom - lo) * scale]
    assert out is not None
    return out
