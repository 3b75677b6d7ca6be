"""The GPU kernels' code shape on every target, read offline: tensor cores, no spills, shared memory that fits.

Triton: compiles the training-shape kernels for sm_90 in bfloat16 and in float32 with TF32
(``bench.compile_report``, in a subprocess: it needs the Triton interpreter off), with the Triton installed
here and with Triton 3.6.0, the GPU image's (its own ptxas 12.8), installed by pip into a cache folder put
first on PYTHONPATH for the report alone. The other targets (sm_80, 86, 89, 100, 120, and AMD gfx942 and gfx1100
through Triton's AMD backend) compile the hot kernels in bf16 and float32 (TF32; IEEE on gfx1100) as a launch on
that card would (its capability, its shared memory, the configuration ``dlsn_kernels.targets`` picks there); all
seven together take over 20 minutes on 2 cores, so each CI run takes one of them in rotation, keyed by the commit
(``DLSN_COMPILE_REPORT_ARCHS="80 86 89 100 120 gfx942 gfx1100"`` for all, or any list). The lss-free variants (lss=None,
NLSA: ``HAS_LSS`` false, records ``lss`` false) are compiled for sm_90 and the rotated target under the installed
Triton, not under 3.6.0 (their dots are the GLA kernels', minus the learned-score loads). CUDA C++: reads the
sm_90 code of the built extension with cuobjdump (``bench.compile_report --cuda``). This keeps the GPU path fast
between GPU runs: a change that makes a hot kernel spill, serialize its wgmma (ptxas C7515) or fall back to FFMA
fails here, without a GPU.
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
# every hot kernel of issue 25 (forward, key passes, dq pass, position pass, combine), and those with tensor cores
ALL_HOT = HOT | {"_dq_pass", "_position_pass", "_combine_rounds_kernel"}
TENSOR_CORE = HOT | {"_dq_pass"}
LSS_KERNELS = HOT | {"_position_pass"}  # the kernels that read lss or write dlss: a variant without (HAS_LSS false)
# the targets besides sm_90, one per CI run: NVIDIA (issue 25) and AMD CDNA (gfx942) and RDNA3 (gfx1100) through
# Triton's AMD backend (issue 30)
ROTATION = ("80", "86", "89", "100", "120", "gfx942", "gfx1100")
GPU_IMAGE_TRITON = "3.6.0"
# where pip puts the GPU image's Triton (DLSN_TRITON36_DIR to use another folder, e.g. one CI caches)
TRITON36_DIR = os.environ.get("DLSN_TRITON36_DIR",
                              os.path.join(os.path.expanduser("~"), ".cache", "dlsn-kernels", "triton-3.6.0"))


def _report(tmp_path_factory, *extra: str) -> list[dict]:
    """The report's records for bf16 and TF32 (both learned-score variants unless ``extra`` says ``--lss``)."""
    out = tmp_path_factory.mktemp("compile") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.compile_report", "--modes", "bf16", "fp32-tf32", "--json", str(out), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return _report(tmp_path_factory)


def rotated_archs() -> list[str]:
    """``DLSN_COMPILE_REPORT_ARCHS`` if set, else one target of ROTATION picked by the checked-out commit."""
    chosen = os.environ.get("DLSN_COMPILE_REPORT_ARCHS")
    if chosen:
        return chosen.split()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    key = int(head[:8], 16) if head else 0
    return [ROTATION[key % len(ROTATION)]]


@pytest.fixture(scope="module")
def rotated(tmp_path_factory):
    return _report(tmp_path_factory, "--arch", *rotated_archs(), "--kernels", *sorted(ALL_HOT))


def _triton36() -> str:
    """The folder holding Triton 3.6.0, installed there by pip (no dependencies) if it is not yet."""
    init = os.path.join(TRITON36_DIR, "triton", "__init__.py")
    if not os.path.isfile(init):
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
             "--target", TRITON36_DIR, f"triton=={GPU_IMAGE_TRITON}"],
            capture_output=True, text=True, timeout=900,
        )
        if proc.returncode != 0:
            if any(s in proc.stderr for s in ("NewConnectionError", "Temporary failure in name resolution",
                                              "Could not find a version", "Network is unreachable")):
                pytest.skip(f"pip cannot fetch triton=={GPU_IMAGE_TRITON} here: {proc.stderr.strip()[-300:]}")
            raise AssertionError(proc.stdout + proc.stderr)
    return TRITON36_DIR


@pytest.fixture(scope="module")
def records36(tmp_path_factory):
    return _report(tmp_path_factory, "--triton", _triton36(), "--kernels", *sorted(HOT), "--lss", "with")


