"""Backward of ``chunk_attention`` and ``gla_attention`` as Triton kernels (DESIGN.md "Backward: one kernel for both
ops", and "Triton kernels on Hopper" for the launch shapes).

Deterministic without atomics: every buffer element has exactly one writer and every sum runs in a fixed order.
Per round r, three launches, then one position pass for all rounds:

1. ``_key_pass``, twice (``DV_PASS``): per (key block of key chunk c', n), P of the query chunks that read c' from
   the saved ``lse``; the slot gradients of its keys go to round r's float32 buffers ``[N, Lp, .]``: ``dv`` (dv
   pass), ``dkn``, ``dlss`` and ``dS / ||key||`` into the ``ds [N, nc, 3, K, K]`` buffer (score pass).
2. ``_dq_pass``: per query tile of chunk c, ``dq^T = key^T ds`` over t and key blocks into ``dq_buf[r]``.
3. ``_position_pass``: per position, the sum over rounds of its slot's ``dq`` and the key gradients of its slot
   and padded duplicates, then the key normalisation backward; writes ``dxm``, ``dv``, ``dlss``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _checks
from .._magnitudes import check_saved_lse
from ._common import (
    KEY_NORM_EPS,
    LOG2E,
    accumulate_dtype,
    attention_heuristics,
    channel_block,
    device_fn,
    first_padded_copy,
    inverse_key_norms,
    jit,
    kernel_config,
    kernel_precision,
    matmul,
    slot_layout,
    slot_rows,
    tl_dtype,
)
from .chunk_attention import check_attention_inputs

__all__ = ["attention_backward"]


# Tiles that divide the chunk, no padded slots (L % K == 0) and channel blocks that are the channel counts (Cv
# where the kernel has it) need no masks in the loop.
backward_heuristics = triton.heuristics({
    "FULL": lambda a: a["K"] % a["BLOCK_K"] == 0 and a["K"] % a["BLOCK_Q"] == 0 and a["L"] % a["K"] == 0,
    "EVEN_C": lambda a: all(a[c] == channel_block(a[c]) for c in ("Cm", "Cv") if c in a),
})


def _smem_b(dtype: torch.dtype, precision: str) -> bool:
    """Whether the key passes write their products transposed (P and dS on wgmma's shared-memory B side):
    for the tensor-core dots (float16/bfloat16, TF32); IEEE float32/float64 run on FFMA in the plain form."""
    return dtype in (torch.float16, torch.bfloat16) or precision == "tf32"


@backward_heuristics
@attention_heuristics
# the score pass's chunked dP (BLOCK_CV_CHUNK narrower than the value block; the kernel's default 0 holds V)
@triton.heuristics({"CV_CHUNKED": lambda a: 0 < a.get("BLOCK_CV_CHUNK", 0) < channel_block(a["Cv"])})
@jit
def _key_pass(
    grad_out_ptr, delta_ptr, lse_ptr, xm_ptr, v_ptr, lss_ptr, rows_ptr, inv_norm_ptr,
    dv_slot_ptr, dkn_slot_ptr, dlss_slot_ptr, ds_ptr,
    L, Cm, Cv, K, R, nc, Lp, r, stat_rounds, stat_round,
    SMEM_B: tl.constexpr, DV_PASS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_CM: tl.constexpr, BLOCK_CV: tl.constexpr, FULL: tl.constexpr,
    EVEN_C: tl.constexpr, HAS_LSS: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
    CV_CHUNKED: tl.constexpr, BLOCK_CV_CHUNK: tl.constexpr = 0,
):
    # Two launches share this body (DV_PASS): the dv pass holds the dv rows; the score pass holds dkn and
    # dlss and writes dS / ||key|| for the dq pass. Together they would not fit in registers at Cv = 256;
    # apart, each recomputes the cheap score tile S (a Cm-deep product) and neither spills.
    # Score tiles are [key, query slot]: lss rows are read contiguously, and the dlss tile is stored as it is
    # computed (neither exists without a learned score, HAS_LSS false). P is recomputed from the saved lse (base 2
    # inside the kernel). Every product whose operand is computed in registers (P, dS) is written transposed so that
    # operand is the B side, which Hopper's wgmma reads from shared memory: a register A operand is the pattern
    # ptxas 12.8/12.9 can schedule wrongly (Triton issue #9433). Hence the transposed accumulators dv^T, dkn^T and
    # dq^T (SMEM_B: tensor-core dots).
    # IEEE float32 runs on FFMA, where the plain orientation holds fewer registers (the transposed one spills).
    # BLOCK_CV_CHUNK (score pass, RDNA only: targets.py): dP = V dO^T is summed over value-channel chunks of that
    # width, V and dO read per chunk, instead of holding V [keys, Cv] over the loop. RDNA replicates a WMMA
    # operand across the two halves of a wave, so a held V took 128+ of a wave's 256 VGPRs and the pass spilled.
    # 0 (every other target) holds V: one Cv-deep product per step.
    n_kblocks = tl.cdiv(K, BLOCK_K)
    kc = tl.program_id(0) // n_kblocks
    kb = tl.program_id(0) % n_kblocks
    n = tl.program_id(1)
    slot_row = rows_ptr + (n * R + r).to(tl.int64) * Lp  # rows of the Lp sorted slots of (n, round r)
    # grad_out / delta / lse [N, R', L] row of input row n * L + position
    stat_shift = ((n * stat_rounds + stat_round - n) * L).to(tl.int64)

    offs_cm = tl.arange(0, BLOCK_CM)
    offs_cv = tl.arange(0, BLOCK_CV)
    cm_ok = offs_cm < Cm
    cv_ok = offs_cv < Cv

    # this program's keys: slots kc*K + j (all < Lp; slots >= L hold padded duplicates)
    offs_j = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_j < K
    k_slot = kc * K + offs_j
    k_rows = tl.load(slot_row + k_slot, mask=k_ok, other=0)
    key = tl.load(xm_ptr + k_rows[:, None] * Cm + offs_cm[None, :], mask=k_ok[:, None] & cm_ok[None, :], other=0.0)
    inv_norm = tl.load(inv_norm_ptr + k_rows, mask=k_ok, other=0.0)
    if not DV_PASS and not CV_CHUNKED:
        val = tl.load(v_ptr + k_rows[:, None] * Cv + offs_cv[None, :],
                      mask=k_ok[:, None] & cv_ok[None, :], other=0.0)

    if DV_PASS:
        if SMEM_B:
            dv_t = tl.zeros([BLOCK_CV, BLOCK_K], ACC)
        else:
            dv = tl.zeros([BLOCK_K, BLOCK_CV], ACC)
    else:
        if SMEM_B:
            dkn_t = tl.zeros([BLOCK_CM, BLOCK_K], ACC)
        else:
            dkn = tl.zeros([BLOCK_K, BLOCK_CM], ACC)
        if HAS_LSS:
            dlss = tl.zeros([BLOCK_K, BLOCK_Q], ACC)  # [key, query slot i], summed over t
    chunk_next = (kc + 1) % nc
    chunk_prev = (kc + nc - 1) % nc
    # one flat loop over (query tile, t), t fastest: one set of pipelined shared-memory buffers, and the dlss
    # tile of a query tile is complete after its three t
    for step in range(0, 3 * tl.cdiv(K, BLOCK_Q)):
        t = step % 3
        offs_i = (step // 3) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        # query chunk c reads key chunk kc as its chunk t: c = kc, kc + 1, kc - 1 (mod nc)
        c = tl.where(t == 0, kc, tl.where(t == 1, chunk_next, chunk_prev))
        q_slot = c * K + offs_i
        if FULL:
            q_rows = tl.load(slot_row + q_slot)
            if HAS_LSS:
                learned = tl.load(lss_ptr + k_rows[:, None] * K + offs_i[None, :]).to(ACC)
        else:
            i_ok = offs_i < K
            q_ok = i_ok & (q_slot < L)  # padded query slots produce nothing, so get no gradient
            q_rows = tl.load(slot_row + q_slot, mask=i_ok, other=0)
            if HAS_LSS:
                learned = tl.load(lss_ptr + k_rows[:, None] * K + offs_i[None, :],
                                  mask=k_ok[:, None] & q_ok[None, :], other=0.0).to(ACC)
        stat_rows = q_rows + stat_shift
        if EVEN_C:
            q = tl.load(xm_ptr + q_rows[:, None] * Cm + offs_cm[None, :])
            if not CV_CHUNKED:
                d_out = tl.load(grad_out_ptr + stat_rows[:, None] * Cv + offs_cv[None, :]).to(DOT)
        else:
            q = tl.load(xm_ptr + q_rows[:, None] * Cm + offs_cm[None, :], mask=cm_ok[None, :], other=0.0)
            if not CV_CHUNKED:
                d_out = tl.load(grad_out_ptr + stat_rows[:, None] * Cv + offs_cv[None, :],
                                mask=cv_ok[None, :], other=0.0).to(DOT)
        lse = tl.load(lse_ptr + stat_rows).to(ACC)
        s = matmul(key, tl.trans(q), ACC, PRECISION) * inv_norm[:, None]
        if HAS_LSS:
            s += learned
        if FULL:
            p = tl.exp2((s - lse[None, :]) * LOG2E)  # [BLOCK_K, BLOCK_Q]
        else:
            valid = k_ok[:, None] & q_ok[None, :]
            p = tl.exp2(tl.where(valid, (s - lse[None, :]) * LOG2E, float("-inf")))
        if DV_PASS:
            # dv^T [Cv, keys] += dO^T P^T
            if SMEM_B:
                dv_t += matmul(tl.trans(d_out), tl.trans(p.to(DOT)), ACC, PRECISION)
            else:
                dv += matmul(p.to(DOT), d_out, ACC, PRECISION)
        else:
            delta = tl.load(delta_ptr + stat_rows).to(ACC)
            if CV_CHUNKED:
                dp = tl.zeros([BLOCK_K, BLOCK_Q], ACC)
                for c0 in tl.static_range(0, BLOCK_CV, BLOCK_CV_CHUNK):
                    offs_c = c0 + tl.arange(0, BLOCK_CV_CHUNK)
                    v_ptrs = v_ptr + k_rows[:, None] * Cv + offs_c[None, :]
                    do_ptrs = grad_out_ptr + stat_rows[:, None] * Cv + offs_c[None, :]
                    if EVEN_C:
                        if FULL:
                            val_c = tl.load(v_ptrs)
                        else:
                            val_c = tl.load(v_ptrs, mask=k_ok[:, None], other=0.0)
                        d_out_c = tl.load(do_ptrs).to(DOT)
                    else:
                        c_ok = offs_c < Cv
                        val_c = tl.load(v_ptrs, mask=k_ok[:, None] & c_ok[None, :], other=0.0)
                        d_out_c = tl.load(do_ptrs, mask=c_ok[None, :], other=0.0).to(DOT)
                    dp += matmul(val_c, tl.trans(d_out_c), ACC, PRECISION)
            else:
                dp = matmul(val, tl.trans(d_out), ACC, PRECISION)
            ds = p * (dp - delta[None, :])
            # dkn^T [Cm, keys] += q^T dS^T
            if SMEM_B:
                dkn_t += matmul(tl.trans(q), tl.trans(ds.to(DOT)), ACC, PRECISION)
            else:
                dkn += matmul(ds.to(DOT), q, ACC, PRECISION)
            if HAS_LSS:
                dlss += ds
            # dS / ||key|| in the dot dtype, exactly the operand of dq's product, for _dq_pass (one writer per
            # element): the dq product then runs once per query tile there, not in this pass's registers
            ds_row = (((n * nc + c) * 3 + t) * K + offs_j).to(tl.int64) * K
            ds_ptrs = ds_ptr + ds_row[:, None] + offs_i[None, :]
            if FULL:
                tl.store(ds_ptrs, (ds * inv_norm[:, None]).to(DOT))
            else:
                tl.store(ds_ptrs, (ds * inv_norm[:, None]).to(DOT), mask=k_ok[:, None] & (offs_i < K)[None, :])
            if HAS_LSS and t == 2:
                tl.store(dlss_slot_ptr + (n * Lp + k_slot).to(tl.int64)[:, None] * K + offs_i[None, :], dlss,
                         mask=k_ok[:, None] & (offs_i < K)[None, :])
                dlss = tl.zeros([BLOCK_K, BLOCK_Q], ACC)
    # slot order (affine rows): a gathered row index per element of the transposed [Cv, keys] store costs a
    # 64-bit pointer per element and spilled the dv pass; the position pass gathers the rows instead
    out_rows = (n * Lp + k_slot).to(tl.int64)
    if not SMEM_B:  # one layout change at the end, not per step
        if DV_PASS:
            dv_t = tl.trans(dv)
        else:
            dkn_t = tl.trans(dkn)
    if DV_PASS:
        tl.store(dv_slot_ptr + out_rows[None, :] * Cv + offs_cv[:, None], dv_t,
                 mask=k_ok[None, :] & cv_ok[:, None])
    else:
        tl.store(dkn_slot_ptr + out_rows[None, :] * Cm + offs_cm[:, None], dkn_t,
                 mask=k_ok[None, :] & cm_ok[:, None])


@backward_heuristics
@triton.heuristics({"BLOCK_CM": lambda a: channel_block(a["Cm"]),
                    "ACC": lambda a: tl_dtype(accumulate_dtype(a["xm_ptr"].dtype))})
@jit
def _dq_pass(
    ds_ptr, xm_ptr, rows_ptr, dq_ptr,
    L, Cm, K, R, nc, Lp, r,
    PRECISION: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_CM: tl.constexpr, FULL: tl.constexpr, EVEN_C: tl.constexpr, ACC: tl.constexpr,
):
    # dq of a query tile of chunk c for round r: dq^T [Cm, i] = sum over its three key chunks t and their key
    # blocks of key^T (dS / ||key||) (the score pass's operand, stored in the dot dtype), in a fixed order,
    # stored in float32 at the query's slot row of this round's dq buffer.
    n_qblocks = tl.cdiv(K, BLOCK_Q)
    c = tl.program_id(0) // n_qblocks
    offs_i = (tl.program_id(0) % n_qblocks) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    n = tl.program_id(1)
    slot_row = rows_ptr + (n * R + r).to(tl.int64) * Lp
    offs_cm = tl.arange(0, BLOCK_CM)
    cm_ok = offs_cm < Cm
    chunk_prev = (c + nc - 1) % nc
    chunk_next = (c + 1) % nc
    n_kblocks = tl.cdiv(K, BLOCK_K)
    dq_t = tl.zeros([BLOCK_CM, BLOCK_Q], ACC)
    for step in range(0, 3 * n_kblocks):
        t = step // n_kblocks
        offs_j = (step % n_kblocks) * BLOCK_K + tl.arange(0, BLOCK_K)
        # query chunk c reads key chunk c, c - 1, c + 1 as its chunk t = 0, 1, 2 (the score pass's t)
        kc = tl.where(t == 0, c, tl.where(t == 1, chunk_prev, chunk_next))
        ds_ptrs = ds_ptr + ((((n * nc + c) * 3 + t) * K + offs_j).to(tl.int64) * K)[:, None] + offs_i[None, :]
        if FULL:
            k_rows = tl.load(slot_row + kc * K + offs_j)
            ds = tl.load(ds_ptrs)
        else:
            j_ok = offs_j < K
            k_rows = tl.load(slot_row + kc * K + offs_j, mask=j_ok, other=0)
            ds = tl.load(ds_ptrs, mask=j_ok[:, None] & (offs_i < K)[None, :], other=0.0)
        if EVEN_C:
            key = tl.load(xm_ptr + k_rows[:, None] * Cm + offs_cm[None, :])
        else:
            key = tl.load(xm_ptr + k_rows[:, None] * Cm + offs_cm[None, :], mask=cm_ok[None, :], other=0.0)
        dq_t += matmul(tl.trans(key), ds, ACC, PRECISION)
    q_slot = c * K + offs_i
    q_ok = (offs_i < K) & (q_slot < L)  # padded query slots have no gradient
    q_rows = (n * L + q_slot).to(tl.int64)
    tl.store(dq_ptr + q_rows[None, :] * Cm + offs_cm[:, None], dq_t, mask=q_ok[None, :] & cm_ok[:, None])


@device_fn
def _gather_slots(buf_ptr, base, slot, dup_first, n_dup, L, Lp, offs, width, ok, ACC: tl.constexpr):
    """Row ``slot`` of one round's ``[Lp, width]`` slot buffer (from row ``base``) plus the rows of its padded
    duplicates (increasing slot order)."""
    w_ok = offs < width
    total = tl.load(buf_ptr + (base + slot)[:, None] * width + offs[None, :],
                    mask=ok[:, None] & w_ok[None, :], other=0.0).to(ACC)
    for d in range(0, n_dup):
        dup = dup_first + d * L
        dup_ok = ok & (dup < Lp)
        total += tl.load(buf_ptr + (base + dup)[:, None] * width + offs[None, :],
                         mask=dup_ok[:, None] & w_ok[None, :], other=0.0).to(ACC)
    return total


@device_fn
def _store_rows(ptr, rows, offs, width, ok, value):
    tl.store(ptr + rows[:, None] * width + offs[None, :], value.to(ptr.dtype.element_ty),
             mask=ok[:, None] & (offs < width)[None, :])


@triton.heuristics({
    "BLOCK_CM": lambda a: channel_block(a["Cm"]),
    "BLOCK_CV": lambda a: channel_block(a["Cv"]),
    "BLOCK_KK": lambda a: channel_block(a["K"]),
    "ACC": lambda a: tl_dtype(accumulate_dtype(a["xm_ptr"].dtype)),
    "HAS_LSS": lambda a: a["dlss_ptr"] is not None,
})
@jit
def _position_pass(
    slot_of_ptr, xm_ptr, dq_buf_ptr, dv_buf_ptr, dkn_buf_ptr, dlss_buf_ptr, dxm_ptr, dv_ptr, dlss_ptr,
    N, L, Cm, Cv, K, R, pad, Lp, n_dup,
    EPS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CM: tl.constexpr, BLOCK_CV: tl.constexpr,
    BLOCK_KK: tl.constexpr, HAS_LSS: tl.constexpr, ACC: tl.constexpr,
):
    # one launch after all rounds (module docstring, 3.); rounds in increasing order
    n = tl.program_id(1).to(tl.int64)
    pos = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    ok = pos < L
    pos_rows = n * L + pos

    offs_cm = tl.arange(0, BLOCK_CM)
    offs_cv = tl.arange(0, BLOCK_CV)
    offs_k = tl.arange(0, BLOCK_KK)
    cm_ok = offs_cm < Cm
    dq = tl.zeros([BLOCK_P, BLOCK_CM], ACC)
    dkn = tl.zeros([BLOCK_P, BLOCK_CM], ACC)
    dv = tl.zeros([BLOCK_P, BLOCK_CV], ACC)
    if HAS_LSS:
        dlss = tl.zeros([BLOCK_P, BLOCK_KK], ACC)
    for r in range(0, R):
        slot = tl.load(slot_of_ptr + (n * R + r) * L + pos, mask=ok, other=0)  # the position's slot in round r
        dup_first = first_padded_copy(slot, L, pad)
        base = (r * N + n) * Lp
        dq += tl.load(dq_buf_ptr + ((r * N + n) * L + slot)[:, None] * Cm + offs_cm[None, :],
                      mask=ok[:, None] & cm_ok[None, :], other=0.0)
        dkn += _gather_slots(dkn_buf_ptr, base, slot, dup_first, n_dup, L, Lp, offs_cm, Cm, ok, ACC)
        dv += _gather_slots(dv_buf_ptr, base, slot, dup_first, n_dup, L, Lp, offs_cv, Cv, ok, ACC)
        if HAS_LSS:
            dlss += _gather_slots(dlss_buf_ptr, base, slot, dup_first, n_dup, L, Lp, offs_k, K, ok, ACC)

    # backward of kn = x / max(||x||, eps): (dkn - kn (kn . dkn)) / ||x||, or dkn / eps when clamped
    x = tl.load(xm_ptr + pos_rows[:, None] * Cm + offs_cm[None, :],
                mask=ok[:, None] & cm_ok[None, :], other=0.0).to(ACC)
    norm = tl.sqrt(tl.sum(x * x, axis=1))
    kn = x / tl.maximum(norm, EPS)[:, None]
    radial = tl.sum(kn * dkn, axis=1)
    tangent = (dkn - kn * radial[:, None]) / tl.maximum(norm, EPS)[:, None]
    d_key = tl.where((norm >= EPS)[:, None], tangent, dkn / EPS)
    _store_rows(dxm_ptr, pos_rows, offs_cm, Cm, ok, dq + d_key)
    _store_rows(dv_ptr, pos_rows, offs_cv, Cv, ok, dv)
    if HAS_LSS:
        _store_rows(dlss_ptr, pos_rows, offs_k, K, ok, dlss)


def attention_backward(
    grad_out: Tensor, delta: Tensor, xm: Tensor, v: Tensor, lss: Tensor | None, perm: Tensor, lse: Tensor,
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dxm, dv, dlss)`` of the attention (DESIGN.md "Backward: one kernel for both ops").

    ``grad_out [N, R', L, Cv]``, ``delta``/``lse [N, R', L]`` with R' = R (per round: ``chunk_attention``,
    ``delta = rowsum(grad_out * out) - grad_lse``) or R' = 1 (shared by the rounds: ``gla_attention``,
    ``grad_out = dy[:, None]``, ``delta = rowsum(dy * y)[:, None] - grad_lse``, ``lse`` over all rounds).
    Bitwise repeatable: no atomics, fixed summation order. ``lss`` None: no learned score, so no dlss buffers or
    sums at all, and ``dlss`` is ``xm.new_empty(0)``.
    """
    check_attention_inputs(xm, v, lss, perm, chunk_size)
    n, length, cm = xm.shape
    cv = v.shape[2]
    rounds = perm.shape[1]
    _checks.check_rank(grad_out, "grad_out", "[N, R', L, Cv]")
    stat_rounds = grad_out.shape[1]
    if stat_rounds not in (1, rounds) or grad_out.shape != (n, stat_rounds, length, cv):
        raise ValueError(f"grad_out must have shape [N, R', L, Cv] with R' in (1, {rounds}) and "
                         f"N, L, Cv = {n}, {length}, {cv}, got {tuple(grad_out.shape)}")
    for name, t in (("delta", delta), ("lse", lse)):
        if not isinstance(t, Tensor) or t.shape != (n, stat_rounds, length):
            raise ValueError(f"{name} must have shape [N, R', L] = {(n, stat_rounds, length)}, "
                             f"got {tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    for name, t in (("grad_out", grad_out), ("delta", delta), ("lse", lse)):
        if t.device != xm.device:
            raise ValueError(f"xm is on {xm.device} but {name} is on {t.device}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
    # autograd hands over gradients in any layout: these three are made contiguous here
    grad_out, delta, lse = grad_out.contiguous(), delta.contiguous(), lse.contiguous()
    # P is recomputed from the saved lse and q . key is unnormalised: refuse what neither resolves (one host read)
    check_saved_lse(lse, xm, xm.shape[2])

    dxm = torch.empty_like(xm)
    dv = torch.empty_like(v)
    dlss = xm.new_empty(0) if lss is None else torch.empty_like(lss)
    if length == 0 or n == 0:
        return dxm, dv, dlss

    k = int(chunk_size)
    pad, padded, nc = slot_layout(length, k)
    configs = {dv_pass: kernel_config("key_dv" if dv_pass else "key_score", xm.device, xm.dtype, cm, cv, k)
               for dv_pass in (True, False)}
    dq_tiles = kernel_config("dq", xm.device, xm.dtype, cm, 0, k)
    position = kernel_config("position", xm.device, xm.dtype, cm, cv, k)
    acc = accumulate_dtype(xm.dtype)
    dev = xm.device
    # per-round float32 slot buffers (every element the position pass reads is written by a key pass or _dq_pass
    # first), summed per position over the rounds once, at the end: no read-modify-write of position totals
    # per round. Memory: R rounds of them alive (linear in R N L).
    dv_buf = torch.empty((rounds, n, padded, cv), dtype=acc, device=dev)
    dkn_buf = torch.empty((rounds, n, padded, cm), dtype=acc, device=dev)
    dlss_buf = None if lss is None else torch.empty((rounds, n, padded, k), dtype=acc, device=dev)
    dq_buf = torch.empty((rounds, n, length, cm), dtype=acc, device=dev)
    # dS / ||key|| of round r in the dot dtype: [n, query chunk c, t, key j, query i] (one writer per element)
    ds = torch.empty((n, nc, 3, k, k), dtype=xm.dtype, device=dev)
    n_dup = triton.cdiv(pad, length)  # padded copies one position can have
    inv_norm = inverse_key_norms(xm)
    precision = kernel_precision(xm.device, xm.dtype)
    smem_b = _smem_b(xm.dtype, precision)
    rows = slot_rows(perm, k, max(cm, cv, k))

    for r in range(rounds):
        stat_round = r if stat_rounds == rounds else 0
        for dv_pass in (True, False):
            _key_pass[(nc * triton.cdiv(k, configs[dv_pass]["BLOCK_K"]), n)](
                grad_out, delta, lse, xm, v, lss, rows, inv_norm,
                dv_buf[r], dkn_buf[r], None if lss is None else dlss_buf[r], ds,
                length, cm, cv, k, rounds, nc, padded, r, stat_rounds, stat_round,
                SMEM_B=smem_b, DV_PASS=dv_pass, PRECISION=precision, **configs[dv_pass],
            )
        _dq_pass[(nc * triton.cdiv(k, dq_tiles["BLOCK_Q"]), n)](
            ds, xm, rows, dq_buf[r], length, cm, k, rounds, nc, padded, r, PRECISION=precision, **dq_tiles,
        )
    # the slot of every position per round (the inverse permutation), from which the position pass gathers
    slot_of = torch.empty((n, rounds, length), dtype=torch.int32, device=dev)
    slot_of.scatter_(2, perm.long(), torch.arange(length, dtype=torch.int32, device=dev).expand(n, rounds, length))
    _position_pass[(triton.cdiv(length, position["BLOCK_P"]), n)](
        slot_of, xm, dq_buf, dv_buf, dkn_buf, dlss_buf, dxm, dv, None if lss is None else dlss,
        n, length, cm, cv, k, rounds, pad, padded, n_dup,
        EPS=KEY_NORM_EPS, **position,
    )
    return dxm, dv, dlss
