"""The Triton backend's registered ops pass torch.library.opcheck (interpreter on CPU); their results through
the public API are tests/test_public_api.py's."""

from __future__ import annotations

import pytest
import torch

import dlsn_kernels as dk
from tests.helpers import CASES, make_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REASON = dk.available_backends(DEVICE)["triton"].reason
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"triton backend cannot run here: {REASON}")


def test_opcheck_triton_ops():
    case = CASES[3]
    xm, v, lss, rot, perm = (t.to(DEVICE) for t in make_inputs(case, torch.float32))
    dk.gla_attention(xm, v, lss, rot, case.chunk, backend="triton")  # registers the ops
    ops = torch.ops.dlsn
    torch.library.opcheck(ops.triton_sblsh_hash.default, (xm, rot))
    torch.library.opcheck(ops.triton_chunk_attention.default, (xm.requires_grad_(), v, lss, perm, case.chunk))
    torch.library.opcheck(ops.triton_gla_attention.default, (xm, v, lss, rot, case.chunk))


def test_opcheck_triton_ops_without_learned_score():
    """lss=None (``Tensor? lss``): the lss-free kernels through the registered ops, and autograd through the public
    API, where lss gets no gradient."""
    case = CASES[3]
    xm, v, _, rot, perm = (t.to(DEVICE) for t in make_inputs(case, torch.float32))
    dk.gla_attention(xm, v, None, rot, case.chunk, backend="triton")
    ops = torch.ops.dlsn
    torch.library.opcheck(ops.triton_chunk_attention.default, (xm.requires_grad_(), v, None, perm, case.chunk))
    torch.library.opcheck(ops.triton_gla_attention.default, (xm, v, None, rot, case.chunk))
    leaves = [t.detach().double().requires_grad_() for t in (xm, v)]
    y = dk.gla_attention(*leaves, None, rot.double(), case.chunk, backend="triton")
    want = dk.gla_attention(*leaves, torch.zeros(*xm.shape[:2], case.chunk, dtype=torch.float64), rot.double(),
                            case.chunk, backend="triton")
    assert torch.equal(y, want)
    got = torch.autograd.grad(y.sum(), leaves)
    assert all(torch.equal(a, b) for a, b in zip(got, torch.autograd.grad(want.sum(), leaves)))
