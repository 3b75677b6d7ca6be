"""The DLSN network and an EDSR baseline with one GLA block.

Module and parameter names follow the authors' code, so their state dicts load as they are
(see ``checkpoint.py``). Pixel range: like the authors' models, these take and return RGB images
with values in ``[0, rgb_range]`` (255 by default, i.e. 8-bit levels as floats); the DIV2K mean
is subtracted inside (``sub_mean``) and added back at the end (``add_mean``).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor, nn

from .gla import DEFAULT_INFERENCE_SEED, GLA, set_backend, set_inference
from .precision import autocast, check_dtype
from .residual import scaled_residual
from .tail import run_tail

__all__ = ["DIV2K_RGB_MEAN", "DLSN", "EDSRGLA", "GLAFFM", "LFFB", "MeanShift", "Upsampler"]

DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)
SUPPORTED_SCALES = (2, 3, 4, 8)


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1)


def check_scale(scale: object) -> int:
    if scale not in SUPPORTED_SCALES or isinstance(scale, bool):
        raise ValueError(f"scale must be one of {SUPPORTED_SCALES}, got {scale!r}")
    return int(scale)  # type: ignore[call-overload]


class MeanShift(nn.Conv2d):
    """1x1 conv adding ``sign * rgb_range * mean`` per channel (std 1): the authors' MeanShift.

    Its weight and bias are frozen parameters (not buffers) so that the state dict has the
    authors' ``sub_mean.weight`` / ``sub_mean.bias`` entries.
    """

    def __init__(self, rgb_range: float, sign: int, mean: tuple[float, ...] = DIV2K_RGB_MEAN) -> None:
        super().__init__(3, 3, kernel_size=1)
        with torch.no_grad():
            self.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.bias.copy_(sign * float(rgb_range) * torch.tensor(mean))
        for p in self.parameters():
            p.requires_grad_(False)


class LFFB(nn.Module):
    """Local features fusion block: conv3x3, ReLU, conv3x3, plus the input (no scaling)."""

    def __init__(self, channels: int, res_scale: float = 1.0) -> None:
        super().__init__()
        self.res_scale = float(res_scale)
        self.body = nn.Sequential(
            conv3x3(channels, channels), nn.ReLU(inplace=True), conv3x3(channels, channels)
        )

    def forward(self, x: Tensor) -> Tensor:
        return scaled_residual(self.body(x), x, self.res_scale)


class GLAFFM(nn.Module):
    """GLA-based features fusion module: ``n_resblocks`` LFFB, GLA, conv3x3; ``body(x) * res_scale + x``."""

    def __init__(
        self,
        channels: int,
        n_resblocks: int,
        reduction: int,
        chunk_size: int,
        n_hashes: int,
        res_scale: float = 0.1,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.res_scale = float(res_scale)
        layers: list[nn.Module] = [LFFB(channels) for _ in range(n_resblocks)]
        layers.append(GLA(channels, reduction, chunk_size, n_hashes, backend=backend))
        layers.append(conv3x3(channels, channels))
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return scaled_residual(self.body(x), x, self.res_scale)


class Upsampler(nn.Sequential):
    """Sub-pixel upsampling: conv C->4C + PixelShuffle(2) per factor 2, or conv C->9C + PixelShuffle(3)."""

    def __init__(self, scale: int, channels: int) -> None:
        scale = check_scale(scale)
        layers: list[nn.Module] = []
        if scale == 3:
            layers += [conv3x3(channels, 9 * channels), nn.PixelShuffle(3)]
        else:
            for _ in range(int(math.log2(scale))):
                layers += [conv3x3(channels, 4 * channels), nn.PixelShuffle(2)]
        super().__init__(*layers)


class _GLANetwork(nn.Module):
    """Shared pieces of the networks here: input checks, config, GLA controls."""

    ARCH = ""
    scale: int
    # "float32", or "bfloat16": forward under bfloat16 autocast, output in float32 (see set_dtype).
    compute_dtype: str = "float32"

    def set_dtype(self, dtype: str) -> None:
        """Compute dtype of ``forward`` (``dlsn.models.precision``): ``"float32"`` or ``"bfloat16"``
        (autocast on the input's device; the output is float32 either way). Not saved in checkpoints."""
        self.compute_dtype = check_dtype(dtype)

    def set_backend(self, backend: str | None) -> None:
        """Kernel backend of every GLA block (None: automatic, "reference", "cpu", "cuda", "triton")."""
        set_backend(self, backend)

    def set_inference(self, n_hashes: int | None = None, seed: int | None = DEFAULT_INFERENCE_SEED) -> None:
        """Eval-mode hash rounds and rotation seeds of every GLA block (see :func:`gla.set_inference`).

        A network is built with ``seed=0``, so evaluation repeats bitwise; ``seed=None`` gives fresh
        rotations on every call, as the authors' code does. Training is unaffected.
        """
        set_inference(self, n_hashes=n_hashes, seed=seed)

    @property
    def config(self) -> dict[str, Any]:
        """Plain dict that rebuilds this architecture with ``from_config`` (no backend: a runtime choice)."""
        return {"arch": self.ARCH, **self._config}

    @classmethod
    def from_config(cls, config: dict[str, Any], backend: str | None = None):
        """Builds the network described by ``config`` (as returned by :attr:`config`)."""
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        arch = config.get("arch", cls.ARCH)
        if arch != cls.ARCH:
            raise ValueError(f"config describes arch {arch!r}, not {cls.ARCH!r}")
        kwargs = {k: v for k, v in config.items() if k != "arch"}
        known = set(inspect.signature(cls.__init__).parameters) - {"self", "backend"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(
                f"config has keys {unknown} that {cls.__name__} does not take; known: {sorted(known)}"
            )
        if "scale" not in kwargs:
            raise ValueError(f"config must give the scale, got keys {sorted(config)}")
        return cls(**kwargs, backend=backend)

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x must be an RGB batch [N, 3, H, W], got shape {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        """``x [N, 3, h, w]`` in ``[0, rgb_range]`` -> ``[N, 3, h*scale, w*scale]``, in ``compute_dtype``."""
        self._check_input(x)
        if self.compute_dtype == "float32":
            return self._forward(x)
        with autocast(x.device, self.compute_dtype):
            y = self._forward(x)
        return y.float()

    # Both networks: mean shift, head conv, body with a long skip, upsampling tail (in bands at inference).
    def _forward(self, x: Tensor) -> Tensor:
        x = self.head(self.sub_mean(x))
        x = self.body(x) + x
        return self.add_mean(run_tail(self.tail, x, self.scale))


class DLSN(_GLANetwork):
    """Deep Learnable Similarity Network.

    ``sub_mean -> head -> body (n_resgroups GLAFFM, conv3x3) + long skip -> tail (upsampler,
    conv3x3 to RGB) -> add_mean``. Input and output are RGB in ``[0, rgb_range]``.
    The authors' unused scalar parameter ``a`` is left out.
    """

    ARCH = "dlsn"

    def __init__(
        self,
        scale: int,
        n_feats: int = 256,
        n_resgroups: int = 10,
        n_resblocks: int = 4,
        reduction: int = 4,
        chunk_size: int = 128,
        n_hashes: int = 3,
        res_scale: float = 0.1,
        rgb_range: float = 255.0,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.scale = check_scale(scale)
        for value, name in ((n_feats, "n_feats"), (n_resgroups, "n_resgroups")):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(n_resblocks, int) or n_resblocks < 0:
            raise ValueError(f"n_resblocks must be an int >= 0, got {n_resblocks!r}")
        self._config = {
            "scale": self.scale,
            "n_feats": n_feats,
            "n_resgroups": n_resgroups,
            "n_resblocks": n_resblocks,
            "reduction": reduction,
            "chunk_size": chunk_size,
            "n_hashes": n_hashes,
            "res_scale": float(res_scale),
            "rgb_range": float(rgb_range),
        }
        # Registered in the authors' order so state dicts list the same names in the same order.
        self.sub_mean = MeanShift(rgb_range, sign=-1)
        self.add_mean = MeanShift(rgb_range, sign=1)
        self.head = nn.Sequential(conv3x3(3, n_feats))
        groups: list[nn.Module] = [
            GLAFFM(n_feats, n_resblocks, reduction, chunk_size, n_hashes, res_scale, backend)
            for _ in range(n_resgroups)
        ]
        groups.append(conv3x3(n_feats, n_feats))
        self.body = nn.Sequential(*groups)
        self.tail = nn.Sequential(Upsampler(self.scale, n_feats), conv3x3(n_feats, 3))
        set_inference(self)  # per-block eval seeds from base seed 0 (gla.py "Hash rotations")


class EDSRGLA(_GLANetwork):
    """EDSR baseline (16 residual blocks, 64 channels) with one GLA block inserted after
    ``gla_position`` residual blocks: GLA as a drop-in block for an existing SR network.

    Names: ``head.0``, ``body.{i}`` (residual blocks with ``body.0``/``body.2`` convs, the GLA at
    ``body.{gla_position}``), ``body.{n_resblocks + 1}`` the trailing conv, ``tail.0``, ``tail.1``.
    """

    ARCH = "edsr_gla"

    def __init__(
        self,
        scale: int,
        n_feats: int = 64,
        n_resblocks: int = 16,
        res_scale: float = 1.0,
        gla_position: int | None = None,
        reduction: int = 4,
        chunk_size: int = 128,
        n_hashes: int = 3,
        rgb_range: float = 255.0,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.scale = check_scale(scale)
        if not isinstance(n_resblocks, int) or n_resblocks < 0:
            raise ValueError(f"n_resblocks must be an int >= 0, got {n_resblocks!r}")
        if gla_position is None:
            gla_position = n_resblocks // 2
        if not 0 <= gla_position <= n_resblocks:
            raise ValueError(f"gla_position must lie in [0, n_resblocks={n_resblocks}], got {gla_position}")
        self._config = {
            "scale": self.scale,
            "n_feats": n_feats,
            "n_resblocks": n_resblocks,
            "res_scale": float(res_scale),
            "gla_position": gla_position,
            "reduction": reduction,
            "chunk_size": chunk_size,
            "n_hashes": n_hashes,
            "rgb_range": float(rgb_range),
        }
        # Registered in the authors' order so state dicts list the same names in the same order.
        self.sub_mean = MeanShift(rgb_range, sign=-1)
        self.add_mean = MeanShift(rgb_range, sign=1)
        self.head = nn.Sequential(conv3x3(3, n_feats))
        blocks: list[nn.Module] = [LFFB(n_feats, res_scale) for _ in range(n_resblocks)]
        blocks.insert(gla_position, GLA(n_feats, reduction, chunk_size, n_hashes, backend=backend))
        blocks.append(conv3x3(n_feats, n_feats))
        self.body = nn.Sequential(*blocks)
        self.tail = nn.Sequential(Upsampler(self.scale, n_feats), conv3x3(n_feats, 3))
        set_inference(self)  # eval seed from base seed 0 (gla.py "Hash rotations")
