"""DLSN for spandrel (chaiNNer, ComfyUI): ``import dlsn.integrations.spandrel`` registers the architecture.

Then ``spandrel.ModelLoader().load_from_file(path)`` loads this project's files (``model.safetensors``,
``best.pt``, ``last.pt``) and the authors' state dicts (``.pt``/``.pth``/``.safetensors``) into an
``ImageModelDescriptor`` running our network and its fused GLA kernels:

- detection, from the state-dict keys: a ``dlsn_config`` entry (written with every state dict here, any
  architecture), or the authors' DLSN layout (``head.0``, ``body.<g>.body.<b>`` groups with one GLA per group,
  ``tail.0.<i>``), read by ``dlsn.models.official.infer_official_config``, or the NLSN authors' layout
  (``body.<i>.conv_match.0`` NLSA blocks among EDSR ResBlocks, ``dlsn.models.nlsn.infer_nlsn_config``; chunk_size
  144, n_hashes 4 and res_scale 0.1 assumed, from their README run);
- scale and channels from the tensor shapes (the tail convs' output channels, the head's input), or from the
  stored config;
- images in and out in [0, 1], as spandrel expects: the network's ``[0, rgb_range]`` is applied inside;
- ``supports_half``/``supports_bfloat16``: the CUDA and Triton kernels take float16/bfloat16 (the CPU kernels
  run float32 only);
- size requirements: none beyond 2x2 pixels (GLA pads its buckets itself);
- tiling: discouraged, since GLA attends over the whole image and tiles change what it sees.

A state dict with an impossible config (``dlsn.models.presets.check_config``) or with NaN, inf or integer
weights is detected as DLSN but refused on loading, with a one-line :class:`~dlsn.errors.CheckpointError`.

Hash rotations are seeded (seed 0), so a descriptor gives the same pixels as ``load_model`` followed by
``model.set_inference(seed=0)``, the default of ``dlsn.upscale``.
"""

from __future__ import annotations

from typing import Any

from spandrel import (
    MAIN_REGISTRY,
    Architecture,
    ArchRegistry,
    ArchSupport,
    ImageModelDescriptor,
    ModelTiling,
    SizeRequirements,
    StateDict,
)
from torch import Tensor, nn

from dlsn.errors import CheckpointError
from dlsn.models.checkpoint import check_weights, from_state_dict
from dlsn.models.presets import model_from_config

__all__ = ["ARCH_ID", "DLSNArch", "detect", "register"]

ARCH_ID = "DLSN"
MIN_SIZE = 2


def _parse(state_dict: StateDict) -> dict[str, Any] | None:
    """Our checkpoint dict (config + weights) of a state dict, or None when it is not one of ours."""
    if not state_dict or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state_dict.items()):
        return None
    try:
        return from_state_dict(state_dict, "spandrel state dict")
    except CheckpointError:
        return None


def detect(state_dict: StateDict) -> bool:
    """True for a state dict written here (``dlsn_config`` entry) or in the authors' DLSN layout."""
    return _parse(state_dict) is not None


def _tags(config: dict[str, Any]) -> list[str]:
    tags = [str(config["arch"]), f"{config['n_feats']}nf"]
    if "n_resgroups" in config:
        tags.append(f"{config['n_resgroups']}x{config['n_resblocks']}")
    if "n_hashes" in config:
        tags.append(f"R{config['n_hashes']}")
    return tags


class DLSNArch(Architecture[nn.Module]):
    """The spandrel ``Architecture`` of every network here (``dlsn``, ``dlsn_residual``, ``edsr_gla``, ``cnn``)."""

    def __init__(self) -> None:
        super().__init__(id=ARCH_ID, name="DLSN", detect=detect)

    def load(self, state_dict: StateDict) -> ImageModelDescriptor[nn.Module]:
        checkpoint = _parse(state_dict)
        if checkpoint is None:
            raise ValueError("not a DLSN state dict (see dlsn.integrations.spandrel.detect)")
        config = checkpoint["config"]
        try:  # an impossible config, or weights holding NaN/inf or integers: refused before the network runs
            model = model_from_config(dict(config))
            check_weights(checkpoint["model"], "the DLSN state dict", model.state_dict())
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"cannot load this DLSN state dict: {error}") from error
        if hasattr(model, "set_inference"):
            model.set_inference(seed=0)
        rgb_range = float(config.get("rgb_range", 255.0))

        def call(net: nn.Module, image: Tensor) -> Tensor:
            return net(image * rgb_range) / rgb_range

        return ImageModelDescriptor(
            model,
            checkpoint["model"],
            architecture=self,
            purpose="SR",
            tags=_tags(config),
            supports_half=True,
            supports_bfloat16=True,
            scale=int(config["scale"]),
            input_channels=model.head[0].in_channels,
            output_channels=model.tail[-1].out_channels,
            size_requirements=SizeRequirements(minimum=MIN_SIZE),
            tiling=ModelTiling.DISCOURAGED,
            call_fn=call,
        )


def register(registry: ArchRegistry = MAIN_REGISTRY) -> ArchSupport:
    """Adds DLSN to ``registry`` (spandrel's main one by default), detected before every architecture
    already there: its detection asks for GLA's own keys, so it does not claim their state dicts.
    Registering twice keeps the first."""
    existing = registry.get(ARCH_ID)
    if existing is not None:
        return existing
    support = ArchSupport(DLSNArch(), detect, before=tuple(a.architecture.id for a in registry.architectures()))
    registry.add(support)
    return support


register()
