"""dlsn_kernels.targets: GPU targets, the Triton kernels' configuration per target, what a target cannot run, and
the static order of the GPU backends. Pure Python (no GPU, no Triton), except the RDNA configuration's run under
the Triton interpreter against the reference (skipped where Triton is not interpreted)."""

from __future__ import annotations

import pytest
import torch

from dlsn_kernels import targets
from dlsn_kernels.targets import (
    INTERPRETER,
    MAX_CHANNELS,
    MAX_CHUNK,
    TRITON_KERNELS,
    Target,
    family_of,
    shared_estimate,
    static_gpu_order,
    target_for_arch,
    target_of,
    triton_config,
    triton_unsupported_reasons,
)

ARCHS = ("80", "86", "89", "90", "100", "120")
TRAINING = (64, 256, 128)  # Cm, Cv, K
PRECISIONS = [(torch.bfloat16, "highest"), (torch.float16, "highest"), (torch.float32, "high"),
              (torch.float32, "highest")]


@pytest.fixture
def matmul_precision():
    previous = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(previous)


def test_targets_by_name():
    a100, rtx3090, h100, b200, rtx5090 = (target_for_arch(a) for a in (80, "sm_86", "90", 100, "120"))
    assert (a100.arch, a100.capability, a100.shared_per_block) == ("sm_80", (8, 0), 163 * 1024)
    assert rtx3090.shared_per_block == rtx5090.shared_per_block == 99 * 1024
    assert h100.shared_per_block == b200.shared_per_block == 227 * 1024
    assert [family_of(t) for t in (a100, rtx3090, h100, b200, rtx5090)] == ["mma", "mma", "wgmma", "tcgen05", "mma"]
    mi300, rx7900 = target_for_arch("gfx942"), target_for_arch("GFX1100")
    assert (mi300.vendor, mi300.warp_size, mi300.shared_per_block) == ("amd", 64, 64 * 1024)
    assert (rx7900.warp_size, family_of(mi300), family_of(rx7900)) == (32, "mfma", "wmma")
    for bad in ("gfx000", "sm_x", "9"):
        with pytest.raises(ValueError, match="unknown"):
            target_for_arch(bad)


def test_cpu_tensors_get_the_interpreter_with_sm90_tiles(matmul_precision):
    assert target_of(torch.device("cpu")) is INTERPRETER
    h100 = target_for_arch(90)
    for dtype, setting in PRECISIONS:
        matmul_precision(setting)
        for kernel in TRITON_KERNELS:
            assert triton_config(kernel, INTERPRETER, dtype, *TRAINING) == triton_config(kernel, h100, dtype, *TRAINING)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_target_runs_the_training_shape_within_its_shared_memory(arch, matmul_precision):
    target = target_for_arch(arch)
    for dtype, setting in PRECISIONS:
        matmul_precision(setting)
        assert triton_unsupported_reasons(target, dtype, *TRAINING) == []
        for kernel in TRITON_KERNELS:
            config = triton_config(kernel, target, dtype, *TRAINING)
            assert shared_estimate(kernel, config, dtype, 64, 256, target) <= target.shared_per_block
            assert all(isinstance(v, int) and v > 0 for v in config.values()), config
            if "BLOCK_Q" in config:
                assert 16 <= config["BLOCK_Q"] <= 128 and 16 <= config["BLOCK_K"] <= 128


def test_ampere_and_ada_do_not_get_hopper_tiles(matmul_precision):
    """The mma.sync targets split the wide accumulators over 8 warps (Hopper's 4-warp tiles spill there), and the
    99 KB cards get smaller TF32 tiles than sm_80's 163 KB."""
    h100, a100, rtx4090 = (target_for_arch(a) for a in (90, 80, 89))
    matmul_precision("highest")
    assert triton_config("forward", h100, torch.bfloat16, *TRAINING)["num_warps"] == 4
    assert triton_config("forward", rtx4090, torch.bfloat16, *TRAINING)["num_warps"] == 8
    assert triton_config("key_dv", a100, torch.bfloat16, *TRAINING)["num_warps"] == 8
    matmul_precision("high")
    big, small = (triton_config("key_score", t, torch.float32, *TRAINING) for t in (a100, rtx4090))
    assert big["BLOCK_K"] * big["BLOCK_Q"] > small["BLOCK_K"] * small["BLOCK_Q"]
    assert triton_config("forward", rtx4090, torch.float32, *TRAINING)["BLOCK_K"] == 16


