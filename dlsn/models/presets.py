"""Presets: each is one record of a network configuration and the recipe that trains it.

``paper`` is the authors' network (C=256, 10 GLAFFM x 4 LFFB, K=128, R=3): its parameter count equals
their checkpoints' minus their unused scalar ``a`` (tests/test_models.py pins the counts). ``small`` is
the paper's C=128 model of the same depth ("about 18.27M" at x4). ``tiny`` is for CPU runs and tests,
``edsr_gla`` shows GLA as a drop-in block in EDSR-baseline, ``cpu_default`` is what
``python -m dlsn.train`` trains with no arguments and ``cnn`` is the same network without GLA.

A :class:`Preset` cannot be made without its :class:`TrainingRecipe`, so every preset trains with a
recipe chosen for it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from torch import nn

from .cpu_nets import DLSNResidual, PlainSR
from .dlsn import DLSN, EDSRGLA, _GLANetwork
from .nlsn import NLSN

__all__ = ["ARCHITECTURES", "CONFIG_LIMITS", "PRESETS", "Preset", "TrainingRecipe", "build_model", "check_config",
           "model_from_config", "preset_config"]

ARCHITECTURES: dict[str, type[_GLANetwork]] = {
    cls.ARCH: cls for cls in (DLSN, EDSRGLA, DLSNResidual, PlainSR, NLSN)
}


@dataclass(frozen=True)
class TrainingRecipe:
    """How ``python -m dlsn.train`` trains a preset when the command line does not say otherwise."""

    lr: float
    batch_size: int
    patch_size: int
    schedule: str
    epoch_steps: int
    val_every: int
    warmup_steps: int = 0
    min_detail: float = 0.0
    pyramid: tuple[float, ...] = ()  # downscaled copies of the HR training images (HR-image data only)
    time_limit: float | None = None  # minutes, used when neither --max-steps nor --time-limit is given
    epochs: int | None = None  # x2 (or from scratch) run length in epochs, for the step schedule
    decay_epochs: int | None = None
    finetune_epochs: int | None = None  # x3/x4 started from x2 weights (--init-from)
    finetune_decay_epochs: int | None = None
    ema: float = 0.0  # decay of the weights' moving average (--ema; 0: off)


@dataclass(frozen=True)
class Preset:
    """A named network configuration (without ``scale``) and its training recipe."""

    model: Mapping[str, Any]
    training: TrainingRecipe

    def __post_init__(self) -> None:
        if not isinstance(self.training, TrainingRecipe):
            raise TypeError(f"training must be a TrainingRecipe, got {type(self.training).__name__}")
        if self.model.get("arch") not in ARCHITECTURES:
            raise ValueError(f"model arch must be one of {sorted(ARCHITECTURES)}, got {self.model.get('arch')!r}")
        object.__setattr__(self, "model", MappingProxyType(dict(self.model)))


# The paper's recipe for the full-size presets. EMA 0.999 as BasicSR's net_g_ema: its horizon of about
# 1000 steps is short next to 1.5M steps at a constant lr between halvings, where it averages out the noise.
PAPER_RECIPE = TrainingRecipe(lr=1e-4, batch_size=16, patch_size=48, schedule="step", epoch_steps=1000,
                              val_every=1000, epochs=1500, decay_epochs=300, finetune_epochs=200,
                              finetune_decay_epochs=50, ema=0.999)
# Short CPU runs: a high peak lr with cosine decay to a 9-minute budget, tuned for cpu_default at x2 on
# a 2-core CPU (the project README has the measurements). No EMA: the cosine decay to 1% of the lr already
# settles the weights, and a 0.999 average would lag a run that is still improving fast (README: measured).
CPU_RECIPE = TrainingRecipe(lr=2e-3, batch_size=16, patch_size=32, schedule="cosine", epoch_steps=100,
                            val_every=100, warmup_steps=10, min_detail=2.0, pyramid=(0.75, 0.5, 0.35),
                            time_limit=9.0)

# NLSN's authors' README run: 1000 epochs of 1000 steps, lr 1e-4 halved at epochs 200/400/600/800, batch 16,
# HR patches 96 at x2 (48 LR), no weight average. They publish no x3/x4 fine-tuning schedule.
NLSN_RECIPE = TrainingRecipe(lr=1e-4, batch_size=16, patch_size=48, schedule="step", epoch_steps=1000,
                             val_every=1000, epochs=1000, decay_epochs=200)

PRESETS: dict[str, Preset] = {
    # About 0.2M parameters, for tests and CPU smoke training.
    "tiny": Preset(model={
        "arch": "dlsn",
        "n_feats": 32,
        "n_resgroups": 2,
        "n_resblocks": 2,
        "reduction": 4,
        "chunk_size": 64,
        "n_hashes": 2,
        "res_scale": 0.1,
        "rgb_range": 255.0,
    }, training=CPU_RECIPE),
    "small": Preset(model={
        "arch": "dlsn",
        "n_feats": 128,
        "n_resgroups": 10,
        "n_resblocks": 4,
        "reduction": 4,
        "chunk_size": 128,
        "n_hashes": 3,
        "res_scale": 0.1,
        "rgb_range": 255.0,
    }, training=PAPER_RECIPE),
    "paper": Preset(model={
        "arch": "dlsn",
        "n_feats": 256,
        "n_resgroups": 10,
        "n_resblocks": 4,
        "reduction": 4,
        "chunk_size": 128,
        "n_hashes": 3,
        "res_scale": 0.1,
        "rgb_range": 255.0,
    }, training=PAPER_RECIPE),
    # EDSR-baseline (16 blocks, 64 channels, res_scale 1) with one GLA after block 8.
    "edsr_gla": Preset(model={
        "arch": "edsr_gla",
        "n_feats": 64,
        "n_resblocks": 16,
        "res_scale": 1.0,
        "gla_position": 8,
        "reduction": 4,
        "chunk_size": 128,
        "n_hashes": 3,
        "rgb_range": 255.0,
    }, training=PAPER_RECIPE),
    # The default of ``python -m dlsn.train`` (minutes on a CPU): one DLSN group of 4 LFFB, GLA and
    # a conv, adding to a bicubic upsampling (DLSNResidual). res_scale 1, not the paper's 0.1:
    # with a single group the 0.1 would damp the whole body and slow the short run down.
    "cpu_default": Preset(model={
        "arch": "dlsn_residual",
        "n_feats": 32,
        "n_resgroups": 1,
        "n_resblocks": 4,
        "reduction": 4,
        "chunk_size": 32,
        "n_hashes": 1,
        "res_scale": 1.0,
        "rgb_range": 255.0,
    }, training=CPU_RECIPE),
    # cpu_default without GLA (and its group conv): the plain residual CNN baseline of the same
    # width and depth and the same bicubic residual, to show what GLA adds in the same training time.
    "cnn": Preset(model={
        "arch": "cnn",
        "n_feats": 32,
        "n_resblocks": 4,
        "bicubic_residual": True,
        "rgb_range": 255.0,
    }, training=CPU_RECIPE),
    # NLSN (Mei et al. 2021) as the authors train it: EDSR 32x256 with 5 NLSA blocks, chunk 144, 4 rounds,
    # res_scale 0.1, rgb_range 1 (their README command).
    "nlsn": Preset(model={
        "arch": "nlsn",
        "n_resblocks": 32,
        "n_feats": 256,
        "chunk_size": 144,
        "n_hashes": 4,
        "reduction": 4,
        "res_scale": 0.1,
        "rgb_range": 1.0,
        "n_colors": 3,
    }, training=NLSN_RECIPE),
    # NLSN for CPU runs and tests: 8 ResBlocks of 32 channels, 2 NLSA blocks (first, after block 8), chunk 32,
    # 2 rounds; res_scale 1 for the reason given at cpu_default.
    "nlsn_small": Preset(model={
        "arch": "nlsn",
        "n_resblocks": 8,
        "n_feats": 32,
        "chunk_size": 32,
        "n_hashes": 2,
        "reduction": 4,
        "res_scale": 1.0,
        "rgb_range": 1.0,
        "n_colors": 3,
    }, training=CPU_RECIPE),
}


def preset_config(preset: str, scale: int, **overrides: Any) -> dict[str, Any]:
    """The config dict of ``preset`` at ``scale``, with ``overrides`` applied (keys must exist)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    config = copy.deepcopy(dict(PRESETS[preset].model))
    unknown = sorted(set(overrides) - set(config) - {"scale"})
    if unknown:
        raise ValueError(f"preset {preset!r} has no settings {unknown}; it has {sorted(config)}")
    config.update(overrides)
    config["scale"] = scale
    return config


