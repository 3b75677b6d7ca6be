"""The CUDA kernels (``torch.ops.dlsn.*`` on CUDA tensors) against the float64 reference.

The ops are called directly, not through the Python backend layer, so these tests check the CUDA
kernels alone: every op, forward and backward (``attention_backward`` against autograd of the
reference), float32/float16/bfloat16 inputs (the reference runs in float64 on the same rounded
values), int32 and int64 permutations, and bitwise-repeatable gradients.
"""

from __future__ import annotations

import pytest
import torch

import dlsn_kernels  # noqa: F401  (importing loads the compiled extension: torch.ops.dlsn)
from dlsn_kernels import reference as ref
from tests.helpers import CASES, TILE_CASES, Case, make_inputs, rel_err, tolerance

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEVICE = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

ALL_CASES = CASES + TILE_CASES


def _inputs(case: Case, dtype: torch.dtype, seed: int = 0):
    """Inputs in ``dtype`` on the device, and their float64 copies (the same rounded values)."""
    xm, v, lss, rot, perm = make_inputs(case, torch.float64, seed)
    low = [t.to(DEVICE, dtype) for t in (xm, v, lss, rot)]
    exact = [t.double() for t in low]
    return low, exact, perm.to(DEVICE)


def _reference_rounds(exact, perm, chunk, requires_grad=False):
    xm, v, lss = (t.detach().clone().requires_grad_(requires_grad) for t in exact[:3])
    out, lse = ref.chunk_attention(xm, v, lss, perm, chunk)
    return (xm, v, lss), out, lse


def _check_codes(codes: torch.Tensor, xm: torch.Tensor, rot: torch.Tensor) -> None:
    """codes is an argmax of the float64 projection; where the best bucket leads by a clear margin,
    it is exactly the reference's (float32 accumulation may only break near-ties differently)."""
    proj = torch.einsum("nlc,crb->nrlb", xm.double(), rot.double())
    scale = proj.abs().amax().clamp_min(1e-30)
    tol = 1e-5 * float(scale)
    chosen = proj.gather(-1, codes.unsqueeze(-1)).squeeze(-1)
    best = proj.amax(-1)
    assert bool((chosen >= best - tol).all())
    top2 = proj.topk(min(2, proj.shape[-1]), dim=-1).values
    clear = (top2[..., 0] - top2[..., -1] > tol) | (proj.shape[-1] == 1)
    assert torch.equal(codes[clear], proj.argmax(-1)[clear])


# ---------------------------------------------------------------- hash and sort


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_sblsh_hash(case, dtype):
    (xm, _v, _lss, rot), _exact, _perm = _inputs(case, dtype)
    codes = torch.ops.dlsn.sblsh_hash(xm, rot)
    assert codes.dtype == torch.int64 and codes.shape == (case.n, case.rounds, case.length)
    assert codes.device == xm.device
    _check_codes(codes, xm, rot)


def test_sblsh_hash_many_buckets_and_ties():
    gen = torch.Generator().manual_seed(3)
    xm = torch.randn(2, 50, 19, generator=gen).to(DEVICE)
    rot = torch.randn(19, 3, 128, generator=gen).to(DEVICE)  # B = 128: 16 passes of 8 buckets
    _check_codes(torch.ops.dlsn.sblsh_hash(xm, rot), xm, rot)
    # exact ties everywhere: the lowest bucket wins
    zeros = torch.zeros(1, 7, 4, device=DEVICE)
    assert torch.ops.dlsn.sblsh_hash(zeros, torch.ones(4, 2, 9, device=DEVICE)).unique().tolist() == [0]


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize(
    "shape,n_buckets",
    [((1, 1, 1), 1), ((2, 3, 13), 4), ((2, 3, 5000), 3), ((1, 2, 3000), 128), ((1, 1, 200_003), 64)],
    ids=["single", "small", "ties-many-segments", "B128", "long-row"],
)
def test_bucket_sort_is_stable_sort(shape, n_buckets, index_dtype):
    gen = torch.Generator().manual_seed(11)
    codes = torch.randint(0, n_buckets, shape, generator=gen).to(DEVICE, index_dtype)
    perm = torch.ops.dlsn.bucket_sort(codes, n_buckets)
    assert perm.dtype == torch.int64 and perm.shape == codes.shape
    assert torch.equal(perm.cpu(), torch.sort(codes.cpu().long(), dim=-1, stable=True).indices)


