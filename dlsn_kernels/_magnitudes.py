"""Inputs of extreme magnitude (xm * 1e30, xm * 1e-30): overflow-safe key norms and the backward's lse limit.

Shared by the Python backends (triton, flex); the compiled backends have the same rules in C++
(``csrc/cpu/cpu_kernels.h`` ``row_norm``; ``csrc/magnitudes.h``: the lse limit of both backwards, and the
cuda forward's refusal of magnitudes its scaled scores could not hold, beyond 2^112).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["check_saved_lse", "lse_limit", "product_headroom", "row_norms"]


def row_norms(xm: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(||xm[n, l]||, E)``: the norms over the last dim in ``acc``, overflow-safe, and the exponent E of a power
    of two above every magnitude of ``xm`` (``max |xm| < 2^E``; a 0-d device tensor, no host synchronisation).

    Each row is scaled by the power of two 2^-E_row above its largest magnitude before its squares are summed
    (xm * 1e30 has squares beyond float32's range), then its norm is scaled back. Powers of two scale every
    rounding step exactly, so a normal row gets the bits of the plain norm. Rows below 2^-64 are not scaled up
    further: their norm is under KEY_NORM_EPS either way.
    """
    if xm.shape[-1] == 0:
        top = torch.zeros(xm.shape[:-1], dtype=acc, device=xm.device)
    else:
        top = xm.detach().abs().amax(dim=-1).to(acc)
    row_exp = torch.frexp(top).exponent.clamp_min(-64)  # top = m 2^E_row with 0.5 <= m < 1 (E = 0 for 0)
    scaled = xm.to(acc) * torch.ldexp(torch.ones_like(top), -row_exp).unsqueeze(-1)
    norms = torch.ldexp(torch.linalg.vector_norm(scaled, dim=-1), row_exp)
    top_exp = row_exp.amax() if row_exp.numel() else row_exp.new_zeros(())
    return norms, top_exp


def product_headroom(acc: torch.dtype, channels: int) -> int:
    """The largest 2E for which ``Cm (2^E)^2``, a bound on an unnormalised q . key with every magnitude below
    2^E, stays at a quarter of ``acc``'s range (126 - log2(Cm) in float32)."""
    return math.frexp(torch.finfo(acc).max)[1] - 2 - math.ceil(math.log2(max(int(channels), 1)))


def lse_limit(dtype: torch.dtype) -> float:
    """The largest |lse| the backward resolves: P = exp(s - lse) has lse's rounding |lse| eps as relative error,
    under 0.4% up to 2^16 in float32 (2^40 in float64); the cpu backend's limit."""
    return 2.0**40 if dtype == torch.float64 else 2.0**16


def check_saved_lse(lse: Tensor, xm: Tensor | None = None, channels: int = 0) -> None:
    """Refuses a backward whose saved ``lse`` the accumulation dtype cannot resolve (xm * 1e30 gives |lse| ~ 1e30,
    a one-hot softmax the forward computes exactly, but P recomputed from lse would be 0, 1 or 2 where it is 1/2).

    With ``xm``, also refuses magnitudes whose unnormalised q . key products (the GPU backwards) could overflow.
    One host read per call (the amax of lse, and of xm, stacked): the backward's only synchronisation.
    """
    if lse.numel() == 0:
        return
    tops = [lse.detach().abs().amax().double()]
    if xm is not None and xm.numel():
        tops.append(xm.detach().abs().amax().double())
    top, *rest = torch.stack(tops).tolist()
    limit = lse_limit(lse.dtype)
    if top > limit:  # NaN compares false: left to propagate, as on the cpu backend
        raise ValueError(
            f"attention_backward: the saved lse reaches {top:.6g} in magnitude; the backward recomputes the softmax "
            f"from it, which {lse.dtype} resolves only while |lse| <= {limit:g} (scores this large make the softmax "
            "one-hot: scale xm down, its norm sets the scores)"
        )
    if rest and rest[0] > 0 and math.isfinite(rest[0]):
        headroom = product_headroom(lse.dtype, channels)
        if 2 * math.frexp(rest[0])[1] > headroom:
            raise ValueError(
                f"attention_backward: xm reaches {rest[0]:.3g} in magnitude; the backward's score products "
                f"resolve only while max |xm| < {2.0 ** (headroom // 2):.3g} ({lse.dtype}, Cm = {channels}): scale "
                "xm down, its norm sets the scores"
            )
