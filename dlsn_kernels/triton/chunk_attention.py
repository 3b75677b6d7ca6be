"""Forward chunk attention (DESIGN.md 1.3-1.5) and the fused ``gla_attention`` as Triton kernels.

One program owns a block of query slots of one chunk c of one (n, round); one launch covers every round. It
walks the key slots of chunks c, c-1, c+1 in tiles (rows from ``slot_rows``) with an online softmax and writes
``out``/``lse`` at the queries' original positions: no sorted, padded or ``[K, 3K]`` tensor exists in memory.
``gla_attention`` then merges the rounds' ``out [N, R, L, Cv]`` (input dtype) in ``_combine_rounds_kernel``.
Why each of these choices: DESIGN.md "Triton kernels on Hopper".

The value product is computed transposed, ``acc^T [Cv, BLOCK_Q] += V^T P^T``, so that P is the B operand, which
Hopper's wgmma reads from shared memory: P as a register A operand is the pattern ptxas 12.8/12.9 can schedule
wrongly (Triton issue #9433), silently and only on hardware. ``python -m bench.compile_report`` counts those (RS).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _checks
from ..targets import MAX_CHANNELS, MAX_CHUNK
from . import _common
from ._common import (
    LN2,
    LOG2E,
    accumulate_dtype,
    attention_heuristics,
    channel_block,
    jit,
    kernel_config,
    kernel_precision,
    matmul,
    scaled_key_norms,
    slot_layout,
    slot_rows,
    tl_dtype,
)
from .hash import sblsh_hash, sort_codes

__all__ = ["chunk_attention", "gla_attention", "check_attention_inputs"]


# Tiles that divide the chunk and channel blocks that are the channel counts need no masks in the loop.
even_heuristics = triton.heuristics({
    "EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0 and a["K"] % a["BLOCK_Q"] == 0,
    "EVEN_C": lambda a: a["Cm"] == channel_block(a["Cm"]) and a["Cv"] == channel_block(a["Cv"]),
})


@even_heuristics
@attention_heuristics
@jit
def _chunk_attention_fwd_kernel(
    q_ptr, xm_ptr, v_ptr, lss_ptr, rows_ptr, inv_norm_ptr, out_ptr, lse_ptr,
    L, Cm, Cv, K, R, nc, Lp,
    PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_CM: tl.constexpr, BLOCK_CV: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_C: tl.constexpr, HAS_LSS: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
):
    # tl.dot operands stay in the input dtype DOT (tensor cores for float16/bfloat16, TF32 or IEEE for
    # float32 by PRECISION), sums in ACC. Scores are kept in base 2 (exp2 is the hardware exponential).
    n_qblocks = tl.cdiv(K, BLOCK_Q)
    c = tl.program_id(0) // n_qblocks
    qb = tl.program_id(0) % n_qblocks
    nr = tl.program_id(1)  # n * R + round
    slot_row = rows_ptr + nr.to(tl.int64) * Lp  # rows of the Lp sorted slots of this (n, round)

    offs_cm = tl.arange(0, BLOCK_CM)
    offs_cv = tl.arange(0, BLOCK_CV)
    cm_ok = offs_cm < Cm
    cv_ok = offs_cv < Cv

    # queries: slots c*K + i. Padded slots (>= L, duplicates of real ones) are computed but never written.
    offs_i = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    i_ok = offs_i < K
    q_rows = tl.load(slot_row + c * K + offs_i, mask=i_ok, other=0)
    # q_ptr: xm, or xm * 2^-e beyond ~1e18 (scaled_key_norms) so that q . key cannot overflow; 2^e is in inv_norm
    # (xm_ptr: the keys, xm, or beyond ~1e34 with rows far below the largest scaled up, see scaled_key_norms)
    if EVEN_C:
        q = tl.load(q_ptr + q_rows[:, None] * Cm + offs_cm[None, :])
    else:
        q = tl.load(q_ptr + q_rows[:, None] * Cm + offs_cm[None, :], mask=cm_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_Q], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_Q], ACC)
    acc = tl.zeros([BLOCK_CV, BLOCK_Q], ACC)  # out^T: P is the B operand of the value product
    # the key chunks c, c-1, c+1 (mod nc): once per program, not per step
    chunk_prev = (c + nc - 1) % nc
    chunk_next = (c + 1) % nc
    # one flat loop over (t, key tile): the pipeliner then prefetches across chunk boundaries and keeps one
    # set of shared-memory buffers (an unrolled loop over t would triple them)
    n_kblocks = tl.cdiv(K, BLOCK_K)
    for step in range(0, 3 * n_kblocks):
        t = step // n_kblocks
        kc = tl.where(t == 0, c, tl.where(t == 1, chunk_prev, chunk_next))
        offs_j = (step - t * n_kblocks) * BLOCK_K + tl.arange(0, BLOCK_K)
        # lss[key position, query slot i] (HAS_LSS): each key's row is read contiguously, then transposed
        if EVEN_K:
            k_rows = tl.load(slot_row + kc * K + offs_j)
            inv_norm = tl.load(inv_norm_ptr + k_rows)
            if HAS_LSS:
                learned = tl.load(lss_ptr + k_rows[:, None] * K + offs_i[None, :])
        else:
            k_ok = offs_j < K
            k_rows = tl.load(slot_row + kc * K + offs_j, mask=k_ok, other=0)
            inv_norm = tl.load(inv_norm_ptr + k_rows, mask=k_ok, other=0.0)
            if HAS_LSS:
                learned = tl.load(lss_ptr + k_rows[:, None] * K + offs_i[None, :],
                                  mask=k_ok[:, None] & i_ok[None, :], other=0.0)
        if EVEN_C:
            key = tl.load(xm_ptr + k_rows[:, None] * Cm + offs_cm[None, :])
            val = tl.load(v_ptr + k_rows[:, None] * Cv + offs_cv[None, :])
        else:
            key = tl.load(xm_ptr + k_rows[:, None] * Cm + offs_cm[None, :], mask=cm_ok[None, :], other=0.0)
            val = tl.load(v_ptr + k_rows[:, None] * Cv + offs_cv[None, :], mask=cv_ok[None, :], other=0.0)
        # log2(e) 2^e / max(||key||, eps) (precomputed per position) scales the score column: q . key / ||key||
        s = matmul(q, tl.trans(key), ACC, PRECISION) * inv_norm[None, :]
        if HAS_LSS:
            s += tl.trans(learned.to(ACC)) * LOG2E
        if not EVEN_K:
            s = tl.where(k_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[None, :] + matmul(tl.trans(val), tl.trans(p.to(DOT)), ACC, PRECISION)
        m_i = m_new

    # original positions: out/lse rows [N, R, L] = (n * R + r) * L + position, position = row - n * L
    n = nr // R
    out_rows = q_rows.to(tl.int64) + (nr - n).to(tl.int64) * L
    q_ok = i_ok & (c * K + offs_i < L)
    tl.store(out_ptr + out_rows[None, :] * Cv + offs_cv[:, None], (acc / l_i[None, :]).to(out_ptr.dtype.element_ty),
             mask=q_ok[None, :] & cv_ok[:, None])
    tl.store(lse_ptr + out_rows, (m_i + tl.log2(l_i)) * LN2, mask=q_ok)


@triton.heuristics({
    "BLOCK_CV": lambda a: channel_block(a["Cv"]),
    "ACC": lambda a: tl_dtype(accumulate_dtype(a["lse_ptr"].dtype)),
})
@jit
def _combine_rounds_kernel(
    out_ptr, lse_ptr, y_ptr, lse_total_ptr, L, Cv, R,
    BLOCK_P: tl.constexpr, BLOCK_CV: tl.constexpr, ACC: tl.constexpr,
):
    """``y = sum_r out_r exp(lse_r - lse)`` and ``lse = logsumexp_r lse_r`` per position (DESIGN.md 1.5)."""
    n = tl.program_id(1).to(tl.int64)
    pos = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    ok = pos < L
    offs_cv = tl.arange(0, BLOCK_CV)
    mask = ok[:, None] & (offs_cv < Cv)[None, :]
    top = tl.full([BLOCK_P], float("-inf"), ACC)
    for r in range(0, R):
        top = tl.maximum(top, tl.load(lse_ptr + (n * R + r) * L + pos, mask=ok, other=0.0))
    total = tl.zeros([BLOCK_P], ACC)
    for r in range(0, R):
        total += tl.exp(tl.load(lse_ptr + (n * R + r) * L + pos, mask=ok, other=0.0) - top)
    lse = top + tl.log(total)
    # weights exp(lse_r - top) / total, not exp(lse_r - lse): at |lse| ~ 1e30 (xm * 1e30) lse rounds to top and
    # two rounds of equal lse would both get weight 1
    scale = 1.0 / total
    y = tl.zeros([BLOCK_P, BLOCK_CV], ACC)
    for r in range(0, R):
        rows = (n * R + r) * L + pos
        weight = tl.exp(tl.load(lse_ptr + rows, mask=ok, other=0.0) - top) * scale
        y += tl.load(out_ptr + rows[:, None] * Cv + offs_cv[None, :], mask=mask, other=0.0).to(ACC) * weight[:, None]
    tl.store(y_ptr + (n * L + pos)[:, None] * Cv + offs_cv[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(lse_total_ptr + n * L + pos, lse, mask=ok)


def check_attention_inputs(xm: Tensor, v: Tensor, lss: Tensor | None, perm: Tensor | None, chunk_size: int) -> None:
    """The public ops' checks (same messages on every backend; ``perm``'s values are the public op's), the device
    rule and Triton's size limits."""
    _checks.check_attention(xm, v, lss, chunk_size, "triton")
    if perm is not None:
        _checks.check_perm(perm, xm, values=False)
    _common._check_device(xm, "xm")
    for name, size in (("xm", xm.shape[2]), ("v", v.shape[2])):
        if size > MAX_CHANNELS:
            raise ValueError(f"{name} has {size} channels; the Triton backend supports at most {MAX_CHANNELS}")
    if chunk_size > MAX_CHUNK:
        raise ValueError(f"chunk_size {chunk_size} is above the Triton backend's limit of {MAX_CHUNK}")


