"""Fused kernels for Global Learnable Attention (GLA).

Public ops (DESIGN.md "Operators"); every one takes ``backend=None`` (automatic: the first backend of the
device's order that supports the call, ordered by ``python -m dlsn_kernels.check``'s cached result when there
is one, else by the first-use probe on GPUs or the static order; ``$DLSN_BACKEND``, read once per process,
overrides) or one of ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"``, ``"flex"`` (FlexAttention; forward
only on CPU tensors). :func:`available_backends` says what runs where, which backward is deterministic, and the
automatic choice; :func:`backend_summary` says it in one line.

- :func:`sblsh_hash` ``(xm [N,L,Cm], rot [Cm,R,B]) -> codes [N,R,L]``
- :func:`bucket_sort` ``(codes, n_buckets) -> perm [N,R,L]`` (stable)
- :func:`chunk_attention` ``(xm, v [N,L,Cv], lss [N,L,K] | None, perm, chunk_size)``
  ``-> (out [N,R,L,Cv], lse [N,R,L])``
- :func:`combine_rounds` ``(out, lse) -> y [N,L,Cv]``
- :func:`gla_attention` ``(xm, v, lss, rot, chunk_size) -> y [N,L,Cv]``, steps 1-5 fused
- :func:`spherical_rotations` ``(rot_half [Cm,R,B/2]) -> rot [Cm,R,B]``: NLSN's spherical LSH as a ``rot``

``lss=None`` is NLSN's Non-Local Sparse Attention: scores ``q . k_hat`` only, with no learned-score memory,
loads or gradient on any backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks, reference
from ._checks import MAX_SORT_BUCKETS, BackendUnavailableError
from ._dispatch import BackendStatus, available_backends, backend_summary, requested, select
from ._hash_setup import KEY_NORM_EPS, n_buckets_for, random_rotations, spherical_rotations
from ._precision import autocast_dtype, cast_floats, takes_half
from .backends import NAMES as BACKENDS
from .backends import Backend, Inputs

__all__ = [
    "BACKENDS",
    "KEY_NORM_EPS",
    "MAX_SORT_BUCKETS",
    "BackendStatus",
    "BackendUnavailableError",
    "available_backends",
    "backend_summary",
    "bucket_sort",
    "chunk_attention",
    "combine_rounds",
    "gla_attention",
    "n_buckets_for",
    "random_rotations",
    "reference",
    "sblsh_hash",
    "spherical_rotations",
]


def _choose(op: str, name: str | None, xm: Tensor, grad: tuple[Tensor | None, ...], **sizes: int
            ) -> tuple[Backend, torch.dtype | None]:
    """The backend of one call (``name`` from ``requested``) and the autocast dtype it computes in (None: the
    inputs' own)."""
    cast = autocast_dtype(xm.device, name)
    dtype = cast if cast is not None and xm.dtype == torch.float32 else xm.dtype
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in grad)
    return select(name, Inputs(xm.device, dtype, **sizes), needs_grad, op), cast


def sblsh_hash(xm: Tensor, rot: Tensor, backend: str | None = None) -> Tensor:
    """Super-bit LSH codes ``[N, R, L]`` (int64): argmax of ``xm . rot[:, r, :]``, lowest bucket on ties."""
    _checks.require_tensors(xm=xm, rot=rot)
    name = requested(backend)
    _checks.check_hash(xm, rot, name or "auto", strided_ok=True)
    chosen, _ = _choose("sblsh_hash", name, xm, (), cm=xm.shape[2])
    xm, rot = _checks.kernel_layout(chosen.name, xm, rot)
    return (chosen.ops or reference).sblsh_hash(xm, rot)


def bucket_sort(codes: Tensor, n_buckets: int, backend: str | None = None) -> Tensor:
    """Positions ordered by ``(code, position)`` per (n, round): ``perm [N, R, L]`` int64.

    Raises ValueError when a code lies outside ``[0, n_buckets)`` or ``n_buckets`` outside ``[1, 2^24]``.
    """
    _checks.require_tensors(codes=codes)
    _checks.check_codes(codes, n_buckets, strided_ok=True, values=False)
    name = requested(backend)
    chosen = select(name, Inputs(codes.device, None), False, "bucket_sort")
    (codes,) = _checks.kernel_layout(chosen.name, codes)
    if chosen.name not in ("cpu", "cuda", "triton"):  # those check code values themselves (raw-op safety)
        _checks.check_codes(codes, n_buckets, strided_ok=True)
    return (chosen.ops or reference).bucket_sort(codes, n_buckets)


