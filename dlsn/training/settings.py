"""The settings of a training run: the command line, else the run being resumed, else the preset's recipe."""

from __future__ import annotations

import argparse
import ast
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlsn.data.datasets import check_pyramid
from dlsn.errors import UserInputError
from dlsn.models.presets import PRESETS

LOSSES = ("l1", "l2")
DEFAULT_PRESET = "cpu_default"
# Settings the lr schedule is built from; given on a --resume command line, they replace the saved one.
SCHEDULE_SETTINGS = ("lr", "schedule", "warmup_steps", "decay_epochs", "epoch_steps")


class TrainError(UserInputError, RuntimeError):
    """A problem with the training inputs (data, checkpoint, settings) the user can act on: printed as
    one line. Any other exception is a bug and keeps its traceback."""



@dataclass
class Settings:
    """Resolved settings of a run."""

    preset: str
    model_args: dict[str, Any]
    scale: int
    data: Path | None
    degradation: str
    noise_sigma: float | None
    batch_size: int
    patch_size: int
    lr: float
    loss: str
    schedule: str
    decay_epochs: int | None
    epoch_steps: int
    warmup_steps: int
    min_detail: float
    max_steps: int | None
    time_limit: float | None
    val_every: int
    save_every: int
    val_crop: int
    val_images: int | None
    seed: int
    init_from: Path | None
    pyramid: tuple[float, ...] = ()
    ema: float = 0.0  # decay of the weights' moving average used for validation and best.pt (0: off)

    def to_plain(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self).items()}


def _given(args: argparse.Namespace, name: str) -> Any:
    if name == "model_args":
        return parse_model_args(args.model_arg) if getattr(args, "model_arg", None) else None
    return getattr(args, name, None)


def parse_model_args(items: Sequence[str]) -> dict[str, Any]:
    """``["chunk_size=64", "n_hashes=2"]`` -> ``{"chunk_size": 64, "n_hashes": 2}`` (Python literals)."""
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise TrainError(f"--model-arg must look like KEY=VALUE, got {item!r}")
        try:
            parsed[key.strip()] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            parsed[key.strip()] = text.strip()
    return parsed


