"""The Triton kernels in each target's configuration (dlsn_kernels.targets), run under the Triton interpreter.

The tiles, warps and stages differ per target (sm_80's mma.sync tables, the smaller TF32 tiles of the 99 KB cards,
sm_100's forward, the last-resort 16x16 tiles of a card with little shared memory). Here the launch code is told
it runs on such a card and the interpreter runs exactly those blocks on CPU tensors, forward and backward, against
the reference: float64 (the IEEE tables) and float32 under TF32 (the TF32 tables; the interpreter multiplies in
float32).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import dlsn_kernels.triton as tk  # noqa: E402
from dlsn_kernels import reference as ref  # noqa: E402
from dlsn_kernels.targets import INTERPRETER, TRITON_KERNELS, Target, target_for_arch, triton_config  # noqa: E402
from dlsn_kernels.triton import _common  # noqa: E402
from tests.helpers import Case  # noqa: E402

if not tk.INTERPRETED:
    pytest.skip("runs the per-target tiles under the Triton interpreter (TRITON_INTERPRET=1 before triton is "
                "imported; run this file on its own)", allow_module_level=True)

# a card with 96 KB of shared memory per block: in float64 (8-byte operands) the forward and key passes fall back to
# the last-resort 16x16 unpipelined tiles
SMALL = Target("test_small", "nvidia", (8, 6), 96 * 1024, 32)
# RDNA3 (gfx1100) with room for float64 operands (the interpreter has no LDS): its score pass sums dP over
# 32-channel chunks of V (BLOCK_CV_CHUNK), which no other target does
RDNA = Target("gfx1100", "amd", None, 1 << 20, 32)
TARGETS = {"sm_86": target_for_arch(86), "small": SMALL, "rdna": RDNA}
# K = 64 and 70: the tiles are not clamped to the chunk, and 70 leaves partial tiles and padded slots; the training
# shape's channels (Cm = 64, Cv = 256, and 200 with masks), where the 99 KB cards take smaller tiles
SIZES = [Case(1, 128, 64, 2, 64, 256), Case(1, 100, 70, 1, 64, 200)]
MODES = {"float64": (torch.float64, "highest", 1e-10), "tf32": (torch.float32, "high", 3e-5)}


# the (target, mode) pairs whose blocks differ from the interpreter's own (sm_90's) tables: sm_80 shares sm_90's
# blocks in float32 (it differs in warps, which the interpreter does not have, and in bf16), sm_86 shares its IEEE
# blocks, sm_100 differs in bf16 only (not run by the interpreter)
CASES = [("sm_86", "tf32"), ("small", "float64")]


def _blocks(target, dtype, size):
    return {k: {f: v for f, v in triton_config(k, target, dtype, size.cm, size.cv, size.chunk).items()
                if f.startswith("BLOCK_")} for k in TRITON_KERNELS}


def _inputs(size, dtype):
    gen = torch.Generator().manual_seed(3)
    xm = torch.randn(size.n, size.length, size.cm, generator=gen, dtype=torch.float64)
    v = torch.randn(size.n, size.length, size.cv, generator=gen, dtype=torch.float64)
    lss = torch.randn(size.n, size.length, size.chunk, generator=gen, dtype=torch.float64)
    rot = ref.random_rotations(size.cm, size.rounds, ref.n_buckets_for(size.length, size.chunk), generator=gen)
    dy = torch.randn(size.n, size.length, size.cv, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (xm, v, lss, rot, dy)]


@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize(("name", "mode", "learned"), [*((n, m, True) for n, m in CASES), ("small", "float64", False),
                                                       ("rdna", "float64", True), ("rdna", "float64", False)])
def test_target_configuration_matches_reference(name, mode, learned, size, monkeypatch):
    """Forward and backward in the target's blocks against the reference; on the small card and on RDNA (the score
    pass's chunked dP) also without a learned score (lss None: the HAS_LSS=False kernels)."""
    dtype, setting, tol = MODES[mode]
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: setting)
    target = TARGETS[name]
    assert _blocks(target, dtype, size) != _blocks(INTERPRETER, dtype, size)
    if name == "small":
        assert _blocks(target, dtype, size)["forward"] == {"BLOCK_Q": 16, "BLOCK_K": 16}
    if name == "rdna":
        assert _blocks(target, dtype, size)["key_score"]["BLOCK_CV_CHUNK"] == 32 < size.cv
    launched = []
    monkeypatch.setattr(_common, "_launch_target", lambda device: launched.append(device) or target)

    xm, v, lss, rot, dy = _inputs(size, dtype)
    lss = lss if learned else None
    y, lse, perm = tk.gla_attention(xm, v, lss, rot, size.chunk)
    leaves = [t.clone().requires_grad_() for t in (xm, v, lss) if t is not None]
    y_ref = ref.combine_rounds(*ref.chunk_attention(*leaves[:2], leaves[2] if learned else None, perm, size.chunk))
    torch.testing.assert_close(y, y_ref.detach(), atol=tol, rtol=tol)
    expected = torch.autograd.grad((y_ref * dy).sum(), leaves)
    delta = (dy * y).sum(-1)[:, None]
    actual = tk.attention_backward(dy[:, None], delta, xm, v, lss, perm, lse[:, None], size.chunk)
    assert learned or actual[2].shape == (0,)
    for a, e in zip(actual[:len(leaves)], expected, strict=True):
        torch.testing.assert_close(a, e, atol=tol * 10, rtol=tol * 10)
    assert launched and all(d.type == "cpu" for d in launched)  # every launch asked for its target
