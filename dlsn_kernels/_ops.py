"""The ``dlsn`` operators: their schemas, loading ``_C``, fake kernels, autograd, the Triton ops.

Every compiled or Triton backend provides the five operators of DESIGN.md (``sblsh_hash``,
``bucket_sort``, ``chunk_attention``, ``gla_attention``, ``attention_backward``) as torch.library
ops. Fake kernels and autograd are registered here once per op, with one formula for all
backends. The ``reference`` backend is plain PyTorch and differentiates through autograd.
"""

from __future__ import annotations

import functools
import importlib.util
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

# The operator contract, written once: the dlsn namespace is defined here, before the compiled extension is
# loaded, and its CPU/CUDA kernels (csrc/cpu, csrc/cuda) register implementations of these names; the Triton
# backend defines dlsn::triton_<name> with the same schemas. ``Tensor? lss``: None is the attention without a
# learned score (NLSN's NLSA, scores q . k_hat only); attention_backward then returns an empty dlss ([0]).
SCHEMAS = {
    "sblsh_hash": "(Tensor xm, Tensor rot) -> Tensor",
    "bucket_sort": "(Tensor codes, int n_buckets) -> Tensor",
    "chunk_attention": "(Tensor xm, Tensor v, Tensor? lss, Tensor perm, int chunk_size) -> (Tensor, Tensor)",
    "gla_attention": "(Tensor xm, Tensor v, Tensor? lss, Tensor rot, int chunk_size) -> (Tensor, Tensor, Tensor)",
    "attention_backward": (
        "(Tensor grad_out, Tensor delta, Tensor xm, Tensor v, Tensor? lss, Tensor perm, Tensor lse, "
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

    C_ERROR: str | None = None
except ImportError as exc:  # a missing or broken build must say how to fix it
    if importlib.util.find_spec(f"{__package__}._C") is None:
        C_ERROR = f"the compiled extension dlsn_kernels._C is not built; {_BUILD_HINT}"
    else:
        C_ERROR = f"the compiled extension dlsn_kernels._C failed to load ({exc}); rebuild it: {_BUILD_HINT}"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# Fake kernels: shapes and dtypes only, shared by the C++ and the Triton ops.


def _fake_sblsh_hash(xm: Tensor, rot: Tensor) -> Tensor:
    return xm.new_empty((xm.shape[0], rot.shape[1], xm.shape[1]), dtype=torch.int64)


def _fake_bucket_sort(codes: Tensor, n_buckets: int) -> Tensor:
    return torch.empty_like(codes, dtype=torch.int64)


def _fake_chunk_attention(xm: Tensor, v: Tensor, lss: Tensor | None, perm: Tensor, chunk_size: int):
    n, length, _ = xm.shape
    rounds = perm.shape[1]
    out = v.new_empty((n, rounds, length, v.shape[2]))
    lse = xm.new_empty((n, rounds, length), dtype=_acc_dtype(xm.dtype))
    return out, lse


def _fake_gla_attention(xm: Tensor, v: Tensor, lss: Tensor | None, rot: Tensor, chunk_size: int):
    n, length, _ = xm.shape
    y = v.new_empty((n, length, v.shape[2]))
    lse = xm.new_empty((n, length), dtype=_acc_dtype(xm.dtype))
    perm = xm.new_empty((n, rot.shape[1], length), dtype=torch.int64)
    return y, lse, perm


def _fake_attention_backward(grad_out, delta, xm, v, lss, perm, lse, chunk_size):
    dlss = xm.new_empty(0) if lss is None else torch.empty_like(lss)  # no learned score: an empty dlss
    return torch.empty_like(xm), torch.empty_like(v), dlss


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
    # One setup and one backward for both ops: gla_attention's rounds are merged, one softmax over every round's
    # keys, so its gradients are a single "round" (R' = 1) of the same backward. lss may be None (no learned
    # score): save_for_backward keeps None as None, and lss then gets no gradient (the kernels' dlss is empty).
    def setup(ctx, inputs, output):
        xm, v, lss, perm_or_rot, chunk_size = inputs
        ctx.merged = len(output) == 3  # gla_attention: (y, lse, perm)
        perm = output[2] if ctx.merged else perm_or_rot
        ctx.save_for_backward(xm, v, lss, perm, output[0], output[1])
        ctx.chunk_size = chunk_size

    def backward(ctx, grad_out, grad_lse, _grad_perm=None):
        xm, v, lss, perm, out, lse = ctx.saved_tensors
        grad_out, delta = _incoming(grad_out, out, lse, grad_lse)
        if ctx.merged:
            grad_out, delta, lse = grad_out.unsqueeze(1), delta.unsqueeze(1), lse.unsqueeze(1)
        dxm, dv, dlss = backward_op(grad_out, delta, xm, v, lss, perm, lse, ctx.chunk_size)
        return dxm, dv, None if lss is None else dlss, None, None

    for op in (chunk_op, gla_op):
        torch.library.register_autograd(op, backward, setup_context=setup)


def _register_cpp_ops() -> None:
    for name in OP_NAMES:
        torch.library.register_fake(f"dlsn::{name}", _FAKES[name])
    _register_autograd("dlsn::chunk_attention", "dlsn::gla_attention", torch.ops.dlsn.attention_backward)


if C_ERROR is None:
    _register_cpp_ops()


# ----------------------------------------------------------------------------------------------
# Triton: the plain functions of dlsn_kernels.triton wrapped as torch.library custom ops.


@functools.cache
def triton_error() -> str | None:
    """Imports Triton and registers its ops on first use (not at ``import dlsn_kernels``: Triton is slow to
    import and decides the interpreter mode at its own import); returns why they cannot run, or None."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not importable ({exc}); `pip install triton`"
    try:
        from . import triton as tk

        for name, schema in SCHEMAS.items():
            op = torch.library.custom_op(f"dlsn::triton_{name}", getattr(tk, name), mutates_args=(), schema=schema)
            op.register_fake(_FAKES[name])
            setattr(TRITON_OPS, name, op)
        _register_autograd(TRITON_OPS.chunk_attention, TRITON_OPS.gla_attention, TRITON_OPS.attention_backward)
    except Exception as exc:  # noqa: BLE001 - any failure here means the backend is unusable
        return f"the Triton kernels failed to load ({type(exc).__name__}: {exc})"
    return None


# The five dlsn::triton_<name> ops as plain (traceable) attributes, set once triton_error() returned None.
TRITON_OPS = types.SimpleNamespace()
