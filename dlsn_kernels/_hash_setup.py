"""What every backend, the model and the oracle share about GLA's set-up: bucket count, hash rotations, key floor.

These are production values, not part of the oracle: the model draws its rotations here, the kernels
clamp key norms with the same floor, and ``reference`` imports them so that it computes the same thing.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

__all__ = ["KEY_NORM_EPS", "n_buckets_for", "random_rotations"]

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


def random_rotations(
    channels: int,
    n_hashes: int,
    n_buckets: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
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
