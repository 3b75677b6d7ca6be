"""The precision policy (DESIGN.md "Precision"): what each dtype and matmul-precision setting asks of the
Triton dots, and the autocast casts of the public ops. The GPU side of it (tensor cores in the SASS) is
tests/test_compile_report.py."""

import pytest
import torch

from dlsn_kernels._precision import autocast_dtype, cast_floats, takes_half

pytest.importorskip("triton")


@pytest.fixture
def matmul_precision():
    previous = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(previous)


def test_float32_dots_follow_the_matmul_precision(matmul_precision):
    from dlsn_kernels.targets import dot_kind_of
    from dlsn_kernels.triton._common import kernel_precision

    cpu = torch.device("cpu")  # the Triton kernels' precision on the interpreter's target
    matmul_precision("highest")
    assert kernel_precision(cpu, torch.float32) == "ieee" and dot_kind_of(torch.float32) == "ieee"
    for setting in ("high", "medium"):
        matmul_precision(setting)
        assert kernel_precision(cpu, torch.float32) == "tf32" and dot_kind_of(torch.float32) == "tf32"
    # half precision is always on tensor cores; float64 (interpreter) is always exact
    assert dot_kind_of(torch.bfloat16) == dot_kind_of(torch.float16) == "native"
    assert kernel_precision(cpu, torch.float64) == "ieee"


def test_tiles_depend_on_the_dot_kind(matmul_precision):
    from dlsn_kernels.targets import INTERPRETER, triton_config

    def tiles(kernel, dtype, cv=256, chunk_size=128):  # Cm = 64; the interpreter runs sm_90's tiles
        return triton_config(kernel, INTERPRETER, dtype, 64, cv, chunk_size)

    matmul_precision("highest")
    ieee = tiles("forward", torch.float32)
    matmul_precision("high")
    tf32 = tiles("forward", torch.float32)
    half = tiles("forward", torch.bfloat16)
    assert ieee["BLOCK_K"] < tf32["BLOCK_K"] <= half["BLOCK_K"]  # FFMA holds whole operand rows in registers
    assert half["BLOCK_Q"] >= 64  # a 64-slot query tile amortises the gather of 3K keys
    # both backward passes share the key block (dq_part is sized by it), blocks never exceed the chunk
    for dtype in (torch.float32, torch.bfloat16):
        assert tiles("key_dv", dtype)["BLOCK_K"] == tiles("key_score", dtype)["BLOCK_K"]
    assert tiles("forward", torch.bfloat16, cv=6, chunk_size=5)["BLOCK_Q"] == 16


def test_autocast_on_the_cpu_casts_for_backends_that_take_16_bits():
    xm = torch.randn(2, 3)
    assert autocast_dtype(xm.device) is None  # autocast off
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for backend in (None, "cpu", "reference", "flex"):
            assert autocast_dtype(xm.device, backend) == torch.bfloat16
        assert autocast_dtype(xm.device, "triton") is None  # Triton's interpreter: float32/float64 CPU tensors only
    assert takes_half(torch.device("cuda"), "triton") and not takes_half(xm.device, "triton")


def test_autocast_cast_touches_float32_only():
    a, b, c = torch.randn(2), torch.randn(2, dtype=torch.float64), torch.arange(3)
    ca, cb, cc = cast_floats(torch.bfloat16, a, b, c)
    assert ca.dtype == torch.bfloat16 and torch.equal(ca, a.to(torch.bfloat16))
    assert cb is b and cc is c
    assert cast_floats(None, a)[0] is a
