"""The precision policy under ``torch.autocast`` (DESIGN.md "Precision" states the policy of every backend).

Under autocast (CUDA or CPU) the attention ops cast their own float32 inputs to the autocast dtype (``rot`` too,
as the op contract wants it in ``xm``'s dtype; the hash product itself stays IEEE float32), so a model need not
cast before calling them. A backend that declares no 16-bit dtype on the device (Triton's interpreter on CPU
tensors) is left in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backends import BACKENDS

__all__ = ["autocast_dtype", "cast_floats", "takes_half"]


def takes_half(device: torch.device, backend: str | None) -> bool:
    """Whether ``backend`` (a resolved name; None: automatic, which always finds one) computes bfloat16 and
    float16 tensors of ``device``, as its declared dtypes say."""
    return backend is None or torch.bfloat16 in BACKENDS[backend].dtypes.get(device.type, (torch.bfloat16,))


def autocast_dtype(device: torch.device, backend: str | None = None) -> torch.dtype | None:
    """The dtype autocast asks for on ``device`` now, or None when autocast is off there or ``backend``
    cannot compute it (:func:`takes_half`)."""
    if device.type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device.type):
        return None
    if not takes_half(device, backend):
        return None
    return torch.get_autocast_dtype(device.type)


def cast_floats(dtype: torch.dtype | None, *tensors: Tensor) -> tuple[Tensor, ...]:
    """The float32 tensors among ``tensors`` cast to ``dtype`` (None: nothing changes). float64 inputs ask for
    an exact computation and integer ones are indices: autocast leaves both alone, and so does this."""
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.dtype == torch.float32 else t for t in tensors)
