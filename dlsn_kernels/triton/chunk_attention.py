"""Forward chunk attention (DESIGN.md 1.3-1.5) and the fused ``gla_attention`` as Triton kernels.

One program owns a block of query slots of one chunk c of one (n, round). It gathers its queries
through ``perm``, then walks the K key slots of chunks c, c-1, c+1 (in that order, DESIGN.md) in tiles:
gathers the key rows through ``perm``, normalises them in registers, adds ``lss[key, query slot]``,
and keeps an online softmax. It writes ``out``/``lse`` at the queries' original positions; padded
query slots are never written. No sorted, padded or ``[K, 3K]`` tensor exists in memory.

``gla_attention`` runs the rounds one launch after another; round r merges its result into the
running ``(y, lse)`` of each position (written once per round, so race-free): memory does not grow
with R and no per-round output is stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _checks
from ._common import (
    LN2,
    LOG2E,
    MAX_CHANNELS,
    MAX_CHUNK,
    accumulate_dtype,
    attention_heuristics,
    check_device,
    dot_kind,
    dot_precision,
    inverse_key_norms,
    jit,
    launch_tiles,
    matmul,
    neighbour_chunk,
    slot_layout,
    slot_position,
)
from .hash import sblsh_hash, sort_codes

__all__ = ["chunk_attention", "gla_attention", "check_attention_inputs", "check_perm_shape"]

# What a program does with its result.
_STORE = 0  # chunk_attention: out[n, r, q], lse[n, r, q]
_FIRST_ROUND = 1  # gla_attention, round 0: y[n, q], lse[n, q]
_MERGE_ROUND = 2  # gla_attention, rounds > 0: merge into y[n, q], lse[n, q]


# (BLOCK_Q, BLOCK_K, num_warps) at Cv = 256 by dot kind; what ``python -m bench.compile_report`` shows
# spill-free on sm_90 in every MODE (the round merge holds the old y beside the accumulator, which is what
# caps BLOCK_K at 32 in half precision too). IEEE float32 runs on FFMA, which holds whole operand rows in
# registers, hence its small key tiles.
_FORWARD_TILES = {"native": (64, 32, 8), "tf32": (64, 32, 8), "ieee": (32, 16, 8)}


def forward_config(chunk_size: int, value_channels: int, dtype: torch.dtype) -> dict[str, int]:
    """Block sizes and launch shape of ``_chunk_attention_fwd_kernel``, fixed per problem (no autotuning).

    Query tiles of up to 64 slots amortise the gather of the 3K key rows (DESIGN.md 1.4) over many queries.
    """
    return launch_tiles(chunk_size, value_channels, *_FORWARD_TILES[dot_kind(dtype)])


@attention_heuristics
@jit
def _chunk_attention_fwd_kernel(
    xm_ptr, v_ptr, lss_ptr, perm_ptr, inv_norm_ptr, out_ptr, lse_ptr,
    L, Cm, Cv, K, R, nc, pad,
    rounds_in_grid, first_round,
    MODE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_CM: tl.constexpr, BLOCK_CV: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr,
):
    # tl.dot operands stay in the input dtype DOT (tensor cores for float16/bfloat16, TF32 or IEEE for
    # float32 by PRECISION), sums in ACC. Scores are kept in base 2 (exp2 is the hardware exponential).
    n_qblocks = tl.cdiv(K, BLOCK_Q)
    c = tl.program_id(0) // n_qblocks
    qb = tl.program_id(0) % n_qblocks
    grid_row = tl.program_id(1).to(tl.int64)  # n * rounds_in_grid + round within the grid
    n = grid_row // rounds_in_grid
    r = first_round + grid_row % rounds_in_grid
    perm_row = perm_ptr + (n * R + r) * L

    offs_cm = tl.arange(0, BLOCK_CM)
    offs_cv = tl.arange(0, BLOCK_CV)
    cm_ok = offs_cm < Cm
    cv_ok = offs_cv < Cv

    # queries: slots c*K + i; padded slots (>= L) produce nothing, so they are not even loaded
    offs_i = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_slot = c * K + offs_i
    q_ok = (offs_i < K) & (q_slot < L)
    q_pos = slot_position(perm_row, q_slot, L, pad, q_ok)
    q = tl.load(xm_ptr + (n * L + q_pos)[:, None] * Cm + offs_cm[None, :],
                mask=q_ok[:, None] & cm_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_Q], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_Q], ACC)
    acc = tl.zeros([BLOCK_Q, BLOCK_CV], ACC)
    # one flat loop over (t, key tile): the pipeliner then prefetches across chunk boundaries and keeps one
    # set of shared-memory buffers (an unrolled loop over t would triple them)
    n_kblocks = tl.cdiv(K, BLOCK_K)
    for step in range(0, 3 * n_kblocks):
        t = step // n_kblocks
        kc = neighbour_chunk(c, t, nc, 1)  # key chunks c, c-1, c+1 (mod nc), in this order
        k0 = (step % n_kblocks) * BLOCK_K
        offs_j = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_j < K
        k_rows = n * L + slot_position(perm_row, kc * K + offs_j, L, pad, k_ok)
        key = tl.load(xm_ptr + k_rows[:, None] * Cm + offs_cm[None, :],
                      mask=k_ok[:, None] & cm_ok[None, :], other=0.0)
        # 1 / max(||key||, eps) (precomputed per position) scales the score column: q . key / ||key||
        inv_norm = tl.load(inv_norm_ptr + k_rows, mask=k_ok, other=0.0)
        # lss[key position, query slot i]: each key's row is read contiguously, then transposed
        learned = tl.load(lss_ptr + k_rows[:, None] * K + offs_i[None, :],
                          mask=k_ok[:, None] & q_ok[None, :], other=0.0).to(ACC)
        s = matmul(q, tl.trans(key), ACC, PRECISION) * inv_norm[None, :] + tl.trans(learned)
        s = tl.where(k_ok[None, :], s * LOG2E, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        val = tl.load(v_ptr + k_rows[:, None] * Cv + offs_cv[None, :],
                      mask=k_ok[:, None] & cv_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + matmul(p.to(DOT), val, ACC, PRECISION)
        m_i = m_new

    lse = (m_i + tl.log2(l_i)) * LN2
    out_rows = grid_row * L + q_pos  # [N, rounds_in_grid, L] row of each query's original position
    out_ptrs = out_ptr + out_rows[:, None] * Cv + offs_cv[None, :]
    out_mask = q_ok[:, None] & cv_ok[None, :]
    if MODE == 2:
        # y = y e^{lse - lse'} + out_r e^{lse_r - lse'} with lse' = logaddexp(lse, lse_r); the 1/l of out_r is
        # folded into its factor so that only acc and the old y are live (no spills at Cv = 256)
        lse_old = tl.load(lse_ptr + out_rows, mask=q_ok, other=0.0)
        top = tl.maximum(lse_old, lse)
        lse_new = top + tl.log(tl.exp(lse_old - top) + tl.exp(lse - top))
        new_weight = tl.exp(lse - lse_new) / l_i
        old_weight = tl.exp(lse_old - lse_new)
        out = acc * new_weight[:, None]
        out += tl.load(out_ptrs, mask=out_mask, other=0.0) * old_weight[:, None]
        lse = lse_new
    else:
        out = acc / l_i[:, None]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_mask)
    tl.store(lse_ptr + out_rows, lse, mask=q_ok)


def check_attention_inputs(xm: Tensor, v: Tensor, lss: Tensor, chunk_size: int) -> None:
    """The public ops' checks (same messages on every backend), the device rule and Triton's size limits."""
    _checks.check_attention(xm, v, lss, chunk_size, "triton")
    check_device(xm, "xm")
    for name, size in (("xm", xm.shape[2]), ("v", v.shape[2])):
        if size > MAX_CHANNELS:
            raise ValueError(
                f"{name} has {size} channels; the Triton backend supports at most {MAX_CHANNELS}"
            )
    if chunk_size > MAX_CHUNK:
        raise ValueError(f"chunk_size {chunk_size} is above the Triton backend's limit of {MAX_CHUNK}")


def check_perm_shape(perm: Tensor, xm: Tensor) -> None:
    """``perm``'s rank, dtype, device and shape; its values are the public op's check (``_checks``)."""
    _checks.check_perm(perm, xm, values=False)


def _launch_forward(xm, v, lss, perm, inv_norm, out, lse, chunk_size, rounds_in_grid, first_round, mode):
    n, length, cm = xm.shape
    pad, _, nc = slot_layout(length, chunk_size)
    config = forward_config(chunk_size, v.shape[2], xm.dtype)
    block_q = config.pop("BLOCK_Q")
    grid = (nc * triton.cdiv(chunk_size, block_q), n * rounds_in_grid)
    _chunk_attention_fwd_kernel[grid](
        xm, v, lss, perm, inv_norm, out, lse,
        length, cm, v.shape[2], chunk_size, perm.shape[1], nc, pad,
        rounds_in_grid, first_round,
        MODE=mode, PRECISION=dot_precision(xm.dtype), BLOCK_Q=block_q, **config,
    )


def chunk_attention(
    xm: Tensor, v: Tensor, lss: Tensor, perm: Tensor, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """Attention of every round within adjacent chunks: ``out [N, R, L, Cv]`` (dtype of ``v``) and
    ``lse [N, R, L]`` (float32; float64 for float64 input), in original position order.

    ``perm [N, R, L]`` must hold a permutation of ``0..L-1`` per (n, round) (not checked).
    """
    check_attention_inputs(xm, v, lss, chunk_size)
    check_perm_shape(perm, xm)
    n, length, _ = xm.shape
    rounds = perm.shape[1]
    out = torch.empty((n, rounds, length, v.shape[2]), dtype=v.dtype, device=v.device)
    lse = torch.empty((n, rounds, length), dtype=accumulate_dtype(xm.dtype), device=xm.device)
    if out.numel() == 0 or lse.numel() == 0:
        return out, lse
    _launch_forward(xm, v, lss, perm, inverse_key_norms(xm), out, lse, int(chunk_size), rounds, 0, _STORE)
    return out, lse


def gla_attention(
    xm: Tensor, v: Tensor, lss: Tensor, rot: Tensor, chunk_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """DESIGN.md 1.1-1.5 fused: ``y [N, L, Cv]`` (dtype of ``v``), ``lse [N, L]`` over all rounds (float32;
    float64 for float64 input) and ``perm [N, R, L]`` int64 (for the backward pass)."""
    check_attention_inputs(xm, v, lss, chunk_size)
    codes = sblsh_hash(xm, rot)
    perm = sort_codes(codes, rot.shape[2])
    n, length, _ = xm.shape
    acc_dtype = accumulate_dtype(xm.dtype)
    # y is merged in the accumulation dtype over the rounds, cast once at the end
    y = torch.empty((n, length, v.shape[2]), dtype=acc_dtype, device=v.device)
    lse = torch.empty((n, length), dtype=acc_dtype, device=xm.device)
    if y.numel() == 0 or lse.numel() == 0:
        return y.to(v.dtype), lse, perm
    inv_norm = inverse_key_norms(xm)
    for r in range(perm.shape[1]):
        mode = _FIRST_ROUND if r == 0 else _MERGE_ROUND
        _launch_forward(xm, v, lss, perm, inv_norm, y, lse, int(chunk_size), 1, r, mode)
    return y.to(v.dtype), lse, perm
