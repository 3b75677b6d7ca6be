"""Random inputs and comparisons shared by the kernel tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import dlsn_kernels as dk
from dlsn_kernels import reference as ref


@dataclass(frozen=True)
class Case:
    n: int
    length: int
    chunk: int
    rounds: int
    cm: int
    cv: int

    def __str__(self) -> str:
        return f"N{self.n}-L{self.length}-K{self.chunk}-R{self.rounds}-Cm{self.cm}-Cv{self.cv}"


# The size matrix of the kernel tests: L < K, L == K, L % K != 0, one and two chunks, N > 1,
# R = 1..4, channel counts that are not powers of two; L < K/2 makes padding wrap several times.
CASES = [
    Case(1, 3, 8, 2, 3, 5),  # L < K/2: each position duplicated many times in the padding
    Case(2, 6, 8, 1, 5, 3),  # L < K
    Case(2, 8, 8, 3, 4, 6),  # L == K: one chunk, no padding
    Case(1, 13, 8, 2, 7, 9),  # two chunks, padded
    Case(3, 16, 8, 4, 3, 5),  # exactly two chunks
    Case(2, 29, 5, 3, 6, 7),  # six chunks, L % K != 0
    Case(1, 40, 8, 1, 5, 11),  # five chunks, no padding
]

# Sizes around the GPU kernels' tiles (64 query slots, 32-64 keys per step, column slices of 64-256 channels):
# K > 64 (several query tiles per chunk), 3K keys in several partial steps, Cv > 256 and Cm > 64 (two column
# slices, the second partial).
TILE_CASES = [
    Case(1, 10, 70, 1, 3, 6),      # K > 64, L < K: one chunk of padding-heavy slots
    Case(1, 150, 70, 2, 32, 40),   # two query tiles, 3K = 210 keys in partial steps
    Case(1, 30, 24, 1, 20, 300),   # Cv > 256
    Case(2, 20, 12, 2, 70, 16),    # Cm > 64
    Case(2, 97, 40, 2, 37, 133),   # several tiles in every direction, odd widths
    Case(1, 300, 256, 1, 64, 512),  # the large end of the brief: K = 256, Cv = 512
]


def make_inputs(case: Case, dtype=torch.float64, seed: int = 0, requires_grad: bool = False):
    gen = torch.Generator().manual_seed(seed)
    xm = torch.randn(case.n, case.length, case.cm, generator=gen, dtype=dtype)
    v = torch.randn(case.n, case.length, case.cv, generator=gen, dtype=dtype)
    lss = torch.randn(case.n, case.length, case.chunk, generator=gen, dtype=dtype)
    rot = dk.random_rotations(
        case.cm, case.rounds, dk.n_buckets_for(case.length, case.chunk), generator=gen, dtype=dtype
    )
    codes = ref.sblsh_hash(xm, rot)
    perm = ref.bucket_sort(codes)
    if requires_grad:
        for t in (xm, v, lss):
            t.requires_grad_(True)
    return xm, v, lss, rot, perm


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Worst absolute error relative to the largest magnitude of ``expected`` (never divides by ~0)."""
    scale = expected.detach().abs().max().clamp_min(1e-30)
    return float((actual.detach().double() - expected.detach().double()).abs().max() / scale)


def tolerance(dtype: torch.dtype, *, grad: bool = False, tf32: bool = False) -> float:
    """Bound on ``rel_err`` against the float64 reference, derived from the dtype: four units of roundoff of
    its products (TF32: a 10-bit mantissa), at least 2e-5 (float32 sums over thousands of terms). Gradients
    go through P and dS rounded to the input type and through the key-norm backward: four times that, at
    least 1e-4. float64 kernels must agree to rounding."""
    if dtype == torch.float64:
        return 1e-10 if grad else 1e-12
    unit = 2.0**-10 if tf32 else torch.finfo(dtype).eps
    bound = max(4 * unit, 2e-5)
    return max(4 * bound, 1e-4) if grad else bound


def assert_each_default_once(help_text: str) -> None:
    """An argparse --help where no option states its default twice or shows "(default: None)"."""
    assert "(default: None)" not in help_text
    options = " ".join(help_text.split("options:", 1)[1].split()).split(" --")
    assert all(option.count("(default") <= 1 for option in options)
