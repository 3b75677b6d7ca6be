"""Backends of the ``dlsn`` operators: loading ``_C``, fake kernels, autograd, backend choice.

Every compiled or Triton backend provides the five operators of DESIGN.md (``sblsh_hash``,
``bucket_sort``, ``chunk_attention``, ``gla_attention``, ``attention_backward``) as torch.library
ops. Fake kernels and autograd are registered here once per op, with one formula for all
backends. The ``reference`` backend is plain PyTorch and differentiates through autograd.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

BACKENDS = ("reference", "cpu", "cuda", "triton", "flex")

# The operator contract, written once: the dlsn namespace is defined here, before the compiled extension is
# loaded, and its CPU/CUDA kernels (csrc/cpu, csrc/cuda) register implementations of these names; the Triton
# backend defines dlsn::triton_<name> with the same schemas.
SCHEMAS = {
    "sblsh_hash": "(Tensor xm, Tensor rot) -> Tensor",
    "bucket_sort": "(Tensor codes, int n_buckets) -> Tensor",
    "chunk_attention": "(Tensor xm, Tensor v, Tensor lss, Tensor perm, int chunk_size) -> (Tensor, Tensor)",
    "gla_attention": "(Tensor xm, Tensor v, Tensor lss, Tensor rot, int chunk_size) -> (Tensor, Tensor, Tensor)",
    "attention_backward": (
        "(Tensor grad_out, Tensor delta, Tensor xm, Tensor v, Tensor lss, Tensor perm, Tensor lse, "
        "int chunk_size) -> (Tensor, Tensor, Tensor)"
    ),
}
OP_NAMES = tuple(SCHEMAS)

_LIBRARY = torch.library.Library("dlsn", "DEF")  # kept alive: dropping it would remove the definitions
for _name, _schema in SCHEMAS.items():
    _LIBRARY.define(_name + _schema)

_BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` from the repository root "
    "(see README.md, 'Install')"
)

try:
    from . import _C  # noqa: F401  (importing registers the C++ ops and their CPU/CUDA kernels)

    _C_ERROR: str | None = None
except ImportError as exc:  # a missing or broken build must say how to fix it
    if importlib.util.find_spec(f"{__package__}._C") is None:
        _C_ERROR = f"the compiled extension dlsn_kernels._C is not built; {_BUILD_HINT}"
    else:
        _C_ERROR = f"the compiled extension dlsn_kernels._C failed to load ({exc}); rebuild it: {_BUILD_HINT}"


class BackendUnavailableError(RuntimeError):
    """Raised when a requested backend cannot run for the given tensors."""


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# Fake kernels: shapes and dtypes only, shared by the C++ and the Triton ops.


def _fake_sblsh_hash(xm: Tensor, rot: Tensor) -> Tensor:
    return xm.new_empty((xm.shape[0], rot.shape[1], xm.shape[1]), dtype=torch.int64)


def _fake_bucket_sort(codes: Tensor, n_buckets: int) -> Tensor:
    return torch.empty_like(codes, dtype=torch.int64)


def _fake_chunk_attention(xm: Tensor, v: Tensor, lss: Tensor, perm: Tensor, chunk_size: int):
    n, length, _ = xm.shape
    rounds = perm.shape[1]
    out = v.new_empty((n, rounds, length, v.shape[2]))
    lse = xm.new_empty((n, rounds, length), dtype=_acc_dtype(xm.dtype))
    return out, lse


def _fake_gla_attention(xm: Tensor, v: Tensor, lss: Tensor, rot: Tensor, chunk_size: int):
    n, length, _ = xm.shape
    y = v.new_empty((n, length, v.shape[2]))
    lse = xm.new_empty((n, length), dtype=_acc_dtype(xm.dtype))
    perm = xm.new_empty((n, rot.shape[1], length), dtype=torch.int64)
    return y, lse, perm


def _fake_attention_backward(grad_out, delta, xm, v, lss, perm, lse, chunk_size):
    return torch.empty_like(xm), torch.empty_like(v), torch.empty_like(lss)


_FAKES: dict[str, Callable[..., Any]] = {
    "sblsh_hash": _fake_sblsh_hash,
    "bucket_sort": _fake_bucket_sort,
    "chunk_attention": _fake_chunk_attention,
    "gla_attention": _fake_gla_attention,
    "attention_backward": _fake_attention_backward,
}


# ----------------------------------------------------------------------------------------------
# Autograd: one formula for every backend (DESIGN.md, "Backward: one kernel for both ops").


def _incoming(grad: Tensor | None, out: Tensor, lse: Tensor, grad_lse: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(grad_out, delta)`` for attention_backward: ``delta = rowsum(grad_out * out) - grad_lse``."""
    if grad is None:
        grad = torch.zeros_like(out)
    delta = (grad.to(lse.dtype) * out.to(lse.dtype)).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse
    return grad.contiguous(), delta.contiguous()