def test_every_kernel_of_a_training_step_is_compiled(records):
    names = {(r["kernel"], r["dtype"]) for r in records}
    for mode in ("bf16", "fp32-tf32"):
        for kernel in ("_sblsh_hash_kernel", "_chunk_attention_fwd_kernel", "_key_pass", "_position_pass",
                       "_bucket_histogram_kernel", "_bucket_scatter_kernel", "_combine_rounds_kernel"):
            assert (kernel, mode) in names
    # one forward variant for every round of both ops; the key pass per DV_PASS (dv pass, score pass); each with and
    # without the learned score, which only the kernels that read lss distinguish
    for mode in ("bf16", "fp32-tf32"):
        forward = [r["lss"] for r in records if r["kernel"] == "_chunk_attention_fwd_kernel" and r["dtype"] == mode]
        key = {(r["config"]["DV_PASS"], r["lss"]) for r in records if r["kernel"] == "_key_pass" and r["dtype"] == mode}
        assert sorted(forward) == [False, True] and key == {(p, lss) for p in (True, False) for lss in (True, False)}
        lss_free = {r["kernel"] for r in records if r["dtype"] == mode and not r["lss"]}
        assert lss_free == {"_chunk_attention_fwd_kernel", "_key_pass", "_position_pass"}, lss_free
    assert {r["toolchain"].split(",")[0] for r in records} == {f"triton {__import__('triton').__version__}"}


def test_no_kernel_spills_or_uses_stack(records):
    for r in records:
        assert r["arch"] == "sm_90" and r["shared_limit"] == 227 * 1024, r
        assert r["spill_bytes"] == 0, r
        assert r["stack_bytes"] == 0, r
        assert r["shared_bytes"] <= 227 * 1024, r
        assert r["registers"] <= 255, r
        if r["shared_estimate"]:  # the launch code's bound of the shared memory must not undercut Triton's
            assert r["shared_bytes"] <= r["shared_estimate"], r


def test_hot_kernels_are_clean_on_the_rotated_target(rotated):
    """The hot kernels compiled for another card (sm_80 ... sm_120, gfx942, gfx1100) in its launch configuration:
    no spills (AMD: no VGPR or SGPR spills), no stack (scratch), shared memory (LDS) within that card's limit and
    within the launch code's estimate, tensor-core instructions (HMMA on mma.sync targets, UTCHMMA on sm_100,
    MFMA/WMMA on AMD) in the attention kernels, and a main loop to measure; float32 on RDNA (gfx1100: no TF32 in
    Triton there) runs on FMA instead."""
    from dlsn_kernels.targets import family_of, target_for_arch

    archs = {target_for_arch(a).arch for a in rotated_archs()}
    assert {r["arch"] for r in rotated} == archs
    for arch in archs:
        for mode in ("bf16", "fp32-tf32"):
            for lss in (True, False):  # the lss-free variants (NLSA) as clean as the GLA ones
                found = {r["kernel"] for r in rotated if r["arch"] == arch and r["dtype"] == mode and r["lss"] is lss}
                assert found == (ALL_HOT if lss else LSS_KERNELS), (arch, mode, lss, found)
    for r in rotated:
        assert r["spill_bytes"] == 0 and r["stack_bytes"] == 0, r
        assert r["shared_bytes"] <= r["shared_limit"], r
        assert r["registers"] <= 255, r
        if r["shared_estimate"]:
            assert r["shared_bytes"] <= r["shared_estimate"] <= r["shared_limit"], r
        if r["kernel"] in TENSOR_CORE:
            if family_of(target_for_arch(r["arch"])) == "wmma" and r["dtype"].startswith("fp32"):
                assert r["tensor_core_instructions"] == 0 and r["ffma_instructions"] > 0, r
                continue
            assert r["tensor_core_instructions"] > 0, r
            assert r["instructions_per_kflop"] is not None and r["instructions_per_kflop"] < 2.5, r


def test_attention_kernels_run_on_tensor_cores(records):
    hot = [r for r in records if r["kernel"] in HOT]
    assert len(hot) == 12  # the forward and two key passes, in two modes, with and without the learned score
    for r in hot:
        assert r["tensor_core_instructions"] > 0, r
        assert r["precision"] == ("native" if r["dtype"] == "bf16" else "tf32")
        assert r["sass_instructions"] > r["main_loop_instructions"] > 0, r
        assert r["instructions_per_mma"] is not None, r


