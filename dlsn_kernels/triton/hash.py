"""SB-LSH hashing and the stable bucket sort (DESIGN.md 1.1-1.2) as Triton kernels.

``sblsh_hash``: one program per (block of positions, n, round) multiplies its ``xm`` rows by tiles of
the round's rotation with ``tl.dot`` and keeps a running argmax in registers, so the ``[N, R, L, B]``
projection is never stored. ``bucket_sort``: a counting sort, parallel over blocks of positions
(per-block histograms, a scan, a scatter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _checks
from ..targets import MAX_CHANNELS
from . import _common
from ._common import accumulate_dtype, channel_block, jit, matmul, tl_dtype

__all__ = ["sblsh_hash", "bucket_sort", "MAX_SORT_BUCKETS"]

# The counting sort holds one counter per bucket in registers; more buckets fall back to torch.sort.
MAX_SORT_BUCKETS = 1024


# Positions per hash program: a [BLOCK_L, Cm] x [Cm, BLOCK_B] product per bucket tile (fixed, no autotuning).
_HASH_BLOCK_L = 64


@triton.heuristics({
    "BLOCK_C": lambda a: 16,
    "BLOCK_B": lambda a: min(channel_block(a["B"]), 64),
    "ACC": lambda a: tl_dtype(accumulate_dtype(a["xm_ptr"].dtype)),
})
@jit
def _sblsh_hash_kernel(xm_ptr, rot_ptr, codes_ptr, L, Cm, R, B,
                       BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr,
                       ACC: tl.constexpr):
    pid_l = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    r = tl.program_id(2)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    l_ok = offs_l < L
    best = tl.full([BLOCK_L], float("-inf"), ACC)
    best_code = tl.zeros([BLOCK_L], tl.int64)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        b_ok = offs_b < B
        # IEEE float32 products run on FFMA, which holds whole operand rows in registers: the channels are
        # walked in slices of BLOCK_C so that nothing spills. float16/bfloat16 features are projected in
        # float32 too: a TF32 or half-precision product flips codes.
        proj = tl.zeros([BLOCK_L, BLOCK_B], ACC)
        for c0 in range(0, Cm, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            c_ok = offs_c < Cm
            x = tl.load(xm_ptr + (n * L + offs_l)[:, None] * Cm + offs_c[None, :],
                        mask=l_ok[:, None] & c_ok[None, :], other=0.0).to(ACC)
            # rot is [Cm, R, B] in ACC: the tile rot[c0:c0+BLOCK_C, r, b0:b0+BLOCK_B]
            w = tl.load(rot_ptr + offs_c[:, None] * (R * B) + r * B + offs_b[None, :],
                        mask=c_ok[:, None] & b_ok[None, :], other=0.0)
            proj += matmul(x, w, ACC, "ieee")
        proj = tl.where(b_ok[None, :], proj, float("-inf"))
        tile_best = tl.max(proj, axis=1)
        tile_code = tl.argmax(proj, axis=1, tie_break_left=True).to(tl.int64) + b0
        # strictly greater: on a tie the earlier tile, i.e. the lower b, keeps the code
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        best_code = tl.where(better, tile_code, best_code)
    tl.store(codes_ptr + (n * R + r) * L + offs_l, best_code, mask=l_ok)


def sblsh_hash(xm: Tensor, rot: Tensor) -> Tensor:
    """``codes[n, r, l] = argmax_b xm[n, l] . rot[:, r, b]`` (lowest b on ties) as ``[N, R, L]`` int64.

    ``xm [N, L, Cm]``, ``rot [Cm, R, B]``. The projection is IEEE float32 for every input dtype (float64 for
    float64 input, under the interpreter): TF32 or half-precision products would flip codes. NaN inputs give
    unspecified codes.
    """
    _checks.check_hash(xm, rot, "triton")
    _common._check_device(xm, "xm")
    n, length, cm = xm.shape
    if cm > MAX_CHANNELS:
        raise ValueError(f"xm has {cm} channels; the Triton backend supports at most {MAX_CHANNELS}")
    rounds, n_buckets = rot.shape[1], rot.shape[2]
    rot = rot.to(accumulate_dtype(xm.dtype)).contiguous()
    codes = torch.empty((n, rounds, length), dtype=torch.int64, device=xm.device)
    if codes.numel() == 0:
        return codes

    grid = (triton.cdiv(length, _HASH_BLOCK_L), n, rounds)
    _sblsh_hash_kernel[grid](xm, rot, codes, length, cm, rounds, n_buckets, BLOCK_L=_HASH_BLOCK_L, num_warps=4)
    return codes


@jit
def _bucket_histogram_kernel(codes_ptr, counts_ptr, L, NB, BLOCK_L: tl.constexpr, BLOCK_NB: tl.constexpr):
    """``counts[row, block, b]``: how many codes of this block of positions equal b."""
    blk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    n_blocks = tl.num_programs(0)
    offs = blk * BLOCK_L + tl.arange(0, BLOCK_L)
    bins = tl.arange(0, BLOCK_NB)
    code = tl.load(codes_ptr + row * L + offs, mask=offs < L, other=-1)
    counts = tl.sum((code[:, None] == bins[None, :]).to(tl.int32), axis=0)
    tl.store(counts_ptr + (row * n_blocks + blk) * NB + bins, counts, mask=bins < NB)


@jit
def _bucket_scatter_kernel(codes_ptr, start_ptr, perm_ptr, L, NB, BLOCK_L: tl.constexpr, BLOCK_NB: tl.constexpr):
    """Each position of the block takes the next free slot of its bucket, in position order (stable)."""
    blk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    n_blocks = tl.num_programs(0)
    offs = blk * BLOCK_L + tl.arange(0, BLOCK_L)
    ok = offs < L
    bins = tl.arange(0, BLOCK_NB)
    # first slot of every bucket for this block: bucket start + the same bucket's codes in earlier blocks
    start = tl.load(start_ptr + (row * n_blocks + blk) * NB + bins, mask=bins < NB, other=0)
    code = tl.load(codes_ptr + row * L + offs, mask=ok, other=-1)
    onehot = (code[:, None] == bins[None, :]).to(tl.int32)
    before = tl.cumsum(onehot, axis=0) - onehot  # earlier positions of this block with the same code
    dest = tl.sum(onehot * (start[None, :] + before), axis=1)
    tl.store(perm_ptr + row * L + dest, offs.to(tl.int64), mask=ok)


def bucket_sort(codes: Tensor, n_buckets: int) -> Tensor:
    """Positions ordered by ``(code, position)`` per (n, round): ``perm [N, R, L]`` int64, stable.

    A Triton counting sort for ``n_buckets <= MAX_SORT_BUCKETS`` (``torch.sort(stable=True)`` beyond).
    Codes must lie in ``[0, n_buckets)``; this is checked (one device synchronisation).
    """
    _checks.check_codes(codes, n_buckets)
    _common._check_device(codes, "codes")
    return sort_codes(codes, n_buckets)


def sort_codes(codes: Tensor, n_buckets: int) -> Tensor:
    """``bucket_sort`` without the argument checks (codes from ``sblsh_hash`` are known good)."""
    n, rounds, length = codes.shape
    if n_buckets > MAX_SORT_BUCKETS:
        return torch.sort(codes.long(), dim=-1, stable=True).indices
    perm = torch.empty((n, rounds, length), dtype=torch.int64, device=codes.device)
    if perm.numel() == 0:
        return perm
    # A parallel counting sort: per-block histograms, a scan over (bucket, block) in torch, then every
    # block scatters its positions. Blocks keep the [BLOCK_L, BLOCK_NB] one-hot tile near 8K entries.
    block_nb = triton.next_power_of_2(n_buckets)
    block_l = max(16, min(256, 8192 // block_nb))
    n_blocks = triton.cdiv(length, block_l)
    rows = n * rounds
    counts = torch.empty((rows, n_blocks, n_buckets), dtype=torch.int32, device=codes.device)
    _bucket_histogram_kernel[(n_blocks, rows)](codes, counts, length, n_buckets,
                                              BLOCK_L=block_l, BLOCK_NB=block_nb, num_warps=4)
    totals = counts.sum(dim=1, dtype=torch.int32)  # [rows, NB]
    bucket_start = torch.cumsum(totals, dim=1, dtype=torch.int32) - totals
    start = (bucket_start[:, None, :] + torch.cumsum(counts, dim=1, dtype=torch.int32) - counts).contiguous()
    _bucket_scatter_kernel[(n_blocks, rows)](codes, start, perm, length, n_buckets,
                                            BLOCK_L=block_l, BLOCK_NB=block_nb, num_warps=4)
    return perm
