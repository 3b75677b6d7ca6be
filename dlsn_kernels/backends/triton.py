"""The ``triton`` backend: the Triton kernels of ``dlsn_kernels.triton`` on CUDA-type tensors (NVIDIA, or AMD
through a ROCm build of torch), float32/float16/bfloat16, bitwise repeatable backward. CPU tensors run only
under Triton's interpreter (``TRITON_INTERPRET=1`` before triton is imported), in float32/float64. Per-target
limits (channels, chunk size, shared memory) come from ``dlsn_kernels.targets``."""

from __future__ import annotations

import os

import torch

from .. import _ops, targets
from ._base import Backend, Inputs, constant_for_compile


class Triton(Backend):
    name = "triton"
    dtypes = {"cuda": (torch.float32, torch.float16, torch.bfloat16), "cpu": (torch.float32, torch.float64)}
    backward_on = ("cuda", "cpu")
    ops = _ops.TRITON_OPS  # filled when _ops.triton_error() (device_reasons) first loads Triton

    def device_reasons(self, device: torch.device) -> list[str]:
        why = super().device_reasons(device)
        if why:
            return why
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            return ["Triton runs on CPU tensors only in interpreter mode (set TRITON_INTERPRET=1 before importing "
                    "triton)"]
        error = _ops.triton_error()
        return [error] if error else []

    def input_reasons(self, inputs: Inputs, pass_: str) -> list[str]:
        why = super().input_reasons(inputs, pass_)
        if inputs.dtype is None or why:
            return why
        if inputs.chunk_size == 0:  # the hash: one channel row per position
            return [f"Cm = {inputs.cm} channels is above the Triton backend's limit of {targets.MAX_CHANNELS}"
                    ] if inputs.cm > targets.MAX_CHANNELS else []
        return _limits(inputs.device, inputs.dtype, inputs.cm, inputs.cv, inputs.chunk_size)


@constant_for_compile  # per (target, dtype, sizes): compiled code reads the answer, not the GPU
def _limits(device: torch.device, dtype: torch.dtype, cm: int, cv: int, chunk_size: int) -> list[str]:
    return targets.triton_unsupported_reasons(targets.target_of(device), dtype, cm, cv, chunk_size)
