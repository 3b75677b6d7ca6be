"""The CUDA kernels, run on the CPU through the SIMT emulator of tests/cuda_emulation.

The kernels in csrc/cuda/*_tc.cuh (tensor cores) and chunk_attention_fwd_simt.cuh (the scalar IEEE float32
forward) are torch-free templates; the harness compiles them with the host compiler,
each CUDA thread a fiber, mma.sync and ldmatrix emulated from the PTX fragment layouts. This checks their
index math (slots, padding, adjacent chunks, tiles, column slices), fragment layouts, staging and
synchronisation against the reference on machines without a GPU. It cannot see timing, the real
instructions' rounding, or races the emulator's schedule does not produce: tests/test_cuda.py does, on a GPU.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.cpp_extension import include_paths

from dlsn_kernels import reference as ref

from .helpers import CASES as SHARED_CASES
from .helpers import TILE_CASES, Case, make_inputs, rel_err, tolerance

pytestmark = pytest.mark.slow  # every CUDA thread a fiber: about a minute

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent / "cuda_emulation"

# the harness's dtype names; float32 runs the TF32 kernels
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _tolerance(dtype: str, grad: bool = False) -> float:
    return tolerance(DTYPES[dtype], grad=grad, tf32=dtype == "fp32")

# The small shared cases that exercise both staging paths (odd widths: plain loads; 16-byte rows: cp.async)
# and the cases around the tensor-core kernels' tiles (emulating the two largest would take minutes).
CASES = [SHARED_CASES[0], Case(2, 13, 8, 2, 16, 24), SHARED_CASES[3], *TILE_CASES[1:4]]


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        pytest.skip(f"no host C++ compiler ({compiler})")
    exe = tmp_path_factory.mktemp("emulator") / "harness"
    flags = [f"-I{p}" for p in include_paths()] + [f"-I{ROOT / 'csrc'}"]
    cmd = [compiler, "-std=c++17", "-O1", "-DDLSN_SIMT_EMULATION", *flags, str(HERE / "harness.cpp"),
           "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return exe


def _run(harness: Path, tmp: Path, what: str, dtype: str, case: Case, last: int, copies: str = "deferred",
         **tensors) -> None:
    """copies: when the emulator lands cp.async copies: "eager" (at issue: catches a copy into a buffer that
    other threads still read) or "deferred" (at the wait: catches a read before the wait)."""
    for name, t in tensors.items():
        if t is not None:  # lss=None: no file, the harness runs the kernels without the learned score
            t.detach().to(torch.int64 if name == "perm" else torch.float32).numpy().tofile(tmp / name)
    sizes = (case.n, case.length, case.cm, case.cv, case.chunk, case.rounds, last)
    args = [str(harness), what, dtype, *(str(s) for s in sizes), repr(ref.KEY_NORM_EPS), str(tmp)]
    env = {**os.environ, "DLSN_SIMT_ASYNC": copies}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr


def _read(tmp: Path, name: str, *shape: int) -> torch.Tensor:
    return torch.from_numpy(np.fromfile(tmp / name, dtype=np.float32).reshape(shape))


def _run_forward(harness: Path, tmp: Path, dtype: str, case: Case, xm, v, lss, perm, merge: bool,
                 copies: str = "deferred", kernel: str = "forward"):
    """kernel: "forward" (tensor cores) or "scalar" (the IEEE float32 kernel; dtype fp32)."""
    tmp.mkdir(parents=True, exist_ok=True)
    _run(harness, tmp, kernel, dtype, case, int(merge), copies, xm=xm, v=v, lss=lss, perm=perm)
    rounds = 1 if merge else case.rounds
    shape = (case.n, case.length, case.cv) if merge else (case.n, case.rounds, case.length, case.cv)
    out = _read(tmp, "out", *shape)
    lse = _read(tmp, "lse", case.n, rounds, case.length)
    return out, lse.squeeze(1) if merge else lse


def _inputs(case: Case, dtype: torch.dtype, seed: int = 0):
    xm, v, lss, _, perm = make_inputs(case, dtype=torch.float64, seed=seed)
    # the kernel sees the inputs rounded to its dtype; the reference gets the same values in float64
    return tuple(t.to(dtype).double() for t in (xm, v, lss)) + (perm,)


@pytest.mark.parametrize("copies", ["eager", "deferred"])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_matches_reference(harness, tmp_path, dtype, case, copies):
    tol = _tolerance(dtype)
    xm, v, lss, perm = _inputs(case, DTYPES[dtype])
    out, lse = _run_forward(harness, tmp_path, dtype, case, xm, v, lss, perm, merge=False, copies=copies)
    want_out, want_lse = ref.chunk_attention(xm, v, lss, perm, case.chunk)
    assert rel_err(out, want_out) < tol
    assert (lse.double() - want_lse).abs().max() < tol * want_lse.abs().max().clamp_min(1)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=str)
def test_merged_rounds_match_reference(harness, tmp_path, dtype, case):
    """gla_attention's launch: one round per launch, folded into the running (y, lse) in float32."""
    tol = _tolerance(dtype)
    xm, v, lss, perm = _inputs(case, DTYPES[dtype], seed=1)
    y, lse = _run_forward(harness, tmp_path, dtype, case, xm, v, lss, perm, merge=True)
    out, lse_r = ref.chunk_attention(xm, v, lss, perm, case.chunk)
    assert rel_err(y, ref.combine_rounds(out, lse_r)) < tol
    assert (lse.double() - torch.logsumexp(lse_r, dim=1)).abs().max() < tol * lse_r.abs().max().clamp_min(1)


