"""The authors' checkpoints: bare ``state_dict``s of their DLSN, their architecture read off the tensor shapes."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from dlsn.errors import CheckpointError

from .dlsn import DIV2K_RGB_MEAN

__all__ = ["OFFICIAL_DEFAULTS", "OFFICIAL_UNUSED_KEYS", "infer_official_config"]

# Entries of the authors' state dicts that no module here holds.
OFFICIAL_UNUSED_KEYS = ("a",)
# Settings the weights cannot tell: the authors' values (from the paper).
OFFICIAL_DEFAULTS = {"n_hashes": 3, "res_scale": 0.1}


def _shape(state: Mapping[str, Tensor], key: str, network: str = "a DLSN") -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"not {network} state dict: it has no {key!r}")
    return tuple(state[key].shape)


def _indices(state: Mapping[str, Any], pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in state if (m := regex.match(k))})


def _head_features(state: Mapping[str, Tensor], network: str = "a DLSN") -> int:
    """``n_feats`` of an EDSR-style state dict (``head.0``: a 3x3 conv from RGB), checking it is a state dict."""
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise CheckpointError("not a state dict (a mapping of names to tensors)")
    head = _shape(state, "head.0.weight", network)
    if len(head) != 4 or head[1] != 3:
        raise CheckpointError(f"head.0.weight has shape {head}; {network} head is [n_feats, 3, 3, 3]")
    return head[0]


def _infer_tail_scale(state: Mapping[str, Tensor], n_feats: int, network: str = "a DLSN") -> int:
    """The scale of an EDSR-style tail (``tail.0.<i>``: one x3 pixel shuffle, or x2 ones) from its convs' widths."""
    tail_convs = [
        _shape(state, f"tail.0.{i}.weight", network)[0] for i in _indices(state, r"^tail\.0\.(\d+)\.weight$")
    ]
    if tail_convs == [9 * n_feats]:
        return 3
    if tail_convs and all(c == 4 * n_feats for c in tail_convs):
        return 2 ** len(tail_convs)
    raise CheckpointError(f"cannot read the scale from the tail convs' output channels {tail_convs}")


def _infer_rgb_range(state: Mapping[str, Tensor]) -> float:
    bias = state.get("sub_mean.bias")
    if bias is None or bias.device.type == "meta":
        return 255.0
    value = -float(bias.reshape(-1)[0]) / DIV2K_RGB_MEAN[0]  # sub_mean bias = -rgb_range * mean
    rounded = round(value)
    return float(rounded) if rounded > 0 and abs(value - rounded) < 1e-3 * rounded else value


def infer_official_config(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """The DLSN config of an authors' state dict, read from tensor shapes.

    ``n_hashes`` and ``res_scale`` are not in the weights: the authors' 3 and 0.1 are assumed.
    """
    n_feats = _head_features(state)

    groups = _indices(state, r"^body\.(\d+)\.body\.")
    if not groups or groups != list(range(len(groups))):
        raise CheckpointError(f"not a DLSN state dict: body groups found at indices {groups}")
    n_resgroups = len(groups)
    _shape(state, f"body.{n_resgroups}.weight")  # the conv after the groups

    gla_blocks = _indices(state, r"^body\.0\.body\.(\d+)\.conv_match\.")
    if len(gla_blocks) != 1:
        raise CheckpointError(f"not a DLSN state dict: expected one GLA in body.0, found {len(gla_blocks)}")
    n_resblocks = gla_blocks[0]
    gla = f"body.0.body.{n_resblocks}"
    match_channels = _shape(state, f"{gla}.conv_match.0.weight")[0]
    if match_channels < 1 or n_feats % match_channels:
        raise CheckpointError(f"{gla}.conv_match has {match_channels} channels, not a divisor of {n_feats}")
    chunk_size = _shape(state, f"{gla}.fc.0.weight")[0]

    scale = _infer_tail_scale(state, n_feats)

    return {
        "arch": "dlsn",
        "scale": scale,
        "n_feats": n_feats,
        "n_resgroups": n_resgroups,
        "n_resblocks": n_resblocks,
        "reduction": n_feats // match_channels,
        "chunk_size": chunk_size,
        **OFFICIAL_DEFAULTS,
        "rgb_range": _infer_rgb_range(state),
    }
