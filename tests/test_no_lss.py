"""Attention without the learned score (``lss=None``, NLSN's NLSA; issue 27) through the public ops.

``lss=None`` must compute exactly what ``lss = zeros`` computes (adding +0.0 is exact) while the kernels skip the
learned score's loads, its gradient and its memory. Each backend is checked against the float64 reference on the
shared case table, forward and backward. The cpu op's own contract without lss (empty dlss, no autograd gradient,
gradcheck, opcheck) is in tests/test_cpu_no_lss.py, the Triton kernels' lss-free variants in tests/test_triton*.py
and the CUDA ones in the emulator (tests/test_cuda_emulation.py).
"""

from __future__ import annotations

import pytest
import torch

import dlsn_kernels as dk
from dlsn_kernels import reference as ref

from .helpers import CASES, TILE_CASES, make_inputs, rel_err, tolerance

SIZES = [*CASES, TILE_CASES[1]]
IDS = [str(c) for c in SIZES]


def _cpu_backends() -> list[str]:
    return [name for name, status in dk.available_backends("cpu").items() if status.reason is None]


@pytest.mark.parametrize("backend", ["reference", "cpu", "flex"])
@pytest.mark.parametrize("case", SIZES, ids=IDS)
def test_forward_without_learned_score(backend, case):
    if backend not in _cpu_backends():
        pytest.skip(f"{backend} does not run on CPU tensors here: {dk.available_backends('cpu')[backend].reason}")
    xm, v, _, rot, perm = make_inputs(case)
    want_out, want_lse = ref.chunk_attention(xm, v, None, perm, case.chunk)
    out, lse = dk.chunk_attention(xm, v, None, perm, case.chunk, backend=backend)
    assert rel_err(out, want_out) <= tolerance(torch.float64)
    assert rel_err(lse, want_lse) <= tolerance(torch.float64)
    # the same arithmetic as a zero learned score, without it
    zeros = torch.zeros(case.n, case.length, case.chunk, dtype=xm.dtype)
    out_z, lse_z = dk.chunk_attention(xm, v, zeros, perm, case.chunk, backend=backend)
    assert torch.equal(out, out_z) and torch.equal(lse, lse_z)
    y = dk.gla_attention(xm, v, None, rot, case.chunk, backend=backend)
    assert rel_err(y, ref.gla_attention(xm, v, None, rot, case.chunk)) <= tolerance(torch.float64)


@pytest.mark.parametrize("case", SIZES, ids=IDS)
def test_backward_without_learned_score(case):
    xm, v, _, rot, perm = make_inputs(case, requires_grad=True)
    grad = torch.randn(case.n, case.length, case.cv, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = torch.autograd.grad(ref.gla_attention(xm, v, None, rot, case.chunk), (xm, v), grad)
    got = torch.autograd.grad(dk.gla_attention(xm, v, None, rot, case.chunk, backend="cpu"), (xm, v), grad)
    for g, w in zip(got, want):
        assert rel_err(g, w) <= tolerance(torch.float64, grad=True)


def test_float32_matches_zero_learned_score_bitwise():
    case = CASES[5]
    xm, v, _, rot, perm = make_inputs(case, dtype=torch.float32, requires_grad=True)
    zeros = torch.zeros(case.n, case.length, case.chunk, requires_grad=True)
    grad = torch.randn(case.n, case.length, case.cv)
    for backend in ("cpu", "reference"):
        none_y = dk.gla_attention(xm, v, None, rot, case.chunk, backend=backend)
        none_g = torch.autograd.grad(none_y, (xm, v), grad)
        zero_y = dk.gla_attention(xm, v, zeros, rot, case.chunk, backend=backend)
        zero_g = torch.autograd.grad(zero_y, (xm, v), grad)
        assert torch.equal(none_y, zero_y)
        for a, b in zip(none_g, zero_g):
            assert torch.equal(a, b)


def test_spherical_rotations_ties_go_to_the_first_maximum():
    """NLSN's code argmax(cat[xR, -xR]) through the SB-LSH hash: bucket b wins over b + B/2 and over any later
    bucket on an exact tie (x = 0 rows tie everywhere: bucket 0)."""
    rot_half = torch.tensor([[[1.0, 1.0]], [[0.0, 0.0]]])  # Cm = 2, R = 1, B/2 = 2: columns identical
    rot = dk.spherical_rotations(rot_half)
    assert torch.equal(rot, torch.cat([rot_half, -rot_half], 2))
    xm = torch.tensor([[[2.0, 5.0], [-3.0, 1.0], [0.0, 0.0]]])
    for backend in ("reference", "cpu"):
        codes = dk.sblsh_hash(xm, rot, backend=backend)
        # x . r = 2 (cols 0 and 1 tie -> 0), -3 (cols 2 and 3 tie at +3 -> 2), 0 everywhere -> 0
        assert codes.tolist() == [[[0, 2, 0]]]
        assert torch.equal(codes, torch.cat([xm @ rot_half[:, 0], -(xm @ rot_half[:, 0])], -1).argmax(-1)[:, None])


def test_nlsa_block_passes_no_learned_score(monkeypatch):
    from dlsn.models.nlsn import NLSA

    seen = []
    real = dk.gla_attention

    def spy(xm, v, lss, rot, chunk_size, backend=None):
        seen.append(lss)
        return real(xm, v, lss, rot, chunk_size, backend=backend)

    monkeypatch.setattr(dk, "gla_attention", spy)
    block = NLSA(channels=8, reduction=2, chunk_size=4, n_hashes=2).eval()
    block(torch.randn(1, 8, 5, 6))
    assert seen == [None]


def test_wrong_lss_shape_still_raises():
    case = CASES[2]
    xm, v, lss, _, perm = make_inputs(case)
    with pytest.raises(ValueError, match="lss must have shape"):
        dk.chunk_attention(xm, v, lss[:, :, :-1], perm, case.chunk)
