"""Plain PyTorch Global Learnable Attention: the oracle every kernel is tested against.

This module follows DESIGN.md "Semantics" step by step and materialises everything (sorted copies,
padded copies, the ``[N, R, nc, K, 3K]`` score tensor), the way the authors' code does. It is
meant to be read, not to be fast. Autograd gives its gradients.

Layouts: ``xm [N, L, Cm]``, ``v [N, L, Cv]``, ``lss [N, L, K]`` or None (NLSA: no learned score), ``rot [Cm, R, B]``,
``codes``/``perm`` ``[N, R, L]`` int64.
"""

from __future__ import annotations

import torch
from torch import Tensor

# n_buckets_for and random_rotations stay importable from here for code written before they moved to _hash_setup
from ._hash_setup import KEY_NORM_EPS, n_buckets_for, random_rotations

__all__ = ["KEY_NORM_EPS", "n_buckets_for", "random_rotations", "sblsh_hash", "bucket_sort", "padded_slot_positions",
           "chunk_attention", "combine_rounds", "gla_attention"]


def sblsh_hash(xm: Tensor, rot: Tensor) -> Tensor:
    """``codes[n, r, l] = argmax_b xm[n, l] . rot[:, r, b]`` (lowest b on ties), int64."""
    proj = torch.einsum("nlc,crb->nrlb", xm, rot.to(xm.dtype))
    return proj.argmax(dim=-1)


def bucket_sort(codes: Tensor, n_buckets: int | None = None) -> Tensor:
    """Positions ordered by ``(code, position)``: a stable sort per (n, round)."""
    del n_buckets  # the order does not depend on it; kept for the same signature as the ops
    return torch.sort(codes.long(), dim=-1, stable=True).indices


def padded_slot_positions(perm: Tensor, chunk_size: int) -> Tensor:
    """Position held by each of the ``Lp`` sorted slots, padded slots included (DESIGN.md 1.3)."""
    length = perm.shape[-1]
    pad = (chunk_size - length % chunk_size) % chunk_size
    if pad == 0:
        return perm.long()
    extra = (torch.arange(length, length + pad, device=perm.device) - pad) % length
    return torch.cat([perm.long(), perm.long()[..., extra]], dim=-1)


def _adjacent(x: Tensor) -> Tensor:
    """``[.., nc, K, C] -> [.., nc, 3K, C]``: chunk c followed by chunks c-1 and c+1."""
    back = torch.roll(x, shifts=1, dims=-3)
    forward = torch.roll(x, shifts=-1, dims=-3)
    return torch.cat([x, back, forward], dim=-2)


def chunk_attention(xm: Tensor, v: Tensor, lss: Tensor | None, perm: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Attention of every round within adjacent buckets (DESIGN.md 1.3-1.4); ``lss=None``: scores q . k_hat only.

    Returns ``out [N, R, L, Cv]`` and ``lse [N, R, L]`` in original position order.
    """
    n, length, cm = xm.shape
    cv = v.shape[-1]
    k = chunk_size
    rounds = perm.shape[1]
    slots = padded_slot_positions(perm, k)  # [N, R, Lp]
    lp = slots.shape[-1]
    nc = lp // k

    def gather(t: Tensor) -> Tensor:
        c = t.shape[-1]
        idx = slots.unsqueeze(-1).expand(n, rounds, lp, c)
        return torch.gather(t.unsqueeze(1).expand(n, rounds, length, c), 2, idx)

    q = gather(xm).reshape(n, rounds, nc, k, cm)
    # the norm scaled by the row's largest magnitude, so that squares of huge features do not overflow; the
    # scale is a constant for autograd (s * ||x / s|| = ||x|| for any s > 0)
    scale = xm.detach().abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(xm.dtype).tiny)
    key_norm = xm / (scale * (xm / scale).norm(dim=-1, keepdim=True)).clamp_min(KEY_NORM_EPS)
    keys = _adjacent(gather(key_norm).reshape(n, rounds, nc, k, cm))
    values = _adjacent(gather(v).reshape(n, rounds, nc, k, cv))
    scores = torch.einsum("nrcie,nrcje->nrcij", q, keys)
    if lss is not None:
        learned = _adjacent(gather(lss).reshape(n, rounds, nc, k, k))  # [.., 3K keys, K query slots]
        scores = scores + learned.transpose(-1, -2)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    # softmax subtracts the row max, not lse: with huge scores (xm * 1e30) lse rounds above the max and
    # exp(scores - lse) would drop the whole row
    out = torch.einsum("nrcij,nrcje->nrcie", torch.softmax(scores, dim=-1), values)

    out = out.reshape(n, rounds, lp, cv)[:, :, :length]
    lse = lse.reshape(n, rounds, lp)[:, :, :length]
    order = perm.long()
    out_orig = torch.empty_like(out).scatter_(2, order.unsqueeze(-1).expand_as(out), out)
    lse_orig = torch.empty_like(lse).scatter_(2, order, lse)
    return out_orig, lse_orig


def combine_rounds(out: Tensor, lse: Tensor) -> Tensor:
    """``y = sum_r softmax_r(lse) out_r`` (DESIGN.md 1.5): ``[N, R, L, Cv], [N, R, L] -> [N, L, Cv]``."""
    weights = torch.softmax(lse, dim=1).unsqueeze(-1)
    return (weights * out).sum(dim=1)


def gla_attention(xm: Tensor, v: Tensor, lss: Tensor | None, rot: Tensor, chunk_size: int) -> Tensor:
    """DESIGN.md 1.1-1.5: hash, sort, chunk attention, round combination. ``y [N, L, Cv]``."""
    codes = sblsh_hash(xm.detach(), rot)
    perm = bucket_sort(codes, rot.shape[-1])
    out, lse = chunk_attention(xm, v, lss, perm, chunk_size)
    return combine_rounds(out, lse.to(out.dtype))
