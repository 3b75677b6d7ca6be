"""What every backend, the model and the oracle share about GLA's set-up: bucket count, hash rotations, key floor.

These are production values, not part of the oracle: the model draws its rotations here, the kernels
clamp key norms with the same floor, and ``reference`` imports them so that it computes the same thing.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

__all__ = ["KEY_NORM_EPS", "n_buckets_for", "random_rotations", "spherical_rotations"]

# Keys are ``xm / max(||xm||, KEY_NORM_EPS)`` (DESIGN.md 1.4): the floor keeps near-zero keys finite.
KEY_NORM_EPS = 5e-5

MAX_BUCKETS = 128  # the cap in bucket count of DESIGN.md "Semantics"


def _positive_int(value: object, name: str) -> None:
    """Sizes must be whole and >= 1 (SymInt: torch.compile traces sizes taken from shapes)."""
    if not isinstance(value, (numbers.Integral, torch.SymInt)) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def n_buckets_for(length: int, chunk_size: int) -> int:
    """Number of hash buckets for a sequence of ``length`` positions (DESIGN.md "Semantics")."""
    _positive_int(length, "length")
    _positive_int(chunk_size, "chunk_size")
    n = length // chunk_size
    n = min(n + n % 2, MAX_BUCKETS)
    return max(n, 1)


def random_rotations(channels: int, n_hashes: int, n_buckets: int, *, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """``rot [Cm, R, B]``: one random orthonormal ``[Cm, B]`` matrix per hash round.

    Same law as ``torch.nn.init.orthogonal_`` on a ``[Cm, B]`` tensor (QR of a Gaussian matrix,
    signs fixed by the diagonal of R), drawn from ``generator`` when one is given.
    """
    _positive_int(channels, "channels")
    _positive_int(n_hashes, "n_hashes")
    _positive_int(n_buckets, "n_buckets")
    rots = []
    for _ in range(n_hashes):
        flat = torch.randn(max(channels, n_buckets), min(channels, n_buckets), generator=generator,
                           dtype=torch.float64)
        q, r = torch.linalg.qr(flat)
        q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
        if channels < n_buckets:
            q = q.t()
        rots.append(q)
    return torch.stack(rots, dim=1).to(device=device, dtype=dtype)


def spherical_rotations(rot_half: Tensor) -> Tensor:
    """NLSN's spherical LSH as an SB-LSH ``rot [Cm, R, B]``: ``cat[rot_half, -rot_half]`` for Gaussian
    ``rot_half [Cm, R, B/2]``, so every hash (and ``gla_attention``) computes NLSN's code
    ``argmax(cat[x R, -x R])``. Exact: negation is exact in IEEE arithmetic, so ``x . -r`` is ``-(x . r)``
    bit for bit, and ties go to the first maximum, as ``torch.argmax`` picks it (bucket b before b + B/2).
    With no column (``B/2 = 0``, one bucket) a zero ``[Cm, R, 1]``: every position in bucket 0.
    """
    if rot_half.dim() != 3:
        raise ValueError(f"rot_half must be [Cm, R, B/2], got shape {tuple(rot_half.shape)}")
    if rot_half.shape[2] == 0:
        return rot_half.new_zeros(rot_half.shape[0], rot_half.shape[1], 1)
    return torch.cat([rot_half, -rot_half], dim=2)
