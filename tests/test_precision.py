"""The precision policy (DESIGN.md "Precision"): what each dtype and matmul-precision setting asks of the
Triton dots, and the autocast casts of the public ops. The GPU side of it (tensor cores in the SASS) is
tests/test_compile_report.py."""

import pytest
import torch

from dlsn_kernels._precision import autocast_dtype, cast_floats, cast_for_autocast

pytest.importorskip("triton")


@pytest.fixture
def matmul_precision():
    previous = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(previous)


def test_float32_dots_follow_the_matmul_precision(matmul_precision):
    from dlsn_kernels.triton._common import dot_kind, dot_precision

    matmul_precision("highest")
    assert dot_precision(torch.float32) == "ieee" and dot_kind(torch.float32) == "ieee"
    for setting in ("high", "medium"):
        matmul_precision(setting)
        assert dot_precision(torch.float32) == "tf32" and dot_kind(torch.float32) == "tf32"
    # half precision is always on tensor cores; float64 (interpreter) is always exact
    assert dot_kind(torch.bfloat16) == dot_kind(torch.float16) == "native"
    assert dot_precision(torch.float64) == "ieee"


def test_tiles_depend_on_the_dot_kind(matmul_precision):
    from dlsn_kernels.triton.attention_backward import backward_config
    from dlsn_kernels.triton.chunk_attention import forward_config

    matmul_precision("highest")
    ieee = forward_config(128, 256, torch.float32)
    matmul_precision("high")
    tf32 = forward_config(128, 256, torch.float32)
    half = forward_config(128, 256, torch.bfloat16)
    assert ieee["BLOCK_K"] < tf32["BLOCK_K"] <= half["BLOCK_K"]  # FFMA holds whole operand rows in registers
    assert half["BLOCK_Q"] >= 64  # a 64-slot query tile amortises the gather of 3K keys
    # both backward passes share the key block (dq_part is sized by it), blocks never exceed the chunk
    for dtype in (torch.float32, torch.bfloat16):
        assert backward_config(128, 256, dtype, True)["BLOCK_K"] == backward_config(128, 256, dtype, False)["BLOCK_K"]
    assert forward_config(5, 6, torch.bfloat16)["BLOCK_Q"] == 16


def test_autocast_on_the_cpu_casts_for_backends_that_take_16_bits():
    xm = torch.randn(2, 3)
    assert autocast_dtype(xm.device) is None  # autocast off
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_dtype(xm.device) == torch.bfloat16
        for backend in ("cpu", "reference", "flex:cpu"):
            (out,) = cast_for_autocast(xm, backend=backend)
            assert out.dtype == torch.bfloat16
        (out,) = cast_for_autocast(xm, backend="triton")
        assert out is xm  # Triton's interpreter takes float32/float64 CPU tensors only


def test_autocast_cast_touches_float32_only():
    a, b, c = torch.randn(2), torch.randn(2, dtype=torch.float64), torch.arange(3)
    ca, cb, cc = cast_floats(torch.bfloat16, a, b, c)
    assert ca.dtype == torch.bfloat16 and torch.equal(ca, a.to(torch.bfloat16))
    assert cb is b and cc is c
    assert cast_floats(None, a)[0] is a
