"""The Triton backend (dlsn_kernels.triton) against the reference oracle.

Without a GPU the kernels run under the Triton interpreter on CPU tensors, in float64 (tight
tolerances); with a GPU they run compiled on CUDA tensors in float32, plus float16/bfloat16 checks.
Shapes are tiny because the interpreter runs every program in Python.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Triton reads this when it is first imported; if another test module imported it earlier without
    # the variable, INTERPRETED below is False and this module is skipped with that reason.
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import dlsn_kernels.triton as tk  # noqa: E402
from dlsn_kernels import reference as ref  # noqa: E402
from tests.helpers import CASES, TILE_CASES, Case  # noqa: E402

if not HAS_CUDA and not tk.INTERPRETED:
    pytest.skip(
        "needs a GPU, or the Triton interpreter (triton was imported before TRITON_INTERPRET=1 was set; "
        "run this file on its own)",
        allow_module_level=True,
    )

DEVICE = "cuda" if HAS_CUDA else "cpu"
# float64 exists on CPU only (interpreter); a GPU checks float32 at float32 tolerances
EXACT = torch.float64 if DEVICE == "cpu" else torch.float32
TOL = {"atol": 1e-10, "rtol": 1e-10} if EXACT == torch.float64 else {"atol": 2e-4, "rtol": 2e-4}
def needs_gpu(test):
    """Compiled kernels, float16/bfloat16: the ``cuda`` marker, skipped without a GPU."""
    skip = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (compiled kernels, float16/bfloat16)")
    return pytest.mark.cuda(skip(test))

# The shared case table (tests/helpers.py) plus one with K > 64: several query and key tiles per chunk under
# the interpreter's block size of 64, and one whose chunk, length and channel counts fill the blocks exactly
# (the kernels' mask-free paths, EVEN_C and EVEN_K / FULL: L % K == 0, power-of-two channels of at least 16).
SIZES = [*CASES, TILE_CASES[0], Case(2, 48, 16, 2, 16, 32)]
SIZE_IDS = [str(c) for c in SIZES]


def make_inputs(size, dtype=EXACT, seed=0, learned="random"):
    """``[xm, v, lss, rot]``; ``learned``: lss random, "zeros" or "none" (None: NLSA, no learned score)."""
    n, length, k, cm, cv, rounds = size.n, size.length, size.chunk, size.cm, size.cv, size.rounds
    gen = torch.Generator().manual_seed(seed)
    xm = torch.randn(n, length, cm, generator=gen, dtype=torch.float64)
    v = torch.randn(n, length, cv, generator=gen, dtype=torch.float64)
    lss = torch.randn(n, length, k, generator=gen, dtype=torch.float64)
    rot = ref.random_rotations(cm, rounds, ref.n_buckets_for(length, k), generator=gen)
    inputs = [t.to(device=DEVICE, dtype=dtype) for t in (xm, v, lss, rot)]
    if learned != "random":
        inputs[2] = None if learned == "none" else torch.zeros_like(inputs[2])
    return inputs


def reference_perm(xm, rot):
    return ref.bucket_sort(ref.sblsh_hash(xm, rot))


def assert_close(actual, expected, **tol):
    torch.testing.assert_close(actual, expected.to(actual.dtype), **(tol or TOL))


# ---------------------------------------------------------------------------------------------
# hashing and sorting


def test_slot_rows_match_the_padded_slot_positions():
    """The kernels' row table: input row n * L + position of every sorted slot, padded slots included."""
    from dlsn_kernels.triton._common import slot_rows

    gen = torch.Generator().manual_seed(1)
    for n, length, k in ((2, 13, 8), (1, 3, 8), (3, 16, 8)):
        perm = torch.stack([torch.stack([torch.randperm(length, generator=gen) for _ in range(2)])
                            for _ in range(n)])
        rows = slot_rows(perm, k, 64)
        want = ref.padded_slot_positions(perm, k) + torch.arange(n).view(n, 1, 1) * length
        assert rows.dtype == torch.int32 and torch.equal(rows.long(), want)
    assert slot_rows(perm, 8, 2**31).dtype == torch.int64  # element offsets past int32


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_hash_and_sort_match_reference(size):
    xm, _, _, rot = make_inputs(size)
    codes = tk.sblsh_hash(xm, rot)
    assert codes.dtype == torch.int64 and codes.shape == (size.n, size.rounds, size.length)
    assert torch.equal(codes, ref.sblsh_hash(xm, rot))
    perm = tk.bucket_sort(codes, rot.shape[2])
    assert perm.dtype == torch.int64
    assert torch.equal(perm, ref.bucket_sort(codes))


