"""The compute dtype of a whole network at inference (the ``--dtype`` of ``dlsn.upscale`` and ``dlsn.eval``).

``float32`` runs everything in IEEE float32. ``bfloat16`` runs the network under
``torch.autocast(<device>, dtype=torch.bfloat16)``: convolutions and linear layers in bfloat16 with
float32 accumulation, the attention op as the precision policy says (DESIGN.md "Precision"); the
output is returned as float32 before it is rounded to 8 bits.

The default (:func:`default_dtype`) is a measured choice, see the README's "What is fast where".
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

__all__ = ["DTYPES", "autocast", "cpu_has_fast_bf16", "default_dtype", "with_dtype"]

DTYPES = ("float32", "bfloat16")


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX-BF16): there
    oneDNN's bfloat16 convolutions are about twice as fast as float32 ones (bench/NOTES.md)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def default_dtype(device: torch.device | str) -> str:
    """``bfloat16`` on a CPU with bfloat16 instructions, else ``float32`` (the GPU is not measured yet)."""
    if torch.device(device).type == "cpu" and cpu_has_fast_bf16():
        return "bfloat16"
    return "float32"


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


@contextlib.contextmanager
def autocast(device: torch.device | str, dtype: str) -> Iterator[None]:
    """Runs the block in ``dtype`` on ``device`` (``float32``: no autocast).

    Without autocast's weight cache: an inference forward uses each weight once, so the cache saves no cast
    and only keeps a bfloat16 copy of every weight alive to the end of the call (140 MB for ``paper``, most
    of a bfloat16 call's peak memory; ``bench/NOTES.md``)."""
    check_dtype(dtype)
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                        enabled=dtype == "bfloat16", cache_enabled=False):
        yield


def with_dtype(forward: Callable[[Tensor], Tensor], dtype: str) -> Callable[[Tensor], Tensor]:
    """``forward`` run in ``dtype`` (on its input's device), returning float32."""
    check_dtype(dtype)
    if dtype == "float32":
        return forward

    def run(x: Tensor) -> Tensor:
        with autocast(x.device, dtype):
            y = forward(x)
        return y.float()

    return run
