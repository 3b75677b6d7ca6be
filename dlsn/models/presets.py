"""Named model configurations and building a model from a config dict.

Parameter counts (``sum(p.numel() for p in model.parameters())``, mean shifts included, the
authors' unused scalar ``a`` not):

| preset | x2 | x3 | x4 |
|---|---|---|---|
| ``paper`` (C=256, 10 GLAFFM x 4 LFFB, K=128, R=3) | 69,842,587 | 72,792,987 | 72,202,907 |
| ``small`` (C=128, same depth) | 17,678,427 | 18,416,347 | 18,268,763 |

``paper`` equals the authors' checkpoints minus ``a`` (header lines of
reference/official_dlsn_x*_state_dict.txt). ``small`` is the paper's "C=128, about 18.27M" model,
the figure being its x4 count. ``tiny`` is for CPU runs and tests, ``edsr_gla`` shows GLA as a
drop-in block in EDSR-baseline.
"""

from __future__ import annotations

import copy
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .dlsn import DLSN, EDSRGLA, LFFB, MeanShift, Upsampler, _GLANetwork, check_scale, conv3x3

__all__ = ["ARCHITECTURES", "PRESETS", "build_model", "model_from_config", "preset_config"]

ARCHITECTURES: dict[str, type[_GLANetwork]] = {DLSN.ARCH: DLSN, EDSRGLA.ARCH: EDSRGLA}

PRESETS: dict[str, dict[str, Any]] = {
    # About 0.2M parameters, for tests and CPU smoke training: a step on 16 LR patches of 48x48
    # took about 5 s with the cpu kernels (10 s with the reference) on 2 busy CPU cores.
    "tiny": {
        "arch": "dlsn",
        "n_feats": 32,
        "n_resgroups": 2,
        "n_resblocks": 2,
        "reduction": 4,
        "chunk_size": 64,
        "n_hashes": 2,
        "res_scale": 0.1,
        "rgb_range": 255.0,
    },
    "small": {
        "arch": "dlsn",
        "n_feats": 128,
        "n_resgroups": 10,
        "n_resblocks": 4,
        "reduction": 4,
        "chunk_size": 128,
        "n_hashes": 3,
        "res_scale": 0.1,
        "rgb_range": 255.0,
    },
    "paper": {
        "arch": "dlsn",
        "n_feats": 256,
        "n_resgroups": 10,
        "n_resblocks": 4,
        "reduction": 4,
        "chunk_size": 128,
        "n_hashes": 3,
        "res_scale": 0.1,
        "rgb_range": 255.0,
    },
    # EDSR-baseline (16 blocks, 64 channels, res_scale 1) with one GLA after block 8.
    "edsr_gla": {
        "arch": "edsr_gla",
        "n_feats": 64,
        "n_resblocks": 16,
        "res_scale": 1.0,
        "gla_position": 8,
        "reduction": 4,
        "chunk_size": 128,
        "n_hashes": 3,
        "rgb_range": 255.0,
    },
    # The default of ``python -m dlsn.train`` (minutes on a CPU): one DLSN group of 4 LFFB, GLA and
    # a conv, adding to a bicubic upsampling (DLSNResidual below). res_scale 1, not the paper's 0.1:
    # with a single group the 0.1 would damp the whole body and slow the short run down.
    "cpu_default": {
        "arch": "dlsn_residual",
        "n_feats": 32,
        "n_resgroups": 1,
        "n_resblocks": 4,
        "reduction": 4,
        "chunk_size": 32,
        "n_hashes": 1,
        "res_scale": 1.0,
        "rgb_range": 255.0,
    },
    # cpu_default without GLA (and its group conv): the plain residual CNN baseline of the same
    # width and depth and the same bicubic residual, to show what GLA adds in the same training time.
    "cnn": {
        "arch": "cnn",
        "n_feats": 32,
        "n_resblocks": 4,
        "bicubic_residual": True,
        "rgb_range": 255.0,
    },
}


def preset_config(preset: str, scale: int, **overrides: Any) -> dict[str, Any]:
    """The config dict of ``preset`` at ``scale``, with ``overrides`` applied (keys must exist)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    config = copy.deepcopy(PRESETS[preset])
    unknown = sorted(set(overrides) - set(config) - {"scale"})
    if unknown:
        raise ValueError(f"preset {preset!r} has no settings {unknown}; it has {sorted(config)}")
    config.update(overrides)
    config["scale"] = scale
    return config


def model_from_config(config: dict[str, Any], backend: str | None = None) -> nn.Module:
    """Builds the network of a config dict (``model.config`` or a checkpoint's ``config``)."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    arch = config.get("arch")
    if arch not in ARCHITECTURES:
        raise ValueError(f"config arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    return ARCHITECTURES[arch].from_config(config, backend=backend)


def build_model(preset: str, scale: int, backend: str | None = None, **overrides: Any) -> nn.Module:
    """``build_model("paper", 3)``: the network of a preset; ``overrides`` change its settings."""
    return model_from_config(preset_config(preset, scale, **overrides), backend=backend)


# ----------------------------------------------------------------------------------------------
# Networks for short CPU runs (presets cpu_default and cnn).


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

    def forward(self, x: Tensor) -> Tensor:
        """``x [N, 3, h, w]`` in ``[0, rgb_range]`` -> ``[N, 3, h*scale, w*scale]``."""
        self._check_input(x)
        features = self.head(self.sub_mean(x))
        features = self.body(features) + features
        return self.tail(features) + bicubic_base(x, self.scale)


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

    def forward(self, x: Tensor) -> Tensor:
        """``x [N, 3, h, w]`` in ``[0, rgb_range]`` -> ``[N, 3, h*scale, w*scale]``."""
        self._check_input(x)
        features = self.head(self.sub_mean(x))
        features = self.body(features) + features
        if self.bicubic_residual:
            return self.tail(features) + bicubic_base(x, self.scale)
        return self.add_mean(self.tail(features))


ARCHITECTURES[DLSNResidual.ARCH] = DLSNResidual
ARCHITECTURES[PlainSR.ARCH] = PlainSR
