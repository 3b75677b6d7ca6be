"""The GPU kernels' code shape on Hopper, read offline: tensor cores, no spills, shared memory that fits.

Triton: compiles the training-shape kernels for sm_90 in bfloat16 and in float32 with TF32
(``bench.compile_report``, in a subprocess: it needs the Triton interpreter off). CUDA C++: reads the sm_90
code of the built extension with cuobjdump (``bench.compile_report --cuda``). This keeps the GPU path fast
between GPU runs: a change that makes a hot kernel spill or fall back to FFMA fails here, without a GPU.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

pytestmark = pytest.mark.slow  # minutes of sm_90 compiles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOT = {"_chunk_attention_fwd_kernel", "_key_pass"}  # the attention forward and both backward passes


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.compile_report", "--modes", "bf16", "fp32-tf32", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


def test_every_kernel_of_a_training_step_is_compiled(records):
    names = {(r["kernel"], r["dtype"]) for r in records}
    for mode in ("bf16", "fp32-tf32"):
        for kernel in ("_sblsh_hash_kernel", "_chunk_attention_fwd_kernel", "_key_pass", "_position_pass",
                       "_bucket_histogram_kernel", "_bucket_scatter_kernel"):
            assert (kernel, mode) in names
    # every variant a training step launches: the forward per MODE (chunk_attention, first and merged rounds of
    # gla_attention), the key pass per DV_PASS (dv pass, score pass)
    for mode in ("bf16", "fp32-tf32"):
        forward = {r["config"]["MODE"] for r in records if r["kernel"] == "_chunk_attention_fwd_kernel"
                   and r["dtype"] == mode}
        key = {r["config"]["DV_PASS"] for r in records if r["kernel"] == "_key_pass" and r["dtype"] == mode}
        assert forward == {0, 1, 2} and key == {True, False}


def test_no_kernel_spills_or_uses_stack(records):
    for r in records:
        assert r["spill_bytes"] == 0, r
        assert r["stack_bytes"] == 0, r
        assert r["shared_bytes"] <= 227 * 1024, r
        assert r["registers"] <= 255, r


def test_attention_kernels_run_on_tensor_cores(records):
    hot = [r for r in records if r["kernel"] in HOT]
    assert len(hot) == 10  # 3 forward variants and 2 key passes, in two modes
    for r in hot:
        assert r["tensor_core_instructions"] > 0, r
        assert r["precision"] == ("native" if r["dtype"] == "bf16" else "tf32")


# --- the CUDA C++ kernels of the built extension ---------------------------------------------------------

ATTENTION_TC = {"chunk_attention_fwd_tc_kernel", "attention_bwd_dq_tc_kernel", "attention_bwd_keys_tc_kernel"}


@pytest.fixture(scope="module")
def cuda_records():
    ext = pytest.importorskip("dlsn_kernels._C")
    if not getattr(ext, "WITH_CUDA", False):
        pytest.skip("the extension was built without CUDA kernels")
    from bench.compile_report import cuda_kernels

    records = [r for r in cuda_kernels() if r.registers >= 0]
    if not records:
        pytest.skip("the extension holds no sm_90 code (TORCH_CUDA_ARCH_LIST without 9.0)")
    return records


def test_cuda_attention_kernels_run_on_tensor_cores(cuda_records):
    """Every tensor-core attention kernel (forward, dq pass, dv and score passes) in fp16, bf16 and float32 (TF32)
    holds mma instructions, and the float32 instantiation is the TF32 one."""
    tc = [r for r in cuda_records if r.kernel in ATTENTION_TC]
    found = {(r.kernel, r.dtype, r.config["template"].split(", ")[-1]) for r in tc}
    for dtype, name in (("fp16", "Half"), ("bf16", "BFloat16"), ("fp32", "float")):
        assert ("chunk_attention_fwd_tc_kernel", dtype, name) in found
        assert ("attention_bwd_dq_tc_kernel", dtype, name) in found
        assert ("attention_bwd_keys_tc_kernel", dtype, "true") in found  # dv pass
        assert ("attention_bwd_keys_tc_kernel", dtype, "false") in found  # score pass
    for r in tc:
        assert r.tensor_core_instructions > 0, r
        assert r.precision == ("tf32" if r.dtype == "fp32" else "native"), r


def test_cuda_attention_kernels_use_no_local_memory(cuda_records):
    """No spills in any kernel; no stack in the tensor-core attention kernels (the hot path)."""
    for r in cuda_records:
        assert r.spill_bytes == 0, r
        assert r.registers <= 255, r
    for r in cuda_records:
        if r.kernel in ATTENTION_TC:
            assert r.stack_bytes == 0, r


def test_cuda_scalar_attention_kernels_are_float32_only(cuda_records):
    """The scalar attention kernels are the IEEE float32 path: half inputs never reach them (they run on
    tensor cores, or in float32 copies where the tensor-core kernels cannot take them)."""
    scalar = [r for r in cuda_records if r.kernel in
              {"chunk_attention_fwd_kernel", "attention_bwd_dq_kernel", "attention_bwd_keys_kernel"}]
    assert scalar and {r.dtype for r in scalar} == {"fp32"}
