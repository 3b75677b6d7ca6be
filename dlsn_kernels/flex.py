"""The ``flex`` backend: GLA's chunk attention written with ``torch.nn.attention.flex_attention``.

The formulation a PyTorch user would write (DESIGN.md 1.3-1.5, exactly): the R hash rounds are flex's heads;
``xm`` (queries), the normalised keys, ``v`` and ``lss`` are gathered into each round's padded sorted order; a
block mask with one block per chunk keeps the key chunks c, c - 1 and c + 1 (mod nc) of query chunk c;
``score_mod`` adds the learned score ``lss_sorted[b, h, kv_idx, q_idx % K]`` (``lss`` is ``[key, query slot]``)
with ``scale=1.0`` (NLSA, ``lss=None``: no score_mod at nc >= 3); the rounds are merged by their lse.

Chunks read more than once. DESIGN.md 1.4 reads the chunks c, c - 1, c + 1 *with duplicates*: with nc = 2 the
other chunk is read twice, with nc = 1 the only chunk three times. A block mask can list a block only once,
so the score of a key chunk read m times gets ``+ log(m)`` (``exp(s + log m) = m exp(s)``: the softmax, the
lse and every gradient are those of m copies). nc >= 3 needs no bias.

Chunk sizes that are not a multiple of 16. FlexAttention's Triton kernels work on tiles of at least 16 rows
that divide the block size, so each chunk is laid out in ``Kp = ceil(K / 16) * 16`` flex slots; slots K..Kp-1
of a chunk are masked out as keys (``mask_mod``) and dropped as queries. With K % 16 == 0 (K = 128 in the
paper) nothing is padded and every kept block is a full block (no mask evaluated in the kernel). The CPU path
uses the same layout, so the CPU tests cover what runs on the GPU.

Passes. On CUDA tensors compiled FlexAttention with flex's own autograd (through the gathers, into the captured
``lss``). On CPU tensors an eager forward only (it materialises ``[N, R, nc Kp, nc Kp]`` scores), whose backward
raises :class:`BackendUnavailableError` naming the cpu backend: compiled FlexAttention has no CPU backward. The
lse comes through ``return_aux`` (torch >= 2.9) or ``return_lse`` (older): :func:`_flex_with_lse`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._checks import BackendUnavailableError
from ._hash_setup import KEY_NORM_EPS
from ._magnitudes import check_saved_lse, row_norms
from .reference import bucket_sort, padded_slot_positions  # the stable sort (DESIGN.md 1.2) is the reference's

__all__ = ["ROW_MULTIPLE", "block_mask_for", "chunk_attention", "chunk_multiplicity", "flex_slots", "padded_chunk",
           "gla_attention", "merge_rounds", "sblsh_hash", "bucket_sort"]

ROW_MULTIPLE = 16  # the smallest tile of FlexAttention's Triton kernels; chunks are laid out in multiples


# Layout: sorted slots, flex slots, the block mask.


def padded_chunk(k: int) -> int:
    return -(-k // ROW_MULTIPLE) * ROW_MULTIPLE


def flex_slots(perm: Tensor, chunk_size: int) -> Tensor:
    """Position held by each flex slot ``[N, R, nc Kp]``: chunk c's K sorted slots (DESIGN.md 1.3), then
    ``Kp - K`` fillers (the chunk's first position; masked out as keys, never stored as queries)."""
    slots = padded_slot_positions(perm, chunk_size)
    kp = padded_chunk(chunk_size)
    if kp == chunk_size:
        return slots
    n, rounds, lp = slots.shape
    chunks = slots.reshape(n, rounds, lp // chunk_size, chunk_size)
    filler = chunks[..., :1].expand(-1, -1, -1, kp - chunk_size)
    return torch.cat([chunks, filler], dim=-1).reshape(n, rounds, -1)


def chunk_multiplicity(nc: int) -> Tensor:
    """``m[c, c']``: how many times query chunk c reads key chunk c' among c, c - 1, c + 1 (mod nc)."""
    m = torch.zeros(nc, nc, dtype=torch.int64)
    for c in range(nc):
        for d in (0, -1, 1):
            m[c, (c + d) % nc] += 1
    return m


def _mask_mod(k: int, kp: int, nc: int) -> Callable[..., Tensor]:
    def mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        step = (kv_idx // kp - q_idx // kp + nc) % nc
        adjacent = (step == 0) | (step == 1) | (step == nc - 1)
        return adjacent & (kv_idx % kp < k)

    return mask


@functools.lru_cache(maxsize=64)  # one mask per (shape, device), built once as a user would (and kept by identity)
def block_mask_for(length: int, chunk_size: int, device: torch.device | str, full_blocks: bool = True) -> Any:
    """The BlockMask of GLA: one block per chunk (``BLOCK_SIZE = Kp``), query chunk c keeping key chunks c, c - 1,
    c + 1 (mod nc), each distinct chunk once. Built from the block lists (O(nc)), never from a dense mask.

    With K % 16 == 0 the kept blocks are listed as full blocks (no mask_mod in the kernel) unless
    ``full_blocks`` is False; otherwise they are partial blocks and the mask has no full-block lists at all.
    Compiled FlexAttention on the CPU (torch 2.14) fails to build a kernel for a mask with full-block lists
    broadcast over batch and heads ("kv_indices was not declared"; fine with B = N, or without full lists), so
    :func:`_rounds` retries a failed compile with partial blocks.
    """
    from torch.nn.attention.flex_attention import BlockMask

    k = chunk_size
    kp = padded_chunk(k)
    nc = -(-length // k)
    # the distinct key chunks of each query chunk, in the order c, c - 1, c + 1 (DESIGN.md 1.4)
    blocks = [list(dict.fromkeys((c + d) % nc for d in (0, -1, 1))) for c in range(nc)]
    counts = torch.tensor([len(b) for b in blocks], dtype=torch.int32, device=device).reshape(1, 1, nc)
    rows = [b + [0] * (nc - len(b)) for b in blocks]  # each row's unused entries are 0
    indices = torch.tensor(rows, dtype=torch.int32, device=device).reshape(1, 1, nc, nc)
    blocks_of: tuple[Tensor, ...]
    if kp == k and full_blocks:  # every kept block is whole: the kernels skip mask_mod on full blocks
        blocks_of = (torch.zeros_like(counts), indices, counts, indices)
    else:  # filler key slots in every block (or asked for): partial blocks, mask_mod applies
        blocks_of = (counts, indices)
    return BlockMask.from_kv_blocks(*blocks_of, BLOCK_SIZE=kp, mask_mod=_mask_mod(k, kp, nc),
                                    seq_lengths=(nc * kp, nc * kp))


# FlexAttention calls: compiled on CUDA, eager on the CPU (compiled CPU flex has no lse and no backward).
_COMPILED_ON = ("cuda",)
_FULL_BLOCKS_COMPILE: dict[str, bool] = {}  # device type -> whether compiled flex built a full-blocks mask
_log = logging.getLogger("dlsn_kernels")


@functools.cache
def _compiled_flex(precision: str) -> Callable[..., Any]:
    """One compiled flex_attention per float32 matmul ``precision``: the kernels read it when they are generated
    (IEEE under "highest", TF32 otherwise), so a compiled graph must not be reused across a change."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.cache
def _has_return_aux() -> bool:
    from torch.nn.attention.flex_attention import flex_attention

    return "return_aux" in inspect.signature(flex_attention).parameters


def _kernel_options(kp: int, device: torch.device) -> dict[str, int] | None:
    """Tiles that divide the block size when Kp is not a multiple of the default 128-row tiles."""
    if device.type != "cuda" or kp % 128 == 0:
        return None
    tile = min(64, kp & -kp)  # the largest power of two dividing Kp (>= 16)
    return {name: tile for name in ("BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")}


def _flex_with_lse(q: Tensor, k: Tensor, v: Tensor, score_mod, block_mask, compiled: bool,
                   kernel_options: dict[str, int] | None) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of flex_attention, natural-log lse, with the API of this torch version."""
    from torch.nn.attention import flex_attention as fa

    fn = _compiled_flex(torch.get_float32_matmul_precision()) if compiled else fa.flex_attention
    kwargs: dict[str, Any] = {"score_mod": score_mod, "block_mask": block_mask, "scale": 1.0,
                              "kernel_options": kernel_options}
    with warnings.catch_warnings():
        # eager on purpose (CPU): the "called without torch.compile()" advice does not apply
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        if _has_return_aux():
            out, aux = fn(q, k, v, **kwargs, return_aux=fa.AuxRequest(lse=True))
            return out, aux.lse
        return fn(q, k, v, **kwargs, return_lse=True)


def _gather_rows(t: Tensor, slots: Tensor) -> Tensor:
    """``t [N, L, C]`` at ``slots [N, R, S]`` -> ``[N, R, S, C]`` (differentiable)."""
    batch = torch.arange(t.shape[0], device=t.device).reshape(-1, 1, 1)
    return t[batch, slots]


def _rounds(xm: Tensor, v: Tensor, lss: Tensor | None, perm: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Per-round ``out [N, R, L, Cv]`` and ``lse [N, R, L]`` (accumulation dtype) at the original positions."""
    n, length, _ = xm.shape
    rounds = perm.shape[1]
    k = chunk_size
    kp = padded_chunk(k)
    nc = -(-length // k)
    acc = torch.float64 if xm.dtype == torch.float64 else torch.float32
    slots = flex_slots(perm, k)  # [N, R, nc Kp]

    # overflow-safe norms (xm * 1e30 has squares beyond float32), keys normalised before any product
    norms = row_norms(xm, acc)[0].unsqueeze(-1).clamp_min(KEY_NORM_EPS)
    keys = (xm.to(acc) / norms).to(xm.dtype)
    q, kn, vv = (_gather_rows(t, slots) for t in (xm, keys, v))
    # [N, R, nc Kp, K]: row = key slot, column = query slot index; None (NLSA): no learned score at all
    lss_sorted = None if lss is None else _gather_rows(lss, slots)
    # chunks read 2 or 3 times get + log(reads) (module docstring)
    bias = None if nc > 2 else chunk_multiplicity(nc).to(device=xm.device, dtype=acc).log()

    def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        if lss_sorted is not None:
            slot = q_idx % kp
            if kp != k:
                slot = torch.clamp(slot, max=k - 1)  # filler query rows: any in-bounds column, never stored
            score = score + lss_sorted[b, h, kv_idx, slot]
        if bias is not None:
            score = score + bias[q_idx // kp, kv_idx // kp]
        return score

    compiled = xm.device.type in _COMPILED_ON

    def attend(full_blocks: bool) -> tuple[Tensor, Tensor]:
        with torch.autocast(xm.device.type, enabled=False):  # one dtype already (the public ops cast for autocast)
            mod = score_mod if lss_sorted is not None or bias is not None else None  # None: flex's plain q.k
            return _flex_with_lse(q, kn, vv, mod, block_mask_for(length, k, xm.device, full_blocks),
                                  compiled=compiled, kernel_options=_kernel_options(kp, xm.device))

    full_blocks = _FULL_BLOCKS_COMPILE.get(xm.device.type, True) or not compiled
    try:
        out, lse = attend(full_blocks)
    except Exception as exc:  # noqa: BLE001 - a kernel that does not build; a genuine error recurs below
        if not (compiled and full_blocks and kp == k):
            raise
        _log.warning("dlsn_kernels.flex: compiled FlexAttention failed with full blocks (%s: %s); using the same "
                     "blocks as partial ones", type(exc).__name__, str(exc).splitlines()[0][:200])
        _FULL_BLOCKS_COMPILE[xm.device.type] = False
        out, lse = attend(False)
    # back from flex slots to sorted slots (drop fillers), then to positions (drop padded slots)
    out = out.reshape(n, rounds, nc, kp, -1)[:, :, :, :k].reshape(n, rounds, nc * k, -1)[:, :, :length]
    lse = lse.reshape(n, rounds, nc, kp)[:, :, :, :k].reshape(n, rounds, nc * k)[:, :, :length].to(acc)
    inverse = torch.argsort(perm.long(), dim=-1)
    out = torch.gather(out, 2, inverse.unsqueeze(-1).expand_as(out))
    lse = torch.gather(lse, 2, inverse)
    if torch.is_grad_enabled() and (out.requires_grad or lse.requires_grad):
        out, lse = _SavedLseGuard.apply(out, lse)
    return out.to(v.dtype), lse


class _SavedLseGuard(torch.autograd.Function):
    """Identity on ``(out, lse)`` whose backward first refuses an lse flex's backward cannot resolve (flex
    recomputes P = exp(s - lse) from it, as every backend's backward does; ``check_saved_lse``): one host read
    per backward call."""

    @staticmethod
    def forward(ctx, out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(lse)
        return out.view_as(out), lse.view_as(lse)

    @staticmethod
    def backward(ctx, grad_out: Tensor, grad_lse: Tensor) -> tuple[Tensor, Tensor]:
        (lse,) = ctx.saved_tensors
        check_saved_lse(lse)
        return grad_out, grad_lse


def merge_rounds(out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    """Rounds merged by their lse (DESIGN.md 1.5): ``y [N, L, Cv]`` and the lse over all rounds ``[N, L]``."""
    total = torch.logsumexp(lse, dim=1)
    # softmax subtracts the max, not total: at |lse| ~ 1e30 (xm * 1e30) total rounds to the max and
    # exp(lse - total) would give two rounds of equal lse weight 1 each
    weights = torch.softmax(lse, dim=1).unsqueeze(-1)
    return (weights * out.to(lse.dtype)).sum(dim=1).to(out.dtype), total


class _NoCpuBackward(torch.autograd.Function):
    """The forward's outputs, attached to the differentiable inputs by a node whose backward raises."""

    @staticmethod
    def forward(ctx, n_inputs: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        outputs = tensors[n_inputs:]
        ctx.mark_non_differentiable(*[o for o in outputs if not o.is_floating_point()])
        return tuple(o.clone() for o in outputs)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        raise BackendUnavailableError(
            "the flex backend has no backward on CPU tensors (compiled FlexAttention has no CPU backward); "
            "use backend='cpu' (the fused CPU kernels) or backend='reference' for gradients")


def _run(fn: Callable[..., tuple[Tensor, ...]], xm: Tensor, v: Tensor, lss: Tensor | None,
         *args: Any) -> tuple[Tensor, ...]:
    """``fn(xm, v, lss, *args)``, as it is on CUDA (flex's autograd). On CPU without a graph; if an input wants
    gradients, the outputs get a node whose backward raises (at backward time, so that inference with parameters
    that require grad still works)."""
    if xm.device.type != "cpu":
        return fn(xm, v, lss, *args)
    with torch.no_grad():
        outputs = fn(xm, v, lss, *args)
    differentiable = tuple(t for t in (xm, v, lss) if t is not None)  # lss=None: nothing to differentiate
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in differentiable):
        return outputs
    return _NoCpuBackward.apply(len(differentiable), *differentiable, *outputs)


# The forward ops of the backend table (DESIGN.md "Operators"; arguments already checked). Its backward is
# flex's own autograd (CUDA), so it has no attention_backward.


def sblsh_hash(xm: Tensor, rot: Tensor) -> Tensor:
    """Codes ``[N, R, L]``: the projection in IEEE float32 (float64 for float64), whatever the matmul precision
    (README "Precision": TF32 or half products move near-ties)."""
    acc = torch.float64 if xm.dtype == torch.float64 else torch.float32
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast(xm.device.type, enabled=False):
            proj = torch.einsum("nlc,crb->nrlb", xm.detach().to(acc), rot.to(acc))
    finally:
        torch.set_float32_matmul_precision(previous)
    return proj.argmax(dim=-1)  # first maximum: the lowest bucket on ties


def chunk_attention(xm: Tensor, v: Tensor, lss: Tensor | None, perm: Tensor, chunk_size: int
                    ) -> tuple[Tensor, Tensor]:
    """Per-round ``out [N, R, L, Cv]`` and ``lse [N, R, L]``; differentiable on CUDA (flex's autograd)."""
    return _run(_rounds, xm, v, lss, perm, chunk_size)


def _gla(xm: Tensor, v: Tensor, lss: Tensor | None, rot: Tensor, chunk_size: int) -> tuple[Tensor, Tensor, Tensor]:
    perm = bucket_sort(sblsh_hash(xm, rot), rot.shape[-1])
    y, lse = merge_rounds(*_rounds(xm, v, lss, perm, chunk_size))
    return y, lse, perm


def gla_attention(xm: Tensor, v: Tensor, lss: Tensor | None, rot: Tensor, chunk_size: int
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """``y [N, L, Cv]``, ``lse [N, L]`` over all rounds, ``perm [N, R, L]``; differentiable on CUDA."""
    return _run(_gla, xm, v, lss, rot, chunk_size)
