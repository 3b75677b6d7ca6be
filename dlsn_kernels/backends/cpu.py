"""The ``cpu`` backend: the compiled C++ kernels (csrc/cpu) on CPU tensors, float32/float64/float16/bfloat16,
forward and a bitwise repeatable backward (fixed summation order, no atomics)."""

from __future__ import annotations

import torch

from .. import _ops
from ._base import Backend


class Cpu(Backend):
    name = "cpu"
    dtypes = {"cpu": (torch.float32, torch.float64, torch.float16, torch.bfloat16)}
    backward_on = ("cpu",)
    ops = torch.ops.dlsn

    def device_reasons(self, device: torch.device) -> list[str]:
        return super().device_reasons(device) or ([_ops.C_ERROR] if _ops.C_ERROR else [])