# Measured worst gradient errors: bf16 3.7e-3, fp16 5.4e-4, TF32 7.6e-3 (Cm = 70).


# (case, dtype, gla_attention's R' = 1, when copies land); bf16 runs the double-buffered tiles both ways
BACKWARD = (
    [(case, dtype, False, "deferred") for case in CASES for dtype in sorted(DTYPES)]
    + [(case, "bf16", False, "eager") for case in CASES]
    + [(case, dtype, True, "deferred") for case in (CASES[1], CASES[3], CASES[5]) for dtype in ("bf16", "fp32")]
)


@pytest.mark.parametrize(("case", "dtype", "merged", "copies"), BACKWARD,
                         ids=[f"{c}-{d}-{'gla' if m else 'chunk'}-{cp}" for c, d, m, cp in BACKWARD])
def test_backward_matches_reference(harness, tmp_path, dtype, case, merged, copies):
    """attention_backward's tensor-core path: dq, dv and score passes per round, scatter, finish."""
    torch_dtype = DTYPES[dtype]
    xm, v, lss, perm = _inputs(case, torch_dtype, seed=2)
    leaves = [t.clone().requires_grad_(True) for t in (xm, v, lss)]
    out, lse = ref.chunk_attention(*leaves, perm, case.chunk)
    gen = torch.Generator().manual_seed(3)
    if merged:  # gla_attention: one softmax over every round's keys, R' = 1
        y = ref.combine_rounds(out, lse)
        grad = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(torch_dtype).double()
        y.backward(grad)
        grad_in, delta, lse_in = grad[:, None], (grad * y).sum(-1)[:, None], torch.logsumexp(lse, 1)[:, None]
    else:
        grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(torch_dtype).double()
        out.backward(grad)
        grad_in, delta, lse_in = grad, (grad * out).sum(-1), lse
    _run(harness, tmp_path, "backward", dtype, case, grad_in.shape[1], copies, xm=xm, v=v, lss=lss, perm=perm,
         grad_out=grad_in, delta=delta, lse=lse_in)
    for name, leaf, width in (("dxm", leaves[0], case.cm), ("dv", leaves[1], case.cv), ("dlss", leaves[2], case.chunk)):
        got = _read(tmp_path, name, case.n, case.length, width)
        assert rel_err(got, leaf.grad) < _tolerance(dtype, grad=True), name


# ---------------------------------------------------------------- the hash kernel (csrc/cuda/sblsh_hash.cuh)

# (N, L, Cm, R, B): 16-byte rows of 32 channels (vector loads) and odd widths (element loads), a partial channel
# step (Cm = 40), a partial last block of 64 positions, and several 64-bucket tiles (B = 130).
HASH_CASES = [(2, 50, 32, 3, 7), (1, 70, 19, 2, 130), (3, 9, 40, 1, 64), (1, 5, 8, 2, 1)]


