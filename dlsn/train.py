"""Train an SR network (DLSN by default) with L1 loss and Adam.

    python -m dlsn.train                                  # the default run: see below
    python -m dlsn.train --preset cnn                     # the no-GLA CNN baseline, same time budget
    python -m dlsn.train --resume                         # continue the latest default run
    python -m dlsn.train --data DIV2K --preset paper --scale 2 --out runs/x2
    python -m dlsn.train --data DIV2K --preset paper --scale 3 --init-from runs/x2/best.pt --out runs/x3
    torchrun --nproc_per_node=4 -m dlsn.train --data DIV2K --preset paper --out runs/x2

**Default run.** With no arguments this trains the ``cpu_default`` preset (a one-group DLSN: 4 LFFB,
GLA with K=32, R=1, 32 channels, its output added to a bicubic upsampling: ``DLSNResidual``) at x2 on
the real photos embedded in scikit-image / matplotlib (``dlsn.data.samples``: 8 for training, coffee
and grace_hopper held out) for 9 minutes of wall time counted from the start of the command, then
scores the final model on the two held-out photos against bicubic, on 256x256 HR centre crops (the
periodic validation) and on the whole images. It ends within 10 minutes on a 2-core CPU.
``--preset cnn`` trains the same network without GLA under the same budget, for comparison.

**Data** (``--data``): nothing, the embedded photos; a DIV2K root (it holds ``DIV2K_train_HR``):
the stored ``DIV2K_train_LR_bicubic/X{s}`` pairs for BI, LR made from the HR for BD / DN, and the
first ``--val-images`` images of ``DIV2K_valid_*`` for validation when present; any other folder of
images: HR images, the last ``--val-images`` (by name) held out for validation, LR made on the fly.
With HR images (not stored LR pairs) ``--pyramid`` adds copies of the training images downscaled by
the given factors (CPU presets: 0.75, 0.5 and 0.35; on the embedded photos it lifted the default
run's whole-image gain from +2.60 to +2.79 dB): a smaller copy packs more detail into each patch.

**Epochs.** As in the authors' EDSR-based code an epoch is ``--epoch-steps`` batches (1000 for the
paper presets): the training set is repeated to that length, patches being random crops anyway.

**Schedules.** ``step``: lr halved every ``--decay-epochs`` epochs (the paper: 1e-4, halved every 300
epochs for 1500 epochs at x2; every 50 epochs for 200 epochs at x3/x4 started from x2 weights).
``cosine``: lr follows a half cosine from ``--lr`` to 1% of it over the run's budget, the budget being
``--max-steps`` or ``--time-limit``, whichever ends first (the CPU presets' default). Both start with
``--warmup-steps`` of linear warm-up.

**Outputs** (``--out DIR``): ``last.pt`` (everything needed to resume; written atomically every
``--save-every`` steps, at the end and on Ctrl-C / SIGTERM), ``best.pt`` (the weights with the best
periodic validation Y-PSNR), ``log.csv`` (step, epoch, loss, lr, val_psnr, elapsed), ``curves.png``,
and ``sample_<image>_x<s>_{sr,bicubic,hr}.png`` for the first held-out image.

Periodic validation scores centre crops of the held-out images (``--val-crop``, HR pixels; 0: whole
images); the final report adds the whole held-out images (and with ``--self-ensemble`` their x8
self-ensemble score). Y-PSNR follows SPEC 5 (8-bit rounding,
``scale`` border pixels shaved). Resume (``--resume``) restores the model, optimizer, schedule, step,
data order, RNG state, elapsed time and best PSNR; settings not given again on the command line are
those of the run being resumed. With ``--workers 0`` a resumed run repeats the uninterrupted one.

**Failures.** ``last.pt`` is replaced atomically, so ``kill -9`` at any moment, even during a save,
leaves the previous ``last.pt`` whole: at most ``--save-every`` steps are lost, and ``--resume``
removes the killed write's temporary file. Resume keeps the saved lr schedule (its warm-up, decay
interval and peak lr) unless ``--lr``, ``--schedule``, ``--warmup-steps``, ``--decay-epochs`` or
``--epoch-steps`` is given anew. Bad input (data, checkpoint, settings) prints one line and exits
with status 2; any other error is a bug and keeps its traceback. A run folder this command created
and left empty is removed. A second Ctrl-C stops at once, keeping the last ``last.pt`` written.

Several processes (torchrun) train with DistributedDataParallel (gloo on CPU, nccl on GPU); each
process draws its own patches, ``--batch-size`` is per process, and only rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import ast
import collections
import contextlib
import csv
import functools
import math
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm import tqdm

from dlsn.cli import (
    EXIT_INTERRUPTED,
    check_backend,
    format_conversions,
    format_failures,
    pick_device,
    run_tool,
)
from dlsn.data import samples
from dlsn.data.datasets import HRImageDataset, PairedFolderDataset, check_pyramid
from dlsn.data.degradations import DEGRADATIONS
from dlsn.errors import UserInputError, one_line
from dlsn.eval import SetScore, bicubic_upscaler, evaluate_dataset, model_upscaler
from dlsn.images import IMAGE_EXTENSIONS, decode_image, list_images, write_image
from dlsn.models.checkpoint import load_checkpoint, load_weights, restore, save_checkpoint
from dlsn.models.presets import PRESETS, model_from_config, preset_config

LOG_COLUMNS = ("step", "epoch", "loss", "lr", "val_psnr", "elapsed")
SCHEDULES = ("step", "cosine", "constant")
LOSSES = ("l1", "l2")
COSINE_FLOOR = 0.01  # the cosine schedule ends at 1% of the peak lr
# Settings the lr schedule is built from; given on a --resume command line, they replace the saved one.
SCHEDULE_SETTINGS = ("lr", "schedule", "warmup_steps", "decay_epochs", "epoch_steps")


class TrainError(UserInputError, RuntimeError):
    """A problem with the training inputs (data, checkpoint, settings) the user can act on: printed as
    one line. Any other exception is a bug and keeps its traceback."""


# --------------------------------------------------------------------------------------------------
# Settings: command line > the run being resumed > the preset's training defaults


@dataclass(frozen=True)
class PresetTraining:
    """Training defaults of a preset (what the command line does not set)."""

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


# The paper's recipe (SPEC 4) for the full-size presets.
_PAPER = PresetTraining(lr=1e-4, batch_size=16, patch_size=48, schedule="step", epoch_steps=1000,
                        val_every=1000, epochs=1500, decay_epochs=300, finetune_epochs=200,
                        finetune_decay_epochs=50)
# Short CPU runs: a high peak lr with cosine decay to the time budget. Tuned for cpu_default at x2
# on 2 busy cores (see the project README for the numbers).
_CPU = PresetTraining(lr=2e-3, batch_size=16, patch_size=32, schedule="cosine", epoch_steps=100,
                      val_every=100, warmup_steps=10, min_detail=2.0, pyramid=(0.75, 0.5, 0.35), time_limit=9.0)
TRAINING_DEFAULTS: dict[str, PresetTraining] = {
    "paper": _PAPER,
    "small": _PAPER,
    "edsr_gla": _PAPER,
    "cpu_default": _CPU,
    "cnn": _CPU,
    "tiny": _CPU,
}
DEFAULT_PRESET = "cpu_default"

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dlsn.train",
        description="Train a super-resolution network (DLSN by default). With no arguments: a short CPU "
                    "run on the embedded sample photos that beats bicubic.",
    )
    # Every default is None here and resolved in resolve_settings (preset, resumed run); the help
    # texts state the defaults themselves, so argparse must not append its "(default: None)".
    arg = parser.add_argument
    arg("--data", type=Path, help="DIV2K root or a folder of HR images (default: embedded photos)")
    arg("--scale", type=int, choices=(2, 3, 4), help="upscaling factor (default 2)")
    arg("--preset", choices=sorted(PRESETS), help=f"model preset (default {DEFAULT_PRESET})")
    arg("--model-arg", action="append", metavar="KEY=VALUE",
        help="change one setting of the preset, e.g. --model-arg chunk_size=64 (repeatable)")
    arg("--degradation", choices=DEGRADATIONS, help="how LR images are made: BI, BD or DN (default BI)")
    arg("--noise-sigma", type=float, help="DN noise level on the 0-255 scale (default 15)")
    arg("--max-steps", type=int, help="stop after this many steps (default: preset's epochs, or time)")
    arg("--time-limit", type=float,
        help="stop after this many minutes since the command started (a resumed run counts earlier "
             "runs); 0: no limit (CPU presets default: 9 when --max-steps is not given)")
    arg("--batch-size", type=int, help="patches per step per process (default 16)")
    arg("--patch-size", type=int, help="LR patch size in pixels, HR patches are scale times larger "
                                       "(paper presets: 48; CPU presets: 32)")
    arg("--lr", type=float, help="peak learning rate (paper presets: 1e-4; CPU presets: 2e-3)")
    arg("--loss", choices=LOSSES, help="pixel loss (default l1, as in the paper)")
    arg("--schedule", choices=SCHEDULES, help="lr schedule (paper presets: step; CPU presets: cosine)")
    arg("--decay-epochs", type=int, help="step schedule: halve the lr every this many epochs (paper: 300; "
                                         "50 for x3/x4 from x2 weights)")
    arg("--epoch-steps", type=int, help="batches per epoch, the training set repeated to this length "
                                        "(paper presets: 1000; CPU presets: 100)")
    arg("--warmup-steps", type=int, help="linear lr warm-up steps (paper presets: 0; CPU presets: 10)")
    arg("--min-detail", type=float,
        help="redraw training patches flatter than this mean |HR gradient| (0-255 scale); 0: off "
             "(CPU presets: 2)")
    arg("--pyramid", type=float, nargs="*", metavar="F",
        help="also train on the HR images downscaled by these factors in (0, 1); no value: off "
             "(CPU presets: 0.75 0.5 0.35; HR-image data only, not stored LR pairs)")
    arg("--out", type=Path, help="output folder (default runs/<preset>_x<scale>, numbered if taken)")
    arg("--resume", nargs="?", const="auto", metavar="PATH",
        help="continue a run: its last.pt, a folder holding one, or --out's last.pt (no PATH)")
    arg("--overwrite", action="store_true", help="start afresh in an --out folder that holds a run")
    arg("--init-from", type=Path, help="start from these weights (e.g. x2 weights for x3/x4; the tail "
                                       "and any mis-shaped layer keep their fresh init)")
    arg("--device", help="torch device (default: cuda if available, else cpu)")
    arg("--backend", help="attention kernel backend: reference, cpu, cuda, triton (default: automatic)")
    arg("--val-every", type=int, help="validate (and save best.pt) every this many steps; 0: at the end "
                                      "(paper presets: 1000; CPU presets: 100)")
    arg("--save-every", type=int, help="write last.pt every this many steps (default: --val-every)")
    arg("--val-crop", type=int, help="periodic validation on centre crops of this HR size; 0: whole "
                                     "images (default 256)")
    arg("--val-images", type=int, help="images held out / used for validation (default 2; DIV2K 10)")
    arg("--seed", type=int, help="random seed (default 0)")
    arg("--threads", type=int,
        help="CPU threads per process (default: tuned while training among all cores, half, one; an "
             "OMP_NUM_THREADS in the environment fixes it)")
    arg("--workers", type=int, default=0, help="data loader worker processes per training process (default 0)")
    arg("--self-ensemble", action="store_true",
        help="also score the final model with the x8 flip/transpose self-ensemble")
    arg("--no-amp", action="store_true", help="no bfloat16 autocast on GPU")
    arg("--no-progress", action="store_true", help="no progress bar")
    return parser


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

    def to_plain(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self).items()}


def _given(args: argparse.Namespace, name: str) -> Any:
    if name == "model_args":
        return _parse_model_args(args.model_arg) if getattr(args, "model_arg", None) else None
    return getattr(args, name, None)


def _parse_model_args(items: Sequence[str]) -> dict[str, Any]:
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
    defaults = TRAINING_DEFAULTS.get(preset, _CPU)
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
    )
    _check_settings(settings)
    return settings


def _check_settings(s: Settings) -> None:
    if s.preset not in PRESETS:
        raise TrainError(f"--preset must be one of {', '.join(PRESETS)}, got {s.preset!r}")
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
    try:
        check_pyramid(s.pyramid)
    except ValueError as error:
        raise TrainError(f"--pyramid: {error}") from None


# --------------------------------------------------------------------------------------------------
# Processes and devices


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup_processes(device_arg: str | None) -> tuple[Processes, torch.device]:
    """Joins the torchrun process group (if launched by torchrun) and picks the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    procs = Processes(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = pick_device(device_arg)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", procs.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if procs.distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return procs, device


def cpu_thread_budget(procs: Processes) -> int:
    """The cores this process may use: those it can run on, shared among torchrun's local processes."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(procs.world)))
    return max(1, cores // local_world)


class ThreadTuner:
    """Chooses torch's intra-op thread count on the CPU by measured step time.

    On a machine shared with other processes, using every core can be many times slower than using
    fewer: when another process holds a core, each parallel op waits for the thread that is not
    running (seen here: 2.3 s per step with 2 threads against 0.09 s, on 2 cores with one busy). The
    tuner times a few steps with each count, keeps the fastest, and measures again later, less often
    while the choice stands.
    """

    def __init__(self, options: Sequence[int], probe_steps: int = 3, recheck_s: float = 20.0,
                 max_recheck_s: float = 320.0) -> None:
        self.options = list(dict.fromkeys(options))
        self.probe_steps, self.recheck_s, self.max_recheck_s = probe_steps, recheck_s, max_recheck_s
        self.interval = recheck_s
        self.best = self.options[0]
        self.queue = list(self.options)
        self.times: dict[int, float] = {}
        self.samples: list[float] = []
        self.probing = True
        self.next_check = 0.0
        self._use(self.queue.pop(0))

    @property
    def threads(self) -> int:
        return torch.get_num_threads()

    def _use(self, threads: int) -> None:
        torch.set_num_threads(threads)
        self.samples = []

    def after_step(self, seconds: float, now: float | None = None) -> None:
        """Call after every training step with its duration."""
        now = time.monotonic() if now is None else now
        if len(self.options) < 2:
            return
        if not self.probing:
            if now >= self.next_check:  # measure again: the other counts first, then the best
                self.queue = [t for t in self.options if t != self.best] + [self.best]
                self.probing = True
                self._use(self.queue.pop(0))
            return
        self.samples.append(seconds)
        if len(self.samples) <= self.probe_steps:  # the first step after a switch is a warm-up
            return
        self.times[self.threads] = sorted(self.samples[1:])[len(self.samples[1:]) // 2]
        if self.queue:
            self._use(self.queue.pop(0))
            return
        best = min(self.times, key=self.times.__getitem__)
        self.interval = min(self.interval * 2, self.max_recheck_s) if best == self.best else self.recheck_s
        self.best = best
        self._use(best)
        self.probing = False
        self.next_check = now + self.interval


def barrier(procs: Processes) -> None:
    if procs.distributed:
        dist.barrier()


# --------------------------------------------------------------------------------------------------
# Data


@dataclass
class Data:
    train: Dataset
    val: Dataset  # periodic validation (centre crops)
    val_full: Dataset  # the final score (whole images)
    description: str
    conversions: list[tuple[str, str]] = field(default_factory=list)  # (file, what reading it changed)


def read_images(paths: Sequence[Path], conversions: list[tuple[str, str]]) -> dict[str, Any]:
    """``{stem: [H, W, 3] uint8}`` of every file; raises one error listing all unreadable files (a run
    on part of the data would not be the run asked for). Conversions to 8-bit RGB go to ``conversions``."""
    images, failed = {}, []
    for path in paths:
        try:
            images[path.stem], conversion = decode_image(path)
        except UserInputError as error:
            failed.append((path.name, one_line(error)))
            continue
        if conversion is not None:
            conversions.append((path.name, conversion))
    if failed:
        raise TrainError(format_failures(failed, len(paths)))
    return images


def _is_div2k(folder: Path) -> bool:
    return (folder / "DIV2K_train_HR").is_dir()


def _with_crops(images: dict, crop: int) -> dict:
    return {name: samples.center_crop(image, crop) for name, image in images.items()} if crop else images


def _hr_split_datasets(train_images: dict, val_images: dict, s: Settings) -> tuple[Dataset, Dataset, Dataset]:
    common = {"degradation": s.degradation, "noise_sigma": s.noise_sigma, "seed": s.seed}
    train = HRImageDataset(train_images, s.scale, train=True, patch_size=s.patch_size, pyramid=s.pyramid,
                           **common)
    val_full = HRImageDataset(val_images, s.scale, train=False, **common)
    val = HRImageDataset(_with_crops(val_images, s.val_crop), s.scale, train=False, **common) \
        if s.val_crop else val_full
    return train, val, val_full


def _pyramid_note(s: Settings) -> str:
    if not s.pyramid:
        return ""
    return f" (plus copies downscaled by {', '.join(f'{f:g}' for f in s.pyramid)})"


def build_data(s: Settings) -> Data:
    """Training set and validation sets for the settings (see the module docstring)."""
    if s.data is None:
        train_images, val_images = samples.train_val_split()
        try:
            train, val, val_full = _hr_split_datasets(train_images, val_images, s)
        except ValueError as error:  # settings that do not fit the photos, e.g. a patch larger than one
            raise TrainError(f"the embedded photos: {one_line(error)}") from error
        desc = (f"embedded photos: {len(train_images)} for training{_pyramid_note(s)}, "
                f"held out {', '.join(val_images)}")
        return Data(train, val, val_full, desc)

    root = s.data
    if not root.exists():
        raise TrainError(f"--data folder not found: {root}")
    if not root.is_dir():
        raise TrainError(f"--data must be a folder (DIV2K root or a folder of images), got file {root}")
    if _is_div2k(root):
        return _div2k_data(root, s)

    paths = list_images(root)
    if not paths:
        raise TrainError(f"--data {root}: no images found directly inside it (looked for "
                         f"{', '.join(IMAGE_EXTENSIONS)}) and it is not a DIV2K root (no DIV2K_train_HR)")
    n_val = s.val_images or (2 if len(paths) >= 4 else 1)
    if len(paths) <= n_val:
        raise TrainError(f"--data {root}: {len(paths)} image(s); need more than the {n_val} held out for "
                         f"validation (lower --val-images or add images)")
    conversions: list[tuple[str, str]] = []
    try:
        images = read_images(paths, conversions)
        names = list(images)
        train_images = {n: images[n] for n in names[:-n_val]}
        val_images = {n: images[n] for n in names[-n_val:]}
        train, val, val_full = _hr_split_datasets(train_images, val_images, s)
    except ValueError as error:
        raise TrainError(f"--data {root}: {one_line(error)}") from error
    desc = (f"{root}: {len(train_images)} HR images for training{_pyramid_note(s)}, "
            f"held out {', '.join(val_images)}")
    return Data(train, val, val_full, desc, conversions)


def _div2k_data(root: Path, s: Settings) -> Data:
    try:
        return _div2k_datasets(root, s)
    except (ValueError, FileNotFoundError, NotADirectoryError) as error:
        raise TrainError(f"--data {root} (DIV2K layout): {one_line(error)}") from error


def _div2k_datasets(root: Path, s: Settings) -> Data:
    n_val = s.val_images or 10
    conversions: list[tuple[str, str]] = []
    if s.degradation == "BI":
        paired = PairedFolderDataset.from_div2k(root, s.scale, "train", train=True, patch_size=s.patch_size)
        conversions += list(paired.conversions.items())
        train: Dataset = paired
    else:
        paths = list_images(root / "DIV2K_train_HR")
        train = HRImageDataset(read_images(paths, conversions), s.scale, train=True,
                               patch_size=s.patch_size, degradation=s.degradation,
                               noise_sigma=s.noise_sigma, seed=s.seed, pyramid=s.pyramid)
    desc = f"DIV2K at {root}: {len(train)} training images"
    valid_hr = root / "DIV2K_valid_HR"
    if valid_hr.is_dir():
        paths = list_images(valid_hr)[:n_val]
        images = read_images(paths, conversions)
        if s.degradation == "BI" and (root / "DIV2K_valid_LR_bicubic" / f"X{s.scale}").is_dir():
            full = PairedFolderDataset.from_div2k(root, s.scale, "valid", train=False, cache=False)
            val_full: Dataset = Subset(full, range(min(n_val, len(full))))
        else:
            val_full = HRImageDataset(images, s.scale, train=False, degradation=s.degradation,
                                      noise_sigma=s.noise_sigma, seed=s.seed)
        val = HRImageDataset(_with_crops(images, s.val_crop), s.scale, train=False,
                             degradation=s.degradation, noise_sigma=s.noise_sigma, seed=s.seed) \
            if s.val_crop else val_full
        return Data(train, val, val_full, desc + f", validation on {len(val_full)} of DIV2K_valid",
                    conversions)
    # No validation split: hold nothing out, validate on a few training images (said so in the log).
    hr = list_images(root / "DIV2K_train_HR")[:n_val]
    images = read_images(hr, conversions)
    val = HRImageDataset(_with_crops(images, s.val_crop), s.scale, train=False, degradation=s.degradation,
                         noise_sigma=s.noise_sigma, seed=s.seed)
    return Data(train, val, val, desc + " (no DIV2K_valid_HR: validating on training images)",
                list(dict.fromkeys(conversions)))


class EpochSampler(Sampler[int]):
    """Indices of one epoch for one process: a permutation seeded by (seed, epoch), padded to a
    multiple of the process count and dealt out round-robin; ``skip`` drops the first indices
    (resuming mid-epoch without loading the batches already seen)."""

    def __init__(self, size: int, seed: int, procs: Processes) -> None:
        self.size, self.seed, self.procs = size, seed, procs
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def per_process(self) -> int:
        return math.ceil(self.size / self.procs.world)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        total = self.per_process() * self.procs.world
        order += order[: total - len(order)]
        return iter(order[self.procs.rank::self.procs.world][self.skip:])

    def __len__(self) -> int:
        return max(0, self.per_process() - self.skip)


class DetailedPatches(Dataset):
    """Training patches with some detail: a patch whose HR mean absolute gradient (0-255 scale) is
    below ``min_detail`` is drawn again, up to ``tries`` draws (then the most detailed draw is kept).

    Flat patches (sky, black backgrounds: most of ``retina``, half of ``rocket`` in the embedded
    photos) teach a short run almost nothing. Wraps a training data set with random patches.
    """

    def __init__(self, dataset: Dataset, min_detail: float, tries: int = 8) -> None:
        self.dataset, self.min_detail, self.tries = dataset, float(min_detail), tries

    def __len__(self) -> int:
        return len(self.dataset)

    @staticmethod
    def detail(hr: Tensor) -> float:
        """Mean absolute difference of neighbouring pixels of ``hr [3, H, W]`` (in [0, 1]), 0-255 scale."""
        vertical = (hr[:, 1:, :] - hr[:, :-1, :]).abs().mean()
        horizontal = (hr[:, :, 1:] - hr[:, :, :-1]).abs().mean()
        return 127.5 * float(vertical + horizontal)

    def __getitem__(self, index: int) -> dict[str, Any]:
        best, best_detail = None, -1.0
        for _ in range(self.tries):
            item = self.dataset[index]
            value = self.detail(item["hr"])
            if value >= self.min_detail:
                return item
            if value > best_detail:
                best, best_detail = item, value
        return best


def _quiet_worker(_: int) -> None:
    # Ctrl-C reaches every process of the terminal's group: the main process saves and stops,
    # so the workers must not die first with a KeyboardInterrupt of their own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# --------------------------------------------------------------------------------------------------
# Learning rate schedule


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


# --------------------------------------------------------------------------------------------------
# Output folder, log, plot


def _run_folder(out: Path | None, preset: str, scale: int, resuming: bool, overwrite: bool) -> Path:
    """``--out``, or ``runs/<preset>_x<scale>`` numbered ``_2``, ``_3`` ... past folders holding a run
    (for a resume without --out: the most recent of them)."""
    if out is not None:
        if (out / "last.pt").exists() and not resuming and not overwrite:
            raise TrainError(f"{out} already holds a run (last.pt); pass --resume to continue it, "
                             "--overwrite to start afresh, or choose another --out")
        return out
    base = Path("runs") / f"{preset}_x{scale}"
    taken = [base] + [base.with_name(f"{base.name}_{i}") for i in range(2, 1000)]
    existing = [p for p in taken if (p / "last.pt").exists()]
    if resuming:
        if not existing:
            raise TrainError(f"--resume: no run to continue in {base}*; pass --out DIR or --resume FILE")
        return max(existing, key=lambda p: (p / "last.pt").stat().st_mtime)
    if overwrite:
        return base
    return next(p for p in taken if not (p / "last.pt").exists())


class RunLog:
    """``log.csv`` rows and the in-memory history behind ``curves.png``.

    The file is (re)written at the first row, not before: a run that fails before logging anything
    leaves no header-only log behind. On resume the rows after the resumed step (logged by the run
    that went on and was then killed) are dropped; that rewrite replaces the file atomically.
    """

    def __init__(self, path: Path, keep_until_step: int | None) -> None:
        self.path = path
        self.rows: list[dict[str, str]] = []
        if keep_until_step is not None and path.exists():
            with path.open(newline="") as handle:
                self.rows = [r for r in csv.DictReader(handle)
                             if r.get("step", "").isdigit() and int(r["step"]) <= keep_until_step]
        self._started = False

    def add(self, step: int, epoch: int, loss: float | None, lr: float, val_psnr: float | None,
            elapsed: float) -> None:
        row = {"step": str(step), "epoch": str(epoch),
               "loss": "" if loss is None else f"{loss:.6f}", "lr": f"{lr:.6g}",
               "val_psnr": "" if val_psnr is None else f"{val_psnr:.4f}", "elapsed": f"{elapsed:.1f}"}
        self.rows.append(row)
        if not self._started:
            self._rewrite()
            self._started = True
            return
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, LOG_COLUMNS).writerow(row)

    def _rewrite(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, LOG_COLUMNS)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.path)

    def plot(self, path: Path, bicubic_psnr: float | None, title: str) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        loss = [(int(r["step"]), float(r["loss"])) for r in self.rows if r["loss"]]
        psnr = [(int(r["step"]), float(r["val_psnr"])) for r in self.rows if r["val_psnr"]]
        fig, (ax_loss, ax_psnr) = plt.subplots(1, 2, figsize=(11, 4))
        if loss:
            steps, values = zip(*loss, strict=True)
            ax_loss.plot(steps, values, color="tab:blue", alpha=0.35, linewidth=0.8)
            window = max(1, len(values) // 30)
            if window > 1:  # running mean, so the trend shows through the batch-to-batch noise
                spans = [values[max(0, i - window + 1):i + 1] for i in range(len(values))]
                smooth = [sum(span) / len(span) for span in spans]
                ax_loss.plot(steps, smooth, color="tab:blue", linewidth=1.5)
            ax_loss.set_yscale("log")
        ax_loss.set(xlabel="step", ylabel="L1 loss (0-255 scale)", title="training loss")
        if psnr:
            ax_psnr.plot(*zip(*psnr, strict=True), "o-", color="tab:green", label="model")
        if bicubic_psnr is not None:
            ax_psnr.axhline(bicubic_psnr, color="tab:gray", linestyle="--", label="bicubic")
        ax_psnr.set(xlabel="step", ylabel="Y-PSNR (dB)", title="validation")
        ax_psnr.legend(loc="lower right")
        fig.suptitle(title)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


# --------------------------------------------------------------------------------------------------
# Interruption


class StopFlag:
    """Ctrl-C / SIGTERM ask the loop to stop after the current step (a second Ctrl-C stops at once)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> StopFlag:
        with contextlib.suppress(ValueError):  # not the main thread: no handlers, no interruption
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


# --------------------------------------------------------------------------------------------------
# Model, validation, checkpoints


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def validate(model: nn.Module, dataset: Dataset, scale: int, device: torch.device, seed: int,
             ensemble: bool = False) -> SetScore:
    """Y-PSNR/SSIM of the model on ``dataset`` (whole items); hash rotations seeded, so repeatable."""
    net = _unwrap(model)
    was_training = net.training
    net.eval()
    if hasattr(net, "set_inference"):
        net.set_inference(seed=seed)
    rgb_range = float(net.config.get("rgb_range", 255.0))
    try:
        return evaluate_dataset(model_upscaler(net, rgb_range, ensemble), dataset, scale, set_name="val",
                                device=device, progress=False)
    finally:
        net.train(was_training)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _find_resume_file(resume_arg: str, out: Path) -> Path:
    path = out / "last.pt" if resume_arg == "auto" else Path(resume_arg)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise TrainError(f"--resume: no checkpoint at {path}")
    return path


@dataclass
class Progress:
    """Where a run stands; saved in ``last.pt``'s ``extra``."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    elapsed: float = 0.0  # seconds of earlier runs (resumed) plus this one
    best_psnr: float = -math.inf
    best_step: int = -1
    bicubic_psnr: float | None = None


def _format_minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


# --------------------------------------------------------------------------------------------------
# Training


class Trainer:
    """One training run: set up from the command line (and a resumed checkpoint), then :meth:`run`."""

    def __init__(self, args: argparse.Namespace, started: float) -> None:
        self.args, self.started = args, started
        self.procs, self.device = setup_processes(args.device)
        self.say = functools.partial(print, flush=True) if self.procs.main else (lambda *a, **k: None)

        # The run folder decides which checkpoint --resume reads, and that the remaining defaults.
        preliminary = resolve_settings(args, None)
        out = args.out
        if out is None and args.resume not in (None, "auto"):  # --resume FILE/DIR: its folder
            resume_arg = Path(args.resume)
            out = resume_arg if resume_arg.is_dir() else resume_arg.parent
        self.out = _run_folder(out, preliminary.preset, preliminary.scale, args.resume is not None,
                               args.overwrite)
        # A folder this command creates and never writes to is removed again (see remove_if_empty).
        self.created_out = not self.out.exists()
        self.saved_step: int | None = None  # the step last written to last.pt by this command
        self.resume_path: Path | None = None
        saved: dict[str, Any] | None = None
        if args.resume is not None:
            self.resume_path = _find_resume_file(args.resume, self.out)
            # Read once: everything resume needs comes from this one copy of the file.
            try:
                saved = load_checkpoint(self.resume_path, map_location="cpu")
            except UserInputError as error:
                raise TrainError(f"--resume: {one_line(error)}") from error
            saved_settings = saved.get("extra", {}).get("settings") or {}
            if args.preset is not None and saved_settings.get("preset") not in (None, args.preset):
                raise TrainError(f"--resume: {self.resume_path} is a {saved_settings.get('preset')!r} run; "
                                 f"it cannot continue as --preset {args.preset}")
            self.s = resolve_settings(args, saved_settings)
        else:
            self.s = preliminary
        s = self.s
        torch.manual_seed(s.seed + self.procs.rank)

        backend = check_backend(args.backend, self.device)
        self.data = build_data(s)
        if self.data.conversions:
            self.say(f"note: {format_conversions(self.data.conversions)}")
        self.config, self.net = self._build_model(saved, backend)
        self.rgb_range = float(self.config.get("rgb_range", 255.0))
        if s.init_from is not None and saved is None:
            self._init_from(s.init_from)

        # Epoch length: the training set repeated to epoch_steps batches per process.
        train_set = self.data.train
        train_set.repeat = max(1, math.ceil(s.epoch_steps * s.batch_size * self.procs.world
                                            / len(train_set.names)))
        self.train_set = DetailedPatches(train_set, s.min_detail) if s.min_detail > 0 else train_set
        self.sampler = EpochSampler(len(train_set), s.seed, self.procs)
        self.steps_per_epoch = self.sampler.per_process() // s.batch_size
        if self.steps_per_epoch < 1:
            raise TrainError(f"an epoch has fewer patches ({self.sampler.per_process()}) than --batch-size "
                             f"{s.batch_size}")

        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=s.lr, betas=(0.9, 0.999), eps=1e-8)
        self.schedule = self._make_schedule()
        self.state = Progress()
        if saved is not None:
            self._resume(saved)
        self.model: nn.Module = self.net
        if self.procs.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.amp = self.device.type == "cuda" and not args.no_amp
        self.limit_s = None if s.time_limit is None else s.time_limit * 60.0
        self.elapsed_before = self.state.elapsed
        self.log = None
        if self.procs.main:
            self.log = RunLog(self.out / "log.csv", self.state.step if saved else None)
        self.step_time = 0.0
        self.last_val: float | None = None
        self.threads: ThreadTuner | None = None
        if self.device.type == "cpu":
            if args.threads is not None:
                if args.threads < 1:
                    raise TrainError(f"--threads must be >= 1, got {args.threads}")
                torch.set_num_threads(args.threads)
            elif not os.environ.get("OMP_NUM_THREADS"):
                budget = cpu_thread_budget(self.procs)
                self.threads = ThreadTuner([budget, max(1, budget // 2), 1])

    # ---- setup pieces

    def _build_model(self, saved: dict[str, Any] | None, backend: str | None) -> tuple[dict[str, Any], nn.Module]:
        s = self.s
        if saved is not None:
            config = dict(saved["config"])
            return config, model_from_config(config, backend=backend).to(self.device)
        try:
            config = preset_config(s.preset, s.scale, **s.model_args)
            net = model_from_config(config, backend=backend)
        except (TypeError, ValueError) as error:
            if not s.model_args:  # the preset itself does not build: a bug, not an input
                raise
            changes = " ".join(f"{k}={v!r}" for k, v in s.model_args.items())
            raise TrainError(f"--model-arg {changes}: {one_line(error)}") from error
        return config, net.to(self.device)

    def _make_schedule(self) -> LRSchedule:
        s = self.s
        decay_steps = s.decay_epochs * self.steps_per_epoch if s.decay_epochs else None
        return LRSchedule(self.optimizer, s.schedule, s.lr, s.warmup_steps, decay_steps)

    def _init_from(self, path: Path) -> None:
        try:
            source = load_checkpoint(path, map_location="cpu")
        except UserInputError as error:
            raise TrainError(f"--init-from: {one_line(error)}") from error
        left_out = load_weights(self.net, source["model"], strict=False, source=str(path))
        shown = f" ({', '.join(left_out[:6])}{' ...' if len(left_out) > 6 else ''})" if left_out else ""
        self.say(f"init from {path}: {len(left_out)} tensors keep their fresh init{shown}")

    def _resume(self, saved: dict[str, Any]) -> None:
        """Weights, optimizer, schedule, progress and RNG from ``saved`` (``last.pt``, read once)."""
        assert self.resume_path is not None
        try:
            restore(saved, self.net, self.optimizer, self.schedule, source=str(self.resume_path))
        except UserInputError as error:
            raise TrainError(f"--resume: {one_line(error)}") from error
        # The restored schedule goes on as it was, even where this setup would derive another one (an
        # epoch's length in steps depends on the data and the process count). Only schedule settings
        # given anew on this command line replace it.
        given = [f"--{name.replace('_', '-')}" for name in SCHEDULE_SETTINGS if getattr(self.args, name, None)
                 is not None]
        if given:
            self.schedule = self._make_schedule()
            self.say(f"schedule: rebuilt from {', '.join(given)} given anew (the resumed run's is replaced)")
        extra = saved.get("extra", {})
        self.state = Progress(**{k: extra[k] for k in vars(Progress()) if k in extra})
        self.state.step = int(saved["step"])
        if self.procs.main and "rng" in extra:
            _set_rng_state(extra["rng"], self.device)
        else:  # other processes: fresh streams, not a replay of their first steps
            torch.manual_seed(self.s.seed * 1_000_003 + self.procs.rank * 7919 + self.state.step)

    # ---- bookkeeping

    def elapsed(self) -> float:
        return self.elapsed_before + (time.monotonic() - self.started)

    def progress(self) -> float:
        """Share of the budget used: steps of --max-steps or time of --time-limit, whichever is more."""
        parts = [0.0]
        if self.s.max_steps:
            parts.append(self.state.step / self.s.max_steps)
        if self.limit_s:
            parts.append(self.elapsed() / self.limit_s)
        return max(parts)

    def out_of_budget(self) -> bool:
        if self.s.max_steps and self.state.step >= self.s.max_steps:
            return True
        # Stop when the next step would overrun the time limit.
        return bool(self.limit_s and self.elapsed() + self.step_time >= self.limit_s)

    def checkpoint(self, path: Path, with_optimizer: bool = True) -> None:
        st = self.state
        extra = {"epoch": st.epoch, "batch_in_epoch": st.batch_in_epoch, "elapsed": self.elapsed(),
                 "best_psnr": st.best_psnr, "best_step": st.best_step, "bicubic_psnr": st.bicubic_psnr,
                 "settings": self.s.to_plain(), "rng": _rng_state(self.device),
                 "world_size": self.procs.world}
        save_checkpoint(path, self.net, config=self.config,
                        optimizer=self.optimizer if with_optimizer else None,
                        scheduler=self.schedule if with_optimizer else None, step=st.step, extra=extra)
        if with_optimizer:
            self.saved_step = st.step

    def save_last(self) -> None:
        """``last.pt`` at the current step, unless this command wrote it there already."""
        if self.procs.main and self.saved_step != self.state.step:
            self.checkpoint(self.out / "last.pt")

    def interrupted_note(self) -> str:
        """What a second Ctrl-C (or one outside the training loop) leaves behind, for the one-line message."""
        last = self.out / "last.pt"
        if self.saved_step is not None:
            return f"saved {last} at step {self.saved_step} (continue with: python -m dlsn.train --resume {last})"
        if self.resume_path is not None:
            return f"{self.resume_path} is unchanged"
        return "nothing saved"

    def remove_if_empty(self) -> None:
        """Removes the run folder when this command created it and wrote nothing there (a failed start)."""
        if self.created_out and self.out.is_dir() and not any(self.out.iterdir()):
            with contextlib.suppress(OSError):
                self.out.rmdir()

    def remove_unfinished_writes(self) -> None:
        """Temporary files of checkpoint writes a killed run left (``kill -9`` during a save)."""
        stale = sorted(self.out.glob(".last.pt.*.tmp")) + sorted(self.out.glob(".best.pt.*.tmp"))
        for path in stale:
            with contextlib.suppress(OSError):
                path.unlink()
        if stale:
            self.say(f"removed {len(stale)} unfinished checkpoint write(s) of a run killed while saving")

    def run_validation(self) -> float:
        """Periodic validation (rank 0): log it, keep best.pt, redraw the curves."""
        st = self.state
        score = validate(self.net, self.data.val, self.s.scale, self.device, self.s.seed).psnr
        if score > st.best_psnr:
            st.best_psnr, st.best_step = score, st.step
            self.checkpoint(self.out / "best.pt", with_optimizer=False)
        assert self.log is not None
        self.log.add(st.step, st.epoch, None, self.schedule.last_lr, score, self.elapsed())
        self.plot()
        return score

    def plot(self) -> None:
        if self.log is not None:
            title = f"{self.s.preset} x{self.s.scale}"
            self.log.plot(self.out / "curves.png", self.state.bicubic_psnr, title)

    def announce(self) -> None:
        s, st = self.s, self.state
        n_params = sum(p.numel() for p in self.net.parameters())
        budget = [f"{s.max_steps} steps"] if s.max_steps else []
        if self.limit_s:
            budget.append(f"{s.time_limit:g} min")
        self.say(f"dlsn.train: {s.preset} x{s.scale} {s.degradation}, {n_params / 1e6:.3f}M parameters, on "
                 f"{self.device}" + (f" x {self.procs.world} processes" if self.procs.distributed else "")
                 + (f", {torch.get_num_threads()} threads" if self.threads is None else
                    f", threads tuned among {'/'.join(map(str, self.threads.options))}"))
        self.say(f"data: {self.data.description}; an epoch is {self.steps_per_epoch} steps of "
                 f"{s.batch_size} LR patches {s.patch_size}x{s.patch_size}")
        budget_text = " or ".join(budget) or "none (Ctrl-C stops)"
        self.say(f"schedule: {s.schedule}, lr {s.lr:g}; budget: {budget_text}; output: {self.out}"
                 + (f"; resumed at step {st.step}" if self.resume_path else ""))
        if self.procs.main:
            if st.bicubic_psnr is None:
                st.bicubic_psnr = evaluate_dataset(bicubic_upscaler(s.scale), self.data.val, s.scale,
                                                   progress=False).psnr
            kind = f"{s.val_crop}x{s.val_crop} HR centre crops" if s.val_crop else "whole images"
            self.say(f"validation: {len(self.data.val)} images ({kind}); "
                     f"bicubic Y-PSNR {st.bicubic_psnr:.2f} dB")

    # ---- the loop

    def train_step(self, batch: dict[str, Any]) -> Tensor:
        lr_img = batch["lr"].to(self.device, non_blocking=True).mul_(self.rgb_range)
        hr_img = batch["hr"].to(self.device, non_blocking=True).mul_(self.rgb_range)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            sr = self.model(lr_img)
        loss = (F.l1_loss if self.s.loss == "l1" else F.mse_loss)(sr.float(), hr_img)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def batches(self) -> Iterator[dict[str, Any]]:
        """Batches from the current position on, epoch after epoch (``state.epoch`` advances)."""
        s, st = self.s, self.state
        kwargs: dict[str, Any] = {"batch_size": s.batch_size, "sampler": self.sampler, "drop_last": True,
                                  "num_workers": self.args.workers, "pin_memory": self.device.type == "cuda"}
        if self.args.workers > 0:
            kwargs["worker_init_fn"] = _quiet_worker
        while True:
            self.sampler.set_epoch(st.epoch, skip=st.batch_in_epoch * s.batch_size)
            # Its own generator: creating a loader must not draw from the global RNG (exact resume).
            generator = torch.Generator().manual_seed(s.seed * 7919 + st.epoch * 104729 + self.procs.rank)
            yield from DataLoader(self.train_set, generator=generator, **kwargs)
            st.epoch += 1
            st.batch_in_epoch = 0

    def run(self) -> int:
        s, st, procs = self.s, self.state, self.procs
        if procs.main:
            self.remove_unfinished_writes()
        self.announce()
        self.net.train()
        bar = tqdm(total=s.max_steps, initial=st.step, unit="step", dynamic_ncols=True, file=sys.stderr,
                   disable=self.args.no_progress or not procs.main, smoothing=0.1)
        loss_sum, loss_count = 0.0, 0
        step_ends: collections.deque[float] = collections.deque([time.monotonic()], maxlen=31)
        interrupted = False
        self.schedule.apply(st.step, self.progress())
        with StopFlag() as stop:
            done = self.out_of_budget()
            batches = self.batches()
            while not done:
                batch = next(batches)
                t0 = time.monotonic()
                loss = self.train_step(batch)
                st.step += 1
                st.batch_in_epoch += 1
                took = time.monotonic() - t0
                if self.threads is not None:
                    self.threads.after_step(took)
                self.step_time = 0.8 * self.step_time + 0.2 * took if self.step_time else took

                # One all-reduce per step: the mean loss, and whether any process was signalled or is
                # out of budget (time differs between processes, but they must stop at the same step).
                status = torch.tensor([float(loss), float(stop.signal_name is not None),
                                       float(self.out_of_budget())], dtype=torch.float64)
                if procs.distributed:
                    status = status.to(self.device)
                    dist.all_reduce(status)
                    status = status.cpu()
                mean_loss = float(status[0]) / procs.world
                interrupted = bool(status[1] > 0)
                done = interrupted or bool(status[2] > 0)
                if not math.isfinite(mean_loss):
                    if procs.main:
                        self.checkpoint(self.out / "last.pt")
                    raise TrainError(f"the loss is not finite at step {st.step}; lower --lr "
                                     f"(last.pt written for inspection)")
                loss_sum, loss_count = loss_sum + mean_loss, loss_count + 1
                self.schedule.apply(st.step, self.progress())

                step_ends.append(time.monotonic())
                if procs.main:
                    # Steps per second over the last 30 steps, data loading and validation included.
                    rate = (len(step_ends) - 1) / max(step_ends[-1] - step_ends[0], 1e-9)
                    postfix = {"loss": f"{mean_loss:.3f}", "lr": f"{self.schedule.last_lr:.2e}",
                               "img/s": f"{rate * s.batch_size * procs.world:.1f}"}
                    if self.last_val is not None:
                        postfix["val"] = f"{self.last_val:.2f}"
                    if self.limit_s:
                        postfix["left"] = _format_minutes(max(0.0, self.limit_s - self.elapsed()))
                    if self.threads is not None:
                        postfix["threads"] = str(torch.get_num_threads())
                    bar.set_postfix(postfix, refresh=False)
                    bar.update(1)
                    if st.step % 10 == 0 and self.log is not None:
                        self.log.add(st.step, st.epoch, loss_sum / loss_count, self.schedule.last_lr, None,
                                     self.elapsed())
                        loss_sum, loss_count = 0.0, 0

                # Periodic validation and saving (the end of the run does both anyway).
                at_val = bool(s.val_every) and st.step % s.val_every == 0 and not done
                at_save = bool(s.save_every) and st.step % s.save_every == 0 and not done
                if procs.main and at_val:
                    self.last_val = self.run_validation()
                if procs.main and at_save:
                    self.checkpoint(self.out / "last.pt")
                if at_val or at_save:
                    barrier(procs)
            signal_name = stop.signal_name
        bar.close()

        if procs.main:
            try:
                self._finish(interrupted, signal_name, loss_sum, loss_count)
            except KeyboardInterrupt:  # Ctrl-C during the final validation or report: keep the steps
                self.save_last()
                raise
        barrier(procs)
        return EXIT_INTERRUPTED if interrupted else 0

    def _finish(self, interrupted: bool, signal_name: str | None, loss_sum: float, loss_count: int) -> None:
        st = self.state
        if loss_count and self.log is not None:
            self.log.add(st.step, st.epoch, loss_sum / loss_count, self.schedule.last_lr, None, self.elapsed())
        if interrupted:
            self.checkpoint(self.out / "last.pt")
            self.plot()
            self.say(f"\nstopped by {signal_name or 'a signal'} at step {st.step}; saved "
                     f"{self.out / 'last.pt'} (continue with: python -m dlsn.train --resume "
                     f"{self.out / 'last.pt'})")
        else:
            val_psnr = self.run_validation()
            self.checkpoint(self.out / "last.pt")
            self.final_report(val_psnr)

    def final_report(self, val_psnr: float) -> None:
        """Scores on the held-out images vs bicubic (the validation crops and the whole images), and a
        sample SR image next to its bicubic version. ``val_psnr``: the model's score on ``data.val``."""
        s, st, out = self.s, self.state, self.out
        train_time = self.elapsed()
        whole = validate(self.net, self.data.val_full, s.scale, self.device, s.seed)
        bicubic = evaluate_dataset(bicubic_upscaler(s.scale), self.data.val_full, s.scale, progress=False)
        ensemble = None
        if self.args.self_ensemble:
            ensemble = validate(self.net, self.data.val_full, s.scale, self.device, s.seed, ensemble=True)
        item = self.data.val_full[0]
        self.net.eval()
        sr = model_upscaler(self.net, self.rgb_range)(item["lr"][None].to(self.device))[0]
        stem = f"sample_{item['name']}_x{s.scale}"
        sr_path = write_image(out / f"{stem}_sr.png", sr.float().clamp(0, 1))
        bicubic_image = bicubic_upscaler(s.scale)(item["lr"][None])[0]
        bicubic_path = write_image(out / f"{stem}_bicubic.png", bicubic_image)
        write_image(out / f"{stem}_hr.png", item["hr"])

        say = functools.partial(print, flush=True)
        say(f"\ntrained {st.step} steps (epoch {st.epoch}) in {_format_minutes(train_time)} min")
        say(f"checkpoints: {out / 'last.pt'} (final), {out / 'best.pt'} (best validation, step "
            f"{st.best_step}); log {out / 'log.csv'}, curves {out / 'curves.png'}")
        say(f"sample: {sr_path} (model) next to {bicubic_path} (bicubic)")
        names = ", ".join(score.name for score in whole.images)
        say(f"held-out Y-PSNR at x{s.scale} {s.degradation} ({names}; never trained on), final model:")
        if self.data.val is not self.data.val_full and st.bicubic_psnr is not None:
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
        say(f"wall time: {_format_minutes(self.elapsed() - self.elapsed_before)} min for this command")


def _process_age() -> float:
    """Seconds since this process started (Linux; 0 elsewhere), so time limits include imports."""
    try:
        start_ticks = float(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def main(argv: Sequence[str] | None = None, started: float | None = None) -> int:
    """Command-line entry point; ``started``: ``time.monotonic()`` the time limit counts from (now).

    Bad input (:class:`~dlsn.errors.UserInputError`) prints one line and returns 2; Ctrl-C outside
    the training loop (or a second one inside it) prints one line and returns 130; anything else is
    a bug and propagates with its traceback. A run folder this command created and left empty is
    removed.
    """
    started = time.monotonic() if started is None else started
    parser = _parser()
    args = parser.parse_args(argv)
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    trainer: Trainer | None = None

    def body() -> int:
        nonlocal trainer
        trainer = Trainer(args, started)
        return trainer.run()

    def interrupted() -> str:
        return trainer.interrupted_note() if trainer is not None else "nothing saved"

    try:
        return run_tool("dlsn.train", body, interrupted)
    finally:
        if trainer is not None and trainer.procs.main:
            trainer.remove_if_empty()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(started=time.monotonic() - _process_age()))
