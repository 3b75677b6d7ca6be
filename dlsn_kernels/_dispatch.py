"""The one dispatcher: which backend runs a call (DESIGN.md "Backends and dispatch").

``backend=`` (or ``$DLSN_BACKEND``, read once per process) runs that backend or raises with its reasons.
Automatic: the first backend of the device's order with no reasons for the call's pass. The order is computed
once per process and (device, dtype, precision): from ``python -m dlsn_kernels.check``'s per-user cache (the
fastest that passed; never one that failed), else on a GPU the static order after a first-use probe, else the
static order. Nothing is read per call and the order is a trace-time constant for ``torch.compile``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import os
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import _verify, targets
from ._checks import BackendUnavailableError
from .backends import BACKENDS, NAMES, Backend, Inputs, constant_for_compile

_log = logging.getLogger("dlsn_kernels")
_STATE: dict[str, Any] = {}  # "env": $DLSN_BACKEND as read once; "cache": the check results as read once
_DEVICE_REASONS: dict[str, dict[str, list[str]]] = {}
_ORDERS: dict[tuple[Any, ...], tuple[tuple[str, ...], str]] = {}
_PROBES: dict[tuple[str, str, str], str | None] = {}
_LOGGED: set[tuple[str, torch.dtype]] = set()


def reset() -> None:
    """Forgets everything read once per process ($DLSN_BACKEND, the cache, probes, orders): for tests and
    for a process that ran ``dlsn_kernels.check`` and wants its result now."""
    for store in (_STATE, _DEVICE_REASONS, _ORDERS, _PROBES, _LOGGED):
        store.clear()
    _STATE["env"] = (os.environ.get("DLSN_BACKEND") or "").strip().lower() or None


reset()


def requested(backend: str | None) -> str | None:
    """The backend a call names (``backend``, else ``$DLSN_BACKEND``), validated; None: automatic."""
    name = _STATE["env"] if backend is None else backend.strip().lower()
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)} or None")
    return name


def device_reasons(device: torch.device) -> dict[str, list[str]]:
    """Every backend's device and build reasons on ``device``, asked once per process and device."""
    key = str(device)
    if key not in _DEVICE_REASONS:
        _DEVICE_REASONS[key] = {name: b.device_reasons(device) for name, b in BACKENDS.items()}
    return _DEVICE_REASONS[key]


def select(name: str | None, inputs: Inputs, needs_grad: bool, op: str) -> Backend:
    """The backend for one call (``name`` from :func:`requested`); raises with the reasons when none fits."""
    pass_ = "backward" if needs_grad else "forward"
    if name is not None:
        backend = BACKENDS[name]
        # a backend with no backward here (flex on CPU) still runs forward-only calls whose inputs want
        # gradients (inference with trainable parameters): its backward raises if it is ever reached
        asked = pass_ if inputs.device.type in backend.backward_on else "forward"
        why = device_reasons(inputs.device)[name] + backend.input_reasons(inputs, asked)
        if why:
            raise BackendUnavailableError(f"backend {name!r} cannot run {op} on {inputs.device.type} tensors: "
                                          f"{'; '.join(why)}\nbackends on {inputs.device}:\n"
                                          f"{_statuses(inputs, pass_)}")
        return backend
    order, _source = automatic_order(str(inputs.device), inputs.dtype, needs_grad)
    for candidate in order:
        backend = BACKENDS[candidate]
        if not backend.input_reasons(inputs, pass_):
            return backend
    raise BackendUnavailableError(
        f"no backend can run {op} ({'forward and backward' if needs_grad else 'forward'}) automatically on "
        f"{inputs.device} tensors of {inputs.dtype} (Cm={inputs.cm}, Cv={inputs.cv}, K={inputs.chunk_size}); "
        f"pass backend='reference' for the slow plain-PyTorch path, or fix one of:\n{_statuses(inputs, pass_)}")


