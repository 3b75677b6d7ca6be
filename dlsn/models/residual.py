"""``body * scale + x``, the skip connection of every block, without temporaries at inference."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["scaled_residual"]


def scaled_residual(body: Tensor, x: Tensor, scale: float) -> Tensor:
    """``body * scale + x``. ``body`` must be a fresh result (a layer's output or a view of one) that nothing
    else reads afterwards.

    Without autograd it is scaled and added in place, with the same roundings (a product, then a sum): at
    inference the expression would allocate two more feature maps per block, of which one (LFFB's ``* 1.0``)
    is a copy, and the peak of a call holds them (about 34 MB at 256 channels and 128x128 in float32). Under
    autograd, or where the result's dtype or shape would differ from ``body``'s, it is the plain expression.
    """
    if (torch.is_grad_enabled() or body.shape != x.shape or body.dtype != x.dtype
            or body is x):
        return body * scale + x
    if scale != 1.0:
        body.mul_(scale)
    return body.add_(x)
