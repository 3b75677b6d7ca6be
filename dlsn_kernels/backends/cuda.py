"""The ``cuda`` backend: the compiled CUDA C++ kernels (csrc/cuda) on NVIDIA GPUs, float32/float16/bfloat16,
with a bitwise repeatable backward. A ROCm build of torch has no such kernels: this backend says so there."""

from __future__ import annotations

import torch

from .. import _ops
from ._base import Backend


class Cuda(Backend):
    name = "cuda"
    dtypes = {"cuda": (torch.float32, torch.float16, torch.bfloat16)}
    backward_on = ("cuda",)
    ops = torch.ops.dlsn
    nvidia_only = True

    def device_reasons(self, device: torch.device) -> list[str]:
        why = super().device_reasons(device)
        if why:
            return why
        if _ops.C_ERROR is not None:
            return [_ops.C_ERROR]
        if not torch._C._dispatch_has_kernel_for_dispatch_key("dlsn::chunk_attention", "CUDA"):
            return ["the extension was built without CUDA kernels (rebuild with DLSN_WITH_CUDA=1)"]
        return []