def test_a_configuration_that_does_not_fit_is_never_chosen():
    """Less shared memory: the next smaller candidate, down to the unpipelined 16x16 tiles; below that, the case is
    unsupported with a one-line reason and triton_config refuses rather than hand out a launch that would fail."""
    chosen = []
    for kb in (227, 99, 64, 40, 24):
        target = Target(f"test_{kb}", "nvidia", (8, 6), kb * 1024, 32)
        config = triton_config("key_dv", target, torch.bfloat16, *TRAINING)
        assert shared_estimate("key_dv", config, torch.bfloat16, 64, 256, target) <= kb * 1024
        chosen.append(config)
    assert chosen[0] != chosen[-1] and chosen[-1] == {"BLOCK_K": 16, "BLOCK_Q": 16, "num_warps": 4, "num_stages": 1}
    tiny = Target("test_8", "nvidia", (8, 6), 8 * 1024, 32)
    reasons = triton_unsupported_reasons(tiny, torch.bfloat16, *TRAINING)
    assert reasons and all("\n" not in r for r in reasons)
    assert "the BF16 forward pass needs" in reasons[0] and "test_8 allows 8 KB" in reasons[0]
    with pytest.raises(ValueError, match="shared memory"):
        triton_config("forward", tiny, torch.bfloat16, *TRAINING)


def test_channel_and_chunk_limits_are_reasons(matmul_precision):
    h100 = target_for_arch(90)
    reasons = triton_unsupported_reasons(h100, torch.bfloat16, MAX_CHANNELS + 1, 256, MAX_CHUNK + 1)
    assert len(reasons) == 2
    assert f"Cm = {MAX_CHANNELS + 1} channels" in reasons[0] and f"limit of {MAX_CHUNK}" in reasons[1]
    assert triton_unsupported_reasons(h100, torch.bfloat16, MAX_CHANNELS, MAX_CHANNELS, MAX_CHUNK) == []
    # IEEE float32 at the widest channels needs more than a 99 KB card has, even in the smallest tiles
    matmul_precision("highest")
    reasons = triton_unsupported_reasons(target_for_arch(86), torch.float32, 512, 512, 1024)
    assert reasons == ["the IEEE key_score pass needs 131 KB of shared memory, sm_86 allows 99 KB"]
    assert triton_unsupported_reasons(target_for_arch(75), torch.bfloat16, *TRAINING)[0].startswith(
        "Triton's tensor-core kernels need sm_80")


def test_shared_estimate_is_an_upper_bound_of_compiled_kernels():
    """Spot values from the compile report (Triton 3.8, training shape): what Triton allocated, which the
    estimate must not undercut (tests/test_compile_report.py checks every compiled kernel the same way)."""
    measured = [  # kernel, config, dtype, shared bytes Triton allocated
        ("key_dv", {"BLOCK_K": 64, "BLOCK_Q": 32, "num_warps": 8, "num_stages": 2}, torch.bfloat16, 65536),
        ("key_dv", {"BLOCK_K": 64, "BLOCK_Q": 64, "num_warps": 4, "num_stages": 2}, torch.bfloat16, 106700),
        ("forward", {"BLOCK_Q": 64, "BLOCK_K": 64, "num_warps": 8, "num_stages": 2}, torch.bfloat16, 107315),
        ("key_score", {"BLOCK_K": 64, "BLOCK_Q": 16, "num_warps": 4, "num_stages": 2}, torch.float32, 106598),
        # TF32 on sm_90 and sm_100: P and dS pass through shared memory as float32 copies as well
        ("forward", {"BLOCK_Q": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 2}, torch.float32, 115072),
        ("key_score", {"BLOCK_K": 64, "BLOCK_Q": 16, "num_warps": 4, "num_stages": 2}, torch.float32, 139424),
    ]
    for kernel, config, dtype, shared in measured:
        assert shared <= shared_estimate(kernel, config, dtype, 64, 256) <= 1.6 * shared, (kernel, config)
    assert shared_estimate("position", {}, torch.float32, 64, 256) == 0
    with pytest.raises(ValueError, match="unknown Triton kernel"):
        shared_estimate("nope", {}, torch.float32, 64, 256)


@pytest.mark.parametrize("arch", ARCHS)
def test_static_order_puts_triton_first_where_it_is_clean_offline(arch, matmul_precision):
    target = target_for_arch(arch)
    for dtype, setting in PRECISIONS:
        matmul_precision(setting)
        order, why = static_gpu_order(target, dtype)
        assert order == ("triton", "cuda"), why
        assert target.arch in why and "offline compile report" in why and "not measured on hardware" in why


