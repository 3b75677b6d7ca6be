"""The ``reference`` backend: plain PyTorch (``dlsn_kernels.reference``), every device and floating dtype,
gradients by autograd. Slow and memory-hungry by design: never chosen automatically."""

from __future__ import annotations

import torch

from ._base import Backend

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class Reference(Backend):
    name = "reference"
    dtypes = {"cpu": _FLOATS, "cuda": _FLOATS, "meta": _FLOATS}
    backward_on = ("cpu", "cuda", "meta")

    def device_reasons(self, device: torch.device) -> list[str]:
        return []  # plain PyTorch runs wherever its tensors live

    def input_reasons(self, inputs, pass_: str) -> list[str]:
        return []
