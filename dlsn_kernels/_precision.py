"""The precision policy of every backend (README "Precision", DESIGN.md "Precision").

- float16/bfloat16 inputs: dot products with float32 accumulation (tensor cores on CUDA; on the CPU the rows
  are read in 16 bits and widened into float32 tiles for SGEMM); softmax and lse in float32.
- float32 inputs follow ``torch.get_float32_matmul_precision()``: "highest" is IEEE float32, "high" and
  "medium" allow TF32 tensor cores (the Triton and cuda backends use them; the cpu backend is always IEEE).
- The hash projection is IEEE float32 whatever the input dtype: TF32 or half-precision products flip codes.
- Under ``torch.autocast`` (CUDA or CPU) the attention ops cast their own float32 inputs to the autocast dtype
  (``rot`` too, since the op contract wants it in ``xm``'s dtype; the product itself stays float32), so a
  model need not cast before calling them. The one backend that takes no 16-bit inputs, Triton's interpreter
  on CPU tensors, is left in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import takes_half

__all__ = ["autocast_dtype", "cast_floats", "cast_for_autocast"]


def autocast_dtype(device: torch.device, backend: str | None = None) -> torch.dtype | None:
    """The dtype autocast asks for on ``device`` now, or None when autocast is off there or ``backend`` (a
    resolved name; None: any that takes 16-bit inputs) cannot compute it (dlsn_kernels._checks.takes_half)."""
    if device.type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device.type):
        return None
    if backend is not None and not takes_half(device, backend):
        return None
    return torch.get_autocast_dtype(device.type)


def cast_floats(dtype: torch.dtype | None, *tensors: Tensor) -> tuple[Tensor, ...]:
    """The float32 tensors among ``tensors`` cast to ``dtype`` (None: nothing changes). float64 inputs ask for
    an exact computation and integer ones are indices: autocast leaves both alone, and so does this."""
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.dtype == torch.float32 else t for t in tensors)


def cast_for_autocast(*tensors: Tensor, backend: str | None = None) -> tuple[Tensor, ...]:
    """``tensors`` in the autocast dtype of their device when autocast is on there (and ``backend`` computes
    that dtype); unchanged otherwise."""
    if not tensors or not isinstance(tensors[0], Tensor):
        return tensors
    return cast_floats(autocast_dtype(tensors[0].device, backend), *tensors)
