"""Baselines written the way their authors write them, to time and size against our fused op.

Two attentions, both in plain PyTorch with every intermediate materialised (bench/NOTES.md "What is compared"):

* **NLSN-style** (Non-Local Sparse Attention, Mei et al. 2021): Gaussian random rotations
  ``[Cm, R, B/2]``, hash code = argmax over ``cat[proj, -proj]``, one sort over all rounds with
  per-round offsets, sorted copies, padded copies, adjacent-bucket concatenation, a
  ``[.., K, 3K]`` score tensor, logsumexp, einsum, unsort, softmax over rounds. No learned score.
* **DLSN-style** (the authors' Global Learnable Attention): the same pipeline with orthonormal
  rotations ``[Cm, R, B]`` (argmax over the projection itself) and the learned score ``fc(f)``
  computed on *every key copy* (the gathered, padded, adjacent ``f`` rows: 3R times per
  position). It can also take a precomputed ``lss = fc(f)`` so tests can feed identical inputs
  to it and to ``dlsn_kernels``.

Both normalise the keys only, with ``F.normalize(eps=5e-5)`` (DESIGN.md 1.4); queries stay raw.

A third, the strongest plain-PyTorch alternative on a GPU: **flex-gla**, GLA written with
``torch.nn.attention.flex_attention`` (rounds as heads, a block mask keeping the adjacent chunks, the learned
score in ``score_mod``, rounds merged by lse; ``dlsn_kernels/flex.py`` has the details, including how chunks
read twice or three times stay exact). It is the ``flex`` backend of dlsn_kernels called without the op
checks and the dispatcher; compiled on CUDA tensors (with flex's own backward), eager and forward-only on CPU.

The cores take ``xm [N, L, Cm]`` and ``v [N, L, Cv]`` plus either ready-made ``perm [N, R, L]``
(positions in bucket order per round) or rotations to hash with. With the same ``perm`` the
DLSN-style core computes exactly what ``dlsn_kernels.chunk_attention`` + ``combine_rounds``
compute; given the same orthonormal ``rot`` it computes ``dlsn_kernels.gla_attention`` (its sort
is stable, as DESIGN.md 1.2 defines; the authors' CPU sort is not).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Constants shared with the kernels (the bucket count and key-norm clamp are part of the method).
from dlsn_kernels import KEY_NORM_EPS, n_buckets_for

__all__ = [
    "KEY_NORM_EPS",
    "n_buckets_for",
    "gaussian_rotations",
    "nlsn_hash",
    "dlsn_hash",
    "sort_by_codes",
    "nlsn_attention",
    "dlsn_attention",
    "flex_gla_attention",
    "NLSAttention",
    "DLSNStyleGLA",
]



def gaussian_rotations(
    channels: int,
    n_hashes: int,
    n_buckets: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """NLSN's rotations: i.i.d. Gaussian ``[Cm, R, B/2]`` (the hash takes ``+-`` of each column)."""
    if n_buckets < 1:
        raise ValueError(f"n_buckets must be >= 1, got {n_buckets}")
    return torch.randn(channels, n_hashes, n_buckets // 2, generator=generator, dtype=dtype, device=device)


def nlsn_hash(xm: Tensor, rot_half: Tensor) -> Tensor:
    """NLSN hash codes ``[N, R, L]`` in ``[0, 2 * rot_half.shape[-1])``.

    ``argmax`` over ``cat[xm @ rot, -(xm @ rot)]``. With fewer than two buckets (``L < 2K``) NLSN's
    rotation has no column; every position then lands in bucket 0 (NLSN itself would fail there).
    """
    n, length, _ = xm.shape
    if rot_half.shape[-1] == 0:
        return torch.zeros(n, rot_half.shape[1], length, dtype=torch.long, device=xm.device)
    # The authors expand one rotation over the batch and contract with einsum.
    rotations = rot_half.to(xm.dtype).unsqueeze(0).expand(n, -1, -1, -1)
    rotated = torch.einsum("btf,bfhi->bhti", xm, rotations)  # [N, R, L, B/2]
    rotated = torch.cat([rotated, -rotated], dim=-1)  # [N, R, L, B]
    return torch.argmax(rotated, dim=-1)


def dlsn_hash(xm: Tensor, rot: Tensor) -> Tensor:
    """DLSN (SB-LSH) codes ``[N, R, L]``: argmax over ``xm @ rot``, ``rot [Cm, R, B]`` orthonormal."""
    rotations = rot.to(xm.dtype).unsqueeze(0).expand(xm.shape[0], -1, -1, -1)
    rotated = torch.einsum("btf,bfhi->bhti", xm, rotations)  # [N, R, L, B]
    return torch.argmax(rotated, dim=-1)


def sort_by_codes(codes: Tensor, n_buckets: int, stable: bool = True) -> tuple[Tensor, Tensor]:
    """The authors' single sort over all rounds: ``(indices, undo_sort)``, both ``[N, R*L]``.

    Codes get an offset of ``r * n_buckets`` so rounds never mix, then one sort over ``R*L``.
    ``indices % L`` is the position in each slot; ``undo_sort`` puts slots back in position order.
    Stable by default, so ties keep position order (DESIGN.md 1.2); ``stable=False`` is the authors'
    own ``torch.sort`` (what the whole-network benchmark times).
    """
    n, rounds, _ = codes.shape
    offsets = torch.arange(rounds, device=codes.device).reshape(1, -1, 1) * n_buckets
    flat = (codes.long() + offsets).reshape(n, -1)
    _, indices = flat.sort(dim=-1, stable=stable)
    _, undo_sort = indices.sort(dim=-1)
    return indices, undo_sort


def _indices_from_perm(perm: Tensor) -> tuple[Tensor, Tensor]:
    """``perm [N, R, L]`` (positions in bucket order) as the authors' ``(indices, undo_sort)``."""
    n, rounds, length = perm.shape
    offsets = torch.arange(rounds, device=perm.device).reshape(1, -1, 1) * length
    indices = (perm.long() + offsets).reshape(n, -1)
    _, undo_sort = indices.sort(dim=-1)
    return indices, undo_sort


def _batched_index_select(values: Tensor, indices: Tensor) -> Tensor:
    """``values [N, L, C]``, ``indices [N, M]`` -> ``[N, M, C]`` (a materialised gathered copy)."""
    return values.gather(1, indices.unsqueeze(-1).expand(-1, -1, values.shape[-1]))


def _add_adjacent_buckets(x: Tensor) -> Tensor:
    """``[N, R, nc, K, C] -> [N, R, nc, 3K, C]``: chunk c, then c-1, then c+1 (copies, wrapping)."""
    back = torch.cat([x[:, :, -1:], x[:, :, :-1]], dim=2)
    forward = torch.cat([x[:, :, 1:], x[:, :, :1]], dim=2)
    return torch.cat([x, back, forward], dim=3)


def _pad_to_chunks(x: Tensor, padding: int) -> Tensor:
    """Append ``padding`` slots copied from the end of each round (DESIGN.md 1.3), as a new tensor.

    The authors copy ``x[:, :, -padding:]``; when ``padding > L`` that slice is too short, so the
    same rule ``slot p -> slot (p - pad) mod L`` is applied with an index instead.
    """
    if padding == 0:
        return x
    length = x.shape[2]
    if padding <= length:
        extra = x[:, :, -padding:].clone()
    else:
        wrap = torch.arange(length - padding, length, device=x.device) % length
        extra = x[:, :, wrap]
    return torch.cat([x, extra], dim=2)


def _bucket_attention(
    xm: Tensor,
    v: Tensor,
    indices: Tensor,
    undo_sort: Tensor,
    rounds: int,
    chunk_size: int,
    learned_score=None,
) -> tuple[Tensor, Tensor]:
    """The shared body: sort, pad, chunk, adjacent buckets, scores, softmax, unsort.

    ``learned_score(index_sel, pad, chunk, adjacent)`` returns the ``[N, R, nc, K, 3K]`` term added to
    the scores, or None for NLSN. Returns ``ret [N, R, L, Cv]`` and ``bucket_score [N, R, L]``.
    """
    n, length, cm = xm.shape
    cv = v.shape[-1]
    k = chunk_size
    mod_indices = indices % length

    x_sorted = _batched_index_select(xm, mod_indices)  # [N, R*L, Cm]
    y_sorted = _batched_index_select(v, mod_indices)  # [N, R*L, Cv]

    padding = (k - length % k) % k
    x_buckets = _pad_to_chunks(x_sorted.reshape(n, rounds, length, cm), padding)
    y_buckets = _pad_to_chunks(y_sorted.reshape(n, rounds, length, cv), padding)
    x_buckets = x_buckets.reshape(n, rounds, -1, k, cm)  # queries
    y_buckets = y_buckets.reshape(n, rounds, -1, k, cv)

    x_match = F.normalize(x_buckets, p=2, dim=-1, eps=KEY_NORM_EPS)  # keys only
    x_match = _add_adjacent_buckets(x_match)  # [N, R, nc, 3K, Cm]
    y_buckets = _add_adjacent_buckets(y_buckets)  # [N, R, nc, 3K, Cv]

    raw_score = torch.einsum("bhkie,bhkje->bhkij", x_buckets, x_match)  # [N, R, nc, K, 3K]
    if learned_score is not None:
        raw_score = raw_score + learned_score(mod_indices, padding)

    bucket_score = torch.logsumexp(raw_score, dim=-1, keepdim=True)
    score = torch.exp(raw_score - bucket_score)
    ret = torch.einsum("bukij,bukje->bukie", score, y_buckets)  # [N, R, nc, K, Cv]
    ret = ret.reshape(n, rounds, -1, cv)
    bucket_score = bucket_score.reshape(n, rounds, -1)
    if padding:
        ret = ret[:, :, :-padding].clone()
        bucket_score = bucket_score[:, :, :-padding].clone()

    ret = _batched_index_select(ret.reshape(n, -1, cv), undo_sort)  # back to position order
    bucket_score = bucket_score.reshape(n, -1).gather(1, undo_sort)
    return ret.reshape(n, rounds, length, cv), bucket_score.reshape(n, rounds, length)


def _combine_rounds(ret: Tensor, bucket_score: Tensor) -> Tensor:
    """``sum_r softmax_r(bucket_score) ret_r``: ``[N, R, L, Cv], [N, R, L] -> [N, L, Cv]``."""
    probs = F.softmax(bucket_score.unsqueeze(-1), dim=1)
    return torch.sum(ret * probs, dim=1)


def _check_core_inputs(xm: Tensor, v: Tensor, chunk_size: int) -> None:
    if xm.dim() != 3:
        raise ValueError(f"xm must be [N, L, Cm], got shape {tuple(xm.shape)}")
    if v.dim() != 3 or v.shape[:2] != xm.shape[:2]:
        raise ValueError(f"v must be [N, L, Cv] with N, L of xm {tuple(xm.shape[:2])}, got {tuple(v.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _check_perm(perm: Tensor, xm: Tensor) -> None:
    if perm.dim() != 3 or perm.shape[0] != xm.shape[0] or perm.shape[2] != xm.shape[1]:
        raise ValueError(f"perm must be [N, R, L] with N, L of xm, got {tuple(perm.shape)}")


def nlsn_attention(
    xm: Tensor,
    v: Tensor,
    chunk_size: int,
    *,
    rot_half: Tensor | None = None,
    perm: Tensor | None = None,
    return_rounds: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """NLSN-style attention core: ``y [N, L, Cv]`` (or per round ``(ret, bucket_score)``).

    Give either ``perm [N, R, L]`` (positions in bucket order) or ``rot_half [Cm, R, B/2]``
    (Gaussian, see :func:`gaussian_rotations`) to hash with; hashing runs without gradient.
    """
    _check_core_inputs(xm, v, chunk_size)
    if (perm is None) == (rot_half is None):
        raise ValueError("give exactly one of perm and rot_half")
    if perm is not None:
        _check_perm(perm, xm)
        rounds = perm.shape[1]
        indices, undo_sort = _indices_from_perm(perm)
    else:
        rounds = rot_half.shape[1]
        n_buckets = max(2 * rot_half.shape[-1], 1)
        with torch.no_grad():
            codes = nlsn_hash(xm.detach(), rot_half)
        indices, undo_sort = sort_by_codes(codes, n_buckets)
    ret, bucket_score = _bucket_attention(xm, v, indices, undo_sort, rounds, chunk_size)
    if return_rounds:
        return ret, bucket_score
    return _combine_rounds(ret, bucket_score)


def dlsn_attention(
    xm: Tensor,
    v: Tensor,
    chunk_size: int,
    *,
    f: Tensor | None = None,
    fc: nn.Module | None = None,
    lss: Tensor | None = None,
    rot: Tensor | None = None,
    perm: Tensor | None = None,
    return_rounds: bool = False,
    stable: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """DLSN-style attention core (the authors' GLA): ``y [N, L, Cv]`` (or per round ``(ret, lse)``).

    Learned score: either ``f [N, L, C]`` and ``fc`` (``C -> K``), applied as the authors do to every
    gathered, padded, adjacent copy of ``f`` (3R times per position), or a precomputed
    ``lss [N, L, K]`` that is gathered the same way (what ``fc`` would give, 3R times cheaper).
    Hash input: ``perm [N, R, L]``, or orthonormal ``rot [Cm, R, B]`` (argmax; a stable sort, or the
    authors' unstable one with ``stable=False``).
    """
    _check_core_inputs(xm, v, chunk_size)
    if (perm is None) == (rot is None):
        raise ValueError("give exactly one of perm and rot")
    if (lss is None) == (f is None):
        raise ValueError("give exactly one of lss and f (with fc)")
    if f is not None and fc is None:
        raise ValueError("f needs fc, the module that maps it to K scores")
    if lss is not None and (lss.shape[:2] != xm.shape[:2] or lss.shape[-1] != chunk_size):
        raise ValueError(f"lss must be [N, L, chunk_size={chunk_size}], got {tuple(lss.shape)}")
    if perm is not None:
        _check_perm(perm, xm)
        rounds = perm.shape[1]
        indices, undo_sort = _indices_from_perm(perm)
    else:
        rounds = rot.shape[1]
        with torch.no_grad():
            codes = dlsn_hash(xm.detach(), rot)
        indices, undo_sort = sort_by_codes(codes, rot.shape[-1], stable)

    n, length, _ = xm.shape
    source = f if f is not None else lss

    def learned_score(mod_indices: Tensor, padding: int) -> Tensor:
        c = source.shape[-1]
        rows = _batched_index_select(source, mod_indices).reshape(n, rounds, length, c)
        rows = _pad_to_chunks(rows, padding).reshape(n, rounds, -1, chunk_size, c)
        rows = _add_adjacent_buckets(rows)  # [N, R, nc, 3K, C or K]
        scores = fc(rows) if f is not None else rows  # [N, R, nc, 3K keys, K query slots]
        return scores.permute(0, 1, 2, 4, 3)

    ret, bucket_score = _bucket_attention(xm, v, indices, undo_sort, rounds, chunk_size, learned_score)
    if return_rounds:
        return ret, bucket_score
    return _combine_rounds(ret, bucket_score)


def flex_gla_attention(
    xm: Tensor,
    v: Tensor,
    lss: Tensor,
    chunk_size: int,
    *,
    rot: Tensor | None = None,
    perm: Tensor | None = None,
) -> Tensor:
    """GLA as FlexAttention: ``y [N, L, Cv]`` from ``lss [N, L, K]`` and either orthonormal ``rot [Cm, R, B]``
    (hashed in IEEE float32, stable sort) or ``perm [N, R, L]``. Same semantics as ``dlsn_kernels``
    (DESIGN.md 1.1-1.5). Differentiable on CUDA tensors; on CPU tensors forward only (eager, materialising the
    ``[N, R, Lp', Lp']`` scores, ``Lp'`` the padded length with chunks rounded up to 16 slots)."""
    from dlsn_kernels import flex

    _check_core_inputs(xm, v, chunk_size)
    if (perm is None) == (rot is None):
        raise ValueError("give exactly one of perm and rot")
    if lss.shape[:2] != xm.shape[:2] or lss.shape[-1] != chunk_size:
        raise ValueError(f"lss must be [N, L, chunk_size={chunk_size}], got {tuple(lss.shape)}")
    if rot is not None:
        return flex.gla_attention(xm, v, lss, rot, chunk_size)[0]
    _check_perm(perm, xm)
    out, lse = flex.chunk_attention(xm, v, lss, perm, chunk_size)
    return flex.merge_rounds(out, lse)[0]


def _to_rows(x: Tensor) -> Tensor:
    """``[N, C, H, W] -> [N, H*W, C]`` (the authors' view/permute)."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h * w).permute(0, 2, 1).contiguous()


class NLSAttention(nn.Module):
    """Non-Local Sparse Attention as NLSN builds it: ``y * res_scale + x``.

    ``conv_match`` 3x3 ``C -> C/reduction`` and ``conv_assembly`` 1x1 ``C -> C``, both with bias and
    no activation (wrapped in Sequential so parameter names match NLSN checkpoints). Fresh
    Gaussian rotations on every call, as the authors draw them.
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 4,
        chunk_size: int = 144,
        n_hashes: int = 4,
        res_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if channels % reduction:
            raise ValueError(f"channels={channels} must be divisible by reduction={reduction}")
        self.chunk_size = chunk_size
        self.n_hashes = n_hashes
        self.res_scale = res_scale
        self.conv_match = nn.Sequential(nn.Conv2d(channels, channels // reduction, 3, padding=1))
        self.conv_assembly = nn.Sequential(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        xm = _to_rows(self.conv_match(x))
        v = _to_rows(self.conv_assembly(x))
        n_buckets = n_buckets_for(h * w, self.chunk_size)
        rot_half = gaussian_rotations(xm.shape[-1], self.n_hashes, n_buckets, device=x.device, dtype=x.dtype)
        y = nlsn_attention(xm, v, self.chunk_size, rot_half=rot_half)
        return y.permute(0, 2, 1).reshape(n, c, h, w) * self.res_scale + x


class DLSNStyleGLA(nn.Module):
    """Global Learnable Attention as the authors' code runs it (``fc`` on every key copy).

    Layers and parameter names as DESIGN.md "Semantics" (``conv_match``, ``conv_assembly``,
    ``conv_assembly_fc``: conv 3x3 with bias + ReLU; ``fc``: Linear, ReLU, Linear), so a state dict
    of our ``GLA`` or of the official checkpoints loads into it. Fresh orthonormal rotations per call.
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 4,
        chunk_size: int = 144,
        n_hashes: int = 4,
        res_scale: float = 1.0,
        stable: bool = True,
    ) -> None:
        super().__init__()
        if channels % reduction:
            raise ValueError(f"channels={channels} must be divisible by reduction={reduction}")
        self.chunk_size = chunk_size
        self.n_hashes = n_hashes
        self.res_scale = res_scale
        self.stable = stable  # False: the authors' unstable torch.sort

        def conv_relu(out_channels: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(channels, out_channels, 3, padding=1), nn.ReLU(inplace=True))

        self.conv_match = conv_relu(channels // reduction)
        self.conv_assembly = conv_relu(channels)
        self.conv_assembly_fc = conv_relu(channels)
        self.fc = nn.Sequential(
            nn.Linear(channels, chunk_size), nn.ReLU(inplace=True), nn.Linear(chunk_size, chunk_size)
        )

    def forward(self, x: Tensor, rot: Tensor | None = None) -> Tensor:
        """``x [N, C, H, W]``; ``rot [Cm, R, B]`` fixes the rotations (tests), else fresh ones."""
        n, c, h, w = x.shape
        xm = _to_rows(self.conv_match(x))
        v = _to_rows(self.conv_assembly(x))
        f = _to_rows(self.conv_assembly_fc(x))
        if rot is None:
            n_buckets = n_buckets_for(h * w, self.chunk_size)
            # The authors' draw: one orthogonal_ [Cm, B] matrix per round, on the CPU.
            rounds = [nn.init.orthogonal_(torch.empty(xm.shape[-1], n_buckets)) for _ in range(self.n_hashes)]
            rot = torch.stack(rounds, dim=1).to(device=x.device, dtype=x.dtype)
        y = dlsn_attention(xm, v, self.chunk_size, f=f, fc=self.fc, rot=rot, stable=self.stable)
        return y.permute(0, 2, 1).reshape(n, c, h, w) * self.res_scale + x
