"""The static SASS budget of the CUDA tensor-core kernels (issue 18), read offline from the built extension.

``bench.cuda_sass_report`` counts the instructions of every kernel with cuobjdump, in the sm_80 (A100, and the
sm_86/89 cards that run sm_80 code) and sm_90 code of the extension (built for ``8.0;9.0;10.0+PTX`` by default).
The tensor-core attention kernels (bfloat16, float16 and TF32; with and without the learned score, issue 27)
must stay at or under 50 static instructions per HMMA, over the whole kernel and in the main loop (the 16-bit
ones were 98-103 before the staging kept its address math in 32 bits without divisions; the TF32 score and dq
passes 50.1 and 50.7 on sm_90 before a padded slot's position took one unsigned remainder instead of two signed
ones), and no kernel may use local memory. Skipped when the extension has no CUDA kernels or no code for that
architecture.
"""

from __future__ import annotations

import pytest

from bench.cuda_sass_report import loop_figures, sass_records

ATTENTION_TC = {"chunk_attention_fwd_tc_kernel", "attention_bwd_dq_tc_kernel", "attention_bwd_keys_tc_kernel"}
BUDGET = 50.0  # static SASS instructions per HMMA (issue 25's target for the CUDA C++ kernels on sm_80 and sm_90)


@pytest.fixture(scope="module", params=["sm_80", "sm_90"])
def records(request):
    ext = pytest.importorskip("dlsn_kernels._C")
    if not getattr(ext, "WITH_CUDA", False):
        pytest.skip("the extension was built without CUDA kernels")
    try:
        found = sass_records(arch=request.param)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    if not found:
        pytest.skip(f"the extension holds no {request.param} code (TORCH_CUDA_ARCH_LIST without it)")
    return found


def test_tensor_core_kernels_within_budget(records):
    tc = [r for r in records if r.kernel in ATTENTION_TC]
    # forward, dq, dv and score passes, each with and without lss (the last template argument), in bf16, fp16
    # and float32 (TF32)
    assert len(tc) == 24
    assert {r.template.rsplit(",", 1)[-1].strip() for r in tc} == {"true", "false"}
    for r in tc:
        assert r.mma > 0 and r.loop_mma > 0, r
        assert r.per_mma <= BUDGET, r
        assert r.loop_per_mma <= BUDGET, r


def test_no_kernel_uses_local_memory(records, request):
    arch = request.node.callspec.params["records"]
    for r in records:
        assert r.local_bytes == 0, r
        if r.kernel in ATTENTION_TC:
            assert r.stack_bytes == 0, r
        if r.kernel == "sblsh_hash_kernel":  # the scalar hash kernel keeps 8 bytes of stack in its sm_80 code
            assert r.stack_bytes <= (8 if arch == "sm_80" else 0), r


def test_loop_figures_pick_the_loop_with_the_mma():
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0020*/              @P0 BRA 0x10 ;
        /*0030*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0040*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R6.64], P1 ;
        /*0050*/                   NOP ;
        /*0060*/                   HMMA.16816.F32.BF16 R4, R8, R14, R4 ;
        /*0070*/              @P1 BRA 0x30 ;
        /*0080*/                   EXIT ;
    """
    assert loop_figures(sass) == (4, 2, 1)  # 0x30..0x70 without the NOP
