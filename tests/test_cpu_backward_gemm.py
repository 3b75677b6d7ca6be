"""The cpu backward's products: a few GEMMs per (batch, key chunk) job on its scratch tiles, not ATen matmuls per
query chunk (csrc/cpu/attention_backward.cpp, csrc/cpu/gemm.h), with gradients that still match the reference."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import dlsn_kernels as dk
from dlsn_kernels import reference as ref
from tests.helpers import Case, make_inputs, rel_err, tolerance

# Several chunks, a padded last chunk, K not a power of two, Cv > Cm as in the networks (Cv = 4 Cm).
CASE = Case(2, 300, 24, 2, 12, 48)


def _backward_inputs(case: Case, dtype: torch.dtype):
    xm, v, lss, _rot, perm = make_inputs(case, dtype)
    out, lse = torch.ops.dlsn.chunk_attention(xm, v, lss, perm, case.chunk)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    delta = (grad_out.float() * out.float()).sum(-1).to(lse.dtype)
    return grad_out, delta, xm, v, lss, perm, lse


def test_backward_issues_at_most_five_products_per_job():
    args = _backward_inputs(CASE, torch.float32)
    n_chunks = -(-CASE.length // CASE.chunk)
    jobs = CASE.n * CASE.rounds * n_chunks
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the profiler then sees every call (all on this thread)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            torch.ops.dlsn.attention_backward(*args, CASE.chunk)
    finally:
        torch.set_num_threads(threads)
    products = sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::addmm_"))
    # The BLAS path makes none; the at::mm fallback (a torch without sgemm_) five per job. Per-t matmuls made 15.
    assert products <= 5 * jobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_matches_reference(dtype):
    xm, v, lss, _rot, perm = make_inputs(CASE, dtype, requires_grad=True)
    out, lse = dk.chunk_attention(xm, v, lss, perm, CASE.chunk, backend="cpu")
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad((out.float() * weights).sum() + lse.float().sum(), (xm, v, lss))

    wide = [t.detach().double().requires_grad_(True) for t in (xm, v, lss)]
    want_out, want_lse = ref.chunk_attention(*wide, perm, CASE.chunk)
    want = torch.autograd.grad((want_out * weights.double()).sum() + want_lse.sum(), wide)
    for name, a, b in zip(("dxm", "dv", "dlss"), got, want):
        assert a.dtype == dtype
        assert rel_err(a, b) < tolerance(dtype, grad=True), name