def test_lss_free_kernels_are_as_clean_as_the_gla_ones(records):
    """Issue 27: every lss-free variant (NLSA, HAS_LSS false) next to its GLA kernel on sm_90, bf16 and TF32: the same
    configuration, clean (no spills, no stack, shared memory within the limit), tensor cores where the GLA kernel
    has them, and a main loop no longer than the GLA kernel's (it only drops the learned-score loads and sums)."""
    gla = {(r["kernel"], r["dtype"], json.dumps(r["config"], sort_keys=True)): r for r in records if r["lss"]}
    free = [r for r in records if not r["lss"]]
    assert len(free) == 8  # forward, dv pass, score pass, position pass in two modes
    for r in free:
        twin = gla[(r["kernel"], r["dtype"], json.dumps(r["config"], sort_keys=True))]
        assert r["spill_bytes"] == 0 and r["stack_bytes"] == 0 and r["shared_bytes"] <= r["shared_limit"], r
        assert (r["tensor_core_instructions"] > 0) == (twin["tensor_core_instructions"] > 0), r
        assert r["rs_wgmma"] == 0 and r["main_loop_instructions"] <= twin["main_loop_instructions"], (r, twin)


# Main-loop instructions per MMA before the contiguous-row kernels (bench/NOTES.md), under Triton 3.6: the
# targets are at most half of these.
BEFORE_PER_MMA = {
    ("_chunk_attention_fwd_kernel", None, "bf16"): 227, ("_chunk_attention_fwd_kernel", None, "fp32-tf32"): 127,
    ("_key_pass", True, "bf16"): 242, ("_key_pass", True, "fp32-tf32"): 105,
    ("_key_pass", False, "bf16"): 35, ("_key_pass", False, "fp32-tf32"): 33,
}


@pytest.mark.parametrize("toolchain", ["installed", "gpu image"])
def test_hot_kernels_are_lean_under_both_toolchains(toolchain, request):
    """The forward and both key passes, bf16 and TF32: no spills, no stack, no serialized wgmma (C7515), no
    wgmma with its A operand in registers (the pattern of Triton issue #9433, which corrupts results silently
    with ptxas 12.8/12.9), and main-loop instructions per MMA at most half of the old forward's and dv pass's
    (the score pass, already at about 30, must not get worse)."""
    records = request.getfixturevalue("records" if toolchain == "installed" else "records36")
    if toolchain == "gpu image":
        assert all(r["toolchain"].startswith(f"triton {GPU_IMAGE_TRITON},") for r in records)
    hot = [r for r in records if r["kernel"] in HOT]
    assert len(hot) == (12 if toolchain == "installed" else 6)  # 3.6.0: the GLA kernels only
    for r in hot:
        assert r["spill_bytes"] == 0 and r["stack_bytes"] == 0, r
        assert not any("C7515" in w for w in r["ptxas_warnings"]), r
        assert r["rs_wgmma"] == 0, r
        assert r["tensor_core_instructions"] > 0, r
        before = BEFORE_PER_MMA[(r["kernel"], r["config"].get("DV_PASS"), r["dtype"])]
        assert r["instructions_per_mma"] <= (before if before < 50 else before / 2), r
        if not (r["kernel"] == "_chunk_attention_fwd_kernel" and r["dtype"] == "fp32-tf32"):
            assert r["mma_duplication"] == 1, r  # TF32's forward computes its S in both warpgroups


def test_position_pass_is_clean_under_the_gpu_image_triton(tmp_path_factory):
    """The position pass on sm_90 under Triton 3.6.0 with and without the learned score: no spills, no stack (with
    32 positions per program the lss-free pass spilled 8 B there in bf16/fp16 at 128 registers; 16 are clean)."""
    records = _report(tmp_path_factory, "--triton", _triton36(), "--kernels", "_position_pass", "--lss", "both")
    cases = {(mode, lss) for mode in ("bf16", "fp32-tf32") for lss in (True, False)}
    assert {(r["dtype"], r["lss"]) for r in records} == cases
    for r in records:
        assert r["toolchain"].startswith(f"triton {GPU_IMAGE_TRITON},"), r
        assert r["spill_bytes"] == 0 and r["stack_bytes"] == 0 and r["registers"] <= 255, r