def _run_hash(harness: Path, tmp: Path, dtype: str, xm: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    xm.float().numpy().tofile(tmp / "xm")
    rot.float().numpy().tofile(tmp / "rot")
    (n, length, cm), (_, rounds, buckets) = xm.shape, rot.shape
    args = [str(harness), "hash", dtype, *(str(s) for s in (n, length, cm, rounds, buckets, 0, 0)), "0", str(tmp)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return _read(tmp, "codes", n, rounds, length).long()


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("shape", HASH_CASES, ids=str)
def test_hash_matches_reference(harness, tmp_path, dtype, shape):
    """Where the best bucket leads by a clear margin the code is the float64 argmax; elsewhere it is within
    float32 rounding of the best."""
    n, length, cm, rounds, buckets = shape
    gen = torch.Generator().manual_seed(4)
    xm = torch.randn(n, length, cm, generator=gen).to(DTYPES[dtype])
    rot = torch.randn(cm, rounds, buckets, generator=gen).to(DTYPES[dtype])
    codes = _run_hash(harness, tmp_path, dtype, xm, rot)
    proj = torch.einsum("nlc,crb->nrlb", xm.double(), rot.double())
    tol = 1e-5 * float(proj.abs().amax().clamp_min(1e-30))
    assert bool((proj.gather(-1, codes.unsqueeze(-1)).squeeze(-1) >= proj.amax(-1) - tol).all())
    top2 = proj.topk(min(2, buckets), dim=-1).values
    clear = (top2[..., 0] - top2[..., -1] > tol) | (buckets == 1)
    assert torch.equal(codes[clear], proj.argmax(-1)[clear])


def test_hash_ties_and_nans_follow_torch_argmax(harness, tmp_path):
    """Equal projections: the lowest bucket, also across the 16 threads of a row and across bucket tiles;
    a NaN projection beats every number, and the first NaN stays."""
    gen = torch.Generator().manual_seed(5)
    xm = torch.randn(1, 70, 8, generator=gen).abs()
    rot = torch.randn(8, 3, 130, generator=gen)
    rot[:, 0, 77] = rot[:, 0, 9] = 10.0  # round 0: buckets 9 and 77 (another thread, another tile) tie
    rot[:, 1, 100] = float("nan")  # round 1: NaN in bucket 100, then 120
    rot[:, 1, 120] = float("nan")
    rot[:, 2] = 1.0  # round 2: everything ties
    codes = _run_hash(harness, tmp_path, "fp32", xm, rot)
    assert codes[:, 0].unique().tolist() == [9]
    assert codes[:, 1].unique().tolist() == [100]
    assert codes[:, 2].unique().tolist() == [0]
    want = torch.argmax(torch.einsum("nlc,crb->nrlb", xm, rot), dim=-1)
    assert torch.equal(codes, want)


# ---------------------------------------------------------------- the scalar forward (chunk_attention_fwd_simt.cuh)


@pytest.mark.parametrize("merge", [False, True], ids=["chunk", "gla"])
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3], CASES[4]], ids=str)
def test_scalar_forward_matches_reference(harness, tmp_path, case, merge):
    """The IEEE float32 kernel (float32 under "highest", GPUs before sm_80): per round and rounds merged."""
    xm, v, lss, perm = _inputs(case, torch.float32, seed=6)
    out, lse = _run_forward(harness, tmp_path, "fp32", case, xm, v, lss, perm, merge=merge, kernel="scalar")
    want_out, want_lse = ref.chunk_attention(xm, v, lss, perm, case.chunk)
    if merge:
        want_out, want_lse = ref.combine_rounds(want_out, want_lse), torch.logsumexp(want_lse, dim=1)
    assert rel_err(out, want_out) < 1e-5
    assert (lse.double() - want_lse).abs().max() < 1e-5 * want_lse.abs().max().clamp_min(1)


# ---------------------------------------------------------------- without the learned score (lss=None, issue 27)

# (kernel, dtype): the tensor-core forward in each dtype and the scalar one
FORWARD_KERNELS = [("forward", d) for d in sorted(DTYPES)] + [("scalar", "fp32")]


