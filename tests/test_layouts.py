"""Strided inputs (transposed, sliced) on every backend that runs on CPU tensors here, through the public ops and
the raw CPU ops: the same results as contiguous inputs, and gradients that flow back into the strided views.

The layout decision is made in one place (``dlsn_kernels._checks.kernel_layout``): contiguous tensors reach the
kernels untouched, anything else is copied once with ``.contiguous()``; the reference takes any strides.
"""

from __future__ import annotations

import pytest
import torch

import dlsn_kernels as dk
from dlsn_kernels import _checks
from tests.helpers import CASES, make_inputs, rel_err, tolerance

BACKENDS = ["reference", "cpu", "triton"]
CASE = CASES[3]  # two chunks, padded: small enough for the Triton interpreter


@pytest.fixture(params=BACKENDS)
def backend(request):
    status = dk.available_backends("cpu")[request.param]
    if not status.usable:
        pytest.skip(f"{request.param} on cpu: {status}")
    return request.param


def _transposed(t: torch.Tensor) -> torch.Tensor:
    """The same values in a transposed storage ([N, C, L] memory seen as [N, L, C]), as a leaf's view."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _sliced(t: torch.Tensor) -> torch.Tensor:
    """The same values as the first channels of a wider tensor (row stride > row width)."""
    wide = torch.cat([t, torch.zeros_like(t[..., :3])], dim=-1)
    return wide[..., : t.shape[-1]]


def _strided_leaves(tensors, layouts):
    """Leaves with the given values, and the strided views of them the op gets."""
    leaves, views = [], []
    for t, layout in zip(tensors, layouts):
        view = layout(t.detach())
        base = view._base if view._base is not None else view
        base = base.detach().requires_grad_()
        # rebuild the same view on the leaf, so gradients land in the leaf's (strided) storage
        leaves.append(base)
        views.append(base.as_strided(view.shape, view.stride(), view.storage_offset()))
    assert not any(v.is_contiguous() for v in views)
    return leaves, views


@pytest.mark.parametrize("layouts", [(_transposed, _sliced, _transposed), (_sliced, _transposed, _sliced)],
                         ids=["xm-transposed", "xm-sliced"])
def test_chunk_attention_takes_strided_inputs_and_gradients_reach_them(backend, layouts):
    xm, v, lss, _rot, perm = make_inputs(CASE, torch.float32)
    leaves, views = _strided_leaves((xm, v, lss), layouts)
    strided_perm = perm.transpose(1, 2).contiguous().transpose(1, 2)  # a strided index tensor too
    out, lse = dk.chunk_attention(*views, strided_perm, CASE.chunk, backend=backend)

    plain = [t.detach().clone().requires_grad_() for t in (xm, v, lss)]
    want_out, want_lse = dk.chunk_attention(*plain, perm, CASE.chunk, backend=backend)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)  # the same kernels on the same values

    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad((out * g).sum() + lse.sum(), leaves)
    want = torch.autograd.grad((want_out * g).sum() + want_lse.sum(), plain)
    for leaf, view, a, b in zip(leaves, views, got, want):
        # the gradient of each leaf, read through the view the op saw, is the contiguous run's gradient
        seen = a.as_strided(view.shape, view.stride(), view.storage_offset())
        assert rel_err(seen, b) < tolerance(torch.float32, grad=True)
        assert a.shape == leaf.shape


def test_gla_attention_and_hash_take_strided_inputs(backend):
    xm, v, lss, rot, _perm = make_inputs(CASE, torch.float32)
    leaves, views = _strided_leaves((xm, v, lss), (_transposed, _sliced, _transposed))
    strided_rot = rot.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    y = dk.gla_attention(*views, strided_rot, CASE.chunk, backend=backend)
    plain = [t.detach().clone().requires_grad_() for t in (xm, v, lss)]
    want = dk.gla_attention(*plain, rot, CASE.chunk, backend=backend)
    assert torch.equal(y, want)
    got = torch.autograd.grad(y.square().sum(), leaves)
    exp = torch.autograd.grad(want.square().sum(), plain)
    for view, a, b in zip(views, got, exp):
        assert rel_err(a.as_strided(view.shape, view.stride(), view.storage_offset()), b) < 1e-4

    codes = dk.sblsh_hash(views[0].detach(), strided_rot, backend=backend)
    assert torch.equal(codes, dk.sblsh_hash(xm, rot, backend=backend))
    strided_codes = codes.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(dk.bucket_sort(strided_codes, rot.shape[2], backend=backend),
                       dk.bucket_sort(codes, rot.shape[2], backend=backend))


def test_raw_cpu_ops_take_strided_inputs():
    if not dk.available_backends("cpu")["cpu"].usable:
        pytest.skip("the compiled extension is not built")
    xm, v, lss, rot, perm = make_inputs(CASE, torch.float32)
    views = [_transposed(xm), _sliced(v), _transposed(lss)]
    ops = torch.ops.dlsn
    assert all(torch.equal(a, b) for a, b in zip(ops.chunk_attention(*views, _transposed(perm), CASE.chunk),
                                                 ops.chunk_attention(xm, v, lss, perm, CASE.chunk)))
    assert all(torch.equal(a, b) for a, b in zip(ops.gla_attention(*views, rot, CASE.chunk),
                                                 ops.gla_attention(xm, v, lss, rot, CASE.chunk)))
    codes = ops.sblsh_hash(views[0], rot)
    assert torch.equal(ops.bucket_sort(_transposed(codes), rot.shape[2]), ops.bucket_sort(codes, rot.shape[2]))
    out, lse = ops.chunk_attention(xm, v, lss, perm, CASE.chunk)
    grad, delta = torch.ones_like(out), torch.ones_like(lse)
    strided = ops.attention_backward(grad.transpose(1, 2).contiguous().transpose(1, 2), _transposed(delta),
                                     *views, perm, _transposed(lse), CASE.chunk)
    plain = ops.attention_backward(grad, delta, xm, v, lss, perm, lse, CASE.chunk)
    assert all(torch.equal(a, b) for a, b in zip(strided, plain))


def test_contiguous_inputs_are_not_copied_and_the_reference_keeps_strides():
    xm = torch.randn(2, 5, 3)
    view = xm.transpose(0, 1)
    for name in ("cpu", "cuda", "triton"):
        (same,) = _checks.kernel_layout(name, xm)
        assert same is xm  # zero-copy
        (copied,) = _checks.kernel_layout(name, view)
        assert copied.is_contiguous() and torch.equal(copied, view)
    (kept,) = _checks.kernel_layout("reference", view)
    assert kept is view
