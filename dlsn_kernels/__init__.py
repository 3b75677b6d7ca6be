"""Fused kernels for Global Learnable Attention (GLA).

Public ops (DESIGN.md "Operators"); every one takes ``backend=None`` (automatic: per pass, the fastest
backend that bench/gpu_session.py measured on this GPU and dtype, else triton then cuda on CUDA tensors, cpu
on CPU tensors; ``$DLSN_BACKEND`` overrides) or one of ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"``,
``"flex"`` (FlexAttention; forward only on CPU tensors), or ``"<forward>:<backward>"`` such as ``"flex:cpu"``.
:func:`available_backends` says what runs where, which backward is deterministic, and the automatic choice.


- :func:`sblsh_hash` ``(xm [N,L,Cm], rot [Cm,R,B]) -> codes [N,R,L]``
- :func:`bucket_sort` ``(codes, n_buckets) -> perm [N,R,L]`` (stable)
- :func:`chunk_attention` ``(xm, v [N,L,Cv], lss [N,L,K], perm, chunk_size) -> (out [N,R,L,Cv], lse [N,R,L])``
- :func:`combine_rounds` ``(out, lse) -> y [N,L,Cv]``
- :func:`gla_attention` ``(xm, v, lss, rot, chunk_size) -> y [N,L,Cv]``, steps 1-5 fused
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks, reference
from ._hash_setup import KEY_NORM_EPS, n_buckets_for, random_rotations
from ._ops import (
    BACKENDS,
    BackendStatus,
    BackendUnavailableError,
    available_backends,
    resolve_backend,
)
from ._precision import cast_for_autocast

__all__ = [
    "BACKENDS",
    "KEY_NORM_EPS",
    "BackendStatus",
    "BackendUnavailableError",
    "available_backends",
    "bucket_sort",
    "chunk_attention",
    "combine_rounds",
    "gla_attention",
    "n_buckets_for",
    "random_rotations",
    "reference",
    "sblsh_hash",
]


def sblsh_hash(xm: Tensor, rot: Tensor, backend: str | None = None) -> Tensor:
    """Super-bit LSH codes ``[N, R, L]`` (int64): argmax of ``xm . rot[:, r, :]``, lowest bucket on ties."""
    _checks.require_tensors(xm=xm, rot=rot)
    chosen = resolve_backend(backend, xm.device)
    xm, rot = _checks.kernel_layout(chosen.name, xm, rot)
    _checks.check_hash(xm, rot, chosen.name, strided_ok=True)
    if chosen.ops is None:
        return reference.sblsh_hash(xm, rot)
    return chosen.ops.sblsh_hash(xm, rot)


def bucket_sort(codes: Tensor, n_buckets: int, backend: str | None = None) -> Tensor:
    """Positions ordered by ``(code, position)`` per (n, round): ``perm [N, R, L]`` int64.

    Raises ValueError when a code lies outside ``[0, n_buckets)``.
    """
    _checks.require_tensors(codes=codes)
    chosen = resolve_backend(backend, codes.device)
    (codes,) = _checks.kernel_layout(chosen.name, codes)
    _checks.check_codes(codes, n_buckets, strided_ok=True)
    if chosen.ops is None:
        return reference.bucket_sort(codes, n_buckets)
    return chosen.ops.bucket_sort(codes, n_buckets)


def chunk_attention(
    xm: Tensor, v: Tensor, lss: Tensor, perm: Tensor, chunk_size: int, backend: str | None = None
) -> tuple[Tensor, Tensor]:
    """Per-round attention within adjacent buckets: ``out [N, R, L, Cv]``, ``lse [N, R, L]``.

    Differentiable in ``xm``, ``v`` and ``lss``. ``lse`` is float32 (float64 for float64 inputs). Under
    ``torch.autocast`` (CUDA or CPU), float32 inputs are cast to the autocast dtype (README "Precision").
    Raises ValueError unless ``perm`` is a permutation of 0..L-1 for each (n, round).
    """
    _checks.require_tensors(xm=xm, v=v, lss=lss, perm=perm)
    chosen = resolve_backend(backend, xm.device, _autocast_or(xm))
    xm, v, lss = cast_for_autocast(xm, v, lss, backend=chosen.name)
    xm, v, lss, perm = _checks.kernel_layout(chosen.name, xm, v, lss, perm)
    _checks.check_attention(xm, v, lss, chunk_size, chosen.name, strided_ok=True)
    _checks.check_perm(perm, xm, strided_ok=True)
    if chosen.ops is None:
        return reference.chunk_attention(xm, v, lss, perm, chunk_size)
    return chosen.ops.chunk_attention(xm, v, lss, perm, chunk_size)


def combine_rounds(out: Tensor, lse: Tensor, backend: str | None = None) -> Tensor:
    """``y = sum_r softmax_r(lse) * out_r``: ``[N, R, L, Cv], [N, R, L] -> [N, L, Cv]``.

    A few elementwise PyTorch ops on every backend (nothing to fuse); ``backend`` is accepted for
    a uniform signature and validated.
    """
    _checks.require_tensors(out=out, lse=lse)
    _checks.check_rounds(out, lse)
    if backend is not None:
        resolve_backend(backend, out.device)  # a named backend must still exist and be able to run
    return torch.ops.dlsn.combine_rounds(out, lse)


def gla_attention(
    xm: Tensor, v: Tensor, lss: Tensor, rot: Tensor, chunk_size: int, backend: str | None = None
) -> Tensor:
    """Global Learnable Attention without its convolutions: DESIGN.md 1.1-1.5, ``y [N, L, Cv]``.

    ``xm [N, L, Cm]`` match features, ``v [N, L, Cv]`` values, ``lss [N, L, K]`` learned scores,
    ``rot [Cm, R, B]`` one orthonormal projection per hash round (see :func:`random_rotations`
    and :func:`n_buckets_for`), ``chunk_size`` K. Differentiable in ``xm``, ``v``, ``lss``.
    The permutation comes from the package's own hash and sort, so it is not checked again.
    """
    _checks.require_tensors(xm=xm, v=v, lss=lss, rot=rot)
    chosen = resolve_backend(backend, xm.device, _autocast_or(xm))
    # rot follows xm's dtype (the op contract); every hash still multiplies in IEEE float32
    xm, v, lss, rot = cast_for_autocast(xm, v, lss, rot, backend=chosen.name)
    xm, v, lss, rot = _checks.kernel_layout(chosen.name, xm, v, lss, rot)
    _checks.check_attention(xm, v, lss, chunk_size, chosen.name, strided_ok=True)
    _checks.check_hash(xm, rot, chosen.name, strided_ok=True)
    if chosen.ops is None:
        return reference.gla_attention(xm, v, lss, rot, chunk_size)
    y, _lse, _perm = chosen.ops.gla_attention(xm, v, lss, rot, chunk_size)
    return y


def _autocast_or(xm: Tensor) -> torch.dtype:
    """The dtype the op will compute in, for the automatic backend choice: autocast's when it is on."""
    return cast_for_autocast(xm)[0].dtype


def _combine_rounds_impl(out: Tensor, lse: Tensor) -> Tensor:
    _checks.check_rounds(out, lse)  # the raw op too: a broadcast of mismatched shapes would pass silently
    return reference.combine_rounds(out, lse.to(out.dtype))


_lib = torch.library.Library("dlsn", "FRAGMENT")
_lib.define("combine_rounds(Tensor out, Tensor lse) -> Tensor")
_lib.impl("combine_rounds", _combine_rounds_impl, "CompositeImplicitAutograd")
