"""The compiled CPU backend against the reference: every op, forward and backward, in float32 and float64, and
float16/bfloat16 inputs against the float64 reference of the same rounded values; extreme feature scales."""

from __future__ import annotations

import pytest
import torch

import dlsn_kernels as dk
from dlsn_kernels import reference as ref
from tests.helpers import CASES, Case, make_inputs, rel_err, tolerance

pytestmark = pytest.mark.skipif(
    not dk.available_backends("cpu")["cpu"].usable,
    reason=f"the compiled extension is not built: {dk.available_backends('cpu')['cpu'].reason}",
)

DTYPES = [torch.float64, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_hash_and_sort_match_reference(case, dtype):
    xm, _v, _lss, rot, _perm = make_inputs(case, dtype)
    codes = dk.sblsh_hash(xm, rot, backend="cpu")
    assert codes.dtype == torch.int64
    assert torch.equal(codes, ref.sblsh_hash(xm, rot))
    n_buckets = rot.shape[-1]
    perm = dk.bucket_sort(codes, n_buckets, backend="cpu")
    assert torch.equal(perm, ref.bucket_sort(codes))
    assert torch.equal(dk.bucket_sort(codes.int(), n_buckets, backend="cpu"), perm)


def test_bucket_sort_many_ties_is_stable():
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 3, (2, 3, 1000), generator=gen)
    assert torch.equal(dk.bucket_sort(codes, 3, backend="cpu"), torch.sort(codes, stable=True).indices)


def test_hash_ties_pick_lowest_bucket():
    xm = torch.zeros(1, 4, 3)
    rot = torch.ones(3, 2, 5)
    assert dk.sblsh_hash(xm, rot, backend="cpu").unique().tolist() == [0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_chunk_attention_forward_backward(case, dtype):
    xm, v, lss, _rot, perm = make_inputs(case, dtype, requires_grad=True)
    out, lse = dk.chunk_attention(xm, v, lss, perm, case.chunk, backend="cpu")
    want_out, want_lse = ref.chunk_attention(xm, v, lss, perm, case.chunk)
    assert out.dtype == dtype and lse.dtype == dtype
    assert rel_err(out, want_out) < tolerance(dtype)
    assert rel_err(lse, want_lse) < tolerance(dtype)

    gen = torch.Generator().manual_seed(7)
    g_out = torch.randn(out.shape, generator=gen, dtype=dtype)
    g_lse = torch.randn(lse.shape, generator=gen, dtype=dtype)
    got = torch.autograd.grad((out * g_out).sum() + (lse * g_lse).sum(), (xm, v, lss))
    want = torch.autograd.grad((want_out * g_out).sum() + (want_lse * g_lse).sum(), (xm, v, lss))
    for name, a, b in zip(("xm", "v", "lss"), got, want):
        assert rel_err(a, b) < tolerance(dtype, grad=True), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_gla_attention_forward_backward(case, dtype):
    xm, v, lss, rot, perm = make_inputs(case, dtype, requires_grad=True)
    y = dk.gla_attention(xm, v, lss, rot, case.chunk, backend="cpu")
    want = ref.gla_attention(xm, v, lss, rot, case.chunk)
    assert rel_err(y, want) < tolerance(dtype)
    _y, _lse, perm_out = torch.ops.dlsn.gla_attention(xm.detach(), v.detach(), lss.detach(), rot, case.chunk)
    assert torch.equal(perm_out, perm)

    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=dtype)
    got = torch.autograd.grad((y * g).sum(), (xm, v, lss))
    exp = torch.autograd.grad((want * g).sum(), (xm, v, lss))
    for name, a, b in zip(("xm", "v", "lss"), got, exp):
        assert rel_err(a, b) < tolerance(dtype, grad=True), name


def test_combine_rounds_matches_reference():
    xm, v, lss, _rot, perm = make_inputs(CASES[4])
    out, lse = ref.chunk_attention(xm, v, lss, perm, CASES[4].chunk)
    assert rel_err(dk.combine_rounds(out, lse, backend="cpu"), ref.combine_rounds(out, lse)) < 1e-15


# Small enough for full finite differences: L < K/2, two chunks, and four chunks with padding.
GRADCHECK_CASES = [CASES[0], CASES[3], Case(1, 14, 4, 3, 3, 4)]


