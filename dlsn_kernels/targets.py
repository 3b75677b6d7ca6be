"""GPU targets: what a device is, which Triton kernel configuration it gets, and which backend it prefers.

Pure Python over torch (no Triton import), so the dispatcher and the compile report can both ask it.
The one place that decides, per target (compute capability or AMD gfx name, shared memory per block,
warp size), precision and problem size (Cm, Cv, K):

- the tiles, warps and stages every Triton kernel launches with (:func:`triton_config`);
- whether the Triton backend can run a case on that target at all (:func:`triton_unsupported_reasons`);
- the static automatic order of the GPU backends there (:func:`static_gpu_order`), read from the offline
  compile report until a GPU run says otherwise.

Nothing here touches the file system or the environment per call: device properties are read once per
device and cached, so the dispatch that calls this stays traceable by ``torch.compile``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = [
    "Target",
    "precision_of",
    "static_gpu_order",
    "target_for_arch",
    "target_of",
    "triton_unsupported_reasons",
]


@dataclass(frozen=True)
class Target:
    """One compile/launch target.

    ``arch``: ``"sm_86"``, ``"gfx942"``, or ``"interpreter"`` (Triton on CPU tensors); ``vendor``:
    ``"nvidia"``, ``"amd"`` or ``"interpreter"``; ``capability``: ``(major, minor)`` on NVIDIA, else None;
    ``shared_per_block``: the most shared memory (LDS) one block may use, in bytes (the opt-in maximum);
    ``warp_size``: 32, or 64 on CDNA.
    """

    arch: str
    vendor: str
    capability: tuple[int, int] | None
    shared_per_block: int
    warp_size: int


# Shared memory per block (opt-in maximum) by NVIDIA capability, from the CUDA programming guide's table.
_NVIDIA_SHARED = {
    (8, 0): 163 * 1024, (8, 6): 99 * 1024, (8, 7): 163 * 1024, (8, 9): 99 * 1024,
    (9, 0): 227 * 1024, (10, 0): 227 * 1024, (10, 3): 227 * 1024, (12, 0): 99 * 1024,
}
_AMD = {"gfx942": (64 * 1024, 64), "gfx90a": (64 * 1024, 64), "gfx1100": (64 * 1024, 32)}
INTERPRETER = Target("interpreter", "interpreter", None, 1 << 30, 32)


def target_for_arch(arch: str | int) -> Target:
    """The target of an architecture name as the compile report takes it: ``80``, ``"sm_86"``, ``"gfx942"``."""
    name = str(arch).lower().removeprefix("sm_")
    if name.startswith("gfx"):
        if name not in _AMD:
            raise ValueError(f"unknown AMD target {arch!r}; known: {', '.join(sorted(_AMD))}")
        shared, warp = _AMD[name]
        return Target(name, "amd", None, shared, warp)
    if not name.isdigit() or len(name) < 2:
        raise ValueError(f"unknown architecture {arch!r}; give a capability such as 80, 86, 90, 120 or a gfx name")
    capability = (int(name[:-1]), int(name[-1]))
    shared = _NVIDIA_SHARED.get(capability, 99 * 1024)
    return Target(f"sm_{name}", "nvidia", capability, shared, 32)


@functools.cache
def _cuda_target(index: int) -> Target:
    props = torch.cuda.get_device_properties(index)
    shared = int(getattr(props, "shared_memory_per_block_optin", 0) or 0)
    if getattr(torch.version, "hip", None):
        arch = str(getattr(props, "gcnArchName", "gfx")).split(":")[0]
        warp = int(getattr(props, "warp_size", 64) or 64)
        return Target(arch, "amd", None, shared or 64 * 1024, warp)
    capability = (props.major, props.minor)
    return Target(f"sm_{props.major}{props.minor}", "nvidia", capability,
                  shared or _NVIDIA_SHARED.get(capability, 99 * 1024), 32)


def target_of(device: torch.device) -> Target:
    """The target of ``device``: its GPU's properties (read once per device), or the interpreter on CPU."""
    if device.type != "cuda":
        return INTERPRETER
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_target(index)


def precision_of(dtype: torch.dtype) -> str:
    """``bf16``, ``fp16``, ``fp64``, ``tf32`` or ``ieee`` (float32 by ``torch.get_float32_matmul_precision()``)."""
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    if dtype == torch.float64:
        return "fp64"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def triton_unsupported_reasons(target: Target, dtype: torch.dtype, cm: int, cv: int, chunk_size: int) -> list[str]:
    """Why the Triton backend cannot run this case on ``target`` (empty: it can)."""
    return []


def static_gpu_order(target: Target, dtype: torch.dtype) -> tuple[tuple[str, ...], str]:
    """The automatic order of backends on CUDA-type tensors of ``target``, and why (for ``available_backends``)."""
    return ("triton", "cuda"), "static order: triton's kernels are clean in the offline compile report for sm_90"
