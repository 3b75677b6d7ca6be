"""What a training run scores and says: validation, the opening lines and the final report.

The run is described by the :class:`TrainingRun` protocol (what ``Trainer`` has), not by ``Trainer``
itself: ``trainer`` imports this module, and this module imports nothing of ``trainer``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

from dlsn.cli import kernels_line
from dlsn.evaluation import SetScore, bicubic_upscaler, evaluate_dataset, model_upscaler
from dlsn.images import write_image
from dlsn.models.precision import default_dtype

from .data import Data
from .processes import Processes
from .settings import Settings


class TrainingRun(Protocol):
    """What the opening lines and the final report read of a run (``dlsn.training.trainer.Trainer``)."""

    args: argparse.Namespace
    s: Settings
    state: Any  # trainer.Progress: step, epoch, best_step, bicubic_psnr
    procs: Processes
    device: torch.device
    net: nn.Module
    data: Data
    out: Path
    rgb_range: float
    steps_per_epoch: int
    limit_s: float | None
    precision: str  # "bfloat16" (autocast) or "float32": what the training steps compute in
    threads: Any  # processes.ThreadTuner or None
    resume_path: Path | None
    elapsed_before: float

    def say(self, *args: Any, **kwargs: Any) -> None: ...

    def elapsed(self) -> float: ...

    @property
    def eval_net(self) -> nn.Module: ...


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def validate(model: nn.Module, dataset: Dataset, scale: int, device: torch.device, seed: int,
             ensemble: bool = False) -> SetScore:
    """Y-PSNR/SSIM of the model on ``dataset`` (whole items); hash rotations seeded, so repeatable.

    In the compute dtype ``dlsn.eval`` uses by default on ``device`` (``dlsn.models.precision.default_dtype``),
    so the scores a run reports and keeps best.pt by are the ones ``dlsn.eval`` gives its checkpoints."""
    net = _unwrap(model)
    was_training = net.training
    net.eval()
    if hasattr(net, "set_inference"):
        net.set_inference(seed=seed)
    rgb_range = float(net.config.get("rgb_range", 255.0))
    try:
        with eval_dtype(net, device):
            return evaluate_dataset(model_upscaler(net, rgb_range, ensemble), dataset, scale, set_name="val",
                                    device=device, progress=False)
    finally:
        net.train(was_training)


@contextlib.contextmanager
def eval_dtype(net: nn.Module, device: torch.device) -> Iterator[None]:
    """``net`` computes in ``dlsn.eval``'s default dtype for ``device`` inside the block, in its own after it
    (the training steps' precision is the trainer's autocast, not the network's setting)."""
    had = getattr(net, "compute_dtype", None)
    if had is None:  # a network without the setting
        yield
        return
    net.set_dtype(default_dtype(device))
    try:
        yield
    finally:
        net.set_dtype(had)


def precision_text(precision: str, device: torch.device) -> str:
    """``bfloat16 autocast`` / ``float32``, and why (the opening line)."""
    if precision == "float32":
        return "float32"
    why = " (the CPU has AVX512-BF16/AMX; --no-amp: float32)" if device.type == "cpu" else " (--no-amp: float32)"
    return f"bfloat16 autocast{why}"


def format_minutes(seconds: float) -> str:
    """``125.0`` -> ``"2:05"``."""
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def announce(trainer: TrainingRun) -> None:
    """The opening lines: network, data, schedule and budget, and the bicubic score to beat (rank 0)."""
    s, st, say = trainer.s, trainer.state, trainer.say
    n_params = sum(p.numel() for p in trainer.net.parameters())
    budget = [f"{s.max_steps} steps"] if s.max_steps else []
    if trainer.limit_s:
        budget.append(f"{s.time_limit:g} min")
    say(f"dlsn.train: {s.preset} x{s.scale} {s.degradation}, {n_params / 1e6:.3f}M parameters, on "
        f"{trainer.device}" + (f" x {trainer.procs.world} processes" if trainer.procs.distributed else "")
        + (f", {torch.get_num_threads()} threads" if trainer.threads is None else
           f", threads tuned among {'/'.join(map(str, trainer.threads.options))}")
        + f"; training in {precision_text(trainer.precision, trainer.device)}")
    kernels = kernels_line(_unwrap(trainer.net), trainer.args.backend, trainer.device,
                           torch.bfloat16 if trainer.precision == "bfloat16" else torch.float32)
    if kernels is not None:
        say(kernels)
    say(f"data: {trainer.data.description}; an epoch is {trainer.steps_per_epoch} steps of "
        f"{s.batch_size} LR patches {s.patch_size}x{s.patch_size}")
    budget_text = " or ".join(budget) or "none (Ctrl-C stops)"
    say(f"schedule: {s.schedule}, lr {s.lr:g}; budget: {budget_text}; output: {trainer.out}"
        + (f"; resumed at step {st.step}" if trainer.resume_path else ""))
    if trainer.procs.main:
        if st.bicubic_psnr is None:
            st.bicubic_psnr = evaluate_dataset(bicubic_upscaler(s.scale), trainer.data.val, s.scale,
                                               progress=False).psnr
        kind = f"{s.val_crop}x{s.val_crop} HR centre crops" if s.val_crop else "whole images"
        say(f"validation: {len(trainer.data.val)} images ({kind}); bicubic Y-PSNR {st.bicubic_psnr:.2f} dB")


def final_report(trainer: TrainingRun, val_psnr: float) -> None:
    """Scores on the held-out images vs bicubic (the validation crops and the whole images), and a
    sample SR image next to its bicubic version. ``val_psnr``: the model's score on ``data.val``."""
    s, st, out = trainer.s, trainer.state, trainer.out
    train_time = trainer.elapsed()
    net = trainer.eval_net  # the moving average with --ema
    whole = validate(net, trainer.data.val_full, s.scale, trainer.device, s.seed)
    bicubic = evaluate_dataset(bicubic_upscaler(s.scale), trainer.data.val_full, s.scale, progress=False)
    ensemble = None
    if trainer.args.self_ensemble:
        ensemble = validate(net, trainer.data.val_full, s.scale, trainer.device, s.seed, ensemble=True)
    item = trainer.data.val_full[0]
    net.eval()
    with eval_dtype(_unwrap(net), trainer.device):
        sr = model_upscaler(net, trainer.rgb_range)(item["lr"][None].to(trainer.device))[0]
    stem = f"sample_{item['name']}_x{s.scale}"
    sr_path = write_image(out / f"{stem}_sr.png", sr.float().clamp(0, 1))
    bicubic_image = bicubic_upscaler(s.scale)(item["lr"][None])[0]
    bicubic_path = write_image(out / f"{stem}_bicubic.png", bicubic_image)
    write_image(out / f"{stem}_hr.png", item["hr"])

    say = functools.partial(print, flush=True)
    # Steps per second over the whole run (resumed parts included), validation and start-up counted: the
    # figure to compare machines by (README's main job).
    rate = st.step / train_time if train_time > 0 else 0.0
    say(f"\ntrained {st.step} steps (epoch {st.epoch}, {trainer.precision}) in {format_minutes(train_time)} min, "
        f"{rate:.2f} steps/s")
    say(f"checkpoints: {out / 'last.pt'} (final), {out / 'best.pt'} and {out / 'model.safetensors'} (best "
        f"validation, step {st.best_step}); log {out / 'log.csv'}, curves {out / 'curves.png'}")
    say(f"sample: {sr_path} (model) next to {bicubic_path} (bicubic)")
    names = ", ".join(score.name for score in whole.images)
    which = f"final EMA weights (decay {s.ema:g})" if s.ema else "final model"
    say(f"held-out Y-PSNR at x{s.scale} {s.degradation} ({names}; never trained on), {which}:")
    if trainer.data.val is not trainer.data.val_full and st.bicubic_psnr is not None:
        say(f"  {s.val_crop}x{s.val_crop} HR centre crops: model {val_psnr:6.2f} dB   bicubic "
            f"{st.bicubic_psnr:6.2f} dB   {val_psnr - st.bicubic_psnr:+.2f} dB")
    say("  whole images:")
    for ours, theirs in zip(whole.images, bicubic.images, strict=True):
        say(f"    {ours.name:<16} model {ours.psnr:6.2f} dB   bicubic {theirs.psnr:6.2f} dB   "
            f"{ours.psnr - theirs.psnr:+.2f} dB")
    say(f"    {'mean':<16} model {whole.psnr:6.2f} dB   bicubic {bicubic.psnr:6.2f} dB   "
        f"{whole.psnr - bicubic.psnr:+.2f} dB   (SSIM {whole.ssim:.4f} vs {bicubic.ssim:.4f})")
    if ensemble is not None:
        say(f"    {'mean, x8 ensemble':<16} model {ensemble.psnr:6.2f} dB   bicubic "
            f"{bicubic.psnr:6.2f} dB   {ensemble.psnr - bicubic.psnr:+.2f} dB")
    say(f"wall time: {format_minutes(trainer.elapsed() - trainer.elapsed_before)} min for this command")
