"""The compiled CPU ops without a learned score (``lss=None``, NLSN's NLSA; /work DESIGN.md): equal to lss=zeros
bit for bit (the same arithmetic less the +0.0 adds), equal to the reference, forward and backward, on the case
table; gradcheck in float64; opcheck and fake shapes; an empty dlss from the raw backward, None through autograd."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import dlsn_kernels as dk
from dlsn_kernels import reference as ref
from tests.helpers import CASES, Case, make_inputs, rel_err, tolerance

pytestmark = pytest.mark.skipif(
    not dk.available_backends("cpu")["cpu"].usable,
    reason=f"the compiled extension is not built: {dk.available_backends('cpu')['cpu'].reason}",
)

OPS = torch.ops.dlsn
DTYPES = [torch.float64, torch.float32]


def _grads(outputs, inputs, seed: int):
    """Gradients of a random linear function of ``outputs`` (every output gets a gradient)."""
    gen = torch.Generator().manual_seed(seed)
    total = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outputs)
    return torch.autograd.grad(total, inputs)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("dtype", [*DTYPES, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_chunk_attention_none_equals_zeros_bitwise(case, dtype):
    xm0, v0, lss0, _rot, perm = make_inputs(case, dtype)
    zeros = torch.zeros_like(lss0)
    xm, v = _leaves(xm0, v0)
    xz, vz = _leaves(xm0, v0)
    out, lse = OPS.chunk_attention(xm, v, None, perm, case.chunk)
    out_z, lse_z = OPS.chunk_attention(xz, vz, zeros, perm, case.chunk)
    assert torch.equal(out, out_z) and torch.equal(lse, lse_z)
    for got, want in zip(_grads((out, lse), (xm, v), 3), _grads((out_z, lse_z), (xz, vz), 3)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_gla_attention_none_equals_zeros_bitwise(case, dtype):
    xm0, v0, lss0, rot, _perm = make_inputs(case, dtype)
    xm, v = _leaves(xm0, v0)
    xz, vz = _leaves(xm0, v0)
    y, lse, perm = OPS.gla_attention(xm, v, None, rot, case.chunk)
    y_z, lse_z, perm_z = OPS.gla_attention(xz, vz, torch.zeros_like(lss0), rot, case.chunk)
    assert torch.equal(y, y_z) and torch.equal(lse, lse_z) and torch.equal(perm, perm_z)
    for got, want in zip(_grads((y, lse), (xm, v), 4), _grads((y_z, lse_z), (xz, vz), 4)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_chunk_attention_none_matches_reference(case, dtype):
    xm, v, _lss, _rot, perm = make_inputs(case, dtype, requires_grad=True)
    out, lse = OPS.chunk_attention(xm, v, None, perm, case.chunk)
    want_out, want_lse = ref.chunk_attention(xm, v, None, perm, case.chunk)
    assert out.dtype == dtype and lse.dtype == dtype
    assert rel_err(out, want_out) < tolerance(dtype)
    assert rel_err(lse, want_lse) < tolerance(dtype)
    got = _grads((out, lse), (xm, v), 7)
    want = _grads((want_out, want_lse), (xm, v), 7)
    for name, a, b in zip(("xm", "v"), got, want):
        assert rel_err(a, b) < tolerance(dtype, grad=True), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_gla_attention_none_matches_reference(case, dtype):
    xm, v, _lss, rot, perm = make_inputs(case, dtype, requires_grad=True)
    y, _lse, perm_out = OPS.gla_attention(xm, v, None, rot, case.chunk)
    assert torch.equal(perm_out, perm)
    want = ref.gla_attention(xm, v, None, rot, case.chunk)
    assert rel_err(y, want) < tolerance(dtype)
    for name, a, b in zip(("xm", "v"), _grads((y,), (xm, v), 5), _grads((want,), (xm, v), 5)):
        assert rel_err(a, b) < tolerance(dtype, grad=True), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_raw_backward_returns_empty_dlss(dtype):
    case = CASES[3]
    xm, v, lss, _rot, perm = make_inputs(case, dtype)
    out, lse = OPS.chunk_attention(xm, v, None, perm, case.chunk)
    grad_out = torch.randn_like(out)
    delta = torch.randn_like(lse)
    dxm, dv, dlss = OPS.attention_backward(grad_out, delta, xm, v, None, perm, lse, case.chunk)
    assert dlss.shape == (0,) and dlss.dtype == dtype and dlss.device == xm.device
    dxm_z, dv_z, dlss_z = OPS.attention_backward(grad_out, delta, xm, v, torch.zeros_like(lss), perm, lse,
                                                 case.chunk)
    assert torch.equal(dxm, dxm_z) and torch.equal(dv, dv_z)
    assert dlss_z.shape == lss.shape  # the present-lss contract is unchanged


@pytest.mark.parametrize("op", ["chunk_attention", "gla_attention"])
def test_autograd_gives_lss_no_gradient(op):
    """The backward node hands an absent lss None (not the op's empty dlss); a present one gets dlss [N, L, K]."""
    case = CASES[5]
    xm, v, lss, rot, perm = make_inputs(case, torch.float64, requires_grad=True)
    last = perm if op == "chunk_attention" else rot
    for given in (None, lss):
        outputs = getattr(OPS, op)(xm, v, given, last, case.chunk)
        grads = outputs[0].grad_fn.apply(*(torch.ones_like(o) if o.is_floating_point() else None for o in outputs))
        assert grads[0].shape == xm.shape and grads[1].shape == v.shape
        assert (grads[2] is None) if given is None else (grads[2].shape == lss.shape)
    dxm, dv = torch.autograd.grad(OPS.chunk_attention(xm, v, None, perm, case.chunk)[0].sum(), (xm, v))
    assert dxm.shape == xm.shape and dv.shape == v.shape


@pytest.mark.parametrize("case", [Case(1, 3, 8, 2, 3, 5), Case(2, 13, 4, 2, 3, 4)], ids=str)
def test_gradcheck_float64_without_lss(case):
    xm, v, _lss, rot, perm = make_inputs(case, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: OPS.chunk_attention(a, b, None, perm, case.chunk), (xm, v), eps=1e-6, atol=1e-7
    )
    assert torch.autograd.gradcheck(
        lambda a, b: OPS.gla_attention(a, b, None, rot, case.chunk)[:2], (xm, v), eps=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=str)
def test_opcheck_without_lss(case):
    xm, v, _lss, rot, perm = make_inputs(case, torch.float64)
    out, lse = OPS.chunk_attention(xm, v, None, perm, case.chunk)
    samples = {
        OPS.chunk_attention.default: (xm.clone().requires_grad_(), v.clone().requires_grad_(), None, perm,
                                      case.chunk),
        OPS.gla_attention.default: (xm.clone().requires_grad_(), v, None, rot, case.chunk),
        OPS.attention_backward.default: (torch.randn_like(out), torch.randn_like(lse), xm, v, None, perm, lse,
                                         case.chunk),
    }
    for op, args in samples.items():
        torch.library.opcheck(op, args)


def test_fake_shapes_without_lss():
    case = CASES[3]
    xm, v, _lss, rot, perm = make_inputs(case, torch.float32)
    with FakeTensorMode() as mode:
        fxm, fv, fperm, frot = (mode.from_tensor(t) for t in (xm, v, perm, rot))
        out, lse = OPS.chunk_attention(fxm, fv, None, fperm, case.chunk)
        y, y_lse, y_perm = OPS.gla_attention(fxm, fv, None, frot, case.chunk)
        dxm, dv, dlss = OPS.attention_backward(out, lse, fxm, fv, None, fperm, lse, case.chunk)
    assert out.shape == (case.n, case.rounds, case.length, case.cv) and lse.shape == (case.n, case.rounds,
                                                                                        case.length)
    assert y.shape == (case.n, case.length, case.cv) and y_lse.shape == (case.n, case.length)
    assert y_perm.shape == (case.n, case.rounds, case.length)
    assert dxm.shape == xm.shape and dv.shape == v.shape
    assert dlss.shape == (0,) and dlss.dtype == xm.dtype


def test_present_lss_checks_unchanged():
    """lss present keeps every check; lss=None skips only its own."""
    case = CASES[3]
    xm, v, lss, _rot, perm = make_inputs(case, torch.float32)
    with pytest.raises(RuntimeError, match=r"lss must have shape \[N, L, chunk_size\]"):
        OPS.chunk_attention(xm, v, lss[:, :, :-1].contiguous(), perm, case.chunk)
    with pytest.raises(RuntimeError, match="lss is"):
        OPS.chunk_attention(xm, v, lss.double(), perm, case.chunk)
    with pytest.raises(RuntimeError, match="v must have shape"):
        OPS.chunk_attention(xm, v[:, :-1].contiguous(), None, perm, case.chunk)
