"""The ``flex`` backend: GLA written with ``torch.nn.attention.flex_attention`` (``dlsn_kernels.flex``).

Compiled FlexAttention with a backward on CUDA-type tensors; on CPU tensors an eager forward only, which
materialises ``[N, R, nc Kp, nc Kp]`` scores: sizes past ``CPU_MAX_SCORE_BYTES`` are refused before anything
is allocated. Its backward scatters the gradient of the captured ``lss`` with atomic adds (pytorch PR
#137452), so it is not bitwise repeatable and is excluded under ``torch.use_deterministic_algorithms(True)``.
"""

from __future__ import annotations

import importlib.util

import torch

from .. import flex
from ._base import Backend, Inputs

# The eager CPU path's score tensor, one float per (n, round, query slot, key slot): 4 GiB is past what a CPU
# run should allocate for one attention call (a 451x300 photo at R = 2 asked for 146 GB).
CPU_MAX_SCORE_BYTES = 4 << 30


class Flex(Backend):
    name = "flex"
    dtypes = {"cpu": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
              "cuda": (torch.float32, torch.float16, torch.bfloat16)}
    backward_on = ("cuda",)
    deterministic_backward = False

    @property
    def ops(self):
        return flex

    def device_reasons(self, device: torch.device) -> list[str]:
        why = super().device_reasons(device)
        if why:
            return why
        # found, not imported: the import pulls in torch._dynamo (about 35 MB and a second), which a process
        # that never runs flex should not pay for on its first call
        if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
            return [f"torch {torch.__version__} has no torch.nn.attention.flex_attention"]
        if device.type == "cuda":
            try:
                import triton  # noqa: F401  (compiled FlexAttention generates Triton kernels)
            except ImportError as exc:
                return [f"compiled FlexAttention needs triton ({exc})"]
        return []

    def passes(self, device: torch.device) -> str:
        return "forward and backward" if device.type == "cuda" else "forward only (gradients: backend='cpu')"

    def input_reasons(self, inputs: Inputs, pass_: str) -> list[str]:
        why = super().input_reasons(inputs, pass_)
        if inputs.device.type == "cpu" and inputs.chunk_size and inputs.dtype is not None:
            # the [N, R, nc Kp, nc Kp] scores the eager CPU path materialises, one float each
            k = inputs.chunk_size
            slots = -(-inputs.length // k) * flex.padded_chunk(k)
            need = inputs.n * max(inputs.rounds, 1) * slots**2 * (8 if inputs.dtype == torch.float64 else 4)
            if need > CPU_MAX_SCORE_BYTES:
                why.append(f"flex's eager CPU forward would materialise {need:,} bytes of scores (N={inputs.n}, "
                           f"R={inputs.rounds}, L={inputs.length}); its limit is {CPU_MAX_SCORE_BYTES:,}")
        return why
