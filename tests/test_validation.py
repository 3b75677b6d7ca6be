"""Index values and argument types are validated before any kernel reads them (issue 11).

The table of the issue, on every backend that runs on CPU tensors here (reference, cpu, and
triton under the interpreter): a perm that is in range but not a permutation, a perm with one
position repeated, a perm out of range, codes out of range. Each must raise a ValueError naming the
argument and the first bad (n, round, position). The raw ``torch.ops.dlsn`` ops check in C++; they
are called in a subprocess, so a regression shows as a failed test rather than a dead test run.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import dlsn_kernels as dk

BACKENDS_HERE = [name for name, why in dk.available_backends("cpu").items() if why.usable]
CPU_REASON = dk.available_backends("cpu")["cpu"].reason
needs_cpu = pytest.mark.skipif(CPU_REASON is not None, reason=f"compiled extension not built: {CPU_REASON}")

N, R, L, K, CM, CV = 2, 3, 11, 4, 5, 6


@pytest.fixture(params=BACKENDS_HERE)
def backend(request):
    return request.param


def _inputs(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    xm = torch.randn(N, L, CM, generator=gen, dtype=dtype)
    v = torch.randn(N, L, CV, generator=gen, dtype=dtype)
    lss = torch.randn(N, L, K, generator=gen, dtype=dtype)
    perm = torch.stack([torch.stack([torch.randperm(L, generator=gen) for _ in range(R)]) for _ in range(N)])
    return xm, v, lss, perm


def _with(perm: torch.Tensor, n: int, r: int, pos: int, value: int) -> torch.Tensor:
    bad = perm.clone()
    bad[n, r, pos] = value
    return bad


# Each bad perm and the message it must produce: the first bad entry in (n, round, position) order.
def _bad_perms(perm: torch.Tensor) -> dict[str, tuple[torch.Tensor, str]]:
    dup_value = int(perm[1, 2, 3])
    return {
        "all zeros": (
            torch.zeros_like(perm),
            r"perm must be a permutation of 0\.\.L-1 for each \(n, round\), "
            r"but perm\[n=0, round=0, position=0\] = 0 occurs more than once",
        ),
        "one position repeated": (
            _with(perm, 1, 2, 7, dup_value),
            rf"perm\[n=1, round=2, position=3\] = {dup_value} occurs more than once",
        ),
        "one past the end": (
            _with(perm, 0, 1, 5, L),
            rf"perm must hold positions in \[0, L={L}\): perm\[n=0, round=1, position=5\] = {L}",
        ),
        "negative": (_with(perm, 1, 0, 0, -1), r"perm\[n=1, round=0, position=0\] = -1"),
        "far out of range": (_with(perm, 1, 1, 10, 2**40), rf"perm\[n=1, round=1, position=10\] = {2**40}"),
    }


# 2**40 does not fit in int32: that one is tried as int64 only.
PERM_CASES = [(which, dtype) for which in _bad_perms(_inputs()[3]) for dtype in (torch.int64, torch.int32)
              if not (which == "far out of range" and dtype == torch.int32)]


@pytest.mark.parametrize(("which", "index_dtype"), PERM_CASES, ids=[f"{w}-{d}" for w, d in PERM_CASES])
def test_chunk_attention_refuses_a_perm_that_is_not_a_permutation(backend, which, index_dtype):
    xm, v, lss, perm = _inputs()
    bad, match = _bad_perms(perm)[which]
    for t in (xm, v, lss):
        t.requires_grad_(True)
    with pytest.raises(ValueError, match=match):
        dk.chunk_attention(xm, v, lss, bad.to(index_dtype), K, backend=backend)


def test_the_first_bad_row_is_named(backend):
    xm, v, lss, perm = _inputs()
    bad = _with(_with(perm, 1, 2, 0, L), 0, 2, 9, int(perm[0, 2, 4]))  # a repeat in an earlier row
    with pytest.raises(ValueError, match=r"perm must hold positions in \[0, L=11\): perm\[n=1, round=2"):
        dk.chunk_attention(xm, v, lss, bad, K, backend=backend)  # out of range is reported first
    bad = _with(_with(perm, 1, 0, 0, int(perm[1, 0, 1])), 0, 2, 9, int(perm[0, 2, 4]))
    with pytest.raises(ValueError, match=r"perm\[n=0, round=2, position=4\]"):
        dk.chunk_attention(xm, v, lss, bad, K, backend=backend)


def test_valid_perm_is_accepted(backend):
    xm, v, lss, perm = _inputs()
    out, lse = dk.chunk_attention(xm, v, lss, perm.int(), K, backend=backend)
    want, want_lse = dk.reference.chunk_attention(xm, v, lss, perm, K)
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lse, want_lse.to(lse.dtype), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("value", "n_buckets"), [(-1, 4), (4, 4), (2**40, 4), (1, 1)])
def test_bucket_sort_refuses_codes_out_of_range(backend, value, n_buckets):
    codes = torch.zeros(N, R, L, dtype=torch.int64)
    codes[1, 2, 6] = value
    with pytest.raises(ValueError, match=rf"codes must lie in \[0, n_buckets={n_buckets}\): "
                                         rf"codes\[n=1, round=2, position=6\] = {value}"):
        dk.bucket_sort(codes, n_buckets, backend=backend)


# ---------------------------------------------------------------------------------------------
# Non-tensor arguments: a TypeError naming the argument, never an AttributeError from deep inside.

def _public_calls():
    xm, v, lss, perm = _inputs(torch.float32)
    rot = dk.random_rotations(CM, R, 3)
    codes = torch.zeros(N, R, L, dtype=torch.int64)
    out, lse = torch.zeros(N, R, L, CV), torch.zeros(N, R, L)
    return {
        "sblsh_hash": (dk.sblsh_hash, {"xm": xm, "rot": rot}, ()),
        "bucket_sort": (dk.bucket_sort, {"codes": codes}, (3,)),
        "chunk_attention": (dk.chunk_attention, {"xm": xm, "v": v, "lss": lss, "perm": perm}, (K,)),
        "gla_attention": (dk.gla_attention, {"xm": xm, "v": v, "lss": lss, "rot": rot}, (K,)),
        "combine_rounds": (dk.combine_rounds, {"out": out, "lse": lse}, ()),
    }


ARGUMENTS = [(op, name) for op, (_, tensors, _) in _public_calls().items() for name in tensors]


@pytest.mark.parametrize("convert", [lambda t: t.numpy(), lambda t: t.tolist(), lambda t: None],
                         ids=["numpy", "list", "None"])
@pytest.mark.parametrize(("op", "name"), ARGUMENTS, ids=[f"{op}-{name}" for op, name in ARGUMENTS])
def test_non_tensor_argument_is_a_type_error_naming_it(op, name, convert):
    fn, tensors, extra = _public_calls()[op]
    tensors = dict(tensors)
    tensors[name] = convert(tensors[name])
    if name == "lss" and tensors[name] is None:  # no learned score (NLSA): a valid call, not a type error
        assert fn(*tensors.values(), *extra, backend="reference") is not None
        return
    with pytest.raises(TypeError, match=rf"^{name} must be a torch.Tensor, got"):
        fn(*tensors.values(), *extra, backend="reference")


def test_numpy_chunk_size_and_n_buckets_are_type_errors():
    fn, tensors, _ = _public_calls()["chunk_attention"]
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        fn(*tensors.values(), 2.0, backend="reference")
    with pytest.raises(TypeError, match="n_buckets must be an int"):
        dk.bucket_sort(torch.zeros(1, 1, 3, dtype=torch.int64), np.float32(3.0), backend="reference")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: dk.random_rotations(64, 0, 8), "n_hashes must be >= 1, got 0"),
        (lambda: dk.random_rotations(0, 2, 8), "channels must be >= 1, got 0"),
        (lambda: dk.random_rotations(64, 2, -1), "n_buckets must be >= 1, got -1"),
        (lambda: dk.n_buckets_for(0, 128), "length must be >= 1, got 0"),
        (lambda: dk.n_buckets_for(100, 0), "chunk_size must be >= 1, got 0"),
    ],
)
def test_degenerate_sizes_are_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_degenerate_size_helpers_still_take_small_valid_sizes():
    assert dk.n_buckets_for(10, 128) == 1  # L < K: one bucket
    assert dk.n_buckets_for(np.int64(4096), 64) == 64
    assert dk.random_rotations(4, 1, 1).shape == (4, 1, 1)


# ---------------------------------------------------------------------------------------------
# The raw ops skip the Python checks: the C++ kernels must refuse bad index values themselves.

RAW_SCRIPT = textwrap.dedent(
    """
    import torch, dlsn_kernels
    ops = torch.ops.dlsn
    gen = torch.Generator().manual_seed(0)
    n, r, length, k, cm, cv = 2, 3, 11, 4, 5, 6
    xm = torch.randn(n, length, cm, generator=gen, dtype=torch.float64)
    v = torch.randn(n, length, cv, generator=gen, dtype=torch.float64)
    lss = torch.randn(n, length, k, generator=gen, dtype=torch.float64)
    perm = torch.arange(length).repeat(n, r, 1).contiguous()
    grad = torch.randn(n, r, length, cv, generator=gen, dtype=torch.float64)
    stat = torch.randn(n, r, length, generator=gen, dtype=torch.float64)

    def bad_perms():
        zero = torch.zeros_like(perm)
        dup = perm.clone(); dup[1, 1, 4] = dup[1, 1, 5]
        high = perm.clone(); high[0, 2, 3] = length
        low = perm.clone(); low[1, 0, 9] = -7
        far = perm.clone(); far[0, 0, 0] = 2**40
        return {"zero": zero, "dup": dup, "high": high, "low": low, "far": far}

    for name, p in bad_perms().items():
        for dtype in (torch.int64, torch.int32):
            if dtype == torch.int32 and name == "far":
                continue
            q = p.to(dtype)
            calls = {
                "chunk_attention": lambda: ops.chunk_attention(xm, v, lss, q, k),
                "attention_backward": lambda: ops.attention_backward(grad, stat, xm, v, lss, q, stat, k),
                "autograd": lambda: ops.chunk_attention(
                    xm.requires_grad_(), v, lss, q, k)[0].sum().backward(),
            }
            for op, call in calls.items():
                try:
                    call()
                except ValueError as exc:
                    print("raised", op, name, dtype, str(exc).splitlines()[0], flush=True)
                else:
                    print("RETURNED", op, name, dtype, flush=True)
    for value, n_buckets in ((-1, 3), (3, 3), (2**40, 3)):
        codes = torch.zeros(n, r, length, dtype=torch.int64)
        codes[1, 2, 6] = value
        try:
            ops.bucket_sort(codes, n_buckets)
        except ValueError as exc:
            print("raised bucket_sort", value, str(exc).splitlines()[0], flush=True)
        else:
            print("RETURNED bucket_sort", value, flush=True)
    print("finished")
    """
)


@needs_cpu
def test_raw_cpu_ops_refuse_bad_indices_in_their_kernels():
    result = subprocess.run([sys.executable, "-c", RAW_SCRIPT], capture_output=True, text=True, timeout=300)
    lines = result.stdout.splitlines()
    assert result.returncode == 0, f"crashed (exit {result.returncode}) after:\n{result.stdout}\n{result.stderr}"
    assert lines[-1] == "finished"
    verdicts = lines[:-1]
    assert len(verdicts) == 9 * 3 + 3
    assert not [line for line in verdicts if not line.startswith("raised")]
    assert any("perm[n=1, round=1, position=4] = 5 occurs more than once" in line for line in verdicts)
    assert any("perm must hold positions in [0, L=11): perm[n=0, round=2, position=3] = 11" in line
               for line in verdicts)
    assert any("codes must lie in [0, n_buckets=3): codes[n=1, round=2, position=6] = 3" in line
               for line in verdicts)