def _register_autograd(chunk_op, gla_op, backward_op) -> None:
    def chunk_setup(ctx, inputs, output):
        xm, v, lss, perm, chunk_size = inputs
        out, lse = output
        ctx.save_for_backward(xm, v, lss, perm, out, lse)
        ctx.chunk_size = chunk_size

    def chunk_backward(ctx, grad_out, grad_lse):
        xm, v, lss, perm, out, lse = ctx.saved_tensors
        grad_out, delta = _incoming(grad_out, out, lse, grad_lse)
        dxm, dv, dlss = backward_op(grad_out, delta, xm, v, lss, perm, lse, ctx.chunk_size)
        return dxm, dv, dlss, None, None

    def gla_setup(ctx, inputs, output):
        xm, v, lss, _rot, chunk_size = inputs
        y, lse, perm = output
        ctx.save_for_backward(xm, v, lss, perm, y, lse)
        ctx.chunk_size = chunk_size

    def gla_backward(ctx, grad_y, grad_lse, _grad_perm):
        # Rounds merged = one softmax over every round's keys: a single "round" of grads (R' = 1).
        xm, v, lss, perm, y, lse = ctx.saved_tensors
        grad_y, delta = _incoming(grad_y, y, lse, grad_lse)
        dxm, dv, dlss = backward_op(
            grad_y.unsqueeze(1), delta.unsqueeze(1), xm, v, lss, perm, lse.unsqueeze(1), ctx.chunk_size
        )
        return dxm, dv, dlss, None, None

    torch.library.register_autograd(chunk_op, chunk_backward, setup_context=chunk_setup)
    torch.library.register_autograd(gla_op, gla_backward, setup_context=gla_setup)


def _register_cpp_ops() -> None:
    for name in OP_NAMES:
        torch.library.register_fake(f"dlsn::{name}", _FAKES[name])
    _register_autograd("dlsn::chunk_attention", "dlsn::gla_attention", torch.ops.dlsn.attention_backward)


if _C_ERROR is None:
    _register_cpp_ops()


# ----------------------------------------------------------------------------------------------
# Triton: the plain functions of dlsn_kernels.triton wrapped as torch.library custom ops.


def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not importable ({exc}); `pip install triton`"
    return None


_TRITON_OPS: dict[str, Any] = {}


def _register_triton_ops() -> None:
    from . import triton as tk

    for name, schema in SCHEMAS.items():
        op = torch.library.custom_op(
            f"dlsn::triton_{name}", getattr(tk, name), mutates_args=(), schema=schema
        )
        op.register_fake(_FAKES[name])
        _TRITON_OPS[name] = op
    _register_autograd(
        _TRITON_OPS["chunk_attention"], _TRITON_OPS["gla_attention"], _TRITON_OPS["attention_backward"]
    )


@functools.cache
def _triton_ready() -> str | None:
    """Imports Triton and registers its ops on first use (not at ``import dlsn_kernels``: Triton is slow to
    import and decides the interpreter mode at its own import); returns why they cannot run, or None."""
    error = _triton_import_error()
    if error is not None:
        return error
    try:
        _register_triton_ops()
    except Exception as exc:  # noqa: BLE001 - any failure here means the backend is unusable
        return f"the Triton kernels failed to load ({type(exc).__name__}: {exc})"
    return None