@pytest.mark.parametrize("merge", [False, True], ids=["chunk", "gla"])
@pytest.mark.parametrize(("kernel", "dtype"), FORWARD_KERNELS, ids=[f"{k}-{d}" for k, d in FORWARD_KERNELS])
@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=str)
def test_forward_without_lss(harness, tmp_path, case, kernel, dtype, merge):
    """lss=None: no lss tiles or loads (kHasLss = false; nullptr in the scalar kernel), the bits of lss = zeros,
    and the reference's scores q . k_hat."""
    xm, v, lss, perm = _inputs(case, DTYPES[dtype], seed=7)
    run = functools.partial(_run_forward, harness, dtype=dtype, case=case, xm=xm, v=v, perm=perm, merge=merge,
                            kernel=kernel)
    out, lse = run(tmp_path / "none", lss=None)
    out0, lse0 = run(tmp_path / "zeros", lss=torch.zeros_like(lss))
    assert torch.equal(out, out0) and torch.equal(lse, lse0)
    want_out, want_lse = ref.chunk_attention(xm, v, None, perm, case.chunk)
    if merge:
        want_out, want_lse = ref.combine_rounds(want_out, want_lse), torch.logsumexp(want_lse, dim=1)
    tol = _tolerance(dtype)
    assert rel_err(out, want_out) < tol
    assert (lse.double() - want_lse).abs().max() < tol * want_lse.abs().max().clamp_min(1)


def _backward_inputs(case: Case, dtype: str, lss: torch.Tensor | None, merged: bool, seed: int):
    """(xm, v, perm, grad_out, delta, lse and the reference's leaves) for the backward harness."""
    torch_dtype = DTYPES[dtype]
    xm, v, lss_full, perm = _inputs(case, torch_dtype, seed=seed)
    lss = lss_full if lss is None else lss
    leaves = [t.clone().requires_grad_(True) for t in (xm, v)]
    out, lse = ref.chunk_attention(*leaves, None, perm, case.chunk)
    gen = torch.Generator().manual_seed(seed + 1)
    if merged:
        y = ref.combine_rounds(out, lse)
        grad = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(torch_dtype).double()
        y.backward(grad)
        return xm, v, perm, grad[:, None], (grad * y).sum(-1)[:, None], torch.logsumexp(lse, 1)[:, None], leaves
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(torch_dtype).double()
    out.backward(grad)
    return xm, v, perm, grad, (grad * out).sum(-1), lse, leaves


NO_LSS_BACKWARD = [(c, d, False) for c in (CASES[1], CASES[3]) for d in sorted(DTYPES)] + [
    (CASES[3], d, True) for d in ("bf16", "fp32")]


@pytest.mark.parametrize(("case", "dtype", "merged"), NO_LSS_BACKWARD,
                         ids=[f"{c}-{d}-{'gla' if m else 'chunk'}" for c, d, m in NO_LSS_BACKWARD])
def test_backward_without_lss(harness, tmp_path, case, dtype, merged):
    """lss=None: the kHasLss = false passes write no dlss (no buffers at all), and dxm, dv are the bits of the
    lss = zeros run and the reference's gradients of q . k_hat."""
    xm, v, perm, grad, delta, lse, leaves = _backward_inputs(case, dtype, None, merged, seed=8)
    grads = {}
    for name, lss in (("none", None), ("zeros", torch.zeros(case.n, case.length, case.chunk))):
        tmp = tmp_path / name
        tmp.mkdir()
        _run(harness, tmp, "backward", dtype, case, grad.shape[1], xm=xm, v=v, lss=lss, perm=perm, grad_out=grad,
             delta=delta, lse=lse)
        grads[name] = {g: _read(tmp, g, case.n, case.length, w) for g, w in (("dxm", case.cm), ("dv", case.cv))}
        assert (tmp / "dlss").exists() == (lss is not None)
    for g in ("dxm", "dv"):
        assert torch.equal(grads["none"][g], grads["zeros"][g]), g
    tol = _tolerance(dtype, grad=True)
    assert rel_err(grads["none"]["dxm"], leaves[0].grad) < tol
    assert rel_err(grads["none"]["dv"], leaves[1].grad) < tol


# ---------------------------------------------------------------- extreme magnitudes (issue 25 item 4)


def _scaled_xm(xm: torch.Tensor, how: str) -> torch.Tensor:
    """xm * 1e30, xm * 1e-30, or rows of both, of 1 and a zero row mixed (as tests/test_extreme_values.py)."""
    if how == "huge":
        return xm * 1e30
    if how == "tiny":
        return xm * 1e-30
    xm = xm.clone()
    xm[:, ::2] *= 1e30
    xm[:, 1::4] *= 1e-30
    xm[:, 3] = 0
    return xm


