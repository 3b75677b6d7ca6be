"""The Triton backend through the public API: registered ops, autograd, opcheck (interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

import dlsn_kernels as dk
from dlsn_kernels import reference as ref
from tests.helpers import CASES, make_inputs, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REASON = dk.available_backends(DEVICE)["triton"]
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"triton backend cannot run here: {REASON}")


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[5]], ids=str)
def test_gla_and_chunk_attention_autograd(case):
    xm, v, lss, rot, perm = make_inputs(case, torch.float64 if DEVICE == "cpu" else torch.float32)
    inputs = [t.to(DEVICE).requires_grad_() for t in (xm, v, lss)]
    y = dk.gla_attention(*inputs, rot.to(DEVICE), case.chunk, backend="triton")
    want = ref.gla_attention(*inputs, rot.to(DEVICE), case.chunk)
    tol = 1e-10 if xm.dtype == torch.float64 else 2e-5
    assert rel_err(y, want) < tol
    got = torch.autograd.grad(y.square().sum(), inputs)
    exp = torch.autograd.grad(want.square().sum(), inputs)
    for a, b in zip(got, exp):
        assert rel_err(a, b) < 10 * tol

    out, lse = dk.chunk_attention(*inputs, perm.to(DEVICE), case.chunk, backend="triton")
    want_out, want_lse = ref.chunk_attention(*inputs, perm.to(DEVICE), case.chunk)
    assert rel_err(out, want_out) < tol and rel_err(lse, want_lse) < tol
    got = torch.autograd.grad(out.square().sum() + lse.sum(), inputs)
    exp = torch.autograd.grad(want_out.square().sum() + want_lse.sum(), inputs)
    for a, b in zip(got, exp):
        assert rel_err(a, b) < 10 * tol


def test_opcheck_triton_ops():
    case = CASES[3]
    xm, v, lss, rot, perm = (t.to(DEVICE) for t in make_inputs(case, torch.float32))
    dk.gla_attention(xm, v, lss, rot, case.chunk, backend="triton")  # registers the ops
    ops = torch.ops.dlsn
    torch.library.opcheck(ops.triton_sblsh_hash.default, (xm, rot))
    torch.library.opcheck(ops.triton_chunk_attention.default, (xm.requires_grad_(), v, lss, perm, case.chunk))
    torch.library.opcheck(ops.triton_gla_attention.default, (xm, v, lss, rot, case.chunk))
