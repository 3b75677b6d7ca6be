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

from torch import nn

from .cpu_nets import DLSNResidual, PlainSR
from .dlsn import DLSN, EDSRGLA, _GLANetwork

__all__ = ["ARCHITECTURES", "PRESETS", "build_model", "model_from_config", "preset_config"]

ARCHITECTURES: dict[str, type[_GLANetwork]] = {
    cls.ARCH: cls for cls in (DLSN, EDSRGLA, DLSNResidual, PlainSR)
}

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
