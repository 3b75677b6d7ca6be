"""The compiled CPU backend against the reference: every op, forward and backward, float32 and float64."""

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