def test_hash_ties_take_the_lowest_bucket_across_tiles():
    # 130 buckets: two tiles of 128 in the kernel. Columns 5, 9 and 129 are the same direction.
    gen = torch.Generator().manual_seed(1)
    cm = 4
    rot = torch.randn(cm, 2, 130, generator=gen, dtype=torch.float64) * 0.01
    direction = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=torch.float64)
    for b in (129, 9, 5):
        rot[:, 0, b] = direction
    rot[:, 1, 129] = direction  # round 1: the winner sits in the second tile only
    xm = direction.repeat(2, 6, 1) + 1e-3 * torch.randn(2, 6, cm, generator=gen, dtype=torch.float64)
    xm[0, 0] = 0.0  # all projections tie at 0: bucket 0
    xm, rot = xm.to(DEVICE, EXACT), rot.to(DEVICE, EXACT)
    codes = tk.sblsh_hash(xm, rot)
    assert torch.equal(codes, ref.sblsh_hash(xm, rot))
    assert int(codes[0, 0, 0]) == 0
    assert (codes[:, 0].flatten()[1:] == 5).all()
    assert (codes[:, 1].flatten()[1:] == 129).all()


@pytest.mark.parametrize("n_buckets", [1, 7, 128, 2000])
def test_bucket_sort_is_stable(n_buckets):
    gen = torch.Generator().manual_seed(n_buckets)
    # few distinct codes: long runs of ties whose order must stay by position
    codes = torch.randint(0, min(n_buckets, 5), (2, 3, 300), generator=gen)
    codes[0, 0, :7] = n_buckets - 1
    codes = codes.to(DEVICE)
    perm = tk.bucket_sort(codes.to(torch.int32), n_buckets)
    assert torch.equal(perm, torch.sort(codes, dim=-1, stable=True).indices)


def test_bucket_sort_rejects_codes_out_of_range():
    codes = torch.tensor([[[0, 3, 1]]], device=DEVICE)
    with pytest.raises(ValueError, match="codes"):
        tk.bucket_sort(codes, 3)
    with pytest.raises(ValueError, match="n_buckets"):
        tk.bucket_sort(codes, 0)


# ---------------------------------------------------------------------------------------------
# forward


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_chunk_attention_matches_reference(size):
    xm, v, lss, rot = make_inputs(size)
    perm = reference_perm(xm, rot)
    out, lse = tk.chunk_attention(xm, v, lss, perm, size.chunk)
    ref_out, ref_lse = ref.chunk_attention(xm, v, lss, perm, size.chunk)
    assert out.dtype == v.dtype and lse.dtype == EXACT
    assert_close(out, ref_out)
    assert_close(lse, ref_lse)


def test_chunk_attention_takes_int32_perm():
    xm, v, lss, rot = make_inputs(Case(2, 13, 5, 2, 5, 7))
    perm = reference_perm(xm, rot)
    out, lse = tk.chunk_attention(xm, v, lss, perm.to(torch.int32), 5)
    ref_out, ref_lse = tk.chunk_attention(xm, v, lss, perm, 5)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_gla_attention_matches_reference(size):
    xm, v, lss, rot = make_inputs(size)
    y, lse, perm = tk.gla_attention(xm, v, lss, rot, size.chunk)
    assert torch.equal(perm, reference_perm(xm, rot))
    assert_close(y, ref.gla_attention(xm, v, lss, rot, size.chunk))
    _, round_lse = ref.chunk_attention(xm, v, lss, perm, size.chunk)
    assert_close(lse, torch.logsumexp(round_lse, dim=1))