def chunk_attention(
    xm: Tensor, v: Tensor, lss: Tensor | None, perm: Tensor, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """Attention of every round within adjacent chunks: ``out [N, R, L, Cv]`` (dtype of ``v``) and
    ``lse [N, R, L]`` (float32; float64 for float64 input), in original position order. ``lss`` None: scores
    q . k_hat only (the kernel variant without learned-score loads).

    ``perm [N, R, L]`` must hold a permutation of ``0..L-1`` per (n, round) (not checked).
    """
    check_attention_inputs(xm, v, lss, perm, chunk_size)
    return _forward(xm, v, lss, perm, int(chunk_size))


def _forward(xm: Tensor, v: Tensor, lss: Tensor | None, perm: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    """``chunk_attention`` on checked arguments: one launch for every round."""
    n, length, cm = xm.shape
    cv, rounds = v.shape[2], perm.shape[1]
    out = torch.empty((n, rounds, length, cv), dtype=v.dtype, device=v.device)
    lse = torch.empty((n, rounds, length), dtype=accumulate_dtype(xm.dtype), device=xm.device)
    if lse.numel() == 0:  # not out's: with Cv = 0 there is no output row, but lse still has its values
        return out, lse
    _, padded, nc = slot_layout(length, chunk_size)
    rows = slot_rows(perm, chunk_size, max(cm, cv, chunk_size))
    config = kernel_config("forward", xm.device, xm.dtype, cm, cv, chunk_size)
    inv_norm, queries, keys = scaled_key_norms(xm, LOG2E.value)
    grid = (nc * triton.cdiv(chunk_size, config["BLOCK_Q"]), n * rounds)
    _chunk_attention_fwd_kernel[grid](
        queries, keys, v, lss, rows, inv_norm, out, lse,
        length, cm, cv, chunk_size, rounds, nc, padded,
        PRECISION=kernel_precision(xm.device, xm.dtype), **config,
    )
    return out, lse


def combine_rounds(out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    """``(y [N, L, Cv], lse [N, L])`` of per-round ``out [N, R, L, Cv]``, ``lse [N, R, L]`` (DESIGN.md 1.5)."""
    n, rounds, length, cv = out.shape
    if rounds == 1:
        return out[:, 0], lse[:, 0]
    y = torch.empty((n, length, cv), dtype=out.dtype, device=out.device)
    lse_total = torch.empty((n, length), dtype=lse.dtype, device=lse.device)
    config = kernel_config("combine", out.device, out.dtype, 0, cv, 0)
    _combine_rounds_kernel[(triton.cdiv(length, config["BLOCK_P"]), n)](
        out, lse, y, lse_total, length, cv, rounds, **config,
    )
    return y, lse_total


def gla_attention(
    xm: Tensor, v: Tensor, lss: Tensor | None, rot: Tensor, chunk_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """DESIGN.md 1.1-1.5 fused: ``y [N, L, Cv]`` (dtype of ``v``), ``lse [N, L]`` over all rounds (float32;
    float64 for float64 input) and ``perm [N, R, L]`` int64 (for the backward pass).

    The rounds run in one launch into ``[N, R, L, Cv]`` of the input dtype (freed on return), then merge.
    """
    check_attention_inputs(xm, v, lss, None, chunk_size)
    perm = sort_codes(sblsh_hash(xm, rot), rot.shape[2])  # sblsh_hash checks rot; perm is known good
    out, lse = _forward(xm, v, lss, perm, int(chunk_size))
    if lse.numel() == 0:
        n, length, _ = xm.shape
        return (out.new_empty((n, length, v.shape[2])), lse.new_empty((n, length)), perm)
    y, lse = combine_rounds(out, lse)
    return y, lse, perm