# What a config may hold, whoever wrote it (a checkpoint is input like any other): each size an int in
# [low, high], each float finite in (low, high]. The upper bounds are far beyond any network here (the
# paper's has 256 channels, 10 groups of 4 blocks) and keep a crafted config from asking for absurd memory
# or overflowing a size calculation before anything else is checked.
CONFIG_LIMITS: dict[str, tuple[type, float, float]] = {
    "n_feats": (int, 1, 4096),
    "n_resgroups": (int, 1, 256),
    "n_resblocks": (int, 0, 256),
    "reduction": (int, 1, 4096),
    "chunk_size": (int, 1, 1 << 16),
    "n_hashes": (int, 1, 64),
    "gla_position": (int, 0, 256),
    "res_scale": (float, -1e6, 1e6),
    "rgb_range": (float, 0.0, 65535.0),  # (0, 65535]: it divides the output
}


def check_config(config: Mapping[str, Any]) -> None:
    """Raises ``ValueError`` (one line) for a config no network should be built from: a size that is not an
    int in range, a non-finite or out-of-range float (``rgb_range`` <= 0), a ``bicubic_residual`` that is not
    a bool (see ``CONFIG_LIMITS``). The architectures check the rest (scale, unknown keys)."""
    for key, (kind, low, high) in CONFIG_LIMITS.items():
        if key not in config or (key == "gla_position" and config[key] is None):
            continue
        value = config[key]
        if kind is int:
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"config {key} = {value!r} is impossible: it must be an int in [{low:g}, {high:g}]")
        elif (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
              or not low < value <= high):
            raise ValueError(f"config {key} = {value!r} is impossible: it must be a number in ({low:g}, {high:g}]")
    if "reduction" in config and "n_feats" in config and config["reduction"] > config["n_feats"]:
        raise ValueError(f"config reduction = {config['reduction']} is impossible: more than n_feats = "
                         f"{config['n_feats']}")
    if "bicubic_residual" in config and not isinstance(config["bicubic_residual"], bool):
        raise ValueError(f"config bicubic_residual = {config['bicubic_residual']!r} must be true or false")


def model_from_config(config: dict[str, Any], backend: str | None = None) -> nn.Module:
    """Builds the network of a config dict (``model.config`` or a checkpoint's ``config``); ``ValueError``
    for an impossible config (:func:`check_config`)."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    arch = config.get("arch")
    if arch not in ARCHITECTURES:
        raise ValueError(f"config arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    check_config(config)
    return ARCHITECTURES[arch].from_config(config, backend=backend)


def build_model(preset: str, scale: int, backend: str | None = None, **overrides: Any) -> nn.Module:
    """``build_model("paper", 3)``: the network of a preset; ``overrides`` change its settings."""
    return model_from_config(preset_config(preset, scale, **overrides), backend=backend)
