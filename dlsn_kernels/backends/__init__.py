"""The five backends, one module each: ``reference``, ``cpu``, ``cuda``, ``triton``, ``flex``.

``BACKENDS`` maps each name to its :class:`Backend` (declarations and ``not_supported_reasons``); the
dispatcher (``dlsn_kernels._dispatch``) asks them in the order of the device.
"""

from __future__ import annotations

from ._base import PASSES, Backend, Inputs, constant_for_compile
from .cpu import Cpu
from .cuda import Cuda
from .flex import Flex
from .reference import Reference
from .triton import Triton

BACKENDS: dict[str, Backend] = {b.name: b for b in (Reference(), Cpu(), Cuda(), Triton(), Flex())}
NAMES = tuple(BACKENDS)

__all__ = ["BACKENDS", "NAMES", "PASSES", "Backend", "Inputs", "constant_for_compile"]
