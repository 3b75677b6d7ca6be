"""The precision policy of every backend (README "Precision", DESIGN.md "Precision").

- float16/bfloat16 inputs: dot products on tensor cores with float32 accumulation; softmax and lse in float32.
- float32 inputs follow ``torch.get_float32_matmul_precision()``: "highest" is IEEE float32, "high" and
  "medium" allow TF32 tensor cores (the Triton and cuda backends use them; the cpu backend is always IEEE).
- The hash projection is IEEE float32 whatever the input dtype: TF32 or half-precision products flip codes.
- Under ``torch.autocast`` on CUDA the attention ops cast their own float32 inputs to the autocast dtype
  (``rot`` too, since the op contract wants it in ``xm``'s dtype; the product itself stays float32), so a
  model need not cast before calling them.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["autocast_dtype", "cast_floats", "cast_for_autocast"]


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast asks for on ``device`` now, or None when autocast is off there (or on CPU, where the
    kernels are float32/float64 only)."""
    if device.type != "cuda" or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def cast_floats(dtype: torch.dtype | None, *tensors: Tensor) -> tuple[Tensor, ...]:
    """The float32 tensors among ``tensors`` cast to ``dtype`` (None: nothing changes). float64 inputs ask for
    an exact computation and integer ones are indices: autocast leaves both alone, and so does this."""
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.dtype == torch.float32 else t for t in tensors)


def cast_for_autocast(*tensors: Tensor) -> tuple[Tensor, ...]:
    """``tensors`` in the autocast dtype of their device when autocast is on there; unchanged otherwise."""
    if not tensors or not isinstance(tensors[0], Tensor):
        return tensors
    return cast_floats(autocast_dtype(tensors[0].device), *tensors)