def chunk_attention(
    xm: Tensor, v: Tensor, lss: Tensor | None, perm: Tensor, chunk_size: int, backend: str | None = None
) -> tuple[Tensor, Tensor]:
    """Per-round attention within adjacent buckets: ``out [N, R, L, Cv]``, ``lse [N, R, L]``.

    Differentiable in ``xm``, ``v`` and ``lss`` (None: no learned score). ``lse`` is float32 (float64 for
    float64 inputs). Under ``torch.autocast`` (CUDA or CPU), float32 inputs are cast to the autocast dtype
    (README "Precision").
    Raises ValueError unless ``perm`` is a permutation of 0..L-1 for each (n, round).
    """
    _checks.require_tensors(xm=xm, v=v, lss=lss, perm=perm)
    name = requested(backend)
    _checks.check_attention(xm, v, lss, chunk_size, name or "auto", strided_ok=True)
    _checks.check_perm(perm, xm, values=False, strided_ok=True)
    chosen, cast = _choose("chunk_attention", name, xm, (xm, v, lss), cm=xm.shape[2], cv=v.shape[2],
                           chunk_size=chunk_size, n=xm.shape[0], length=xm.shape[1], rounds=perm.shape[1])
    xm, v, lss = cast_floats(cast, xm, v, lss)
    xm, v, lss, perm = _checks.kernel_layout(chosen.name, xm, v, lss, perm)
    if chosen.name not in ("cpu", "cuda"):  # the C++ ops check the permutation themselves (raw-op safety)
        _checks.check_perm(perm, xm, strided_ok=True)
    if xm.shape[0] == 0:  # an empty batch: nothing to compute, on every backend
        return reference.chunk_attention(xm, v, lss, perm, chunk_size)
    return (chosen.ops or reference).chunk_attention(xm, v, lss, perm, chunk_size)


def combine_rounds(out: Tensor, lse: Tensor, backend: str | None = None) -> Tensor:
    """``y = sum_r softmax_r(lse) * out_r``: ``[N, R, L, Cv], [N, R, L] -> [N, L, Cv]``.

    A few elementwise PyTorch ops on every backend (nothing to fuse); a named ``backend`` is validated.
    """
    _checks.require_tensors(out=out, lse=lse)
    _checks.check_rounds(out, lse)
    if backend is not None:
        select(requested(backend), Inputs(out.device, out.dtype), False, "combine_rounds")
    return reference.combine_rounds(out, lse.to(out.dtype))


def gla_attention(
    xm: Tensor, v: Tensor, lss: Tensor | None, rot: Tensor, chunk_size: int, backend: str | None = None
) -> Tensor:
    """Global Learnable Attention without its convolutions: DESIGN.md 1.1-1.5, ``y [N, L, Cv]``.

    ``xm [N, L, Cm]`` match features, ``v [N, L, Cv]`` values, ``lss [N, L, K]`` learned scores (None: NLSA),
    ``rot [Cm, R, B]`` one orthonormal projection per hash round (see :func:`random_rotations`
    and :func:`n_buckets_for`), ``chunk_size`` K. Differentiable in ``xm``, ``v``, ``lss``.
    The permutation comes from the package's own hash and sort, so it is not checked again.
    """
    _checks.require_tensors(xm=xm, v=v, lss=lss, rot=rot)
    name = requested(backend)
    _checks.check_attention(xm, v, lss, chunk_size, name or "auto", strided_ok=True)
    _checks.check_hash(xm, rot, name or "auto", strided_ok=True)
    chosen, cast = _choose("gla_attention", name, xm, (xm, v, lss), cm=xm.shape[2], cv=v.shape[2],
                           chunk_size=chunk_size, n=xm.shape[0], length=xm.shape[1], rounds=rot.shape[1])
    # rot follows xm's dtype (the op contract); every hash still multiplies in IEEE float32
    xm, v, lss, rot = _checks.kernel_layout(chosen.name, *cast_floats(cast, xm, v, lss, rot))
    if chosen.ops is None or xm.shape[0] == 0:  # an empty batch: nothing to compute, on every backend
        return reference.gla_attention(xm, v, lss, rot, chunk_size)
    return chosen.ops.gla_attention(xm, v, lss, rot, chunk_size)[0]


def resolved_takes_half(device: torch.device, backend: str | None) -> bool:
    """Whether the backend a caller names (None: ``$DLSN_BACKEND`` or automatic) computes float16/bfloat16
    tensors of ``device``: everywhere but in the Triton interpreter on CPU tensors."""
    return takes_half(torch.device(device), requested(backend))


def _combine_rounds_impl(out: Tensor, lse: Tensor) -> Tensor:
    _checks.check_rounds(out, lse)  # the raw op too: a broadcast of mismatched shapes would pass silently
    return reference.combine_rounds(out, lse.to(out.dtype))


_lib = torch.library.Library("dlsn", "FRAGMENT")
_lib.define("combine_rounds(Tensor out, Tensor lse) -> Tensor")
_lib.impl("combine_rounds", _combine_rounds_impl, "CompositeImplicitAutograd")