# ----------------------------------------------------------------------------------------------
# Backend choice.


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cuda_device_reason(device: torch.device, consequence: str = "") -> str | None:
    """Why no kernel can run on the CUDA ``device`` (None when one can). Registration alone proves nothing: a
    CUDA build of torch registers CUDA kernels on a machine without a GPU, and the first launch would fail far
    from the call. ``consequence`` ends the no-CUDA-build message."""
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support{consequence}"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    if device.index is not None and device.index >= torch.cuda.device_count():
        return f"CUDA device {device.index} does not exist ({torch.cuda.device_count()} visible)"
    return None


def backend_unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on tensors of ``device``; None when it can."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} or None")
    if name == "reference":
        return None
    if name == "flex":
        from . import flex

        return flex.unavailable_reason(device)
    if device.type == "cuda" and name in ("cuda", "triton"):
        reason = cuda_device_reason(device, f", so no {name} kernel can run")
        if reason is not None:
            return reason
    if name == "cpu":
        if _C_ERROR is not None:
            return _C_ERROR
        return None if device.type == "cpu" else f"the cpu backend takes CPU tensors, got {device.type}"
    if name == "cuda":
        if device.type != "cuda":
            return f"the cuda backend takes CUDA tensors, got {device.type}"
        if _C_ERROR is not None:
            return _C_ERROR
        if not torch._C._dispatch_has_kernel_for_dispatch_key("dlsn::chunk_attention", "CUDA"):
            return "the extension was built without CUDA kernels (rebuild with DLSN_WITH_CUDA=1)"
        return None
    # triton
    if device.type == "cpu" and not _interpreter_on():
        return "Triton runs on CPU tensors only in interpreter mode (set TRITON_INTERPRET=1 before importing triton)"
    if device.type not in ("cpu", "cuda"):
        return f"Triton does not run on {device.type} tensors"
    return _triton_ready()


@dataclass(frozen=True)
class BackendStatus:
    """What ``available_backends`` says about one backend on one device.

    ``reason`` is None when it can run (``usable``), else why not. ``passes`` says which passes run
    ("forward and backward", or "forward only" with why); ``deterministic_backward`` whether its backward
    is bitwise repeatable (measured by bench/gpu_session.py, else by design); ``automatic`` lists the passes
    the automatic choice gives it for the dtype asked about, with the choice's source. ``str()`` is
    "available" or the reason.
    """

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


def _passes(name: str, device: torch.device) -> str:
    if name == "flex" and device.type == "cpu":
        from . import flex

        return f"forward only: {flex.CPU_BACKWARD_REASON}"
    return "forward and backward"


def available_backends(
    device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> dict[str, BackendStatus]:
    """Every backend on ``device`` (``status.reason`` None: it runs), its passes, whether its backward is
    deterministic, and which passes the automatic choice gives it for ``dtype`` (float32 when None, in the
    current float32 matmul precision) and where that choice comes from."""
    from . import _backend_choice

    device = torch.device(device)
    reasons = {name: backend_unavailable_reason(name, device) for name in BACKENDS}
    choice = _automatic_choice(device, dtype, reasons)
    table = _backend_choice.load_table()
    cap, precision = _backend_choice.capability(device), _backend_choice.precision_key(dtype)
    statuses = {}
    for name, reason in reasons.items():
        automatic = ""
        if choice is not None:
            picked = [p for p, b in (("forward", choice.forward), ("backward", choice.backward)) if b == name]
            if picked:
                automatic = f"automatic {' and '.join(picked)} for {precision}: {choice.source}"
        statuses[name] = BackendStatus(
            name, reason, _passes(name, device) if reason is None else "",
            _backend_choice.is_deterministic(name, cap, precision, table) if reason is None else None, automatic)
    return statuses


def _automatic_choice(device: torch.device, dtype: torch.dtype | None, reasons: dict[str, str | None]):
    from . import _backend_choice

    usable = {name for name, why in reasons.items() if why is None}
    return _backend_choice.choose(device, dtype, AUTOMATIC_ORDER.get(device.type, ()), usable)


# The automatic choice, first available wins. On CUDA tensors Triton comes first for both passes: its kernels
# run on tensor cores (bench.compile_report) while the CUDA C++ kernels are scalar FMA. The one GPU
# measurement (bench/results/gpu.md) predates the tensor-core Triton kernels. This order is the fallback: where
# bench/gpu_session.py measured a case, its table picks the fastest backend per pass (_backend_choice.py).
# flex is never in the fallback (it is a baseline until measured faster; its backward is not deterministic).
AUTOMATIC_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}
_log = logging.getLogger("dlsn_kernels")


