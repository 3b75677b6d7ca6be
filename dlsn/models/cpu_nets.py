"""Small networks for short CPU runs: the ``cpu_default`` preset's DLSN with a bicubic global residual,
and the ``cnn`` preset's plain residual CNN, the no-attention baseline it is compared with."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .dlsn import DLSN, LFFB, MeanShift, Upsampler, _GLANetwork, check_scale, conv3x3
from .tail import run_tail

__all__ = ["DLSNResidual", "PlainSR", "bicubic_base"]


def bicubic_base(x: Tensor, scale: int) -> Tensor:
    """The upsampling a residual network adds its output to (PyTorch bicubic: cheap, on any device)."""
    return F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False)


def _zero_last_conv(tail: nn.Sequential) -> None:
    # An untrained residual network then returns exactly its bicubic base.
    nn.init.zeros_(tail[-1].weight)
    nn.init.zeros_(tail[-1].bias)


class DLSNResidual(DLSN):
    """DLSN whose tail output is added to a bicubic upsampling of the input (a global residual, as in
    VDSR) instead of to the DIV2K mean; the last conv starts at zero.

    Same modules and parameter names as :class:`DLSN` (``add_mean`` is kept but unused). An untrained
    network is bicubic interpolation and training only has to learn the missing detail: in a few CPU
    minutes this gained about twice as much over bicubic as the plain DLSN layout.
    """

    ARCH = "dlsn_residual"

    def __init__(
        self,
        scale: int,
        n_feats: int = 32,
        n_resgroups: int = 1,
        n_resblocks: int = 4,
        reduction: int = 4,
        chunk_size: int = 32,
        n_hashes: int = 1,
        res_scale: float = 1.0,
        rgb_range: float = 255.0,
        backend: str | None = None,
    ) -> None:
        super().__init__(scale, n_feats, n_resgroups, n_resblocks, reduction, chunk_size, n_hashes,
                         res_scale, rgb_range, backend)
        _zero_last_conv(self.tail)

    def _forward(self, x: Tensor) -> Tensor:
        features = self.head(self.sub_mean(x))
        features = self.body(features) + features
        return run_tail(self.tail, features, self.scale) + bicubic_base(x, self.scale)


class PlainSR(_GLANetwork):
    """Plain residual CNN (EDSR-baseline layout, no GLA): ``head -> n_resblocks LFFB -> conv`` plus
    the long skip, then the sub-pixel tail. The no-attention baseline of the ``cnn`` preset; same
    module names as :class:`EDSRGLA` without its GLA block. ``bicubic_residual``: add the output to
    a bicubic upsampling of the input, as :class:`DLSNResidual` does."""

    ARCH = "cnn"

    def __init__(
        self,
        scale: int,
        n_feats: int = 32,
        n_resblocks: int = 4,
        res_scale: float = 1.0,
        bicubic_residual: bool = False,
        rgb_range: float = 255.0,
        backend: str | None = None,  # no GLA: accepted so every architecture builds the same way
    ) -> None:
        super().__init__()
        self.scale = check_scale(scale)
        if not isinstance(n_feats, int) or n_feats < 1:
            raise ValueError(f"n_feats must be an int >= 1, got {n_feats!r}")
        if not isinstance(n_resblocks, int) or n_resblocks < 0:
            raise ValueError(f"n_resblocks must be an int >= 0, got {n_resblocks!r}")
        self._config = {
            "scale": self.scale,
            "n_feats": n_feats,
            "n_resblocks": n_resblocks,
            "res_scale": float(res_scale),
            "bicubic_residual": bool(bicubic_residual),
            "rgb_range": float(rgb_range),
        }
        self.bicubic_residual = bool(bicubic_residual)
        self.sub_mean = MeanShift(rgb_range, sign=-1)
        self.add_mean = MeanShift(rgb_range, sign=1)
        self.head = nn.Sequential(conv3x3(3, n_feats))
        blocks: list[nn.Module] = [LFFB(n_feats, res_scale) for _ in range(n_resblocks)]
        blocks.append(conv3x3(n_feats, n_feats))
        self.body = nn.Sequential(*blocks)
        self.tail = nn.Sequential(Upsampler(self.scale, n_feats), conv3x3(n_feats, 3))
        if self.bicubic_residual:
            _zero_last_conv(self.tail)

    def _forward(self, x: Tensor) -> Tensor:
        features = self.head(self.sub_mean(x))
        features = self.body(features) + features
        if self.bicubic_residual:
            return run_tail(self.tail, features, self.scale) + bicubic_base(x, self.scale)
        return self.add_mean(run_tail(self.tail, features, self.scale))
