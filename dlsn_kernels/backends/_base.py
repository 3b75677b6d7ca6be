"""What every backend declares, and the device questions they share (DESIGN.md "Dispatch").

:meth:`Backend.not_supported_reasons` is empty when a backend can run a pass on some inputs, else one sentence per
obstacle. It is split in two so that the dispatcher keeps the slow half per process: :meth:`Backend.device_reasons`
(device and build: a GPU, the extension, Triton) and :meth:`Backend.input_reasons` (dtype, sizes and limits, and
determinism for the backward; cheap, per call).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import torch

_F = TypeVar("_F", bound=Callable[..., Any])


def constant_for_compile(fn: _F) -> _F:
    """``torch.compiler.assume_constant_result`` without importing torch._dynamo (and with it Triton) at our
    import: torch.compile calls ``fn`` at trace time and puts its answer in the graph as a constant. It marks
    the function the same way (tests/test_compile.py checks the whole choice traces with 0 graph breaks)."""
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn

PASSES = ("forward", "backward")
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CPU_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class Inputs(NamedTuple):
    """What a backend's limits depend on: ``dtype`` is None for index-only ops (``bucket_sort``); sizes are 0
    where an op has none (``rounds`` R, ``n`` N, ``length`` L)."""

    device: torch.device
    dtype: torch.dtype | None
    cm: int = 0
    cv: int = 0
    chunk_size: int = 0
    n: int = 0
    length: int = 0
    rounds: int = 0


def _dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def cuda_device_reasons(device: torch.device, nvidia_only: bool = False) -> list[str]:
    """Why nothing can run on the CUDA-type ``device`` (empty when something can). Registration alone proves
    nothing: a CUDA build of torch registers CUDA kernels on a machine without a GPU. On a ROCm build of torch
    (``torch.version.hip``) CUDA-type tensors live on an AMD GPU: ``nvidia_only`` backends refuse them."""
    hip = getattr(torch.version, "hip", None)
    if nvidia_only and hip:
        return [f"needs an NVIDIA (CUDA) build of torch; this one ({torch.__version__}) is a ROCm build (HIP {hip})"]
    if torch.version.cuda is None and not hip:
        return [f"this torch build ({torch.__version__}) has no CUDA or ROCm support"]
    if not torch.cuda.is_available():
        return ["no GPU is visible (torch.cuda.is_available() is False)"]
    if device.index is not None and device.index >= torch.cuda.device_count():
        return [f"CUDA device {device.index} does not exist ({torch.cuda.device_count()} visible)"]
    return []


class Backend:
    """One backend. Subclasses set the class attributes and may extend the two reason methods.

    ``dtypes``: per device type, the floating dtypes it computes; ``backward_on``: device types with a
    backward; ``deterministic_backward``: whether two backward runs give the same bits (no atomics).
    ``max_channels``/``max_chunk``: None when unbounded; ``nvidia_only``: refuses the AMD GPUs of a ROCm torch.
    """

    name = ""
    dtypes: dict[str, tuple[torch.dtype, ...]] = {"cpu": _CPU_DTYPES, "cuda": _CUDA_DTYPES}
    backward_on: tuple[str, ...] = ("cpu", "cuda")
    deterministic_backward = True
    max_channels: int | None = None
    max_chunk: int | None = None
    nvidia_only = False

    ops: Any = None  # the five ops of DESIGN.md "Operators" as attributes; None: the reference (plain PyTorch)

    def device_reasons(self, device: torch.device) -> list[str]:
        """Why this backend cannot run on ``device`` at all (build, GPU, interpreter); empty when it can."""
        if device.type not in self.dtypes:
            return [f"the {self.name} backend takes {' or '.join(self.dtypes)} tensors, got {device.type}"]
        return cuda_device_reasons(device, self.nvidia_only) if device.type == "cuda" else []

    def input_reasons(self, inputs: Inputs, pass_: str) -> list[str]:
        """Why this backend cannot run ``pass_`` ("forward" or "backward") on ``inputs`` on a device it supports."""
        why: list[str] = []
        kind = inputs.device.type
        allowed = self.dtypes.get(kind)
        if allowed is None:  # not this backend's device at all: device_reasons says so
            return why
        if inputs.dtype is not None and inputs.dtype not in allowed:
            why.append(f"{self.name} takes {_dtype_names(allowed)} on {kind}, got {_dtype_names((inputs.dtype,))}")
        if self.max_channels is not None and max(inputs.cm, inputs.cv) > self.max_channels:
            why.append(f"Cm = {inputs.cm}, Cv = {inputs.cv}: {self.name} takes at most {self.max_channels} channels")
        if self.max_chunk is not None and inputs.chunk_size > self.max_chunk:
            why.append(f"chunk_size {inputs.chunk_size} is above {self.name}'s limit of {self.max_chunk}")
        if pass_ == "backward":
            if kind not in self.backward_on:
                why.append(f"{self.name} has no backward on {kind} tensors")
            elif not self.deterministic_backward and torch.are_deterministic_algorithms_enabled():
                why.append(f"{self.name}'s backward is not bitwise repeatable (atomic adds) and "
                           "torch.use_deterministic_algorithms(True) is on")
        return why

    def not_supported_reasons(self, inputs: Inputs, pass_: str) -> list[str]:
        """Every reason this backend cannot run ``pass_`` on ``inputs``: empty when it can."""
        return self.device_reasons(inputs.device) + self.input_reasons(inputs, pass_)

    def passes(self, device: torch.device) -> str:
        if device.type in self.backward_on:
            return "forward and backward"
        return f"forward only (no backward on {device.type} tensors)"