def test_main_loop_and_warnings_are_read_from_the_listings():
    """The parsers on hand-made listings: the loop with the most tensor-core instructions, NOPs left out,
    ptxas's C7515 note kept without the function name, a duplicated warpgroup tile."""
    from bench.compile_report import mma_duplication, ptxas_warnings, sass_shape

    sass = "\n".join([
        "        /*0000*/                   MOV R1, c[0x0][0x28] ;",
        "        /*0010*/                   IMAD R2, R1, R1, RZ ;",  # loop 1: no MMA
        "        /*0020*/              @P0 BRA 0x10 ;",
        "        /*0030*/                   HGMMA.64x32x16.F32.BF16 R24, gdesc[UR4], RZ ;",  # loop 2
        "        /*0040*/                   LDGSTS.E.128 [R3], desc[UR6][R4.64] ;",
        "        /*0050*/                   NOP ;",
        "        /*0060*/                   HGMMA.64x32x16.F32.BF16 R24, gdesc[UR8], R24 ;",
        "        /*0070*/              @!P1 BRA 0x30 ;",
        "        /*0080*/                   EXIT ;",
    ])
    assert sass_shape(sass) == {"sass_instructions": 8, "main_loop_instructions": 4, "main_loop_mma": 2,
                                "main_loop_sass_macs": 2 * 64 * 32 * 16}
    # mma.sync shapes, and Blackwell's tcgen05 instruction (its shape is in a descriptor: counted, no MACs)
    ampere = sass.replace("HGMMA.64x32x16.F32.BF16 R24, gdesc[UR4], RZ", "HMMA.16816.F32.BF16 R4, R8, R12, R4")
    assert sass_shape(ampere)["main_loop_sass_macs"] == 16 * 8 * 16 + 64 * 32 * 16
    blackwell = sass.replace("HGMMA.64x32x16.F32.BF16 R24, gdesc[UR4], RZ",
                             "UTCHMMA gdesc[UR4], gdesc[UR6], tmem[UR8], tmem[UR10], idesc[UR12], UPT")
    assert sass_shape(blackwell)["main_loop_mma"] == 2
    log = ("ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized "
           "due to x in the function 'k'\nptxas info    : Used 255 registers")
    assert ptxas_warnings(log) == ["(C7515) Potential Performance Loss: wgmma.mma_async instructions are "
                                   "serialized due to x"]
    ttgir = ("#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [8, 1], "
             "instrShape = [16, 32, 16]}>\n%s = ttng.warp_group_dot %a, %b, %c : x -> tensor<64x32xf32, #mma>\n")
    assert mma_duplication(ttgir) == 2 and mma_duplication(ttgir.replace("[8, 1]", "[4, 1]")) == 1


def test_amdgcn_listing_is_read_in_nvidia_field_names():
    """AMD records: VGPRs as registers, (VGPR + SGPR spills) x 4 as spill bytes, scratch as stack, MFMA/WMMA as
    tensor-core instructions, and the main loop found through its backward branch."""
    from bench.compile_report import amdgcn_usage

    asm = "\n".join([
        "_k:",
        "\ts_load_dwordx2 s[0:1], s[0:1], 0x0",
        ".LBB0_1:                                ; =>This Inner Loop Header: Depth=1",
        "\tv_mfma_f32_16x16x16_bf16 v[0:3], v[4:5], v[6:7], v[0:3]",
        "\tv_add_u32_e32 v8, 1, v8",
        "\tv_mfma_f32_16x16x16_bf16 v[0:3], v[4:5], v[6:7], v[0:3]",
        "\ts_cbranch_scc1 .LBB0_1",
        "\ts_endpgm",
        "\t.vgpr_count:     128",
        "\t.sgpr_count:     40",
        "\t.vgpr_spill_count: 3",
        "\t.sgpr_spill_count: 1",
        "\t.private_segment_fixed_size: 16",
    ])
    usage = amdgcn_usage(asm)
    assert (usage["registers"], usage["sgprs"], usage["spill_bytes"], usage["stack_bytes"]) == (128, 40, 16, 16)
    assert (usage["tensor_core_instructions"], usage["main_loop_mma"], usage["main_loop_instructions"]) == (2, 2, 4)
    assert usage["sass_instructions"] == 6


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
    """Every tensor-core attention kernel (forward, dq pass, dv and score passes) in fp16, bf16 and float32 (TF32),
    with the learned score and without (the last template argument, kHasLss; records ``lss``), holds mma
    instructions, and the float32 instantiation is the TF32 one."""
    tc = [r for r in cuda_records if r.kernel in ATTENTION_TC]
    found = {(r.kernel, r.dtype, r.config["template"]) for r in tc}
    for dtype, name in (("fp16", "Half"), ("bf16", "BFloat16"), ("fp32", "float")):
        for has_lss in ("true", "false"):
            assert ("chunk_attention_fwd_tc_kernel", dtype, f"{name}, {has_lss}") in found
            assert ("attention_bwd_dq_tc_kernel", dtype, f"{name}, {has_lss}") in found
            assert ("attention_bwd_keys_tc_kernel", dtype, f"{name}, true, {has_lss}") in found  # dv pass
            assert ("attention_bwd_keys_tc_kernel", dtype, f"{name}, false, {has_lss}") in found  # score pass
    for r in tc:
        assert r.tensor_core_instructions > 0, r
        assert r.precision == ("tf32" if r.dtype == "fp32" else "native"), r
        assert r.lss == r.config["template"].endswith("true"), r


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
