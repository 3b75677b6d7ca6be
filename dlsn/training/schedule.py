"""The learning-rate schedule of a training run (``--schedule``, ``--warmup-steps``, ``--decay-epochs``)."""

from __future__ import annotations

import math
from typing import Any

import torch

SCHEDULES = ("step", "cosine", "constant")
COSINE_FLOOR = 0.01  # the cosine schedule ends at 1% of the peak lr


class LRSchedule:
    """Sets the optimizer's lr from the step and the budget used (``progress`` in [0, 1]).

    Has ``state_dict`` / ``load_state_dict`` so checkpoints save and resume it like a torch scheduler.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str, base_lr: float, warmup_steps: int = 0,
                 decay_steps: int | None = None) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
        if kind == "step" and (decay_steps is None or decay_steps < 1):
            raise ValueError(f"the step schedule needs decay_steps >= 1, got {decay_steps!r}")
        self.optimizer = optimizer
        self.kind, self.base_lr = kind, float(base_lr)
        self.warmup_steps, self.decay_steps = int(warmup_steps), decay_steps
        self.last_lr = self.base_lr

    def factor(self, step: int, progress: float) -> float:
        if self.kind == "step":
            assert self.decay_steps is not None
            value = 0.5 ** (step // self.decay_steps)
        elif self.kind == "cosine":
            t = min(max(progress, 0.0), 1.0)
            value = COSINE_FLOOR + (1.0 - COSINE_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * t))
        else:
            value = 1.0
        if self.warmup_steps and step < self.warmup_steps:
            value *= (step + 1) / self.warmup_steps
        return value

    def apply(self, step: int, progress: float) -> float:
        self.last_lr = self.base_lr * self.factor(step, progress)
        for group in self.optimizer.param_groups:
            group["lr"] = self.last_lr
        return self.last_lr

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "base_lr": self.base_lr, "warmup_steps": self.warmup_steps,
                "decay_steps": self.decay_steps, "last_lr": self.last_lr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kind, self.base_lr = state["kind"], float(state["base_lr"])
        self.warmup_steps, self.decay_steps = int(state["warmup_steps"]), state["decay_steps"]
        self.last_lr = float(state["last_lr"])
