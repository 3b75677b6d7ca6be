"""Non-Local Sparse Attention (NLSA) and the NLSN network (Mei et al., CVPR 2021) on the GLA kernels.

NLSA's attention is GLA's (DESIGN.md "Semantics" 1.2-1.5: stable sort by bucket, chunks of K attending to
themselves and their two neighbours, keys normalised with the norm clamped at 5e-5, raw queries, rounds merged
by a softmax of their logsumexps, ``B = min(L//K + (L//K)%2, 128)`` buckets) with two differences, both
expressed here through :func:`dlsn_kernels.gla_attention` without a kernel of their own:

* **Spherical LSH.** NLSN draws Gaussian rotations ``[Cm, R, B/2]`` and hashes to the argmax over
  ``cat[xm R, -xm R]`` (B values, the first maximum wins, as ``torch.argmax`` picks it). That is the SB-LSH
  hash of the kernels with the rotation :func:`dlsn_kernels.spherical_rotations` ``cat[R, -R]`` ``[Cm, R, B]``:
  negation is exact in IEEE arithmetic, so column ``b + B/2`` of the projection is bitwise the negation of
  column ``b``, and both hashes take the lowest index on ties. With ``B = 1`` (``L < 2K``, where NLSN itself
  has no rotation column and fails) every position goes to bucket 0.
* **No learned score.** The kernels run with ``lss=None``: scores ``q . k_hat`` only, with no learned-score
  tensor, loads or gradient on any backend.

Rotations follow GLA's rules (``dlsn.models.gla``): fresh Gaussian ones from the global generator in
training, as the authors draw them; in eval mode drawn from the block's inference seed (repeatable
bitwise; :func:`~dlsn.models.gla.set_inference` gives every block of a network its own seed, and ``seed=None``
restores the authors' fresh draws). The seeded draw is ::

    rot_half = torch.randn(Cm, R, B // 2, generator=torch.Generator().manual_seed(s))   # float32, CPU

behind the custom op ``dlsn::seeded_gaussian_rotations`` so that torch.compile sees one opaque call.

The authors' code also sorts with an unstable sort (ties in bucket order may differ from run to run);
the kernels sort stably, which is one of the orders the authors' sort may return.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

import dlsn_kernels
from dlsn.errors import CheckpointError

from . import official
from .dlsn import LFFB, MeanShift, Upsampler, _GLANetwork, check_scale, conv3x3
from .gla import HashedAttentionBlock, _as_int64, _check_positive_int, eager_or_op, set_inference
from .official import _indices, _infer_rgb_range
from .residual import scaled_residual

__all__ = ["NLSA", "NLSN", "NLSN_DEFAULTS", "infer_nlsn_config", "seeded_gaussian_rotations"]

# Settings the weights of an authors' NLSN cannot tell: the values of their README's training command.
NLSN_DEFAULTS = {"chunk_size": 144, "n_hashes": 4, "res_scale": 0.1}


def _draw_gaussian(seed: int, channels: int, n_hashes: int, half_buckets: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(channels, n_hashes, half_buckets, generator=generator, dtype=torch.float32)


seeded_gaussian_rotations = torch.library.custom_op("dlsn::seeded_gaussian_rotations", mutates_args=())(
    _draw_gaussian)
seeded_gaussian_rotations.__doc__ = """``[channels, n_hashes, half_buckets]`` float32 CPU Gaussian rotations
drawn from a generator seeded with ``seed`` (NLSN's law). A custom op for the same reason as
``dlsn::seeded_rotations``: torch.compile then sees one opaque call instead of a generator made on every call
(eager calls use the plain function: :func:`dlsn.models.gla.eager_or_op`)."""


@seeded_gaussian_rotations.register_fake
def _seeded_gaussian_rotations_fake(seed: int, channels: int, n_hashes: int, half_buckets: int) -> Tensor:
    return torch.empty(channels, n_hashes, half_buckets, dtype=torch.float32, device="cpu")



class NLSA(HashedAttentionBlock):
    """Non-Local Sparse Attention block (NLSN's ``NonLocalSparseAttention``): ``attention(x) * res_scale + x``.

    ``conv_match`` (3x3, C -> C/reduction) and ``conv_assembly`` (1x1, C -> C), both with bias and without
    activation, each in a Sequential so the weights are named ``conv_match.0.*`` / ``conv_assembly.0.*`` as
    in the authors' BasicBlock. The attention runs through :func:`dlsn_kernels.gla_attention` with the
    rotation ``cat[R, -R]`` and no learned score (``lss=None``; module docstring).

    Args:
        channels: C (256 in NLSN).
        reduction: match features have ``C / reduction`` channels (4 in NLSN).
        chunk_size: K (144, the authors' default and README value).
        n_hashes: R, hash rounds in training (4); evaluation may use another count (:meth:`set_inference`).
        res_scale: scale of the attention output before the skip (the authors' class default 1; NLSN
            passes its ``res_scale``, 0.1).
        backend: kernel backend of :func:`dlsn_kernels.gla_attention` (None: automatic);
            :func:`dlsn.models.gla.set_backend` sets it network-wide.
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 4,
        chunk_size: int = 144,
        n_hashes: int = 4,
        res_scale: float = 1.0,
        backend: str | None = None,
    ) -> None:
        super().__init__(channels, reduction, chunk_size, n_hashes, res_scale, backend)
        self.conv_match = nn.Sequential(nn.Conv2d(channels, channels // reduction, 3, padding=1))
        self.conv_assembly = nn.Sequential(nn.Conv2d(channels, channels, 1))

    def rotations(
        self, length: int, device: torch.device, generator: torch.Generator | None = None
    ) -> Tensor:
        """NLSN's Gaussian ``rot_half [Cm, R, B // 2]`` (float32, on ``device``) for ``length = H*W`` positions.

        Drawn from ``generator`` when given; else, in eval mode with an inference seed, from that seed (the
        same tensor on every call); else from PyTorch's global generator. ``B // 2`` is 0 when ``B = 1``.
        """
        half = dlsn_kernels.n_buckets_for(length, self.chunk_size) // 2
        match_channels = self.channels // self.reduction
        if generator is None and not self.training and self.inference_seed is not None:
            draw = eager_or_op(seeded_gaussian_rotations, _draw_gaussian)
            rot = draw(_as_int64(self.inference_seed), match_channels, self.rounds(), half)
            return rot.to(device)
        rot = torch.randn(match_channels, self.rounds(), half, generator=generator, dtype=torch.float32)
        return rot.to(device)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``x [N, C, H, W] -> [N, C, H, W]``; ``generator`` (CPU), when given, draws the rotations."""
        return self.attend(x, self.rotations(x.shape[2] * x.shape[3], x.device, generator))

    def attend(self, x: Tensor, rot_half: Tensor) -> Tensor:
        """The block with given rotations ``rot_half [Cm, R, B // 2]`` (B from :func:`dlsn_kernels.n_buckets_for`)."""
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x must have shape [N, {self.channels}, H, W], got {tuple(x.shape)}")
        n, _, height, width = x.shape
        length = height * width
        expected = (self.channels // self.reduction, dlsn_kernels.n_buckets_for(length, self.chunk_size) // 2)
        if rot_half.dim() != 3 or (rot_half.shape[0], rot_half.shape[2]) != expected:
            raise ValueError(f"rot_half must be [{expected[0]}, R, {expected[1]}], got {tuple(rot_half.shape)}")

        def rows(t: Tensor) -> Tensor:  # [N, C, H, W] -> [N, L, C], position l = h * W + w
            return t.permute(0, 2, 3, 1).reshape(n, length, t.shape[1]).contiguous()

        xm = rows(self.conv_match(x))
        v = rows(self.conv_assembly(x))
        dtype = v.dtype  # one dtype for the op, as in GLA.forward (autocast may leave them different)
        if dtype in (torch.float16, torch.bfloat16) and not dlsn_kernels.resolved_takes_half(x.device, self.backend):
            dtype = torch.float32
        xm, v = xm.to(dtype).contiguous(), v.to(dtype).contiguous()
        rot = dlsn_kernels.spherical_rotations(rot_half.to(device=x.device, dtype=dtype))
        with torch.autocast(device_type=x.device.type, enabled=False):  # no learned score: lss=None
            y = dlsn_kernels.gla_attention(xm, v, None, rot, self.chunk_size, backend=self.backend)
        y = y.reshape(n, height, width, self.channels).permute(0, 3, 1, 2)
        return scaled_residual(y, x, self.res_scale)




class NLSN(_GLANetwork):
    """Non-Local Sparse Network: EDSR (``n_resblocks`` ResBlocks of ``n_feats`` channels) with an NLSA block
    first and one after every 8th ResBlock (5 in the paper's 32-block network).

    The authors' layout, so their state dicts load unchanged: ``sub_mean``, ``head.0``, ``body.<i>`` (NLSA
    blocks with ``conv_match.0`` / ``conv_assembly.0``, ResBlocks with ``body.0`` / ``body.2`` convs, the
    trailing conv last), ``tail.0.<k>`` (upsampler), ``tail.1``, ``add_mean``. Arguments are named as the
    authors' options; defaults are the paper's network and their README's training command (chunk_size 144,
    n_hashes 4, res_scale 0.1; rgb_range 1 as in their commands). Differences from the authors' code: fixed
    seeded rotations in eval mode (theirs vary run to run, ``set_inference(seed=None)`` restores that), a
    stable sort, and feature maps smaller than one chunk work (theirs get 0 buckets and fail).
    """

    ARCH = "nlsn"

    def __init__(
        self,
        scale: int,
        n_resblocks: int = 32,
        n_feats: int = 256,
        chunk_size: int = 144,
        n_hashes: int = 4,
        reduction: int = 4,
        res_scale: float = 0.1,
        rgb_range: float = 1.0,
        n_colors: int = 3,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.scale = check_scale(scale)
        _check_positive_int(n_feats, "n_feats")
        if not isinstance(n_resblocks, int) or isinstance(n_resblocks, bool) or n_resblocks < 0:
            raise ValueError(f"n_resblocks must be an int >= 0, got {n_resblocks!r}")
        if n_colors != 3:  # the authors' MeanShift is RGB only
            raise ValueError(f"n_colors must be 3 (RGB), got {n_colors!r}")
        self._config = {
            "scale": self.scale,
            "n_resblocks": n_resblocks,
            "n_feats": n_feats,
            "chunk_size": chunk_size,
            "n_hashes": n_hashes,
            "reduction": reduction,
            "res_scale": float(res_scale),
            "rgb_range": float(rgb_range),
            "n_colors": n_colors,
        }

        def attention() -> NLSA:
            return NLSA(n_feats, reduction, chunk_size, n_hashes, res_scale, backend=backend)

        self.sub_mean = MeanShift(rgb_range, sign=-1)
        self.add_mean = MeanShift(rgb_range, sign=1)
        self.head = nn.Sequential(conv3x3(n_colors, n_feats))
        # The authors' ResBlock is LFFB's layout (conv, ReLU, conv; body * res_scale + x).
        body: list[nn.Module] = [attention()]
        for i in range(n_resblocks):
            body.append(LFFB(n_feats, res_scale))
            if (i + 1) % 8 == 0:
                body.append(attention())
        body.append(conv3x3(n_feats, n_feats))
        self.body = nn.Sequential(*body)
        self.tail = nn.Sequential(Upsampler(self.scale, n_feats), conv3x3(n_feats, n_colors))
        set_inference(self)  # per-block eval seeds from base seed 0 (gla.py "Hash rotations")


def _shape(state: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    return official._shape(state, key, "an NLSN")


def infer_nlsn_config(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """The NLSN config of an authors' NLSN state dict, read from its keys and tensor shapes.

    The weights do not tell ``chunk_size``, ``n_hashes`` or ``res_scale``: the authors' README run
    (144, 4, 0.1; :data:`NLSN_DEFAULTS`) is assumed. :class:`CheckpointError` when ``state`` is not one.
    """
    n_feats = official._head_features(state, "an NLSN")
    attention = _indices(state, r"^body\.(\d+)\.conv_match\.0\.weight$")
    resblocks = _indices(state, r"^body\.(\d+)\.body\.0\.weight$")
    if not attention or attention[0] != 0:
        raise CheckpointError("not an NLSN state dict: no attention block (conv_match) at body.0")
    n_resblocks = len(resblocks)
    # The authors' order: attention, then after every 8th ResBlock another; the body conv last.
    expected = [0]
    for i in range(n_resblocks):
        expected.append(len(expected))
        if (i + 1) % 8 == 0:
            expected.append(len(expected))
    if sorted(attention + resblocks) != expected:
        raise CheckpointError(f"not an NLSN state dict: body blocks at {sorted(attention + resblocks)}")
    _shape(state, f"body.{len(expected)}.weight")  # the conv after the blocks
    match_channels = _shape(state, "body.0.conv_match.0.weight")[0]
    if match_channels < 1 or n_feats % match_channels:
        raise CheckpointError(f"body.0.conv_match has {match_channels} channels, not a divisor of {n_feats}")

    scale = official._infer_tail_scale(state, n_feats, "an NLSN")
    return {
        "arch": "nlsn",
        "scale": scale,
        "n_resblocks": n_resblocks,
        "n_feats": n_feats,
        **NLSN_DEFAULTS,
        "reduction": n_feats // match_channels,
        "rgb_range": _infer_rgb_range(state),
        "n_colors": 3,
    }
