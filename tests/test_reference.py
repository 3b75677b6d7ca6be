"""The reference itself against a literal, loop-by-loop reading of DESIGN.md "Semantics"."""

from __future__ import annotations

import pytest
import torch

import dlsn_kernels as dk
from dlsn_kernels import reference as ref
from tests.helpers import CASES, make_inputs, rel_err


def literal_chunk_attention(xm, v, lss, perm, chunk):
    """DESIGN.md 1.3-1.4 written as loops over (n, round, chunk, query slot, key)."""
    n_batch, length, _ = xm.shape
    rounds = perm.shape[1]
    pad = (chunk - length % chunk) % chunk
    nc = (length + pad) // chunk
    out = torch.zeros(n_batch, rounds, length, v.shape[-1], dtype=xm.dtype)
    lse = torch.zeros(n_batch, rounds, length, dtype=xm.dtype)
    for n in range(n_batch):
        for r in range(rounds):
            slot = [int(perm[n, r, p]) if p < length else int(perm[n, r, (p - pad) % length])
                    for p in range(length + pad)]
            for c in range(nc):
                keys = []
                for kc in (c, (c - 1) % nc, (c + 1) % nc):
                    keys += slot[kc * chunk:(kc + 1) * chunk]
                for i in range(chunk):
                    p = c * chunk + i
                    if p >= length:
                        continue
                    q = slot[p]
                    s = torch.stack([
                        xm[n, q] @ xm[n, j] / xm[n, j].norm().clamp_min(5e-5) + lss[n, j, i] for j in keys
                    ])
                    out[n, r, q] = (torch.softmax(s, 0)[:, None] * v[n, keys]).sum(0)
                    lse[n, r, q] = torch.logsumexp(s, 0)
    return out, lse


@pytest.mark.parametrize("case", CASES[:5], ids=str)
def test_reference_matches_literal_spec(case):
    xm, v, lss, _rot, perm = make_inputs(case)
    out, lse = ref.chunk_attention(xm, v, lss, perm, case.chunk)
    want_out, want_lse = literal_chunk_attention(xm, v, lss, perm, case.chunk)
    assert rel_err(out, want_out) < 1e-13
    assert rel_err(lse, want_lse) < 1e-13


def test_hash_is_argmax_with_lowest_bucket_on_ties():
    xm = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]], dtype=torch.float64)
    rot = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64).unsqueeze(1)
    # position 0 ties buckets 0 and 1; position 1 ties all; position 2 ties all three (1, 1, 1)
    assert ref.sblsh_hash(xm, rot).tolist() == [[[0, 0, 0]]]


def test_bucket_sort_is_stable():
    codes = torch.tensor([[[2, 0, 1, 0, 2, 1]]])
    assert ref.bucket_sort(codes).tolist() == [[[1, 3, 2, 5, 0, 4]]]


def test_combination_equals_softmax_over_all_keys_of_all_rounds():
    """DESIGN.md 1.5 equals one softmax over the union of every round's keys (DESIGN.md's backward)."""
    xm, v, lss, rot, perm = make_inputs(CASES[3])
    out, lse = ref.chunk_attention(xm, v, lss, perm, CASES[3].chunk)
    y = ref.combine_rounds(out, lse)
    total = torch.logsumexp(lse, dim=1)
    y_union = (torch.exp(lse - total.unsqueeze(1)).unsqueeze(-1) * out).sum(1)
    assert rel_err(y, y_union) < 1e-14


def test_random_rotations_are_orthonormal():
    gen = torch.Generator().manual_seed(3)
    for cm, b in ((8, 4), (4, 8), (5, 5)):
        rot = dk.random_rotations(cm, 3, b, generator=gen, dtype=torch.float64)
        assert rot.shape == (cm, 3, b)
        for r in range(3):
            m = rot[:, r, :]
            gram = m.t() @ m if cm >= b else m @ m.t()
            assert torch.allclose(gram, torch.eye(min(cm, b), dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize(("length", "chunk", "expected"), [(10, 4, 2), (12, 4, 4), (3, 8, 1), (100000, 4, 128)])
def test_bucket_count(length, chunk, expected):
    assert dk.n_buckets_for(length, chunk) == expected


def test_reference_still_exports_the_setup_helpers():
    """Code written against ``dlsn_kernels.reference.X`` keeps working after the move to _hash_setup."""
    assert (ref.KEY_NORM_EPS, ref.n_buckets_for, ref.random_rotations) == (
        dk.KEY_NORM_EPS, dk.n_buckets_for, dk.random_rotations)
