"""An exponential moving average (EMA) of a network's weights, the ``--ema DECAY`` of training.

After every optimizer step each averaged tensor moves towards the live one,
``avg = d * avg + (1 - d) * live``, with ``d = min(decay, (1 + n) / (10 + n))`` after ``n`` updates: the
warm-up keeps the first averages from being dominated by the random initial weights (a fixed 0.999 needs
about 1000 steps to forget them, as long as a whole CPU preset run lasts at its start). Buffers (the
mean shifts) are copied, not averaged.

The average lives in a copy of the network (:attr:`EMA.model`, eval mode, no gradients), so validation and
saving use it like any network. Its state (decay, update count, weights) goes into ``last.pt`` so that a
resumed run continues the same average.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["EMA", "check_decay"]


def check_decay(decay: float) -> float:
    """``decay`` as a float in ``[0, 1)`` (0: no EMA); ValueError otherwise."""
    value = float(decay)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"the EMA decay must lie in [0, 1) (0: off), got {decay!r}")
    return value


class EMA:
    """The moving average of ``model``'s floating-point parameters (see the module docstring)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = check_decay(decay)
        if self.decay == 0.0:
            raise ValueError("an EMA with decay 0 is the model itself; leave it off instead")
        self.model = copy.deepcopy(model).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average towards ``model``'s current weights (call after ``optimizer.step()``)."""
        weight = 1.0 - self.current_decay()
        live = dict(model.named_parameters())
        for name, average in self.model.named_parameters():
            average.lerp_(live[name].detach(), weight)
        live_buffers = dict(model.named_buffers())
        for name, buffer in self.model.named_buffers():
            buffer.copy_(live_buffers[name])
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        """Plain containers and tensors only (checkpoints load with ``weights_only=True``)."""
        weights: dict[str, Tensor] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return {"decay": self.decay, "updates": self.updates, "weights": weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = check_decay(state["decay"])
        self.updates = int(state["updates"])
        self.model.load_state_dict(state["weights"])
