"""Every backend through the public API (``dlsn_kernels.gla_attention`` / ``chunk_attention`` and autograd),
one harness: the same cases, the same float64 reference, tolerances from the dtype (tests/helpers.py).

Backends that cannot run here are skipped with their reason (``available_backends``): on a machine without a
GPU that leaves reference, cpu and triton (interpreted) on CPU tensors; a GPU adds triton and cuda on CUDA
tensors, in float32 (both matmul precisions) and bfloat16. Per-backend details (raw ops, odd layouts,
determinism) stay in the backend's own test file.
"""

from __future__ import annotations

import pytest
import torch

import dlsn_kernels as dk
from dlsn_kernels import reference as ref
from tests.helpers import CASES, TILE_CASES, make_inputs, rel_err, tolerance

# (backend, device, dtype, float32 matmul precision)
RUNS = [(name, "cpu", torch.float64, "highest") for name in ("reference", "cpu", "triton")] + [
    ("cpu", "cpu", dtype, "highest") for dtype in (torch.bfloat16, torch.float16)  # 16-bit rows, float32 inside
] + [
    (name, "cuda", dtype, precision)
    for name in ("triton", "cuda")
    for dtype, precision in ((torch.float32, "highest"), (torch.float32, "high"), (torch.bfloat16, "highest"))
]
API_CASES = [CASES[0], CASES[3], CASES[5], TILE_CASES[0]]
# The interpreted Triton run leaves out K > 64 (minutes per call there); tests/test_triton.py runs that case.
PAIRS = [(run, case) for run in RUNS for case in API_CASES
         if not (run[:2] == ("triton", "cpu") and case.chunk > 64)]
PAIR_IDS = [f"{b}-{d}-{str(t).replace('torch.', '')}-{p}-{case}" for (b, d, t, p), case in PAIRS]


@pytest.fixture
def run(request):
    name, device, dtype, precision = request.param
    if device == "cuda":
        request.applymarker(pytest.mark.cuda)
    reason = dk.available_backends(device)[name].reason
    if reason is not None:
        pytest.skip(f"{name} on {device}: {reason}")
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    yield name, device, dtype, precision
    torch.set_float32_matmul_precision(before)


def _bounds(dtype: torch.dtype, precision: str) -> tuple[float, float]:
    tf32 = dtype == torch.float32 and precision != "highest"
    return tolerance(dtype, tf32=tf32), tolerance(dtype, grad=True, tf32=tf32)


@pytest.mark.parametrize(("run", "case"), PAIRS, ids=PAIR_IDS, indirect=["run"])
def test_attention_and_gradients_match_the_reference(run, case):
    name, device, dtype, precision = run
    fwd_tol, grad_tol = _bounds(dtype, precision)
    xm, v, lss, rot, perm = make_inputs(case, torch.float64)
    # the backend sees the inputs rounded to its dtype; the reference gets the same values in float64
    low = [t.to(device, dtype).requires_grad_() for t in (xm, v, lss)]
    exact = [t.detach().double().cpu().requires_grad_() for t in low]
    gen = torch.Generator().manual_seed(4)

    out, lse = dk.chunk_attention(*low, perm.to(device), case.chunk, backend=name)
    want_out, want_lse = ref.chunk_attention(*exact, perm, case.chunk)
    assert out.dtype == dtype and rel_err(out, want_out) < fwd_tol
    assert rel_err(lse, want_lse) < fwd_tol
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((out * grad.to(device, dtype)).sum() + lse.sum(), low)
    want = torch.autograd.grad((want_out * grad.to(dtype).double()).sum() + want_lse.sum(), exact)
    for label, a, b in zip(("dxm", "dv", "dlss"), got, want):
        assert rel_err(a, b) < grad_tol, label

    # gla_attention hashes itself; the reference attends with the backend's own codes (a near-tie may hash
    # differently in float64)
    y = dk.gla_attention(*low, rot.to(device, dtype), case.chunk, backend=name)
    codes = dk.sblsh_hash(low[0].detach(), rot.to(device, dtype), backend=name)
    own_perm = dk.bucket_sort(codes, rot.shape[2], backend=name).cpu()
    round_out, round_lse = ref.chunk_attention(*exact, own_perm, case.chunk)
    want_y = ref.combine_rounds(round_out, round_lse)
    assert y.dtype == dtype and rel_err(y, want_y) < fwd_tol
    grad = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((y * grad.to(device, dtype)).sum(), low)
    want = torch.autograd.grad((want_y * grad.to(dtype).double()).sum(), exact)
    for label, a, b in zip(("dxm", "dv", "dlss"), got, want):
        assert rel_err(a, b) < grad_tol, label
