"""Op registration (opcheck, torch.compile), backend choice, and errors on bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import dlsn_kernels as dk
from tests.helpers import CASES, make_inputs, rel_err

CPU_REASON = dk.available_backends("cpu")["cpu"].reason
needs_cpu = pytest.mark.skipif(CPU_REASON is not None, reason=f"compiled extension not built: {CPU_REASON}")


@needs_cpu
@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=str)
def test_opcheck_every_op(case):
    xm, v, lss, rot, perm = make_inputs(case, torch.float64)
    codes = dk.sblsh_hash(xm, rot, backend="cpu")
    out, lse = torch.ops.dlsn.chunk_attention(xm, v, lss, perm, case.chunk)
    grad_out = torch.randn_like(out)
    delta = torch.randn_like(lse)
    samples = {
        torch.ops.dlsn.sblsh_hash.default: (xm, rot),
        torch.ops.dlsn.bucket_sort.default: (codes, rot.shape[-1]),
        torch.ops.dlsn.chunk_attention.default: (
            xm.requires_grad_(), v.requires_grad_(), lss.requires_grad_(), perm, case.chunk
        ),
        torch.ops.dlsn.gla_attention.default: (xm, v, lss, rot, case.chunk),
        torch.ops.dlsn.attention_backward.default: (
            grad_out, delta, xm.detach(), v.detach(), lss.detach(), perm, lse, case.chunk
        ),
    }
    samples[torch.ops.dlsn.combine_rounds.default] = (out.detach().requires_grad_(), lse)
    for op, args in samples.items():
        torch.library.opcheck(op, args)


@needs_cpu
def test_torch_compile_fullgraph():
    case = CASES[5]
    xm, v, lss, rot, _perm = make_inputs(case, torch.float32, requires_grad=True)

    def attention(xm_, v_, lss_):
        return dk.gla_attention(xm_, v_, lss_, rot, case.chunk, backend="cpu") * 2.0

    compiled = torch.compile(attention, fullgraph=True)  # inductor: generates C++ around the op
    y = compiled(xm, v, lss)
    assert rel_err(y, attention(xm, v, lss)) < 1e-6
    (g,) = torch.autograd.grad(y.sum(), xm)
    (g_eager,) = torch.autograd.grad(attention(xm, v, lss).sum(), xm)
    assert rel_err(g, g_eager) < 1e-5


def test_reference_backend_always_available():
    assert dk.available_backends("cpu")["reference"].usable
    assert str(dk.available_backends("cpu")["reference"]).startswith("available")


def test_unknown_backend_lists_choices():
    xm, v, lss, rot, _ = make_inputs(CASES[0])
    with pytest.raises(ValueError, match="reference, cpu, cuda, triton"):
        dk.gla_attention(xm, v, lss, rot, CASES[0].chunk, backend="fast")


def test_unavailable_backend_says_why_for_every_backend():
    xm, v, lss, rot, _ = make_inputs(CASES[0])
    with pytest.raises(dk.BackendUnavailableError) as info:
        dk.gla_attention(xm, v, lss, rot, CASES[0].chunk, backend="cuda")
    text = str(info.value)
    for name in dk.BACKENDS:
        assert f"  {name}:" in text


def test_env_variable_picks_backend(monkeypatch):
    """$DLSN_BACKEND is read once per process (at import; ``_dispatch.reset()`` reads it again)."""
    from dlsn_kernels import _dispatch

    xm, v, lss, rot, _ = make_inputs(CASES[0])
    monkeypatch.setenv("DLSN_BACKEND", "cuda")
    _dispatch.reset()
    try:
        with pytest.raises(dk.BackendUnavailableError, match="'cuda'"):
            dk.gla_attention(xm, v, lss, rot, CASES[0].chunk)
        monkeypatch.setenv("DLSN_BACKEND", "reference")
        _dispatch.reset()
        assert dk.gla_attention(xm, v, lss, rot, CASES[0].chunk).shape == v.shape
    finally:
        monkeypatch.delenv("DLSN_BACKEND")
        _dispatch.reset()


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, whatever the backend.

BACKENDS_HERE = ["reference"] + (["cpu"] if CPU_REASON is None else [])


@pytest.fixture(params=BACKENDS_HERE)
def backend(request):
    return request.param


def _inputs():
    case = CASES[3]
    xm, v, lss, rot, perm = make_inputs(case, torch.float32)
    return case.chunk, xm, v, lss, rot, perm


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda a: a.update(xm=a["xm"][0]), r"xm must have shape \[N, L, Cm\]"),
        (lambda a: a.update(v=a["v"][:, :-1]), "v must have shape"),
        (lambda a: a.update(v=torch.cat([a["v"], a["v"]])), "v must have shape"),
        (lambda a: a.update(lss=a["lss"][..., :-1]), "lss must have shape"),
        (lambda a: a.update(chunk=0), "chunk_size must be >= 1"),
        (lambda a: a.update(v=a["v"].double()), "v is torch.float64 but xm is torch.float32"),
        (lambda a: a.update(perm=a["perm"][:, :, :-1]), "perm must have shape"),
        (lambda a: a.update(perm=a["perm"].float()), "perm must be int32 or int64"),
        (lambda a: a.update(perm=a["perm"] + 1), r"perm must hold positions in \[0, L"),
        (lambda a: a.update(lss=a["lss"].to("meta")), "lss is on meta"),
    ],
)
def test_chunk_attention_rejects(backend, mutate, match):
    chunk, xm, v, lss, _rot, perm = _inputs()
    args = {"xm": xm, "v": v, "lss": lss, "perm": perm, "chunk": chunk}
    mutate(args)
    with pytest.raises(ValueError, match=match):
        dk.chunk_attention(args["xm"], args["v"], args["lss"], args["perm"], args["chunk"], backend=backend)


def test_16bit_cpu_tensors_run_on_the_cpu_backend_and_other_dtypes_are_refused():
    """float16/bfloat16 CPU tensors are computed (tests/test_ops_cpu.py checks the values); the error for a
    dtype no backend takes names the ones it does, in Python and in C++ alike."""
    if CPU_REASON is not None:
        pytest.skip(f"compiled extension not built: {CPU_REASON}")
    chunk, xm, v, lss, rot, perm = _inputs()
    for dtype in (torch.float16, torch.bfloat16):
        y = dk.gla_attention(xm.to(dtype), v.to(dtype), lss.to(dtype), rot.to(dtype), chunk, backend="cpu")
        assert y.dtype == dtype
    wanted = "must be float32, float64, float16 or bfloat16 on CPU"
    fp8 = [t.to(torch.float8_e4m3fn) for t in (xm, v, lss)]
    with pytest.raises(ValueError, match=wanted):
        dk.chunk_attention(*fp8, perm, chunk, backend="cpu")
    with pytest.raises(RuntimeError, match=wanted):
        torch.ops.dlsn.chunk_attention(*fp8, perm, chunk)


@pytest.mark.parametrize(
    ("rot_fn", "match"),
    [
        (lambda r: r[:-1], "rot has"),
        (lambda r: r[..., :0], "at least one round and one bucket"),
        (lambda r: r[0], r"rot must have shape \[Cm, R, B\]"),
    ],
)
def test_hash_rejects(backend, rot_fn, match):
    chunk, xm, v, lss, rot, _perm = _inputs()
    with pytest.raises(ValueError, match=match):
        dk.gla_attention(xm, v, lss, rot_fn(rot), chunk, backend=backend)


def test_bucket_sort_rejects(backend):
    codes = torch.tensor([[[0, 1, 2]]])
    with pytest.raises(ValueError, match=r"n_buckets must be in \[1, 2\^24 = 16777216\], got 0"):
        dk.bucket_sort(codes, 0, backend=backend)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, n_buckets=2\)"):
        dk.bucket_sort(codes, 2, backend=backend)
    with pytest.raises(ValueError, match="codes must be int32 or int64"):
        dk.bucket_sort(codes.float(), 3, backend=backend)


@needs_cpu
def test_compiled_ops_check_arguments_themselves():
    """Calling torch.ops.dlsn directly (no Python checks) still gives a clear error, not a crash."""
    chunk, xm, v, lss, rot, perm = _inputs()
    with pytest.raises(RuntimeError, match="lss must have shape"):
        torch.ops.dlsn.chunk_attention(xm, v, lss[..., :-1].contiguous(), perm, chunk)
    with pytest.raises(ValueError, match=r"n_buckets must be in \[1, 2\^24"):
        torch.ops.dlsn.bucket_sort(perm, 0)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, n_buckets=1\): codes\[n=0, round=0, position="):
        torch.ops.dlsn.bucket_sort(perm, 1)
    with pytest.raises(ValueError, match=r"perm must be a permutation of 0\.\.L-1"):
        torch.ops.dlsn.chunk_attention(xm, v, lss, torch.zeros_like(perm), chunk)


@needs_cpu
def test_cuda_build_registers_cuda_kernels_for_every_op():
    """A build that compiled the CUDA kernels (DLSN_WITH_CUDA) registers one for every op, and CI's build
    (which exports DLSN_WITH_CUDA=1) must be such a build: a lost toolkit cannot pass silently."""
    from dlsn_kernels import _C
    from dlsn_kernels._ops import OP_NAMES

    registered = {op: torch._C._dispatch_has_kernel_for_dispatch_key(f"dlsn::{op}", "CUDA") for op in OP_NAMES}
    assert registered == dict.fromkeys(OP_NAMES, bool(_C.WITH_CUDA))
    if os.environ.get("DLSN_WITH_CUDA", "").strip() == "1":
        assert _C.WITH_CUDA == 1, "DLSN_WITH_CUDA=1 is set but the installed extension has no CUDA kernels"


def test_broken_build_says_how_to_build():
    """Without a loadable _C, import still works and asking for a compiled backend says how to build it."""
    code = (
        "import sys; sys.modules['dlsn_kernels._C'] = None\n"
        "import torch, dlsn_kernels as dk\n"
        "assert dk.available_backends()['reference'].usable\n"
        "try:\n"
        "    dk.bucket_sort(torch.zeros(1, 1, 3, dtype=torch.long), 1, backend='cpu')\n"
        "except dk.BackendUnavailableError as e:\n"
        "    print(e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "pip install --no-build-isolation -e ." in result.stdout
