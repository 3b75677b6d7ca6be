"""Ops at their edges, the same way on every backend here (issue 31 item 8): n_buckets bounded, Cm = 0 refused,
an empty batch (N = 0) gives empty results, an integer ``out`` for combine_rounds is a clear error, and flex on
CPU refuses, before allocating, a call whose eager path would materialise more than its bound."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import dlsn_kernels as dk
from dlsn_kernels.backends.flex import CPU_MAX_SCORE_BYTES

HERE = [name for name, status in dk.available_backends("cpu").items() if status.usable]


@pytest.fixture(params=HERE)
def backend(request):
    return request.param


def _floats(n, length, cm, cv, k, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    return tuple(torch.randn(n, length, c, generator=gen, dtype=dtype) for c in (cm, cv, k))


@pytest.mark.parametrize("n_buckets", [2**24 + 1, 2**31, 5 * 10**8])
def test_n_buckets_is_bounded_on_every_backend(backend, n_buckets):
    codes = torch.zeros(1, 1, 8, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"n_buckets must be in \[1, 2\^24 = 16777216\], got"):
        dk.bucket_sort(codes, n_buckets, backend=backend)


def test_the_largest_bucket_count_still_sorts(backend):
    codes = torch.tensor([[[3, 0, 2**24 - 1, 0]]])
    assert dk.bucket_sort(codes, 2**24, backend=backend).tolist() == [[[1, 3, 0, 2]]]


def test_raw_cpu_op_bounds_n_buckets_too():
    """The raw op (no Python checks) refuses before allocating: C++ kMaxSortBuckets. In a subprocess, so that a
    regression (a 16 GB allocation) cannot take the test run down."""
    if dk.available_backends("cpu")["cpu"].reason is not None:
        pytest.skip("cpu backend unavailable")
    code = ("import torch, dlsn_kernels\n"
            "try:\n    torch.ops.dlsn.bucket_sort(torch.zeros(1, 1, 8, dtype=torch.int64), 2**31)\n"
            "except ValueError as e:\n    print('refused:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "refused: n_buckets must be in [1, 2^24 = 16777216], got 2147483648" in out


def test_zero_match_channels_is_refused_on_every_backend(backend):
    xm, v, lss = _floats(1, 8, 0, 4, 4)
    perm = torch.arange(8).reshape(1, 1, 8)
    with pytest.raises(ValueError, match=r"xm must hold at least one match channel \(Cm >= 1\)"):
        dk.chunk_attention(xm, v, lss, perm, 4, backend=backend)
    with pytest.raises(ValueError, match=r"Cm >= 1"):
        dk.gla_attention(xm, v, lss, torch.zeros(0, 1, 2), 4, backend=backend)


def test_an_empty_batch_gives_empty_results_on_every_backend(backend):
    dtype = torch.float64 if backend == "triton" else torch.float32
    xm, v, lss = _floats(0, 8, 4, 6, 4, dtype)
    rot = dk.random_rotations(4, 2, 2, dtype=dtype)
    perm = torch.zeros(0, 2, 8, dtype=torch.int64)
    out, lse = dk.chunk_attention(xm, v, lss, perm, 4, backend=backend)
    assert out.shape == (0, 2, 8, 6) and lse.shape == (0, 2, 8)
    assert dk.gla_attention(xm, v, lss, rot, 4, backend=backend).shape == (0, 8, 6)
    assert dk.sblsh_hash(xm, rot, backend=backend).shape == (0, 2, 8)
    assert dk.bucket_sort(perm, 8, backend=backend).shape == (0, 2, 8)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_combine_rounds_refuses_integer_tensors(backend, dtype):
    out = torch.ones(1, 2, 3, 4, dtype=dtype)
    with pytest.raises(ValueError, match=f"out must be a floating tensor, got {dtype}"):
        dk.combine_rounds(out, torch.zeros(1, 2, 3), backend=backend)
    with pytest.raises(ValueError, match="lse must be a floating tensor"):
        dk.combine_rounds(out.float(), torch.zeros(1, 2, 3, dtype=dtype), backend=backend)


@pytest.mark.skipif("flex" not in HERE, reason="flex unavailable")
def test_flex_on_cpu_refuses_before_allocating_what_its_eager_path_cannot():
    length, k = 300_000, 16
    xm, v, lss = _floats(1, length, 1, 1, k)
    perm = torch.arange(length).reshape(1, 1, length).expand(1, 2, length)
    with pytest.raises(dk.BackendUnavailableError) as info:
        dk.chunk_attention(xm, v, lss, perm, k, backend="flex")
    text = str(info.value)
    assert "flex's eager CPU forward would materialise 720,000,000,000 bytes of scores" in text
    assert f"its limit is {CPU_MAX_SCORE_BYTES:,}" in text


def test_no_value_channels_still_give_the_lse_and_its_gradients(backend):
    """Cv = 0: ``out`` is empty but ``lse`` is the softmax normaliser and differentiable in xm and lss; no backend
    may leave it unwritten (the Triton forward once returned early on an empty ``out``)."""
    gen = torch.Generator().manual_seed(2)
    xm = torch.randn(2, 37, 8, generator=gen).relu()
    v, lss = torch.zeros(2, 37, 0), torch.randn(2, 37, 16, generator=gen)
    rot = dk.random_rotations(8, 2, 2, generator=gen)
    perm = dk.bucket_sort(dk.sblsh_hash(xm, rot, backend="reference"), 2, backend="reference")
    grads = {}
    for name in ("reference", backend):
        leaves = [t.clone().requires_grad_(name != "flex") for t in (xm, lss)]  # flex: no CPU backward
        out, lse = dk.chunk_attention(leaves[0], v, leaves[1], perm, 16, backend=name)
        assert out.shape == (2, 2, 37, 0) and lse.shape == (2, 2, 37)
        if name != "flex":
            lse.sum().backward()
        grads[name] = (lse.detach(), *(t.grad for t in leaves))
        assert dk.gla_attention(xm, v, lss, rot, 16, backend=name).shape == (2, 37, 0)
    torch.testing.assert_close(grads[backend][0], grads["reference"][0])
    if backend != "flex":
        torch.testing.assert_close(grads[backend][1:], grads["reference"][1:])
