"""Property-based parity: every public op on random valid problems, compiled backends vs the reference.

Hypothesis draws the problem (N, L, K, Cm, Cv, R, dtype, the kind of perm, contiguity where the API
accepts it) and the seed of its tensors; the cpu backend is compared with the float64 reference in
forward, lse and gradients, and so is triton under the interpreter at small sizes (on a GPU the
triton cases run compiled on CUDA tensors in float32).

Runs are derandomised (the same cases every run, as CI needs) unless HYPOTHESIS_RANDOM=1, which
draws new cases each run; a failure prints the smallest case found and how to reproduce it.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

import dlsn_kernels as dk
from dlsn_kernels import reference as ref

pytestmark = pytest.mark.slow  # hundreds of drawn cases, about 100 s

HAS_CUDA = torch.cuda.is_available()
CPU_REASON = dk.available_backends("cpu")["cpu"].reason
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"
TRITON_REASON = dk.available_backends(TRITON_DEVICE)["triton"].reason

SETTINGS = settings(
    derandomize=os.environ.get("HYPOTHESIS_RANDOM") != "1",
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)

# Drawn cases per test: 560 on the cpu backend alone, a few more on triton. The interpreter takes seconds
# per attention call, so triton gets a handful of cases and no shrinking (a failure is reported as
# drawn; shrinking it would rerun the slow kernels hundreds of times).
CPU_EXAMPLES = {"hash": 100, "sort": 100, "chunk": 200, "gla": 100, "combine": 60}
TRITON_EXAMPLES = {"hash": 8, "sort": 10, "chunk": 10, "gla": 6}
TRITON_SETTINGS = settings(SETTINGS, phases=[Phase.explicit, Phase.reuse, Phase.generate])

# Error allowed against the float64 reference, relative to the largest expected magnitude, by input
# dtype. Magnitudes below FLOOR count as FLOOR: a gradient that is zero in exact arithmetic (L = 1: every
# key is the same position, the output does not depend on the scores) is rounding noise on both sides.
TOL = {torch.float64: 1e-9, torch.float32: 2e-4}
FLOOR = 1e-2


class Backend:
    def __init__(self, name: str, device: str, max_size: dict[str, int], dtypes: tuple[torch.dtype, ...]):
        self.name, self.device, self.max, self.dtypes = name, device, max_size, dtypes


CPU = Backend("cpu", "cpu", {"n": 3, "length": 48, "chunk": 12, "channels": 9, "rounds": 4},
              (torch.float32, torch.float64))
# The interpreter runs every program in Python: small sizes. A GPU checks float32 (no float64 there).
TRITON = Backend("triton", TRITON_DEVICE, {"n": 2, "length": 20, "chunk": 8, "channels": 6, "rounds": 3},
                 (torch.float32,) if HAS_CUDA else (torch.float32, torch.float64))

needs_cpu = pytest.mark.skipif(CPU_REASON is not None, reason=f"compiled extension not built: {CPU_REASON}")
needs_triton = pytest.mark.skipif(TRITON_REASON is not None, reason=f"triton backend unavailable: {TRITON_REASON}")


@st.composite
def problems(draw, backend: Backend):
    """Sizes with L < K, L == K, L a multiple of K, L % K != 0 and one chunk all drawn often."""
    top = backend.max
    k = draw(st.integers(1, top["chunk"]))
    length = draw(
        st.one_of(
            st.integers(1, top["length"]),
            st.just(k),
            st.integers(1, max(1, k - 1)),
            st.integers(1, max(1, top["length"] // k)).map(lambda m: m * k),
        )
    )
    return {
        "n": draw(st.integers(1, top["n"])),
        "length": length,
        "chunk": k,
        "cm": draw(st.integers(1, top["channels"])),
        "cv": draw(st.integers(1, top["channels"])),
        "rounds": draw(st.integers(1, top["rounds"])),
        "dtype": draw(st.sampled_from(backend.dtypes)),
        "scale": draw(st.sampled_from([1.0, 1.0, 4.0])),  # larger scores: sharper softmax
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _tensors(p: dict, device: str):
    """xm, v, lss, rot in float64 on CPU (the reference's inputs) and the same in p's dtype on device."""
    gen = torch.Generator().manual_seed(p["seed"])
    n, length, k = p["n"], p["length"], p["chunk"]
    xm = torch.randn(n, length, p["cm"], generator=gen, dtype=torch.float64) * p["scale"]
    v = torch.randn(n, length, p["cv"], generator=gen, dtype=torch.float64)
    lss = torch.randn(n, length, k, generator=gen, dtype=torch.float64) * p["scale"]
    rot = dk.random_rotations(p["cm"], p["rounds"], dk.n_buckets_for(length, k), generator=gen,
                              dtype=torch.float64)
    exact = (xm, v, lss, rot)
    return exact, tuple(t.to(device=device, dtype=p["dtype"]) for t in exact), gen


def _random_perm(p: dict, gen: torch.Generator, kind: str, rot: torch.Tensor) -> torch.Tensor:
    n, rounds, length = p["n"], p["rounds"], p["length"]
    if kind == "sorted codes":  # what gla_attention produces: runs of equal codes
        codes = torch.randint(0, rot.shape[2], (n, rounds, length), generator=gen)
        return ref.bucket_sort(codes)
    rows = [torch.randperm(length, generator=gen) for _ in range(n * rounds)]
    return torch.stack(rows).reshape(n, rounds, length)


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff = (got.detach().cpu().double() - want.detach()).abs().max()
    err = float(diff / want.detach().abs().max().clamp_min(FLOOR))
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]:.1g}"


# ---------------------------------------------------------------------------------------------
# The properties, shared by the backends.


def _check_hash(backend: Backend, p: dict) -> None:
    (xm64, _, _, rot64), (xm, _, _, rot), _ = _tensors(p, backend.device)
    codes = dk.sblsh_hash(xm, rot, backend=backend.name).cpu()
    proj = torch.einsum("nlc,crb->nrlb", xm.cpu().double(), rot.cpu().double())
    want = proj.argmax(-1)
    assert codes.dtype == torch.int64 and codes.shape == want.shape
    # Where the argmax differs, the two buckets must tie up to the dtype's rounding.
    gap = proj.gather(-1, want.unsqueeze(-1)) - proj.gather(-1, codes.unsqueeze(-1))
    assert float(gap.max()) <= TOL[p["dtype"]] * float(proj.abs().max().clamp_min(FLOOR))


def _check_sort(backend: Backend, p: dict, n_buckets: int, index_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(p["seed"])
    codes = torch.randint(0, n_buckets, (p["n"], p["rounds"], p["length"]), generator=gen).to(index_dtype)
    perm = dk.bucket_sort(codes.to(backend.device), n_buckets, backend=backend.name).cpu()
    assert perm.dtype == torch.int64
    assert torch.equal(perm, ref.bucket_sort(codes, n_buckets))


def _check_chunk_attention(backend: Backend, p: dict, perm_kind: str, index_dtype: torch.dtype) -> None:
    (xm64, v64, lss64, rot64), inputs, gen = _tensors(p, backend.device)
    perm = _random_perm(p, gen, perm_kind, rot64)
    g_out = torch.randn(p["n"], p["rounds"], p["length"], p["cv"], generator=gen, dtype=torch.float64)
    g_lse = torch.randn(p["n"], p["rounds"], p["length"], generator=gen, dtype=torch.float64)

    exact = [t.requires_grad_() for t in (xm64, v64, lss64)]
    want_out, want_lse = ref.chunk_attention(*exact, perm, p["chunk"])
    want_grads = torch.autograd.grad((want_out * g_out).sum() + (want_lse * g_lse).sum(), exact)

    leaves = [t.requires_grad_() for t in inputs[:3]]
    out, lse = dk.chunk_attention(*leaves, perm.to(backend.device, index_dtype), p["chunk"], backend=backend.name)
    dtype = p["dtype"]
    _close(out, want_out, dtype, "out")
    _close(lse, want_lse, dtype, "lse")
    dev = backend.device
    loss = (out * g_out.to(dev, dtype)).sum() + (lse * g_lse.to(dev, lse.dtype)).sum()
    for got, want, name in zip(torch.autograd.grad(loss, leaves), want_grads, ("xm", "v", "lss"), strict=True):
        _close(got, want, dtype, f"d{name}")


def _check_gla(backend: Backend, p: dict) -> None:
    (xm64, v64, lss64, rot64), (xm, v, lss, rot), gen = _tensors(p, backend.device)
    # Near-ties of the hash may round either way in float32; its own property test covers that.
    assume(torch.equal(dk.sblsh_hash(xm, rot, backend=backend.name).cpu(), ref.sblsh_hash(xm64, rot64)))
    g_y = torch.randn(p["n"], p["length"], p["cv"], generator=gen, dtype=torch.float64)

    exact = [t.requires_grad_() for t in (xm64, v64, lss64)]
    want = ref.gla_attention(*exact, rot64, p["chunk"])
    want_grads = torch.autograd.grad((want * g_y).sum(), exact)

    leaves = [t.requires_grad_() for t in (xm, v, lss)]
    y = dk.gla_attention(*leaves, rot, p["chunk"], backend=backend.name)
    _close(y, want, p["dtype"], "y")
    grads = torch.autograd.grad((y * g_y.to(y.device, y.dtype)).sum(), leaves)
    for got, want_g, name in zip(grads, want_grads, ("xm", "v", "lss"), strict=True):
        _close(got, want_g, p["dtype"], f"d{name}")


# ---------------------------------------------------------------------------------------------
# cpu backend


@needs_cpu
@settings(SETTINGS, max_examples=CPU_EXAMPLES["hash"])
@given(p=problems(CPU))
def test_cpu_sblsh_hash(p):
    _check_hash(CPU, p)


@needs_cpu
@settings(SETTINGS, max_examples=CPU_EXAMPLES["sort"])
@given(p=problems(CPU), n_buckets=st.integers(1, 40), index_dtype=st.sampled_from([torch.int64, torch.int32]))
def test_cpu_bucket_sort(p, n_buckets, index_dtype):
    _check_sort(CPU, p, n_buckets, index_dtype)


@needs_cpu
@settings(SETTINGS, max_examples=CPU_EXAMPLES["chunk"])
@given(p=problems(CPU), perm_kind=st.sampled_from(["random", "sorted codes"]),
       index_dtype=st.sampled_from([torch.int64, torch.int32]))
def test_cpu_chunk_attention(p, perm_kind, index_dtype):
    _check_chunk_attention(CPU, p, perm_kind, index_dtype)


@needs_cpu
@settings(SETTINGS, max_examples=CPU_EXAMPLES["gla"])
@given(p=problems(CPU))
def test_cpu_gla_attention(p):
    _check_gla(CPU, p)


@needs_cpu
@settings(SETTINGS, max_examples=CPU_EXAMPLES["combine"])
@given(p=problems(CPU), contiguous=st.booleans())
def test_cpu_combine_rounds(p, contiguous):
    """combine_rounds is the one op that takes non-contiguous tensors."""
    gen = torch.Generator().manual_seed(p["seed"])
    n, rounds, length, cv = p["n"], p["rounds"], p["length"], p["cv"]
    out64 = torch.randn(n, rounds, length, cv, generator=gen, dtype=torch.float64)
    lse64 = torch.randn(n, rounds, length, generator=gen, dtype=torch.float64) * p["scale"]
    out, lse = out64.to(p["dtype"]), lse64.to(p["dtype"])
    if not contiguous:  # same values, transposed storage (still contiguous when R or L is 1)
        out = out.transpose(1, 2).contiguous().transpose(1, 2)
        lse = lse.transpose(1, 2).contiguous().transpose(1, 2)
    exact = [t.requires_grad_() for t in (out64, lse64)]
    want = ref.combine_rounds(*exact)
    g = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    want_grads = torch.autograd.grad((want * g).sum(), exact)
    leaves = [t.requires_grad_() for t in (out, lse)]
    y = dk.combine_rounds(*leaves, backend="cpu")
    _close(y, want, p["dtype"], "y")
    grads = torch.autograd.grad((y * g.to(y.dtype)).sum(), leaves)
    for got, want_g, name in zip(grads, want_grads, ("out", "lse"), strict=True):
        _close(got, want_g, p["dtype"], f"d{name}")


# ---------------------------------------------------------------------------------------------
# triton backend (interpreter on CPU tensors without a GPU)


@needs_triton
@settings(TRITON_SETTINGS, max_examples=TRITON_EXAMPLES["hash"])
@given(p=problems(TRITON))
def test_triton_sblsh_hash(p):
    _check_hash(TRITON, p)


@needs_triton
@settings(TRITON_SETTINGS, max_examples=TRITON_EXAMPLES["sort"])
@given(p=problems(TRITON), n_buckets=st.integers(1, 40), index_dtype=st.sampled_from([torch.int64, torch.int32]))
def test_triton_bucket_sort(p, n_buckets, index_dtype):
    _check_sort(TRITON, p, n_buckets, index_dtype)


@needs_triton
@settings(TRITON_SETTINGS, max_examples=TRITON_EXAMPLES["chunk"])
@given(p=problems(TRITON), perm_kind=st.sampled_from(["random", "sorted codes"]),
       index_dtype=st.sampled_from([torch.int64, torch.int32]))
def test_triton_chunk_attention(p, perm_kind, index_dtype):
    _check_chunk_attention(TRITON, p, perm_kind, index_dtype)


@needs_triton
@settings(TRITON_SETTINGS, max_examples=TRITON_EXAMPLES["gla"])
@given(p=problems(TRITON))
def test_triton_gla_attention(p):
    _check_gla(TRITON, p)
