"""Inputs of extreme magnitude (issue 21 item 9) on the triton and flex backends: xm * 1e30, xm * 1e-30, rows of
both (and zero rows) mixed. The forwards agree with the reference (exactly at 1e30, where the softmax is one-hot);
the backwards refuse a saved lse beyond what float32 resolves, as the cpu backend does (tests/test_ops_cpu.py).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import dlsn_kernels as dk
from dlsn_kernels import _magnitudes
from dlsn_kernels import reference as ref
from tests.helpers import CASES, make_inputs, rel_err, tolerance

CASE = CASES[3]  # two chunks, padded
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _scaled(how: str) -> list[torch.Tensor]:
    xm, v, lss, _rot, _perm = make_inputs(CASE, torch.float64)
    if how == "huge":
        xm = xm * 1e30
    elif how == "tiny":
        xm = xm * 1e-30
    else:  # rows of 1e30, 1e-30, 1 and a zero row in one input
        xm = xm.clone()
        xm[:, ::2] *= 1e30
        xm[:, 1::4] *= 1e-30
        xm[:, 3] = 0
    return [xm.float(), v.float(), lss.float()]


def _extras():
    _xm, _v, _lss, rot, perm = make_inputs(CASE, torch.float64)
    return rot.float(), perm


def _triton_ready() -> bool:
    if not HAS_TRITON:
        return False
    import dlsn_kernels.triton as tk

    return torch.cuda.is_available() or tk.INTERPRETED


def _backends() -> list:
    backends = [pytest.param("flex", marks=pytest.mark.skipif(
        dk.available_backends("cpu")["flex"].reason is not None, reason="flex unavailable"))]
    backends.append(pytest.param("triton", marks=pytest.mark.skipif(
        not _triton_ready(), reason="needs triton with a GPU or TRITON_INTERPRET=1")))
    return backends


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("op", ["chunk", "gla"])
@pytest.mark.parametrize("how", ["huge", "tiny", "mixed"])
def test_forward_agrees_with_the_reference(backend, op, how):
    low = _scaled(how)
    rot, perm = _extras()
    if op == "chunk":
        got, got_lse = dk.chunk_attention(*low, perm, CASE.chunk, backend=backend)
        want, want_lse = ref.chunk_attention(*low, perm, CASE.chunk)
    else:
        got = dk.gla_attention(*low, rot, CASE.chunk, backend=backend)
        want = ref.gla_attention(*low, rot, CASE.chunk)
    assert torch.isfinite(got).all()
    if how == "huge":  # one-hot softmax: every output row is a value row, on every backend
        assert torch.equal(got, want)
    else:
        assert rel_err(got, want) < tolerance(torch.float32)
    if op == "chunk":
        assert rel_err(got_lse, want_lse.reshape(got_lse.shape)) < tolerance(torch.float32)


@pytest.mark.skipif(not _triton_ready(), reason="needs triton with a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("op", ["chunk", "gla"])
def test_triton_backward_refuses_an_unresolvable_lse(op):
    low = [t.requires_grad_() for t in _scaled("huge")]
    rot, perm = _extras()
    if op == "chunk":
        out = dk.chunk_attention(*low, perm, CASE.chunk, backend="triton")[0]
    else:
        out = dk.gla_attention(*low, rot, CASE.chunk, backend="triton")
    with pytest.raises(ValueError, match=r"the saved lse reaches 4\.\d+e\+30 in magnitude.*\|lse\| <= 65536"):
        torch.autograd.grad(out.sum(), low)


@pytest.mark.skipif(not _triton_ready(), reason="needs triton with a GPU or TRITON_INTERPRET=1")
def test_triton_tiny_gradients_match_the_reference():
    low = [t.requires_grad_() for t in _scaled("tiny")]
    _rot, perm = _extras()
    got = torch.autograd.grad(dk.chunk_attention(*low, perm, CASE.chunk, backend="triton")[0].sum(), low)
    want = torch.autograd.grad(ref.chunk_attention(*low, perm, CASE.chunk)[0].sum(), low)
    for a, b in zip(got, want):
        assert rel_err(a, b) < tolerance(torch.float32, grad=True)


@pytest.mark.skipif(not _triton_ready(), reason="needs triton with a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("scale", [1e36, 1e37])
def test_triton_answers_up_to_the_score_range(scale):
    """Beyond ~1e34 the scaled inverse norm of a key at the norm floor (a zero row) would overflow: that row's key is
    read scaled up instead, so 1e36 and 1e37 with a zero row get the reference's answer: exact (one-hot) for every
    other query, to rounding for the zero query (all its scores are 0: a uniform softmax)."""
    import dlsn_kernels.triton as tk

    xm, v, lss = _scaled("huge")
    xm = xm / xm.abs().amax() * scale
    xm[:, 4] = 0
    _rot, perm = _extras()
    for learned in (lss, None):
        got, _ = tk.chunk_attention(xm, v, learned, perm, CASE.chunk)
        want = ref.chunk_attention(xm, v, learned, perm, CASE.chunk)[0]
        assert rel_err(got, want) < tolerance(torch.float32)
        assert torch.equal(got[:, :, :4], want[:, :, :4]) and torch.equal(got[:, :, 5:], want[:, :, 5:])


@pytest.mark.skipif(not _triton_ready(), reason="needs triton with a GPU or TRITON_INTERPRET=1")
def test_triton_refuses_magnitudes_whose_scores_overflow():
    """Past ~4e37 (Cm = 7) a score times log2(e) could overflow float32: refused, not NaN."""
    xm, v, lss = _scaled("huge")
    _rot, perm = _extras()
    with pytest.raises(ValueError, match=r"xm reaches 2e\+38 .* the attention kernels resolve scores only while max"):
        dk.chunk_attention(xm / xm.abs().amax() * 2e38, v, lss, perm, CASE.chunk, backend="triton")


@pytest.mark.skipif(not _triton_ready(), reason="needs triton with a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("how", ["huge", "tiny", "mixed"])
def test_triton_without_learned_score(how):
    """lss=None (NLSA) through the plain Triton functions: the forward is the reference's (exactly at 1e30, and the
    cpu backend's with lss zeros), the backward at 1e30 refuses through the lse limit with the usual message."""
    import dlsn_kernels.triton as tk

    xm, v, lss = _scaled(how)
    _rot, perm = _extras()
    got, got_lse = tk.chunk_attention(xm, v, None, perm, CASE.chunk)
    want, want_lse = ref.chunk_attention(xm, v, None, perm, CASE.chunk)
    assert torch.isfinite(got).all() and rel_err(got_lse, want_lse) < tolerance(torch.float32)
    if how != "huge":
        assert rel_err(got, want) < tolerance(torch.float32)
        return
    assert torch.equal(got, want)
    assert torch.equal(got, dk.chunk_attention(xm, v, torch.zeros_like(lss), perm, CASE.chunk, backend="cpu")[0])
    with pytest.raises(ValueError, match=r"the saved lse reaches \d\.\d+e\+30 in magnitude.*\|lse\| <= 65536"):
        tk.attention_backward(torch.ones_like(got), torch.zeros_like(got_lse), xm, v, None, perm, got_lse, CASE.chunk)