# ---------------------------------------------------------------- chunk_attention


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_chunk_attention_forward(case, dtype):
    (xm, v, lss, _rot), exact, perm = _inputs(case, dtype)
    out, lse = torch.ops.dlsn.chunk_attention(xm, v, lss, perm, case.chunk)
    assert out.dtype == dtype and out.shape == (case.n, case.rounds, case.length, case.cv)
    assert lse.dtype == torch.float32 and lse.shape == (case.n, case.rounds, case.length)
    _, want_out, want_lse = _reference_rounds(exact, perm, case.chunk)
    assert rel_err(out, want_out) < tolerance(dtype)
    assert rel_err(lse, want_lse) < tolerance(dtype)


@pytest.fixture
def tf32():
    """float32 under "high": the tensor-core (TF32) kernels instead of the IEEE scalar ones."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_chunk_attention_tf32(case, tf32):
    (xm, v, lss, _rot), exact, perm = _inputs(case, torch.float32)
    out, lse = torch.ops.dlsn.chunk_attention(xm, v, lss, perm, case.chunk)
    leaves, want_out, want_lse = _reference_rounds(exact, perm, case.chunk, requires_grad=True)
    assert rel_err(out, want_out) < tolerance(torch.float32, tf32=True)
    assert rel_err(lse, want_lse) < tolerance(torch.float32, tf32=True)
    g_out = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    delta = (g_out.float().to(DEVICE) * out).sum(-1)
    got = torch.ops.dlsn.attention_backward(g_out.float().to(DEVICE), delta, xm, v, lss, perm, lse, case.chunk)
    want = torch.autograd.grad((want_out * g_out).sum(), leaves)
    for name, a, b in zip(("dxm", "dv", "dlss"), got, want):
        assert rel_err(a, b) < tolerance(torch.float32, grad=True, tf32=True), name


@pytest.mark.parametrize("cm", [384, 512, 768, 1024])
def test_wide_channels_near_the_shared_memory_limit(cm):
    """Around the per-block shared-memory limit (static + dynamic, fits_shared_memory) the launchers pick
    the tensor-core kernels or the scalar ones; either way the results are right and no setup error is
    raised (a refused cudaFuncSetAttribute would raise naming the kernel)."""
    case = Case(1, 40, 8, 1, cm, 16)
    (xm, v, lss, _rot), exact, perm = _inputs(case, torch.bfloat16)
    out, lse = torch.ops.dlsn.chunk_attention(xm, v, lss, perm, case.chunk)
    leaves, want_out, want_lse = _reference_rounds(exact, perm, case.chunk, requires_grad=True)
    assert rel_err(out, want_out) < tolerance(torch.bfloat16)
    g_out = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g_low = g_out.to(DEVICE, torch.bfloat16)
    delta = (g_low.float() * out.float()).sum(-1)
    got = torch.ops.dlsn.attention_backward(g_low, delta, xm, v, lss, perm, lse, case.chunk)
    want = torch.autograd.grad((want_out * g_low.double()).sum(), leaves)
    for name, a, b in zip(("dxm", "dv", "dlss"), got, want):
        assert rel_err(a, b) < tolerance(torch.bfloat16, grad=True), name


def test_chunk_attention_int32_perm_matches_int64():
    case = CASES[3]
    (xm, v, lss, _rot), _exact, perm = _inputs(case, torch.float32)
    out64, lse64 = torch.ops.dlsn.chunk_attention(xm, v, lss, perm, case.chunk)
    out32, lse32 = torch.ops.dlsn.chunk_attention(xm, v, lss, perm.int(), case.chunk)
    assert torch.equal(out64, out32) and torch.equal(lse64, lse32)


def test_chunk_attention_tiny_key_norm_and_empty_batch():
    # rows with ||xm|| below 5e-5 are divided by 5e-5, not by their norm
    case = CASES[3]
    (xm, v, lss, _rot), exact, perm = _inputs(case, torch.float32)
    xm[:, ::3] *= 1e-7
    exact[0] = xm.double()
    out, lse = torch.ops.dlsn.chunk_attention(xm, v, lss, perm, case.chunk)
    _, want_out, want_lse = _reference_rounds(exact, perm, case.chunk)
    assert rel_err(out, want_out) < tolerance(torch.float32)
    assert rel_err(lse, want_lse) < tolerance(torch.float32)
    # N = 0
    out, lse = torch.ops.dlsn.chunk_attention(xm[:0], v[:0], lss[:0], perm[:0], case.chunk)
    assert out.shape == (0, case.rounds, case.length, case.cv) and lse.shape == (0, case.rounds, case.length)


def _chunk_attention_grads(case, dtype, perm_dtype=torch.int64, seed=0):
    (xm, v, lss, _rot), exact, perm = _inputs(case, dtype, seed)
    perm = perm.to(perm_dtype)
    out, lse = torch.ops.dlsn.chunk_attention(xm, v, lss, perm, case.chunk)
    gen = torch.Generator().manual_seed(seed + 7)
    g_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    g_lse = torch.randn(lse.shape, generator=gen, dtype=torch.float64).to(DEVICE, torch.float32)
    # grad of (out * g_out).sum() + (lse * g_lse).sum(): DESIGN's delta = rowsum(g_out * out) - g_lse
    delta = (g_out.float() * out.float()).sum(-1) - g_lse
    got = torch.ops.dlsn.attention_backward(g_out, delta, xm, v, lss, perm, lse, case.chunk)
    return got, (exact, perm, g_out, g_lse)


def _assert_grads_match(got, dtype, leaves, outputs, incoming):
    """``got`` (dxm, dv, dlss) equals the float64 gradient of sum(output * incoming) over ``leaves``."""
    loss = sum((out * g.double()).sum() for out, g in zip(outputs, incoming))
    want = torch.autograd.grad(loss, leaves)
    for name, a, b, like in zip(("dxm", "dv", "dlss"), got, want, leaves):
        assert a.dtype == dtype and a.shape == like.shape, name
        assert rel_err(a, b) < tolerance(dtype, grad=True), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_chunk_attention_backward(case, dtype):
    got, (exact, perm, g_out, g_lse) = _chunk_attention_grads(case, dtype)
    leaves, want_out, want_lse = _reference_rounds(exact, perm, case.chunk, requires_grad=True)
    _assert_grads_match(got, dtype, leaves, (want_out, want_lse), (g_out, g_lse))


def test_chunk_attention_backward_int32_perm_matches_int64():
    case = CASES[5]
    got64, _ = _chunk_attention_grads(case, torch.float32)
    got32, _ = _chunk_attention_grads(case, torch.float32, perm_dtype=torch.int32)
    for a, b in zip(got64, got32):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- gla_attention


def _gla_reference(exact, perm, chunk, requires_grad=False):
    leaves, out, lse = _reference_rounds(exact, perm, chunk, requires_grad)
    return leaves, ref.combine_rounds(out, lse), torch.logsumexp(lse, dim=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_gla_attention_forward(case, dtype):
    (xm, v, lss, rot), exact, _perm = _inputs(case, dtype)
    y, lse, perm = torch.ops.dlsn.gla_attention(xm, v, lss, rot, case.chunk)
    assert y.dtype == dtype and y.shape == (case.n, case.length, case.cv)
    assert lse.dtype == torch.float32 and lse.shape == (case.n, case.length)
    assert perm.dtype == torch.int64 and perm.shape == (case.n, case.rounds, case.length)
    codes = torch.ops.dlsn.sblsh_hash(xm, rot)
    assert torch.equal(perm, torch.ops.dlsn.bucket_sort(codes, rot.shape[-1]))
    _, want_y, want_lse = _gla_reference(exact, perm, case.chunk)
    assert rel_err(y, want_y) < tolerance(dtype)
    assert rel_err(lse, want_lse) < tolerance(dtype)


def _gla_grads(case, dtype, seed=0):
    (xm, v, lss, rot), exact, _perm = _inputs(case, dtype, seed)
    y, lse, perm = torch.ops.dlsn.gla_attention(xm, v, lss, rot, case.chunk)
    gen = torch.Generator().manual_seed(seed + 5)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    g_lse = torch.randn(lse.shape, generator=gen, dtype=torch.float64).to(DEVICE, torch.float32)
    # One softmax over the union of all rounds' keys (DESIGN): R' = 1, lse over all rounds.
    delta = (dy.float() * y.float()).sum(-1) - g_lse
    got = torch.ops.dlsn.attention_backward(
        dy[:, None].contiguous(),
        delta[:, None].contiguous(),
        xm,
        v,
        lss,
        perm,
        lse[:, None].contiguous(),
        case.chunk,
    )
    return got, (exact, perm, dy, g_lse)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_gla_attention_backward(case, dtype):
    got, (exact, perm, dy, g_lse) = _gla_grads(case, dtype)
    leaves, want_y, want_lse = _gla_reference(exact, perm, case.chunk, requires_grad=True)
    _assert_grads_match(got, dtype, leaves, (want_y, want_lse), (dy, g_lse))


# ---------------------------------------------------------------- determinism and errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [CASES[0], CASES[4], TILE_CASES[4]], ids=str)
def test_backward_is_bitwise_repeatable(case, dtype):
    first, _ = _chunk_attention_grads(case, dtype, seed=2)
    again, _ = _chunk_attention_grads(case, dtype, seed=2)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    first, _ = _gla_grads(case, dtype, seed=2)
    again, _ = _gla_grads(case, dtype, seed=2)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_errors_name_the_argument():
    case = CASES[3]
    (xm, v, lss, rot), _exact, perm = _inputs(case, torch.float32)
    with pytest.raises(RuntimeError, match="on CUDA"):
        torch.ops.dlsn.chunk_attention(xm.double(), v.double(), lss.double(), perm, case.chunk)
    with pytest.raises(RuntimeError, match="lss"):
        torch.ops.dlsn.chunk_attention(xm, v, lss[..., :-1].contiguous(), perm, case.chunk)
    with pytest.raises(RuntimeError, match="perm"):
        torch.ops.dlsn.chunk_attention(xm, v, lss, perm.float(), case.chunk)
    with pytest.raises(RuntimeError, match="rot"):
        torch.ops.dlsn.sblsh_hash(xm, rot[1:].contiguous())
    with pytest.raises(RuntimeError, match="n_buckets"):
        torch.ops.dlsn.bucket_sort(perm, 0)
    out, lse = torch.ops.dlsn.chunk_attention(xm, v, lss, perm, case.chunk)
    with pytest.raises(RuntimeError, match="delta"):
        torch.ops.dlsn.attention_backward(out, lse.double(), xm, v, lss, perm, lse, case.chunk)


# ---------------------------------------------------------------- without the learned score (lss=None, issue 27)

# float32 twice: the IEEE scalar kernels ("highest") and the TF32 ones ("high")
PRECISIONS = [(torch.float32, "highest"), (torch.float32, "high"), (torch.float16, "highest"),
              (torch.bfloat16, "highest")]


@pytest.fixture
def precision(request):
    dtype, policy = request.param
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(policy)
    yield dtype, policy == "high"
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("precision", PRECISIONS, ids=[f"{d}-{p}" for d, p in PRECISIONS], indirect=True)
@pytest.mark.parametrize("case", [CASES[3], CASES[5], TILE_CASES[1], TILE_CASES[3]], ids=str)
def test_without_lss_is_lss_zeros(case, precision):
    """lss=None runs the lss-free kernels: the bits of lss = zeros, forward (both ops) and backward, and an empty
    dlss [0] in its place."""
    dtype, tf32 = precision
    (xm, v, lss, rot), exact, perm = _inputs(case, dtype)
    zeros = torch.zeros_like(lss)
    out, lse = torch.ops.dlsn.chunk_attention(xm, v, None, perm, case.chunk)
    out0, lse0 = torch.ops.dlsn.chunk_attention(xm, v, zeros, perm, case.chunk)
    assert torch.equal(out, out0) and torch.equal(lse, lse0)
    want_out, want_lse = ref.chunk_attention(exact[0], exact[1], None, perm, case.chunk)
    assert rel_err(out, want_out) < tolerance(dtype, tf32=tf32)
    y, y_lse, y_perm = torch.ops.dlsn.gla_attention(xm, v, None, rot, case.chunk)
    y0, y_lse0, _ = torch.ops.dlsn.gla_attention(xm, v, zeros, rot, case.chunk)
    assert torch.equal(y, y0) and torch.equal(y_lse, y_lse0)
    g_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(DEVICE, dtype)
    delta = (g_out.float() * out.float()).sum(-1)
    got = torch.ops.dlsn.attention_backward(g_out, delta, xm, v, None, perm, lse, case.chunk)
    got0 = torch.ops.dlsn.attention_backward(g_out, delta, xm, v, zeros, perm, lse, case.chunk)
    assert got[2].shape == (0,) and got[2].dtype == dtype and got[2].device == xm.device
    assert torch.equal(got[0], got0[0]) and torch.equal(got[1], got0[1])
    leaves = [t.detach().clone().requires_grad_(True) for t in exact[:2]]
    ref_out, _ = ref.chunk_attention(*leaves, None, perm, case.chunk)
    want = torch.autograd.grad((ref_out * g_out.double()).sum(), leaves)
    for name, a, b in zip(("dxm", "dv"), got, want):
        assert rel_err(a, b) < tolerance(dtype, grad=True, tf32=tf32), name


# ---------------------------------------------------------------- extreme magnitudes (issue 25 item 4)


@pytest.mark.parametrize("precision", [p for p in PRECISIONS if p[0] != torch.float16],
                         ids=[f"{d}-{p}" for d, p in PRECISIONS if d != torch.float16], indirect=True)
@pytest.mark.parametrize("with_lss", [True, False], ids=["lss", "no-lss"])
def test_forward_takes_huge_features(precision, with_lss):
    """xm * 1e30: query rows scaled by 2^-e in the kernels (csrc/cuda/key_norms.cuh), the reference's one-hot
    softmax instead of a refusal; beyond ~5e33 (csrc/magnitudes.h) a refusal; the backward refuses through its
    lse limit."""
    dtype, tf32 = precision
    case = CASES[3]
    (xm, v, lss, rot), exact, perm = _inputs(case, dtype)
    huge = (exact[0] * 1e30).to(dtype)
    learned = lss if with_lss else None
    out, lse = torch.ops.dlsn.chunk_attention(huge, v, learned, perm, case.chunk)
    want_out, want_lse = ref.chunk_attention(huge.double(), exact[1], exact[2] if with_lss else None, perm,
                                             case.chunk)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert rel_err(out, want_out) < tolerance(dtype, tf32=tf32)
    assert rel_err(lse, want_lse) < tolerance(dtype, tf32=tf32)
    y, y_lse, _ = torch.ops.dlsn.gla_attention(huge, v, learned, rot, case.chunk)
    assert torch.isfinite(y).all() and torch.isfinite(y_lse).all()
    with pytest.raises(ValueError, match=r"chunk_attention: xm reaches .* the CUDA kernels resolve scores only"):
        torch.ops.dlsn.chunk_attention((exact[0] * 1e35).to(dtype), v, learned, perm, case.chunk)
    g_out = torch.ones_like(out)
    with pytest.raises(ValueError, match=r"the saved lse reaches .* in magnitude"):
        torch.ops.dlsn.attention_backward(g_out, (g_out.float() * out.float()).sum(-1), huge, v, learned, perm, lse,
                                          case.chunk)