@dataclass(frozen=True)
class Backend:
    name: str
    ops: Any  # an object with the five ops as attributes, or None for the reference


def _status_table(device: torch.device) -> str:
    return "\n".join(f"  {name}: {status}" for name, status in available_backends(device).items())


def resolve_backend(backend: str | None, device: torch.device, dtype: torch.dtype | None = None) -> Backend:
    """The backend to run on ``device``: ``backend`` if given, else ``$DLSN_BACKEND``, else automatic.

    ``"<forward>:<backward>"`` (say ``"flex:cpu"``) runs the forward of one backend and the backward of
    another. Automatic: per pass, the measured choice for ``dtype`` on this GPU (``_backend_choice``), else
    the first available of ``AUTOMATIC_ORDER``.
    """
    requested = backend if backend is not None else (os.environ.get("DLSN_BACKEND") or None)
    if requested is not None and ":" in requested:
        forward, _, backward = requested.partition(":")
        return _pair(resolve_backend(forward, device), resolve_backend(backward, device))
    if requested is not None:
        requested = requested.strip().lower()
        if requested not in BACKENDS:
            raise ValueError(f"unknown backend {requested!r}; choose one of {', '.join(BACKENDS)} or None")
        reason = backend_unavailable_reason(requested, device)
        if reason is not None:
            raise BackendUnavailableError(
                f"backend {requested!r} cannot run on {device.type} tensors: {reason}\n"
                f"backends on {device.type}:\n{_status_table(device)}"
            )
        return _backend(requested)
    from . import _backend_choice

    reasons = {name: backend_unavailable_reason(name, device) for name in AUTOMATIC_ORDER.get(device.type, ())}
    if any(why is None for why in reasons.values()) and _backend_choice.load_table() is not None:
        # a measured table may name any backend (flex): only then is every backend asked
        reasons.update({name: backend_unavailable_reason(name, device) for name in BACKENDS if name not in reasons})
    choice = _automatic_choice(device, dtype, reasons)
    if choice is not None:
        _log.debug("dlsn_kernels: automatic backends forward %r, backward %r on %s tensors (%s)", choice.forward,
                   choice.backward, device.type, choice.source)
        return _pair(_backend(choice.forward), _backend(choice.backward))
    table = _status_table(device)
    raise BackendUnavailableError(
        f"no compiled backend can run on {device.type} tensors; pass backend='reference' for the slow "
        f"plain-PyTorch path, or fix one of:\n{table}"
    )


def _pair(forward: Backend, backward: Backend) -> Backend:
    """One backend, or the forward of one with the backward of another (named ``"<forward>:<backward>"``)."""
    if forward.name == backward.name:
        return forward
    from ._backend_choice import MixedOps

    return Backend(f"{forward.name}:{backward.name}", MixedOps(forward, backward))


class _TritonOps:
    def __getattr__(self, name: str):
        return _TRITON_OPS[name]


_BACKEND_TABLE = {
    "reference": Backend("reference", None),
    "cpu": Backend("cpu", torch.ops.dlsn),
    "cuda": Backend("cuda", torch.ops.dlsn),
    "triton": Backend("triton", _TritonOps()),
    "flex": Backend("flex", importlib.import_module(f"{__package__}.flex")),  # plain functions, flex autograd
}


def _backend(name: str) -> Backend:
    return _BACKEND_TABLE[name]
