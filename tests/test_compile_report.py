"""The Triton kernels' code shape on Hopper, read offline: tensor cores, no spills, shared memory that fits.

Compiles the training-shape kernels for sm_90 in bfloat16 and in float32 with TF32 (``bench.compile_report``,
in a subprocess: it needs the Triton interpreter off). This keeps the GPU path fast between GPU runs: a change
that makes a hot kernel spill or fall back to FFMA fails here, on a machine without a GPU.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

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