@pytest.fixture
def one_thread():
    """gradcheck runs the op thousands of times on tiny inputs; on a busy machine each multi-threaded
    ``at::parallel_for`` then waits for cores held by other processes, so one thread is much faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=str)
def test_gradcheck_float64(case):
    xm, v, lss, rot, perm = make_inputs(case, torch.float64, requires_grad=True)
    # Keep keys away from the norm clamp so finite differences see a smooth function.
    with torch.no_grad():
        xm.add_(torch.sign(xm) * 0.1)

    def chunk(xm_, v_, lss_):
        return dk.chunk_attention(xm_, v_, lss_, perm, case.chunk, backend="cpu")

    def gla(xm_, v_, lss_):
        return dk.gla_attention(xm_, v_, lss_, rot, case.chunk, backend="cpu")

    assert torch.autograd.gradcheck(chunk, (xm, v, lss), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(gla, (xm, v, lss), eps=1e-6, atol=1e-7)


def test_key_norm_clamp_gradient():
    """A key with norm below 5e-5 is divided by the clamp, and its gradient follows."""
    case = CASES[3]
    xm, v, lss, rot, perm = make_inputs(case, torch.float64)
    xm[0, 2] = 1e-6
    xm.requires_grad_(True)
    v.requires_grad_(True)
    out, lse = dk.chunk_attention(xm, v, lss, perm, case.chunk, backend="cpu")
    want_out, want_lse = ref.chunk_attention(xm, v, lss, perm, case.chunk)
    assert rel_err(out, want_out) < 1e-12
    g_cpu = torch.autograd.grad(out.sum() + lse.sum(), xm)[0]
    g_ref = torch.autograd.grad(want_out.sum() + want_lse.sum(), xm)[0]
    assert rel_err(g_cpu, g_ref) < 1e-10


@pytest.mark.parametrize("op", ["chunk", "gla"])
def test_gradients_are_bitwise_deterministic(op):
    torch.manual_seed(0)
    n, length, chunk, rounds = 2, 300, 16, 3
    xm = torch.randn(n, length, 12, requires_grad=True)
    v = torch.randn(n, length, 20, requires_grad=True)
    lss = torch.randn(n, length, chunk, requires_grad=True)
    rot = dk.random_rotations(12, rounds, dk.n_buckets_for(length, chunk))
    perm = dk.bucket_sort(dk.sblsh_hash(xm.detach(), rot), rot.shape[-1])

    def grads():
        if op == "chunk":
            out, lse = dk.chunk_attention(xm, v, lss, perm, chunk, backend="cpu")
            loss = out.square().sum() + lse.sum()
        else:
            loss = dk.gla_attention(xm, v, lss, rot, chunk, backend="cpu").square().sum()
        return torch.autograd.grad(loss, (xm, v, lss))

    first = grads()
    for _ in range(3):
        for a, b in zip(first, grads()):
            assert torch.equal(a, b)


def test_int32_perm_is_accepted():
    case = CASES[5]
    xm, v, lss, _rot, perm = make_inputs(case, torch.float32)
    a = dk.chunk_attention(xm, v, lss, perm, case.chunk, backend="cpu")
    b = dk.chunk_attention(xm, v, lss, perm.int(), case.chunk, backend="cpu")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_training_shape_smoke():
    """The paper's channel counts at a small image: agrees with the reference in float32."""
    torch.manual_seed(1)
    n, length, chunk, rounds = 1, 24 * 24, 128, 3
    xm = torch.relu(torch.randn(n, length, 64))
    v = torch.randn(n, length, 256)
    lss = torch.randn(n, length, chunk)
    rot = dk.random_rotations(64, rounds, dk.n_buckets_for(length, chunk))
    y = dk.gla_attention(xm, v, lss, rot, chunk, backend="cpu")
    assert rel_err(y, ref.gla_attention(xm, v, lss, rot, chunk)) < 2e-5


# float16/bfloat16 (DESIGN.md "Precision"): rows read in 16 bits, float32 inside, lse float32. The reference
# runs in float64 on the same rounded values, so the only error left is the kernel's own.
HALF = [torch.bfloat16, torch.float16]


def _rounded(case: Case, dtype: torch.dtype):
    xm, v, lss, rot, perm = make_inputs(case, torch.float64)
    low = [t.to(dtype).requires_grad_() for t in (xm, v, lss)]
    exact = [t.detach().double().requires_grad_() for t in low]
    return low, exact, rot.to(dtype), perm


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_16bit_chunk_attention_forward_backward(case, dtype):
    low, exact, _rot, perm = _rounded(case, dtype)
    out, lse = dk.chunk_attention(*low, perm, case.chunk, backend="cpu")
    want_out, want_lse = ref.chunk_attention(*exact, perm, case.chunk)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert rel_err(out, want_out) < tolerance(dtype)
    assert rel_err(lse, want_lse) < tolerance(dtype)

    gen = torch.Generator().manual_seed(7)
    g_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)
    g_lse = torch.randn(lse.shape, generator=gen, dtype=torch.float64).float()
    got = torch.autograd.grad((out * g_out).sum() + (lse * g_lse).sum(), low)
    want = torch.autograd.grad((want_out * g_out.double()).sum() + (want_lse * g_lse.double()).sum(), exact)
    for name, a, b in zip(("xm", "v", "lss"), got, want):
        assert a.dtype == dtype and rel_err(a, b) < tolerance(dtype, grad=True), name


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_16bit_gla_attention_forward_backward(case, dtype):
    low, exact, rot, _perm = _rounded(case, dtype)
    # The hash projects in IEEE float32: its codes are those of the rounded values in float64, except at
    # near-ties that float32 cannot resolve.
    codes = dk.sblsh_hash(low[0].detach(), rot, backend="cpu")
    proj = torch.einsum("nlc,crb->nrlb", exact[0].detach(), rot.double())
    top2 = proj.topk(min(2, proj.shape[-1]), dim=-1).values
    clear = (top2[..., 0] - top2[..., -1] > 1e-4 * proj.abs().amax(-1)) | (proj.shape[-1] == 1)
    assert torch.equal(codes[clear], proj.argmax(-1)[clear])
    perm = dk.bucket_sort(codes, rot.shape[2], backend="cpu")

    y = dk.gla_attention(*low, rot, case.chunk, backend="cpu")
    round_out, round_lse = ref.chunk_attention(*exact, perm, case.chunk)
    want = ref.combine_rounds(round_out, round_lse)
    assert y.dtype == dtype and rel_err(y, want) < tolerance(dtype)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
    got = torch.autograd.grad((y * g).sum(), low)
    exp = torch.autograd.grad((want * g.double()).sum(), exact)
    for name, a, b in zip(("xm", "v", "lss"), got, exp):
        assert a.dtype == dtype and rel_err(a, b) < tolerance(dtype, grad=True), name