def test_static_order_puts_cuda_first_elsewhere(monkeypatch):
    for arch in ("75", "87", "103"):
        order, why = static_gpu_order(target_for_arch(arch), torch.bfloat16)
        assert order == ("cuda", "triton") and f"sm_{arch}" in why
    # a case the report shows not clean goes to cuda, saying why
    monkeypatch.setitem(targets.NOT_CLEAN, ("sm_86", "tf32"), "key_dv spills 424 B")
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        order, why = static_gpu_order(target_for_arch(86), torch.float32)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert order == ("cuda", "triton") and "key_dv spills 424 B" in why
    assert static_gpu_order(target_for_arch(86), torch.bfloat16)[0] == ("triton", "cuda")
    amd_order, amd_why = static_gpu_order(target_for_arch("gfx942"), torch.bfloat16)
    assert amd_order == ("triton",) and "NVIDIA" in amd_why
    assert static_gpu_order(INTERPRETER, torch.float64)[0] == ("triton",)


@pytest.mark.parametrize("arch", ["gfx942", "gfx1100"])
def test_amd_targets_fit_their_lds(arch, matmul_precision):
    """AMD rows: every kernel's tiles within 64 KB of LDS at the training shape; 16x16 MFMA on CDNA (an AMD
    backend option), none on RDNA."""
    target = target_for_arch(arch)
    for dtype, setting in PRECISIONS:
        matmul_precision(setting)
        assert triton_unsupported_reasons(target, dtype, *TRAINING) == []
        for kernel in ("forward", "key_dv", "key_score", "dq"):
            config = triton_config(kernel, target, dtype, *TRAINING)
            assert shared_estimate(kernel, config, dtype, 64, 256, target) <= 64 * 1024
            assert config.get("matrix_instr_nonkdim") == (16 if arch == "gfx942" else None)


def test_tf32_only_where_the_target_has_it(matmul_precision):
    """RDNA's Triton backend takes no TF32 (input_precision is ieee, bf16x3 or bf16x6 there): float32 under "high"
    runs IEEE on gfx1100, with the IEEE tiles; CDNA and NVIDIA take TF32."""
    from dlsn_kernels.targets import dot_input_precision, dot_kind_of

    matmul_precision("high")
    rx7900 = target_for_arch("gfx1100")
    assert dot_input_precision(rx7900, torch.float32) == "ieee" and dot_kind_of(torch.float32, rx7900) == "ieee"
    for arch in ("gfx942", "86", "90"):
        assert dot_input_precision(target_for_arch(arch), torch.float32) == "tf32"
    assert dot_input_precision(rx7900, torch.bfloat16) == "ieee"  # 16-bit dots ignore it
    high = triton_config("key_score", rx7900, torch.float32, *TRAINING)
    matmul_precision("highest")
    assert high == triton_config("key_score", rx7900, torch.float32, *TRAINING)
    assert dot_input_precision(target_for_arch(90), torch.float32) == "ieee"


def test_rdna_tiles_are_unpipelined_and_fit_the_wave32_register_file(matmul_precision):
    """gfx1100 rows (what the compile report shows with the fewest VGPRs): every attention pass unpipelined
    (num_stages 1, the stream pipeliner's register-held prefetch spilled), the float32 (FMA) forward and dv pass over
    16 wavefronts, workgroups within RDNA's 1024 threads."""
    rx7900 = target_for_arch("gfx1100")
    for dtype, setting in PRECISIONS:
        matmul_precision(setting)
        for kernel in ("forward", "key_dv", "key_score", "dq"):
            config = triton_config(kernel, rx7900, dtype, *TRAINING)
            assert config["num_stages"] == 1 and config["num_warps"] * rx7900.warp_size <= 1024
        if dtype == torch.float32:
            assert triton_config("forward", rx7900, dtype, *TRAINING)["num_warps"] == 16
    matmul_precision("highest")
    bf16 = {k: triton_config(k, rx7900, torch.bfloat16, *TRAINING) for k in ("forward", "key_dv", "dq")}
    assert (bf16["forward"]["BLOCK_Q"], bf16["forward"]["BLOCK_K"]) == (32, 32)
    assert (bf16["key_dv"]["BLOCK_K"], bf16["key_dv"]["BLOCK_Q"]) == (32, 64)
    # the score pass sums dP over 32-channel chunks of V on RDNA (held, V spilled 376 B bf16 / 728 B float32) and
    # takes 32 query slots per step; other targets hold V (no BLOCK_CV_CHUNK: the kernel's default 0)
    for dtype, blocks in ((torch.bfloat16, (32, 32, 4)), (torch.float32, (16, 16, 8))):
        score = triton_config("key_score", rx7900, dtype, *TRAINING)
        assert (score["BLOCK_K"], score["BLOCK_Q"], score["num_warps"], score["BLOCK_CV_CHUNK"]) == (*blocks, 32)
    for arch in (80, 90, 100, 120, "gfx942"):
        assert "BLOCK_CV_CHUNK" not in triton_config("key_score", target_for_arch(arch), torch.bfloat16, *TRAINING)
    # a narrow value row (Cv <= 128) takes 4 wavefronts in the bf16 forward and key passes; float32 (FMA) keeps its
    # rows' wavefronts (4 spilled)
    assert triton_config("forward", rx7900, torch.bfloat16, 64, 128, 128)["num_warps"] == 4
    assert triton_config("forward", rx7900, torch.float32, 64, 128, 128)["num_warps"] == 16
    assert triton_config("forward", target_for_arch("gfx942"), torch.float32, 64, 128, 128)["num_warps"] == 4