def test_float32_forward_matches_reference():
    size = Case(2, 13, 5, 3, 5, 7)
    xm, v, lss, rot = make_inputs(size, dtype=torch.float32)
    y, lse, perm = tk.gla_attention(xm, v, lss, rot, 5)
    assert y.dtype == torch.float32 and lse.dtype == torch.float32
    out, round_lse = ref.chunk_attention(xm, v, lss, perm, 5)
    assert_close(y, ref.combine_rounds(out, round_lse), atol=2e-5, rtol=2e-5)
    assert_close(lse, torch.logsumexp(round_lse, dim=1), atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------------------------------------
# backward


def _leaves(xm, v, lss):
    """Fresh leaves of the reference's inputs (lss None stays None: no gradient of it)."""
    return [None if t is None else t.clone().requires_grad_() for t in (xm, v, lss)]


def _grads(total, leaves):
    """Gradients of ``total`` for the leaves that exist (dlss is absent with lss None)."""
    return torch.autograd.grad(total, [t for t in leaves if t is not None])


def chunk_backward_pair(size, dtype=EXACT, seed=0, learned="random"):
    """(attention_backward of chunk_attention, autograd of the reference) for random incoming grads."""
    xm, v, lss, rot = make_inputs(size, dtype, seed, learned)
    perm = reference_perm(xm, rot)
    leaves = _leaves(xm, v, lss)
    out, lse = ref.chunk_attention(*leaves, perm, size.chunk)
    gen = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    grad_lse = torch.randn(lse.shape, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    expected = _grads((out * grad_out).sum() + (lse * grad_lse).sum(), leaves)
    delta = (grad_out * out.detach()).sum(-1) - grad_lse
    actual = tk.attention_backward(grad_out, delta, xm, v, lss, perm, lse.detach(), size.chunk)
    return actual, expected


def gla_backward_pair(size, dtype=EXACT, seed=0, learned="random"):
    """(attention_backward with R' = 1 after the fused forward, autograd of the reference GLA).

    The reference runs on the kernel's permutation (equal to its own: see the forward tests), so that
    a rounding-level tie in the float32 hash on a GPU cannot make the comparison flaky.
    """
    xm, v, lss, rot = make_inputs(size, dtype, seed, learned)
    y, lse, perm = tk.gla_attention(xm, v, lss, rot, size.chunk)
    leaves = _leaves(xm, v, lss)
    y_ref = ref.combine_rounds(*ref.chunk_attention(*leaves, perm, size.chunk))
    gen = torch.Generator().manual_seed(seed + 1)
    dy = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    expected = _grads((y_ref * dy).sum(), leaves)
    delta = (dy * y).sum(-1)[:, None]
    actual = tk.attention_backward(dy[:, None], delta, xm, v, lss, perm, lse[:, None], size.chunk)
    return actual, expected


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_chunk_attention_backward_matches_autograd(size):
    actual, expected = chunk_backward_pair(size)
    for name, a, e in zip(("dxm", "dv", "dlss"), actual, expected, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        assert_close(a, e)


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_gla_attention_backward_matches_autograd(size):
    actual, expected = gla_backward_pair(size)
    for a, e in zip(actual, expected, strict=True):
        assert_close(a, e)


@pytest.mark.parametrize("size", [CASES[0], CASES[3], CASES[6], SIZES[-1]], ids=str)
def test_backward_transposed_products_match_autograd(size, monkeypatch):
    """The key passes' tensor-core form (dv^T, dkn^T, dq^T: P and dS on the shared-memory B side), which float16,
    bfloat16 and TF32 take on a GPU, run here in float64: padded and unpadded, one and several rounds."""
    import sys

    monkeypatch.setattr(sys.modules["dlsn_kernels.triton.attention_backward"], "_smem_b", lambda *a: True)
    actual, expected = chunk_backward_pair(size)
    for a, e in zip(actual, expected):
        assert_close(a, e)
    actual, expected = gla_backward_pair(size)
    for a, e in zip(actual, expected):
        assert_close(a, e)


# ---------------------------------------------------------------------------------------------
# no learned score (lss=None, NLSA): the HAS_LSS=False kernels


def _without_learned_score(pair, size, **kw):
    """The backward pair with lss None, checked against the reference and bit for bit against lss zeros."""
    (dxm, dv, dlss), expected = pair(size, learned="none", **kw)
    (dxm0, dv0, _), _ = pair(size, learned="zeros", **kw)
    assert dlss.shape == (0,) and dlss.dtype == dxm.dtype and dlss.device == dxm.device
    assert torch.equal(dxm, dxm0) and torch.equal(dv, dv0)  # adding +0.0 is exact: the same bits
    for a, e in zip((dxm, dv), expected, strict=True):
        assert_close(a, e)


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_attention_without_learned_score(size):
    """lss=None: the forward of both ops and the backward (R' = R and R' = 1) match the reference's lss=None and
    equal lss=zeros bit for bit; dlss is an empty tensor, as the op schema says."""
    xm, v, _, rot = make_inputs(size, learned="none")
    zeros = torch.zeros(size.n, size.length, size.chunk, dtype=EXACT, device=DEVICE)
    y, lse, perm = tk.gla_attention(xm, v, None, rot, size.chunk)
    assert_close(y, ref.gla_attention(xm, v, None, rot, size.chunk))
    assert all(torch.equal(a, b) for a, b in zip((y, lse), tk.gla_attention(xm, v, zeros, rot, size.chunk)))
    out, round_lse = tk.chunk_attention(xm, v, None, perm, size.chunk)
    for a, e in zip((out, round_lse), ref.chunk_attention(xm, v, None, perm, size.chunk), strict=True):
        assert_close(a, e)
    assert all(torch.equal(a, b) for a, b in zip((out, round_lse), tk.chunk_attention(xm, v, zeros, perm, size.chunk)))
    _without_learned_score(chunk_backward_pair, size)
    _without_learned_score(gla_backward_pair, size)


@pytest.mark.parametrize("size", [CASES[3], SIZES[-1]], ids=str)
def test_transposed_backward_without_learned_score(size, monkeypatch):
    """The tensor-core orientation of the key passes (float16/bfloat16/TF32 on a GPU) with lss None, in float64."""
    import sys

    monkeypatch.setattr(sys.modules["dlsn_kernels.triton.attention_backward"], "_smem_b", lambda *a: True)
    _without_learned_score(chunk_backward_pair, size)


def test_float32_without_learned_score():
    size = Case(1, 13, 5, 2, 5, 7)
    (dxm, dv, dlss), expected = gla_backward_pair(size, dtype=torch.float32, learned="none")
    assert dlss.numel() == 0
    for a, e in zip((dxm, dv), expected, strict=True):
        assert_close(a, e, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(EXACT != torch.float64, reason="gradcheck needs float64 (the interpreter's)")
def test_gradcheck_without_learned_score():
    """torch.autograd.gradcheck of gla_attention with lss=None through the public API on the triton backend."""
    import dlsn_kernels as dk

    size = Case(1, 7, 4, 2, 3, 2)
    xm, v, _, rot = make_inputs(size, learned="none")
    fn = lambda x, y: dk.gla_attention(x, y, None, rot, size.chunk, backend="triton")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (xm.requires_grad_(), v.requires_grad_()), eps=1e-6, atol=1e-7, fast_mode=True)


def test_backward_of_keys_below_the_norm_floor():
    # zero and tiny rows of xm: the key normalisation is clamped at 5e-5 (gradient dkn / eps)
    size = Case(1, 9, 4, 2, 3, 5)
    xm, v, lss, rot = make_inputs(size)
    xm[0, 2] = 0.0
    xm[0, 6] = 1e-6
    perm = reference_perm(xm, rot)
    leaves = [t.clone().requires_grad_() for t in (xm, v, lss)]
    out, lse = ref.chunk_attention(*leaves, perm, 4)
    grad_out = torch.ones_like(out)
    expected = torch.autograd.grad((out * grad_out).sum(), leaves)
    delta = (grad_out * out.detach()).sum(-1)
    actual = tk.attention_backward(grad_out, delta, xm, v, lss, perm, lse.detach(), 4)
    # dividing by eps = 5e-5 scales rounding up by 2e4: looser tolerance than elsewhere
    loose = {"atol": 1e-7, "rtol": 1e-7} if EXACT == torch.float64 else {"atol": 1e-2, "rtol": 1e-3}
    assert actual[0][0, 2].abs().max() > 100  # the clamped rows really get the large dkn / eps gradient
    for a, e in zip(actual, expected, strict=True):
        assert_close(a, e, **loose)


def test_backward_is_bitwise_repeatable():
    size = Case(2, 13, 5, 2, 3, 5)
    first, _ = chunk_backward_pair(size, seed=3)
    second, _ = chunk_backward_pair(size, seed=3)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    first, _ = gla_backward_pair(size, seed=3)
    second, _ = gla_backward_pair(size, seed=3)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_float32_backward_matches_autograd():
    actual, expected = gla_backward_pair(Case(1, 13, 5, 2, 5, 7), dtype=torch.float32)
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == torch.float32
        assert_close(a, e, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# argument checks


def test_bad_arguments_name_the_argument():
    xm, v, lss, rot = make_inputs(Case(1, 6, 4, 2, 3, 5))
    perm = reference_perm(xm, rot)
    with pytest.raises(ValueError, match="lss"):
        tk.chunk_attention(xm, v, lss[..., :3].contiguous(), perm, 4)
    with pytest.raises(ValueError, match="v"):
        tk.chunk_attention(xm, v[:, :5].contiguous(), lss, perm, 4)
    with pytest.raises(ValueError, match="perm"):
        tk.chunk_attention(xm, v, lss, perm.float(), 4)
    with pytest.raises(ValueError, match="xm"):
        tk.chunk_attention(xm.transpose(1, 2), v, lss, perm, 4)
    with pytest.raises(ValueError, match="dtype"):
        tk.chunk_attention(xm, v.to(torch.float32 if EXACT == torch.float64 else torch.float16), lss, perm, 4)
    with pytest.raises(ValueError, match="rot"):
        tk.sblsh_hash(xm, rot[:2].contiguous())
    with pytest.raises(ValueError, match="grad_out"):
        tk.attention_backward(v[:, None, :, :4], v[..., 0][:, None], xm, v, lss, perm, v[..., 0][:, None], 4)
    with pytest.raises(ValueError, match="delta"):
        tk.attention_backward(v[:, None], v[..., :2].transpose(1, 2), xm, v, lss, perm, v[..., 0][:, None], 4)


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU (interpreter) dtype rule")
def test_half_precision_on_cpu_is_refused_with_a_reason():
    xm, v, lss, rot = make_inputs(Case(1, 6, 4, 2, 3, 5), dtype=torch.float16)
    with pytest.raises(ValueError, match="float32 or float64 CPU tensors"):
        tk.gla_attention(xm, v, lss, rot, 4)


# ---------------------------------------------------------------------------------------------
# half precision (GPU only): float32 accumulation keeps the error at the inputs' rounding level

HALF_TOL = {torch.float16: 1e-2, torch.bfloat16: 4e-2}  # relative (norm) error bounds
GPU_SIZES = [Case(2, 21, 4, 3, 3, 5), Case(2, 300, 48, 3, 24, 40), Case(1, 1000, 128, 2, 64, 96)]


def relative_error(actual, expected):
    expected = expected.float()
    return float((actual.float() - expected).norm() / expected.norm().clamp_min(1e-12))


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("size", GPU_SIZES)
def test_half_precision_forward_and_backward(size, dtype):
    xm, v, lss, rot = make_inputs(size, dtype=torch.float32)
    half = [t.to(dtype) for t in (xm, v, lss, rot)]
    y, lse, perm = tk.gla_attention(*half, size.chunk)
    assert y.dtype == dtype and lse.dtype == torch.float32
    assert torch.equal(perm, tk.bucket_sort(tk.sblsh_hash(half[0], half[3]), rot.shape[2]))
    # the float32 reference on the same (rounded) inputs and the same permutation
    leaves = [t.float().requires_grad_() for t in half[:3]]
    out, round_lse = ref.chunk_attention(*leaves, perm, size.chunk)
    y_ref = ref.combine_rounds(out, round_lse)
    assert relative_error(y, y_ref) < HALF_TOL[dtype]
    assert (lse - torch.logsumexp(round_lse, dim=1)).abs().max() < 20 * HALF_TOL[dtype]
    dy = torch.randn_like(y_ref)
    expected = torch.autograd.grad((y_ref * dy).sum(), leaves)
    dy_half = dy.to(dtype)
    delta = (dy_half.float() * y.float()).sum(-1)[:, None]
    actual = tk.attention_backward(dy_half[:, None], delta, *half[:3], perm, lse[:, None], size.chunk)
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == dtype
        assert relative_error(a, e) < 2 * HALF_TOL[dtype]


@needs_gpu
@pytest.mark.parametrize("size", GPU_SIZES[1:])
def test_gpu_float32_larger_shapes(size):
    actual, expected = gla_backward_pair(size, dtype=torch.float32)
    for a, e in zip(actual, expected, strict=True):
        assert relative_error(a, e) < 1e-4
    again, _ = gla_backward_pair(size, dtype=torch.float32)
    for a, b in zip(actual, again, strict=True):
        assert torch.equal(a, b)