def test_autocast_on_the_cpu_runs_the_16bit_kernels():
    """Under torch.autocast("cpu") the attention ops cast float32 inputs themselves and return bfloat16."""
    case = CASES[5]
    xm, v, lss, rot, perm = make_inputs(case, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = dk.gla_attention(xm, v, lss, rot, case.chunk, backend="cpu")
        out, lse = dk.chunk_attention(xm, v, lss, perm, case.chunk, backend="cpu")
    assert y.dtype == out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    rounded = [t.bfloat16() for t in (xm, v, lss)]
    assert torch.equal(y, dk.gla_attention(*rounded, rot.bfloat16(), case.chunk, backend="cpu"))


# Overflow-safe key norm: xm * 1e30 has squares beyond float32's range; the norm is computed scaled by the row's
# largest magnitude and keys are normalised before any product. Scores are then of order 1e30 and the softmax is
# one-hot on the largest score, which is the query's own key (Cauchy-Schwarz; these features are nowhere near
# parallel): every output row is the query's own value row and lse its norm. That is the oracle, because the
# reference cannot serve: its exp(s - lse) has a float64 rounding of lse far above 1 at such scores and drops rows.
@pytest.mark.parametrize("op", ["chunk", "gla"])
def test_huge_features_attend_to_themselves(op):
    case = CASES[3]
    xm, v, lss, rot, perm = make_inputs(case, torch.float64)
    low = [(xm * 1e30).float().requires_grad_(), v.float().requires_grad_(), lss.float().requires_grad_()]
    if op == "chunk":
        out, lse = dk.chunk_attention(*low, perm, case.chunk, backend="cpu")
        norms = low[0].detach().double().norm(dim=-1)
        assert rel_err(lse, norms[:, None].expand(lse.shape)) < tolerance(torch.float32)
        want = low[1].detach()[:, None].expand(out.shape)
    else:
        out = dk.gla_attention(*low, rot.float(), case.chunk, backend="cpu")
        want = low[1].detach()
    assert torch.isfinite(out).all() and torch.equal(out, want)
    # the reference agrees (its norm is scaled and its softmax subtracts the row max)
    if op == "chunk":
        ref_out, _ref_lse = ref.chunk_attention(*[t.detach() for t in low], perm, case.chunk)
    else:
        ref_out = ref.gla_attention(*[t.detach() for t in low], rot.float(), case.chunk)
    assert torch.equal(ref_out, want)
    # The backward recomputes P = exp(s - lse) from the saved float32 lse, which cannot resolve scores of 1e30
    # (P would be 0, 1 or 2 where it is 1/2): it refuses instead of returning wrong gradients.
    with pytest.raises(ValueError, match="saved lse reaches"):
        torch.autograd.grad(out.sum(), low)


@pytest.mark.parametrize("op", ["chunk", "gla"])
def test_tiny_features_match_the_reference(op):
    """xm * 1e-30: every key under the norm floor (whose squares underflow float32), against the reference."""
    case = CASES[3]
    xm, v, lss, rot, perm = make_inputs(case, torch.float64)
    low = [(xm * 1e-30).float().requires_grad_(), v.float().requires_grad_(), lss.float().requires_grad_()]
    exact = [t.detach().double().requires_grad_() for t in low]
    if op == "chunk":
        got, _lse = dk.chunk_attention(*low, perm, case.chunk, backend="cpu")
        want, _want_lse = ref.chunk_attention(*exact, perm, case.chunk)
    else:
        got = dk.gla_attention(*low, rot.float(), case.chunk, backend="cpu")
        want = ref.gla_attention(*exact, rot, case.chunk)
    assert rel_err(got, want) < tolerance(torch.float32)
    g = torch.randn(got.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for name, a, b in zip(("xm", "v", "lss"), torch.autograd.grad((got * g.float()).sum(), low),
                          torch.autograd.grad((want * g).sum(), exact)):
        assert rel_err(a, b) < tolerance(torch.float32, grad=True), name