@pytest.mark.skipif(not _triton_ready(), reason="needs triton with a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_triton_normal_inputs_are_unscaled_bit_for_bit(dtype):
    """Below ~1e18 the query scale is 1 and the norms are the plain ones, bit for bit (powers of two)."""
    from dlsn_kernels.triton._common import KEY_NORM_EPS, accumulate_dtype, inverse_key_norms, scaled_key_norms

    xm = (torch.randn(2, 9, 24, dtype=torch.float64) * 3).to(dtype)
    xm[0, 1] = 0
    acc = accumulate_dtype(dtype)
    plain = torch.linalg.vector_norm(xm, dim=-1, dtype=acc).clamp_min(KEY_NORM_EPS).reciprocal()
    assert torch.equal(inverse_key_norms(xm), plain)
    inv, queries, keys = scaled_key_norms(xm, 1.4426950408889634)
    assert queries is xm and keys is xm  # unscaled: no copy
    assert torch.equal(inv, plain * 1.4426950408889634)


def test_row_norms_are_overflow_safe():
    x = torch.tensor([[3e30, 4e30], [3e-30, 4e-30], [0.0, 0.0], [3.0, 4.0]])
    norms, top_exp = _magnitudes.row_norms(x, torch.float32)
    assert torch.allclose(norms, torch.tensor([5e30, 5e-30, 0.0, 5.0]), rtol=1e-6, atol=0)
    assert int(top_exp) == 102 and 4e30 < 2.0**102


def test_saved_lse_check():
    _magnitudes.check_saved_lse(torch.full((2, 1, 3), -65536.0))
    with pytest.raises(ValueError, match="the saved lse reaches 65537 in magnitude"):
        _magnitudes.check_saved_lse(torch.full((2, 1, 3), 65537.0))
    _magnitudes.check_saved_lse(torch.full((1, 1, 1), 2.0**40, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"xm reaches 1e\+20 in magnitude; the backward's score products"):
        _magnitudes.check_saved_lse(torch.zeros(1, 1, 1), torch.full((1, 1, 64), 1e20), 64)
    _magnitudes.check_saved_lse(torch.zeros(1, 1, 1), torch.full((1, 1, 64), 1e17), 64)


@pytest.mark.skipif(dk.available_backends("cpu")["flex"].reason is not None, reason="flex unavailable")
def test_flex_merge_and_backward_guard():
    from dlsn_kernels import flex

    # two rounds of equal lse at 1e30: half each (exp(lse - logsumexp) gave weight 1 to both)
    out = torch.stack([torch.ones(1, 2, 3), 3 * torch.ones(1, 2, 3)], dim=1)
    y, total = flex.merge_rounds(out, torch.full((1, 2, 2), 1e30))
    assert torch.equal(y, 2 * torch.ones(1, 2, 3)) and torch.equal(total, torch.full((1, 2), 1e30))
    # the guard flex's CUDA autograd goes through: identity forward, refusing backward
    o = torch.randn(1, 2, 3, requires_grad=True)
    lse = torch.full((1, 2), 1e30, requires_grad=True)
    g_out, g_lse = flex._SavedLseGuard.apply(o, lse)
    assert torch.equal(g_out, o) and torch.equal(g_lse, lse)
    with pytest.raises(ValueError, match="the saved lse reaches 1e\\+30 in magnitude"):
        (g_out.sum() + g_lse.sum()).backward()
    small = torch.zeros(1, 2, requires_grad=True)
    g_out, g_lse = flex._SavedLseGuard.apply(o, small)
    (g_out.sum() + 2 * g_lse.sum()).backward()
    assert torch.equal(o.grad, torch.ones_like(o)) and torch.equal(small.grad, 2 * torch.ones_like(small))


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and dk.available_backends("cuda")["cuda"].reason is None


@pytest.mark.skipif(not _cuda_ready(), reason="needs the cuda backend on a GPU")
def test_cuda_forward_agrees_at_1e30_and_refuses_beyond_its_limit():
    """The CUDA forwards scale query rows by powers of two (csrc/cuda/key_norms.cuh): xm * 1e30 gives the
    reference's answer; beyond ~5e33 (csrc/magnitudes.h, forward_magnitude_exponent) they refuse."""
    xm, v, lss = [t.cuda() for t in _scaled("huge")]
    _rot, perm = _extras()
    perm = perm.cuda()
    got, _ = dk.chunk_attention(xm, v, lss, perm, CASE.chunk, backend="cuda")
    want, _ = ref.chunk_attention(*[t.cpu().double() for t in (xm, v, lss)], perm.cpu(), CASE.chunk)
    assert rel_err(got.cpu(), want) < tolerance(torch.float32)
    with pytest.raises(ValueError, match=r"chunk_attention: xm reaches .* the CUDA kernels resolve scores only"):
        dk.chunk_attention(xm * 1e5, v, lss, perm, CASE.chunk, backend="cuda")


@pytest.mark.skipif(not _cuda_ready(), reason="needs the cuda backend on a GPU")
def test_cuda_backward_refuses_an_unresolvable_lse():
    xm, v, lss = [t.cuda() for t in _scaled("huge")]
    xm = (xm * 1e-14).requires_grad_()  # scores ~1e32 / ||key||: lse far beyond 65536, products in range
    _rot, perm = _extras()
    out = dk.chunk_attention(xm, v, lss, perm.cuda(), CASE.chunk, backend="cuda")[0]
    with pytest.raises(ValueError, match=r"the saved lse reaches .* in magnitude.*\|lse\| <= 65536"):
        torch.autograd.grad(out.sum(), xm)