# RDNA (gfx1100) blocks under the Triton interpreter, against the reference: the float32 (IEEE) rows as they are,
# and the bfloat16 rows' blocks run in float32 (the interpreter has no bfloat16 CPU path). The interpreter runs the
# blocks, not the warps or stages, which only the compiled kernels show (bench/compile_report.py).
RDNA_SIZES = [(1, 128, 64, 2, 64, 256), (1, 100, 70, 1, 64, 200)]  # N, L, K, R, Cm, Cv: masks and partial tiles


@pytest.mark.parametrize("size", RDNA_SIZES, ids=lambda s: "N{}-L{}-K{}-R{}-Cm{}-Cv{}".format(*s))
@pytest.mark.parametrize("rows", ["ieee", "native"])
@pytest.mark.parametrize("learned", [True, False], ids=["lss", "no-lss"])
def test_rdna_configuration_matches_reference_under_the_interpreter(rows, size, learned, monkeypatch):
    import dlsn_kernels.triton as tk
    from dlsn_kernels import reference as ref
    from dlsn_kernels.triton import _common

    if not tk.INTERPRETED:
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1 before triton is first imported)")
    n, length, chunk, rounds, cm, cv = size
    rx7900 = target_for_arch("gfx1100")
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    if rows == "native":  # float32 launches take the bfloat16 rows' blocks
        for kernel in ("forward", "key_dv", "key_score", "dq"):
            monkeypatch.setitem(targets._RDNA[kernel], "ieee", targets._RDNA[kernel]["native"])
        # float32 operands take twice bfloat16's LDS: the same RDNA card with room for them (the interpreter has
        # no LDS), so that every bfloat16 block is launched rather than a smaller fallback
        rx7900 = Target("gfx1100", "amd", None, 1 << 20, 32)
    expected_blocks = {k: triton_config(k, rx7900, torch.bfloat16 if rows == "native" else torch.float32, cm, cv,
                                        chunk) for k in ("forward", "key_dv", "key_score", "dq")}
    launched = []
    monkeypatch.setattr(_common, "_launch_target", lambda device: launched.append(device) or rx7900)
    for kernel, config in expected_blocks.items():
        assert triton_config(kernel, rx7900, torch.float32, cm, cv, chunk) == config
        if rows == "native":  # the blocks a bfloat16 launch on the real card takes
            assert config == triton_config(kernel, target_for_arch("gfx1100"), torch.bfloat16, cm, cv, chunk)
    # the score pass sums dP over value-channel chunks on RDNA (V not held): the chunked loop is what runs here
    assert expected_blocks["key_score"]["BLOCK_CV_CHUNK"] == 32 < cv

    gen = torch.Generator().manual_seed(5)
    xm, v, lss, dy = (torch.randn(n, length, c, generator=gen, dtype=torch.float64) for c in (cm, cv, chunk, cv))
    rot = ref.random_rotations(cm, rounds, ref.n_buckets_for(length, chunk), generator=gen)
    xm, v, lss, rot, dy = (t.float() for t in (xm, v, lss, rot, dy))
    if not learned:  # the lss-free (NLSA) variants: no learned score, no dlss
        lss = None
    y, lse, perm = tk.gla_attention(xm, v, lss, rot, chunk)
    leaves = [t.double().requires_grad_() for t in (xm, v, lss) if t is not None]
    y_ref = ref.combine_rounds(*ref.chunk_attention(leaves[0], leaves[1], leaves[2] if learned else None, perm,
                                                    chunk))
    torch.testing.assert_close(y.double(), y_ref.detach(), atol=3e-5, rtol=3e-5)
    grads = torch.autograd.grad((y_ref * dy.double()).sum(), leaves)
    delta = (dy * y).sum(-1)[:, None]
    actual = tk.attention_backward(dy[:, None], delta, xm, v, lss, perm, lse[:, None], chunk)
    if not learned:
        assert actual[2].numel() == 0
        actual = actual[:2]
    for a, e in zip(actual, grads, strict=True):
        torch.testing.assert_close(a.double(), e, atol=3e-4, rtol=3e-4)
    assert launched and all(d.type == "cpu" for d in launched)