# float16 cannot hold 1e30 (its rows never overflow the products): only its tiny case
EXTREME = [(k, d, h) for k, d in FORWARD_KERNELS for h in ("huge", "tiny", "mixed") if d != "fp16" or h == "tiny"]


@pytest.mark.parametrize(("kernel", "dtype", "how"), EXTREME, ids=[f"{k}-{d}-{h}" for k, d, h in EXTREME])
def test_forward_extreme_magnitudes(harness, tmp_path, kernel, dtype, how):
    """xm * 1e30 gives the reference's one-hot softmax (query rows scaled by 2^-q_exp, key norms summed scaled)
    instead of overflowing q . key; xm * 1e-30 the reference's near-uniform one; with and without lss."""
    case = CASES[2]  # two chunks, padded
    xm, v, lss, perm = _inputs(case, torch.float64, seed=9)
    xm = _scaled_xm(xm, how).to(DTYPES[dtype]).double()
    tol = _tolerance(dtype)
    for name, learned in (("lss", lss), ("none", None)):
        out, lse = _run_forward(harness, tmp_path / name, dtype, case, xm, v, learned, perm, merge=False,
                                kernel=kernel)
        want_out, want_lse = ref.chunk_attention(xm, v, learned, perm, case.chunk)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all()
        assert rel_err(out, want_out) < tol, name
        assert ((lse.double() - want_lse).abs() <= tol * want_lse.abs().clamp_min(1)).all(), name
        if how == "huge":  # one-hot: the value row of the best key, exactly (as a TF32 operand in the TF32 kernel)
            want = want_out.to(DTYPES[dtype])
            if kernel == "forward" and dtype == "fp32":
                want = _tf32(want)
            assert torch.equal(out, want.float()), name


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 rounded to TF32 as cvt.rna.tf32.f32 does (nearest, ties away; 10 mantissa bits)."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


# ---------------------------------------------------------------- no value channels (Cv = 0)

NO_VALUES = Case(2, 13, 8, 2, 16, 0)


@pytest.mark.parametrize("merge", [False, True], ids=["chunk", "gla"])
@pytest.mark.parametrize(("kernel", "dtype"), FORWARD_KERNELS, ids=[f"{k}-{d}" for k, d in FORWARD_KERNELS])
def test_forward_without_value_channels_writes_lse(harness, tmp_path, kernel, dtype, merge):
    """Cv = 0: no output row, but every lse (per round and merged) is written, as the reference computes it."""
    xm, v, lss, perm = _inputs(NO_VALUES, DTYPES[dtype])
    _, lse = _run_forward(harness, tmp_path, dtype, NO_VALUES, xm, v, lss, perm, merge=merge, kernel=kernel)
    want = ref.chunk_attention(xm, v, lss, perm, NO_VALUES.chunk)[1]
    want = torch.logsumexp(want, dim=1) if merge else want
    assert (lse.double() - want).abs().max() < _tolerance(dtype) * want.abs().max().clamp_min(1)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_backward_without_value_channels(harness, tmp_path, dtype):
    """Cv = 0: the gradients of xm and lss through lse alone (delta = -grad_lse, an empty grad_out)."""
    xm, v, lss, perm = _inputs(NO_VALUES, DTYPES[dtype], seed=2)
    leaves = [t.clone().requires_grad_(True) for t in (xm, v, lss)]
    out, lse = ref.chunk_attention(*leaves, perm, NO_VALUES.chunk)
    grad_lse = torch.randn(lse.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (lse * grad_lse).sum().backward()
    _run(harness, tmp_path, "backward", dtype, NO_VALUES, NO_VALUES.rounds, xm=xm, v=v, lss=lss, perm=perm,
         grad_out=torch.zeros(out.shape, dtype=torch.float64), delta=-grad_lse, lse=lse)
    for name, leaf, width in (("dxm", leaves[0], NO_VALUES.cm), ("dlss", leaves[2], NO_VALUES.chunk)):
        got = _read(tmp_path, name, NO_VALUES.n, NO_VALUES.length, width)
        assert rel_err(got, leaf.grad) < _tolerance(dtype, grad=True), name