def check_resume_fits(args: argparse.Namespace, saved: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    """A resumed run continues its own network: ``--preset``, ``--scale``, ``--model-arg`` and ``--init-from``
    given on the command line must agree with the checkpoint (``saved``: its settings, ``config``: its
    network), else one line says what differs. Data and optimisation settings may change."""
    preset = saved.get("preset")
    if args.preset is not None and preset not in (None, args.preset):
        raise TrainError(f"--resume: {path} is a {preset!r} run; it cannot continue as --preset {args.preset}")
    scale = saved.get("scale", config.get("scale"))
    if args.scale is not None and scale is not None and int(scale) != args.scale:
        raise TrainError(f"--resume: {path} is an x{scale} run; it cannot continue at --scale {args.scale} "
                         f"(to train x{args.scale} from its weights, start a new run with --init-from {path})")
    given = _given(args, "model_args") or {}
    differ = {key: value for key, value in given.items() if key not in config or config[key] != value}
    if differ:
        changes = " ".join(f"{key}={value!r}" for key, value in differ.items())
        had = ", ".join(f"{key}={config[key]!r}" for key in differ if key in config) or "no such settings"
        raise TrainError(f"--resume: {path} holds a network with {had}; it cannot continue with --model-arg "
                         f"{changes} (start a new run for another network)")
    init_from = getattr(args, "init_from", None)
    if init_from is not None and str(init_from) != str(saved.get("init_from")):
        raise TrainError(f"--resume: a resumed run continues from its own weights in {path}; drop --init-from "
                         f"{init_from}")


def resolve_settings(args: argparse.Namespace, saved: dict[str, Any] | None) -> Settings:
    """Command line, else the resumed run's value (``saved``), else the preset's default."""
    saved = saved or {}

    def pick(name: str, default: Any = None) -> Any:
        value = _given(args, name)
        if value is not None:
            return value
        if name in saved and saved[name] is not None:
            return saved[name]
        return default

    preset = pick("preset", DEFAULT_PRESET)
    if preset not in PRESETS:  # e.g. a resumed run of a preset that no longer exists
        raise TrainError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    defaults = PRESETS[preset].training
    scale = pick("scale", 2)
    init_from = pick("init_from")
    finetune = init_from is not None and scale != 2 and defaults.finetune_epochs is not None
    schedule = pick("schedule", defaults.schedule)
    epoch_steps = pick("epoch_steps", defaults.epoch_steps)

    max_steps = _given(args, "max_steps")
    time_limit = _given(args, "time_limit")
    if max_steps is None and time_limit is None and saved:
        max_steps, time_limit = saved.get("max_steps"), saved.get("time_limit")
    elif max_steps is None and time_limit is None:
        if defaults.time_limit is not None:
            time_limit = defaults.time_limit
        elif defaults.epochs is not None:
            epochs = defaults.finetune_epochs if finetune else defaults.epochs
            max_steps = epochs * epoch_steps
    if time_limit is not None and time_limit <= 0:
        time_limit = None

    decay_epochs = pick("decay_epochs")
    if decay_epochs is None and schedule == "step":
        decay_epochs = (defaults.finetune_decay_epochs if finetune else defaults.decay_epochs) or 300
    degradation = pick("degradation", "BI")
    noise_sigma = pick("noise_sigma", 15.0 if degradation == "DN" else None)
    val_every = pick("val_every", defaults.val_every)
    data = pick("data")

    settings = Settings(
        preset=preset,
        model_args=pick("model_args", {}),
        scale=scale,
        data=None if data is None else Path(data),
        degradation=degradation,
        noise_sigma=noise_sigma,
        batch_size=pick("batch_size", defaults.batch_size),
        patch_size=pick("patch_size", defaults.patch_size),
        lr=pick("lr", defaults.lr),
        loss=pick("loss", "l1"),
        schedule=schedule,
        decay_epochs=decay_epochs,
        epoch_steps=epoch_steps,
        warmup_steps=pick("warmup_steps", defaults.warmup_steps),
        min_detail=pick("min_detail", defaults.min_detail),
        max_steps=max_steps,
        time_limit=time_limit,
        val_every=val_every,
        save_every=pick("save_every", val_every),
        val_crop=pick("val_crop", 256),
        val_images=pick("val_images"),
        seed=pick("seed", 0),
        init_from=None if init_from is None else Path(init_from),
        # a run saved before pyramids existed trained without one
        pyramid=tuple(pick("pyramid", () if saved else defaults.pyramid)),
        # a run saved before EMA existed trained without one
        ema=float(pick("ema", 0.0 if saved else defaults.ema)),
    )
    _check_settings(settings)
    return settings


def _check_settings(s: Settings) -> None:
    if s.scale not in (2, 3, 4):
        raise TrainError(f"--scale must be 2, 3 or 4, got {s.scale}")
    positive = {"--batch-size": s.batch_size, "--patch-size": s.patch_size, "--epoch-steps": s.epoch_steps}
    for name, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise TrainError(f"{name} must be a positive integer, got {value!r}")
    if not s.lr > 0:
        raise TrainError(f"--lr must be positive, got {s.lr}")
    if s.max_steps is not None and s.max_steps < 1:
        raise TrainError(f"--max-steps must be >= 1, got {s.max_steps}")
    for name, value in {"--val-every": s.val_every, "--save-every": s.save_every,
                        "--val-crop": s.val_crop, "--warmup-steps": s.warmup_steps,
                        "--min-detail": s.min_detail}.items():
        if value < 0:
            raise TrainError(f"{name} must be >= 0, got {value}")
    if s.decay_epochs is not None and s.decay_epochs < 1:
        raise TrainError(f"--decay-epochs must be >= 1, got {s.decay_epochs}")
    if s.val_images is not None and s.val_images < 1:
        raise TrainError(f"--val-images must be >= 1, got {s.val_images}")
    if s.degradation == "DN" and (s.noise_sigma is None or s.noise_sigma < 0):
        raise TrainError(f"--noise-sigma must be >= 0 for DN, got {s.noise_sigma}")
    if not 0.0 <= s.ema < 1.0:
        raise TrainError(f"--ema must lie in [0, 1) (0: off), got {s.ema}")
    try:
        check_pyramid(s.pyramid)
    except ValueError as error:
        raise TrainError(f"--pyramid: {error}") from None

