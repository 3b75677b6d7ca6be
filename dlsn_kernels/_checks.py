"""Argument checks of the public ops: the one validation layer, run once per call before any kernel, so that every
backend gives one error naming the argument. The raw ``torch.ops.dlsn.*`` ops keep the C++ checks that guard
memory (csrc/checks.h), with the same messages.

Index values too: ``perm`` must be a permutation of 0..L-1 per (n, round) and ``codes`` must lie in ``[0,
n_buckets)``, or a kernel reads out of bounds or leaves rows unwritten (one host synchronisation: bench/NOTES.md,
"Cost of the perm check"). The cpu and cuda kernels check those values themselves (for the raw ops), so the
public ops leave them to those (``values=False``) rather than check twice.
"""

from __future__ import annotations

import torch
from torch import Tensor

_INDEX_DTYPES = (torch.int32, torch.int64)
# The most buckets a sort takes (csrc/checks.h kMaxSortBuckets): the cpu counting sort holds a counter per
# bucket and thread, so an unbounded count is an allocation of any size.
MAX_SORT_BUCKETS = 1 << 24


class BackendUnavailableError(RuntimeError):
    """Raised when a requested backend (or, automatically, every backend) cannot run for the given tensors."""


def _tensor(t: object, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_rank(t: Tensor, name: str, layout: str) -> None:
    rank = layout.count(",") + 1
    if _tensor(t, name).dim() != rank:
        raise ValueError(f"{name} must have shape {layout} ({rank} dims), got {tuple(t.shape)}")


def check_contiguous(t: Tensor, name: str) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")


def kernel_layout(backend: str, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """``tensors`` in the layout the kernels of ``backend`` read: the one layout decision of the public ops.

    The cpu, cuda and Triton kernels read whole rows of contiguous tensors, so a strided view (transposed,
    sliced, expanded) is copied once with ``.contiguous()`` (differentiable: gradients flow back into the
    view); a contiguous tensor passes untouched, with no copy. The reference is plain PyTorch and takes any
    strides as they are.
    """
    if backend == "reference":
        return tensors
    return tuple(t if t is None else t.contiguous() for t in tensors)


def check_float(t: Tensor, name: str, backend: str = "reference") -> None:
    dtype = t.dtype
    if not dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating tensor, got {dtype}")
    if backend == "reference":
        return
    if t.device.type == "cuda":
        ok = (torch.float32, torch.float16, torch.bfloat16)
        if dtype not in ok:
            raise ValueError(f"{name} must be float32, float16 or bfloat16 on CUDA, got {dtype}")
    elif dtype in (torch.float16, torch.bfloat16) and backend == "triton":
        raise ValueError(
            f"{name} is {dtype}: the {backend} backend takes float32 or float64 CPU tensors (Triton's interpreter); "
            "float16/bfloat16 CPU tensors run on the cpu and reference backends"
        )
    elif dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise ValueError(f"{name} must be float32, float64, float16 or bfloat16 on CPU, got {dtype}")


def check_same(ref: Tensor, ref_name: str, t: Tensor, name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} is {t.dtype} but {ref_name} is {ref.dtype}; they must share one dtype")


def check_index(t: Tensor, name: str) -> None:
    if t.dtype not in _INDEX_DTYPES:
        raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")


def check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def check_hash(xm: Tensor, rot: Tensor, backend: str, strided_ok: bool = False) -> None:
    """``strided_ok``: the caller has already decided the layout (the public ops, :func:`kernel_layout`)."""
    check_rank(xm, "xm", "[N, L, Cm]")
    check_rank(rot, "rot", "[Cm, R, B]")
    check_float(xm, "xm", backend)
    check_same(xm, "xm", rot, "rot")
    if not strided_ok:
        check_contiguous(xm, "xm")
        check_contiguous(rot, "rot")
    if rot.shape[0] != xm.shape[2]:
        raise ValueError(f"rot has {rot.shape[0]} rows but xm has Cm = {xm.shape[2]} channels")
    if rot.shape[1] < 1 or rot.shape[2] < 1:
        raise ValueError(f"rot must hold at least one round and one bucket, got shape {tuple(rot.shape)}")
    if rot.shape[2] > MAX_SORT_BUCKETS:
        raise ValueError(f"rot holds {rot.shape[2]} buckets; at most 2^24 = {MAX_SORT_BUCKETS}")
    _check_sizes(xm)


def _check_sizes(xm: Tensor) -> None:
    """L >= 1 and Cm >= 1 on every backend (an empty batch, N = 0, is allowed and gives empty outputs)."""
    if xm.shape[1] < 1:
        raise ValueError("xm must hold at least one position (L >= 1)")
    if xm.shape[2] < 1:
        raise ValueError("xm must hold at least one match channel (Cm >= 1)")


def require_tensors(**tensors: object) -> None:
    """TypeError naming the first argument that is not a torch.Tensor (a numpy array, a list...); ``lss`` may
    be None (NLSA: no learned score)."""
    for name, value in tensors.items():
        if not (name == "lss" and value is None):
            _tensor(value, name)


def _has_values(t: Tensor) -> bool:
    """Whether the values of ``t`` can be read: not while tracing (torch.compile), not on meta tensors."""
    if t.numel() == 0 or t.device.type == "meta":
        return False
    return not torch.compiler.is_compiling()


def _first_true(mask: Tensor) -> tuple[int, int, int]:
    """(n, round, position) of the first true entry of ``mask [N, R, L]`` (argmax: the first maximum)."""
    flat = int(mask.reshape(-1).to(torch.uint8).argmax())
    rounds, length = mask.shape[1], mask.shape[2]
    return flat // (rounds * length), (flat // length) % rounds, flat % length


def _check_range(index: Tensor, high: int, name: str, rule: str) -> None:
    """Every value of ``index [N, R, L]`` in ``[0, high)``: one pass and one host read for both bounds; only a
    failure pays for locating the first bad entry."""
    low, top = torch.stack(torch.aminmax(index)).tolist()
    if low < 0 or top >= high:
        n, r, pos = _first_true((index < 0) | (index >= high))
        raise ValueError(f"{rule}: {name}[n={n}, round={r}, position={pos}] = {int(index[n, r, pos])}")


def check_codes(codes: Tensor, n_buckets: int, strided_ok: bool = False, values: bool = True) -> None:
    """Rank, dtype and layout of ``codes``, the bucket count, and with ``values`` that every code is in range."""
    check_rank(codes, "codes", "[N, R, L]")
    check_index(codes, "codes")
    if not strided_ok:
        check_contiguous(codes, "codes")
    if not isinstance(n_buckets, int) or isinstance(n_buckets, bool):
        raise TypeError(f"n_buckets must be an int, got {type(n_buckets).__name__}")
    if not 1 <= n_buckets <= MAX_SORT_BUCKETS:
        raise ValueError(f"n_buckets must be in [1, 2^24 = {MAX_SORT_BUCKETS}], got {n_buckets!r}")
    if not values or not _has_values(codes):
        return
    _check_range(codes, n_buckets, "codes", f"codes must lie in [0, n_buckets={n_buckets})")


def check_attention(
    xm: Tensor, v: Tensor, lss: Tensor | None, chunk_size: int, backend: str, strided_ok: bool = False
) -> None:
    """``lss`` None: no learned score (NLSA), nothing of it to check."""
    check_chunk_size(chunk_size)
    check_rank(xm, "xm", "[N, L, Cm]")
    check_rank(v, "v", "[N, L, Cv]")
    check_float(xm, "xm", backend)
    check_same(xm, "xm", v, "v")
    n, length = xm.shape[:2]
    _check_sizes(xm)
    if tuple(v.shape[:2]) != (n, length):
        raise ValueError(f"v must have shape [N, L, Cv] = [{n}, {length}, Cv] like xm, got {tuple(v.shape)}")
    if lss is not None:
        check_rank(lss, "lss", "[N, L, K]")
        check_same(xm, "xm", lss, "lss")
        if tuple(lss.shape) != (n, length, chunk_size):
            raise ValueError(
                f"lss must have shape [N, L, chunk_size] = [{n}, {length}, {chunk_size}], got {tuple(lss.shape)}"
            )
    for t, name in ((xm, "xm"), (v, "v"), (lss, "lss")):
        if t is not None and not strided_ok:
            check_contiguous(t, name)


def check_perm(perm: Tensor, xm: Tensor, values: bool = True, strided_ok: bool = False) -> None:
    """Rank, dtype, device and shape of ``perm``; with ``values`` also that each row is a permutation (one
    host synchronisation: kernels that get ``perm`` from the package itself skip it)."""
    check_rank(perm, "perm", "[N, R, L]")
    check_index(perm, "perm")
    if perm.device != xm.device:
        raise ValueError(f"perm is on {perm.device} but xm is on {xm.device}")
    if perm.shape[0] != xm.shape[0] or perm.shape[2] != xm.shape[1] or perm.shape[1] < 1:
        raise ValueError(
            f"perm must have shape [N, R, L] with N = {xm.shape[0]}, L = {xm.shape[1]}, R >= 1, "
            f"got {tuple(perm.shape)}"
        )
    if not strided_ok:
        check_contiguous(perm, "perm")
    if values and _has_values(perm):
        check_permutation(perm)


def check_permutation(perm: Tensor) -> None:
    """``perm [N, R, L]`` must be a permutation of 0..L-1 for each (n, round).

    Values in range (min and max), then every position hit once: a scatter of True into a zeroed
    [N, R, L] mask (L values in range that hit all L positions hold none twice). Only a failure pays
    for locating the first bad entry.
    """
    index = perm.long()
    _check_range(index, perm.shape[2], "perm", f"perm must hold positions in [0, L={perm.shape[2]})")
    seen = torch.zeros(index.shape, dtype=torch.bool, device=index.device).scatter_(2, index, True)
    if bool(seen.all()):
        return
    count = torch.zeros_like(index).scatter_add_(2, index, torch.ones_like(index))
    n, r, pos = _first_true(count.gather(2, index) > 1)
    raise ValueError(
        f"perm must be a permutation of 0..L-1 for each (n, round), but perm[n={n}, round={r}, position={pos}] = "
        f"{int(index[n, r, pos])} occurs more than once in that row"
    )


def check_rounds(out: Tensor, lse: Tensor) -> None:
    check_rank(out, "out", "[N, R, L, Cv]")
    check_rank(lse, "lse", "[N, R, L]")
    for t, name in ((out, "out"), (lse, "lse")):
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
    if tuple(lse.shape) != tuple(out.shape[:3]):
        raise ValueError(f"lse must have shape [N, R, L] = {list(out.shape[:3])}, got {tuple(lse.shape)}")
    if lse.device != out.device:
        raise ValueError(f"lse is on {lse.device} but out is on {out.device}")