def _statuses(inputs: Inputs, pass_: str) -> str:
    order = set(automatic_order(str(inputs.device), inputs.dtype, pass_ == "backward")[0])
    lines = []
    for name, backend in BACKENDS.items():
        why = device_reasons(inputs.device)[name] + backend.input_reasons(inputs, pass_)
        if not why and name == "reference":
            why = ["never chosen automatically (plain PyTorch, slow); pass backend='reference'"]
        elif not why and name not in order:
            why = [f"not in the automatic order on {inputs.device} (set aside or never automatic there)"]
        lines.append(f"  {name}: {'; '.join(why) if why else 'available'}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The automatic order: the check's cache, the first-use probe, or the static order.


def cache_path() -> Path:
    """``$XDG_CACHE_HOME/dlsn_kernels/check.json`` (``~/.cache/dlsn_kernels/check.json`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dlsn_kernels" / "check.json"


@functools.cache
def _cpu_name() -> str:
    try:  # Linux names the model here; platform.processor() says only "x86_64" there
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "cpu"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def cache_key(device: torch.device, dtype: torch.dtype) -> str:
    """What a check result is valid for: device name, capability, torch and Triton versions, precision."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        name, arch = torch.cuda.get_device_name(index), targets.target_of(device).arch
    else:
        name, arch = _cpu_name(), device.type
    return (f"{name} | {arch} | torch {torch.__version__} | triton {_version('triton')} | "
            f"{targets.precision_of(dtype)}")


def _cache() -> dict[str, Any]:
    if "cache" not in _STATE:
        try:
            data = json.loads(cache_path().read_text())
            _STATE["cache"] = data.get("entries", {}) if isinstance(data, dict) else {}
        except (OSError, ValueError):
            _STATE["cache"] = {}
    return _STATE["cache"]


def static_order(device: torch.device, dtype: torch.dtype | None) -> tuple[str, ...]:
    """The order without measurements: ``cpu`` on CPU tensors; on GPUs ``targets.static_gpu_order`` of the
    target, then flex (which only a check that measured it faster moves ahead)."""
    if device.type == "cpu":
        return ("cpu",)
    if device.type != "cuda":
        return ()
    reasons = device_reasons(device)
    if reasons["triton"] and reasons["cuda"]:  # no usable GPU: the target cannot be read
        return ("triton", "cuda", "flex")
    try:
        order, _why = targets.static_gpu_order(targets.target_of(device), dtype or torch.float32)
    except (RuntimeError, AssertionError):  # the device cannot be asked its properties
        order = ("triton", "cuda")
    return (*order, *(["flex"] if "flex" not in order else []))


def compute_order(device: torch.device, dtype: torch.dtype | None, needs_grad: bool,
                  reasons: dict[str, list[str]]) -> tuple[tuple[str, ...], str]:
    """``(backends in order, source)`` for ``device`` given each backend's device ``reasons``."""
    usable = [n for n in static_order(device, dtype) if not reasons[n]]
    if dtype is None or not usable:
        return tuple(usable), "static order"
    try:
        entry = _cache().get(cache_key(device, dtype))
    except (RuntimeError, AssertionError):  # a device that cannot be asked its name
        entry = None
    if isinstance(entry, dict) and isinstance(entry.get("backends"), dict):
        results, metric = entry["backends"], "step_ms" if needs_grad else "fwd_ms"
        ranked = sorted((n for n in usable if n in results and results[n].get("passed")
                         and results[n].get(metric) is not None), key=lambda n: results[n][metric])
        rest = [n for n in usable if n not in results]  # a failed one is in results and never ranked
        return (*ranked, *rest), f"checked on {entry.get('date', '?')} by dlsn_kernels.check"
    if device.type == "cuda":
        kept = tuple(n for n in usable if _probe(device, dtype, n) is None)
        return kept, "first-use probe"
    return tuple(usable), "static order"


def _probe(device: torch.device, dtype: torch.dtype, name: str) -> str | None:
    key = (str(device), targets.precision_of(dtype), name)
    if key not in _PROBES:
        _PROBES[key] = error = _verify.probe(name, device, dtype)
        if error is not None:
            warnings.warn(f"dlsn_kernels: the {name} backend failed its first-use probe on {device} ({key[1]}): "
                          f"{error}. It is set aside for this process; run `python -m dlsn_kernels.check "
                          f"--device {device}` for the full check.", RuntimeWarning, stacklevel=2)
    return _PROBES[key]


@constant_for_compile  # torch.compile: computed at trace time, a constant in the graph
def automatic_order(device: str, dtype: torch.dtype | None, needs_grad: bool) -> tuple[tuple[str, ...], str]:
    """The automatic order (and its source) for ``device``, once per process, dtype and precision."""
    precision = torch.get_float32_matmul_precision() if dtype == torch.float32 else ""
    key = (device, dtype, precision, needs_grad)
    if key not in _ORDERS:
        dev = torch.device(device)
        _ORDERS[key] = compute_order(dev, dtype, needs_grad, device_reasons(dev))
        if dtype is not None and (device, dtype) not in _LOGGED:
            _LOGGED.add((device, dtype))
            _log.info("dlsn_kernels: automatic backend on %s for %s: %s", device, dtype, backend_summary(dev, dtype))
    return _ORDERS[key]


def backend_summary(device: torch.device | str, dtype: torch.dtype = torch.float32) -> str:
    """One line for a tool's opening: which backend runs each pass on ``device`` for ``dtype`` and why, e.g.
    ``"forward cpu, backward cpu (static order)"``."""
    device = str(torch.device(device))
    (forward, f_source), (backward, b_source) = (automatic_order(device, dtype, g) for g in (False, True))
    first, second = (order[0] if order else "none" for order in (forward, backward))
    f_note = "" if f_source == b_source else f" ({f_source})"
    return f"forward {first}{f_note}, backward {second} ({b_source})"


# ----------------------------------------------------------------------------------------------
# available_backends


@dataclass
class BackendStatus:
    """What :func:`available_backends` says about one backend: ``reason`` (None: it runs on this device),
    ``passes``, ``deterministic_backward`` (None when it cannot run) and ``automatic`` (the passes the
    automatic choice gives it, with the choice's source). ``str()``: "available (...)" or the reason."""

    name: str
    reason: str | None
    passes: str = ""
    deterministic_backward: bool | None = None
    automatic: str = ""

    @property
    def usable(self) -> bool:
        return self.reason is None

    def __str__(self) -> str:
        if self.reason is not None:
            return self.reason
        notes = [n for n in (self.passes, self.automatic) if n]
        if self.deterministic_backward is not None and "forward only" not in self.passes:
            notes.append("deterministic backward" if self.deterministic_backward
                         else "backward not bitwise repeatable")
        return "available" + (f" ({'; '.join(notes)})" if notes else "")


class BackendTable(dict):
    """``{name: BackendStatus}`` whose ``str()`` is a table."""

    def __str__(self) -> str:
        rows = [("backend", "runs here", "passes", "repeatable backward", "automatic choice, or why it cannot run")]
        for name, s in self.items():
            repeatable = {None: "-", True: "yes", False: "no"}[s.deterministic_backward]
            rows.append((name, "yes" if s.usable else "no", s.passes or "-", repeatable,
                         (s.automatic or "-") if s.usable else str(s.reason)))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4] for r in rows)

    __repr__ = __str__


def available_backends(device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> BackendTable:
    """Every backend on ``device``: whether it runs here and why not, its passes, whether its backward is
    bitwise repeatable, and which passes the automatic choice gives it for ``dtype`` (float32 when None),
    with the source of that choice. Asked afresh (the dispatcher keeps its own answers per process)."""
    device = torch.device(device)
    dtype = dtype or torch.float32
    reasons = {name: b.device_reasons(device) for name, b in BACKENDS.items()}
    picks = {}
    for label, grad in (("forward", False), ("backward", True)):
        order, source = compute_order(device, dtype, grad, reasons)
        if order:
            picks.setdefault(order[0], []).append(label)
            picks.setdefault("source", source)
    table = BackendTable()
    for name, backend in BACKENDS.items():
        why = "; ".join(reasons[name]) or None
        auto = picks.get(name)
        table[name] = BackendStatus(
            name, why, backend.passes(device) if why is None else "",
            backend.deterministic_backward if why is None else None,
            f"automatic {' and '.join(auto)} for {targets.precision_of(dtype)}: {picks['source']}" if auto else "")
    return table
