"""The tensor-core CUDA kernels, run on the CPU through the SIMT emulator of tests/cuda_emulation.

The kernels in csrc/cuda/*_tc.cuh are torch-free templates; the harness compiles them with the host compiler,
each CUDA thread a fiber, mma.sync and ldmatrix emulated from the PTX fragment layouts. This checks their
index math (slots, padding, adjacent chunks, tiles, column slices), fragment layouts, staging and
synchronisation against the reference on machines without a GPU. It cannot see timing, the real
instructions' rounding, or races the emulator's schedule does not produce: tests/test_cuda.py does, on a GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.cpp_extension import include_paths

from dlsn_kernels import reference as ref

from .helpers import Case, make_inputs, rel_err

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent / "cuda_emulation"

# dtype of the kernel -> the tolerance of its products: bf16/fp16 operands (P rounded to the input type, as
# FlashAttention does) and TF32 for float32.
DTYPES = {"bf16": (torch.bfloat16, 3e-2), "fp16": (torch.float16, 5e-3), "fp32": (torch.float32, 5e-3)}

# Sizes around the kernel's tiles: 64 query rows and 64 keys per step, 256 value columns per block, channels
# staged 16 bytes at a time (aligned) or one by one (odd widths).
CASES = [
    Case(1, 3, 8, 2, 3, 5),     # L < K/2: positions duplicated in the padding; odd widths, plain loads
    Case(2, 13, 8, 2, 16, 24),  # two chunks, padded; aligned rows (cp.async path)
    Case(1, 40, 8, 1, 7, 9),    # five chunks
    Case(1, 150, 70, 2, 32, 40),  # K > 64: two query tiles, 3K = 210 keys in four steps, partial tiles
    Case(1, 30, 24, 1, 20, 300),  # Cv > 256: two column slices, the second partial; 3K = 72 keys
]


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        pytest.skip(f"no host C++ compiler ({compiler})")
    exe = tmp_path_factory.mktemp("emulator") / "forward_harness"
    flags = [f"-I{p}" for p in include_paths()] + [f"-I{ROOT / 'csrc'}"]
    cmd = [compiler, "-std=c++17", "-O1", "-DDLSN_SIMT_EMULATION", *flags, str(HERE / "forward_harness.cpp"),
           "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return exe


def _run_forward(harness: Path, tmp: Path, dtype: str, case: Case, xm, v, lss, perm, merge: bool):
    for name, t in (("xm", xm), ("v", v), ("lss", lss)):
        t.float().numpy().tofile(tmp / name)
    perm.long().numpy().tofile(tmp / "perm")
    args = [str(harness), dtype, *(str(s) for s in (case.n, case.length, case.cm, case.cv, case.chunk, case.rounds)),
            str(int(merge)), repr(ref.KEY_NORM_EPS), str(tmp)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rounds = 1 if merge else case.rounds
    shape = (case.n, case.length, case.cv) if merge else (case.n, case.rounds, case.length, case.cv)
    out = torch.from_numpy(np.fromfile(tmp / "out", dtype=np.float32).reshape(shape))
    lse = torch.from_numpy(np.fromfile(tmp / "lse", dtype=np.float32).reshape(case.n, rounds, case.length))
    return out, lse.squeeze(1) if merge else lse


def _inputs(case: Case, dtype: torch.dtype, seed: int = 0):
    xm, v, lss, _, perm = make_inputs(case, dtype=torch.float64, seed=seed)
    # the kernel sees the inputs rounded to its dtype; the reference gets the same values in float64
    return tuple(t.to(dtype).double() for t in (xm, v, lss)) + (perm,)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_matches_reference(harness, tmp_path, dtype, case):
    torch_dtype, tol = DTYPES[dtype]
    xm, v, lss, perm = _inputs(case, torch_dtype)
    out, lse = _run_forward(harness, tmp_path, dtype, case, xm, v, lss, perm, merge=False)
    want_out, want_lse = ref.chunk_attention(xm, v, lss, perm, case.chunk)
    assert rel_err(out, want_out) < tol
    assert (lse.double() - want_lse).abs().max() < tol * want_lse.abs().max().clamp_min(1)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=str)
def test_merged_rounds_match_reference(harness, tmp_path, dtype, case):
    """gla_attention's launch: one round per launch, folded into the running (y, lse) in float32."""
    torch_dtype, tol = DTYPES[dtype]
    xm, v, lss, perm = _inputs(case, torch_dtype, seed=1)
    y, lse = _run_forward(harness, tmp_path, dtype, case, xm, v, lss, perm, merge=True)
    out, lse_r = ref.chunk_attention(xm, v, lss, perm, case.chunk)
    assert rel_err(y, ref.combine_rounds(out, lse_r)) < tol
    assert (lse.double() - torch.logsumexp(lse_r, dim=1)).abs().max() < tol * lse_r.abs().max().clamp_min(1)
