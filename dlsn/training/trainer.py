"""One training run: built from the command line (and a resumed checkpoint), then run step by step."""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from dlsn.cli import EXIT_INTERRUPTED, EXIT_SOME_FAILED, check_backend, format_conversions, format_failures, saving
from dlsn.errors import DivergedError, SaveError, UserInputError, one_line
from dlsn.models import precision
from dlsn.models.checkpoint import load_checkpoint, load_weights, restore, save_checkpoint, save_safetensors
from dlsn.models.presets import model_from_config, preset_config

from .data import DetailedPatches, EpochSampler, build_data, quiet_worker
from .ema import EMA
from .processes import StopFlag, ThreadTuner, cpu_thread_budget, on_main, setup_processes
from .report import announce, final_report, format_minutes, validate
from .run_folder import RunLock, RunLog, find_resume_file, run_folder
from .schedule import LRSchedule
from .settings import SCHEDULE_SETTINGS, TrainError, check_resume_fits, resolve_settings


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


DIVERGED_NAME = "diverged.pt"  # the state of a diverged run, kept beside last.pt for inspection


def all_finite(*modules: nn.Module) -> bool:
    """Whether every parameter and floating buffer of ``modules`` is finite: one device read in all."""
    flags = [t.isfinite().all() for m in modules for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def training_precision(device: torch.device, no_amp: bool = False) -> str:
    """What the training steps compute in: ``"bfloat16"`` (autocast) on a GPU and on a CPU with bfloat16
    instructions (AVX512-BF16/AMX: oneDNN's bfloat16 convolutions, 88-90% of a step, about twice as fast; in
    a 9-minute default run 472 steps, +2.55 dB, against 318 steps, +2.26 dB in float32), else ``"float32"``;
    ``no_amp`` (``--no-amp``): float32 everywhere."""
    if no_amp:
        return "float32"
    if device.type == "cuda" or (device.type == "cpu" and precision.cpu_has_fast_bf16()):
        return "bfloat16"
    return "float32"


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
        # One run per folder: the lock comes first, so a second command into a running one's folder is told
        # so (and by whom), whatever else it asks. Only the main process writes, so only it locks.
        self.lock: RunLock | None = None
        self.created_out = False  # a folder this command creates and never writes to is removed again
        if out is not None:
            self._lock(out)
        try:
            self._setup(args, preliminary, out)
        except BaseException:
            self.close()
            raise

    def _lock(self, folder: Path) -> None:
        self.created_out = not folder.exists()
        if self.procs.main:
            self.lock = RunLock(folder)
            try:
                self.lock.acquire()
            except BaseException:
                self.lock = None
                if self.created_out:  # made by this command: its lock file is ours too
                    with contextlib.suppress(OSError):
                        (folder / RunLock.NAME).unlink()
                    with contextlib.suppress(OSError):
                        folder.rmdir()
                raise

    def _setup(self, args: argparse.Namespace, preliminary: Any, out: Path | None) -> None:
        self.out = run_folder(out, preliminary.preset, preliminary.scale, args.resume is not None,
                               args.overwrite)
        if out is None:
            self._lock(self.out)
        self.saved_step: int | None = None  # the step last written to last.pt by this command
        self.kept_step: int | None = None  # the step of the last.pt on disk (this command's, or the resumed one)
        self.resume_path: Path | None = None
        saved: dict[str, Any] | None = None
        resuming = args.resume is not None
        if args.resume == "auto" and args.out is not None and not (self.out / "last.pt").exists():
            # The first start of a restartable command (torchrun --max-restarts ... --resume): nothing yet.
            self.say(f"--resume: no last.pt in {self.out} yet, so a new run starts there")
            resuming = False
        if resuming:
            self.resume_path = find_resume_file(args.resume, self.out)
            # Read once: everything resume needs comes from this one copy of the file.
            try:
                saved = load_checkpoint(self.resume_path, map_location="cpu")
            except UserInputError as error:
                raise TrainError(f"--resume: {one_line(error)}") from error
            saved_settings = saved.get("extra", {}).get("settings") or {}
            check_resume_fits(args, saved_settings, saved.get("config") or {}, self.resume_path)
            self.s = resolve_settings(args, saved_settings)
        else:
            self.s = preliminary
        s = self.s
        torch.manual_seed(s.seed + self.procs.rank)

        backend = check_backend(args.backend, self.device)
        self.data = build_data(s)
        if self.data.conversions:
            self.say(f"note: {format_conversions(self.data.conversions)}")
        if self.data.failed:  # the policy of eval and upscale: go on with the rest, list them, exit with 1
            self.say(f"dlsn.train: {self.failures_line()}; training on the others", file=sys.stderr)
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
        # The weights' moving average (--ema): what validation scores and best.pt / model.safetensors hold.
        self.ema = EMA(self.net, s.ema) if s.ema > 0 else None
        if saved is not None:
            self._resume(saved)
        self.model: nn.Module = self.net
        if self.procs.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.precision = training_precision(self.device, args.no_amp)
        self.amp = self.precision == "bfloat16"
        self.limit_s = None if s.time_limit is None else s.time_limit * 60.0
        self.elapsed_before = self.state.elapsed
        self.log = None
        if self.procs.main:
            self.log = RunLog(self.out / "log.csv", self.state.step if saved else None)
        self.step_time = 0.0
        self.loss_sum, self.loss_count = 0.0, 0  # the losses since the last log.csv row
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
        if self.ema is not None and extra.get("ema") is not None:
            self.ema.load_state_dict(extra["ema"])
        elif self.ema is not None:  # --ema given anew: the average starts from the resumed weights
            self.ema = EMA(self.net, self.s.ema)
        self.state = Progress(**{k: extra[k] for k in vars(Progress()) if k in extra})
        self.state.step = int(saved["step"])
        self.kept_step = self.state.step
        best = self.state.best_psnr
        if not (isinstance(best, (int, float)) and (math.isfinite(best) or best == -math.inf)):
            # An older version scored a diverged model as +inf dB, and no later score could replace it.
            self.say(f"note: the resumed run's best validation score is {best} (a diverged model scored by an "
                     "older version); the next validation replaces best.pt")
            self.state.best_psnr, self.state.best_step = -math.inf, -1
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

    @property
    def eval_net(self) -> nn.Module:
        """The weights validation scores and best.pt holds: the moving average with --ema, else the live ones."""
        return self.ema.model if self.ema is not None else self.net

    def checkpoint(self, path: Path, with_optimizer: bool = True) -> None:
        """``last.pt`` (``with_optimizer``: the live weights, the EMA in ``extra``) or ``best.pt`` (the
        :attr:`eval_net` weights only, and ``model.safetensors`` beside it).

        Weights that are not all finite are never saved there: :class:`DivergedError` instead (the check is
        one read per save). A failed write (full disk, read-only folder) is a one-line
        :class:`~dlsn.errors.SaveError` saying what was kept; the file it would have replaced is intact."""
        net = self.net if with_optimizer else self.eval_net
        nets = (self.net, self.ema.model) if with_optimizer and self.ema is not None else (net,)
        if not all_finite(*nets):
            self.diverged("the weights are not finite")
        self._write_checkpoint(path, net, with_optimizer)

    def _write_checkpoint(self, path: Path, net: nn.Module, with_optimizer: bool) -> None:
        st = self.state
        extra = {"epoch": st.epoch, "batch_in_epoch": st.batch_in_epoch, "elapsed": self.elapsed(),
                 "best_psnr": st.best_psnr, "best_step": st.best_step, "bicubic_psnr": st.bicubic_psnr,
                 "settings": self.s.to_plain(), "rng": _rng_state(self.device),
                 "world_size": self.procs.world, "precision": self.precision}
        if with_optimizer and self.ema is not None:
            extra["ema"] = self.ema.state_dict()
        with saving(path, self.kept_note(path.name)):
            save_checkpoint(path, net, config=self.config,
                            optimizer=self.optimizer if with_optimizer else None,
                            scheduler=self.schedule if with_optimizer else None, step=st.step, extra=extra)
        if path.name == DIVERGED_NAME:
            return
        if with_optimizer:
            self.saved_step = self.kept_step = st.step
        else:
            safetensors = path.with_name("model.safetensors")
            with saving(safetensors, self.kept_note(safetensors.name)):
                save_safetensors(safetensors, net, self.config, preset=self.s.preset)

    def kept_note(self, name: str) -> str:
        """What a failed write of ``name`` leaves (for its one-line message)."""
        last = self.out / "last.pt"
        if name == "last.pt":
            if self.kept_step is None:
                return f"no {last} was written yet"
            kept = f"the previous {last} (step {self.kept_step}) is intact"
        else:
            kept = f"the previous {self.out / name} is intact" if (self.out / name).exists() else f"no {name} kept"
            if self.kept_step is None:
                return kept
            kept += f", and {last} (step {self.kept_step})"
        return f"{kept}; free some space or choose another --out, then continue with --resume {last}"

    def diverged(self, what: str) -> None:
        """Stops a run whose loss, weights or validation went non-finite: raises :class:`DivergedError`.

        Nothing is written over ``last.pt``, ``best.pt`` or ``model.safetensors``: they keep the last finite
        state. The diverged state goes to ``diverged.pt`` beside them, for inspection (``torch.load``; the
        tools refuse its non-finite weights)."""
        st = self.state
        kept = []
        if self.kept_step is not None:
            kept.append(f"last.pt (step {self.kept_step})")
        if math.isfinite(st.best_psnr) and st.best_step >= 0:
            kept.append(f"best.pt (step {st.best_step}, {st.best_psnr:.2f} dB)")
        note = ""
        if self.procs.main:
            try:
                self._write_checkpoint(self.out / DIVERGED_NAME, self.net, with_optimizer=True)
                note = f"; the diverged state is in {self.out / DIVERGED_NAME}"
            except SaveError:
                note = f"; {DIVERGED_NAME} could not be written"
        kept_text = f"kept {' and '.join(kept)} unchanged" if kept else "nothing was saved"
        raise DivergedError(f"training diverged at step {st.step}: {what}; {kept_text}{note}; lower --lr "
                            + (f"and continue with --resume {self.out / 'last.pt'}" if self.kept_step is not None
                               else "and start again"))

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

    def close(self) -> None:
        """The end of the command: releases the folder's lock, and removes the folder when this command created
        it and wrote nothing there but the lock file (a failed start)."""
        folder = self.lock.folder if self.lock is not None else getattr(self, "out", None)
        empty = (folder is not None and self.created_out and folder.is_dir()
                 and all(p.name == RunLock.NAME for p in folder.iterdir()))
        if self.lock is not None:
            self.lock.release(remove=empty)
            self.lock = None
        if empty and folder is not None and self.procs.main:
            with contextlib.suppress(OSError):
                folder.rmdir()

    def remove_unfinished_writes(self) -> None:
        """Temporary files of checkpoint writes a killed run left (``kill -9`` during a save)."""
        stale = [p for name in ("last.pt", "best.pt", "model.safetensors")
                 for p in sorted(self.out.glob(f".{name}.*.tmp"))]
        for path in stale:
            with contextlib.suppress(OSError):
                path.unlink()
        if stale:
            self.say(f"removed {len(stale)} unfinished checkpoint write(s) of a run killed while saving")

    def run_validation(self) -> float:
        """Periodic validation (rank 0): log it, keep best.pt, redraw the curves."""
        st = self.state
        score = validate(self.eval_net, self.data.val, self.s.scale, self.device, self.s.seed).psnr
        if math.isnan(score):  # the model's output holds NaN or inf (dlsn.metrics)
            self.diverged("the validation output is not finite (NaN/inf)")
        if math.isfinite(score) and score > st.best_psnr:  # best_psnr stays finite (+inf: identical images)
            st.best_psnr, st.best_step = score, st.step
            self.checkpoint(self.out / "best.pt", with_optimizer=False)
        assert self.log is not None
        with saving(self.log.path, self.kept_note("log.csv")):
            self.log.add(st.step, st.epoch, None, self.schedule.last_lr, score, self.elapsed())
        self.plot()
        return score

    def plot(self) -> None:
        if self.log is not None:
            title = f"{self.s.preset} x{self.s.scale}"
            with saving(self.out / "curves.png", self.kept_note("curves.png")):
                self.log.plot(self.out / "curves.png", self.state.bicubic_psnr, title)

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
        if self.ema is not None:
            self.ema.update(self.net)
        return loss.detach()

    def batches(self) -> Iterator[dict[str, Any]]:
        """Batches from the current position on, epoch after epoch (``state.epoch`` advances)."""
        s, st = self.s, self.state
        kwargs: dict[str, Any] = {"batch_size": s.batch_size, "sampler": self.sampler, "drop_last": True,
                                  "num_workers": self.args.workers, "pin_memory": self.device.type == "cuda"}
        if self.args.workers > 0:
            kwargs["worker_init_fn"] = quiet_worker
        while True:
            self.sampler.set_epoch(st.epoch, skip=st.batch_in_epoch * s.batch_size)
            # Its own generator: creating a loader must not draw from the global RNG (exact resume).
            generator = torch.Generator().manual_seed(s.seed * 7919 + st.epoch * 104729 + self.procs.rank)
            yield from DataLoader(self.train_set, generator=generator, **kwargs)
            st.epoch += 1
            st.batch_in_epoch = 0

    def run(self) -> int:
        st, procs = self.state, self.procs
        if procs.main:
            self.remove_unfinished_writes()
        announce(self)
        self.net.train()
        bar = tqdm(total=self.s.max_steps, initial=st.step, unit="step", dynamic_ncols=True, file=sys.stderr,
                   disable=self.args.no_progress or not procs.main, smoothing=0.1)
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
                mean_loss, interrupted, done = self._agree(loss, stop.signal_name is not None)
                self.schedule.apply(st.step, self.progress())
                step_ends.append(time.monotonic())
                if procs.main:
                    self._show_step(bar, mean_loss, step_ends)
                self._validate_and_save(done)
            signal_name = stop.signal_name
        bar.close()

        def finish() -> None:
            try:
                self._finish(interrupted, signal_name)
            except KeyboardInterrupt:  # Ctrl-C during the final validation or report: keep the steps
                self.save_last()
                raise

        on_main(procs, self.device, finish)
        if interrupted:
            return EXIT_INTERRUPTED
        return EXIT_SOME_FAILED if self.data.failed else 0

    def failures_line(self) -> str:
        """``failed: 1 of 5 images: a.png (cannot read ...)``: the images the run left out."""
        return format_failures(self.data.failed, self.data.total or len(self.data.failed))

    def _agree(self, loss: Tensor, signalled: bool) -> tuple[float, bool, bool]:
        """(mean loss over processes, whether any was signalled, whether to stop): one all-reduce per step.
        Time differs between processes, but they must stop at the same step."""
        procs = self.procs
        status = torch.tensor([float(loss), float(signalled), float(self.out_of_budget())], dtype=torch.float64)
        if procs.distributed:
            status = status.to(self.device)
            dist.all_reduce(status)
            status = status.cpu()
        mean_loss = float(status[0]) / procs.world
        interrupted = bool(status[1] > 0)
        if not math.isfinite(mean_loss):  # rides on the loss read above: no extra device read per step
            self.diverged(f"the loss is {mean_loss}")
        self.loss_sum, self.loss_count = self.loss_sum + mean_loss, self.loss_count + 1
        return mean_loss, interrupted, interrupted or bool(status[2] > 0)

    def _show_step(self, bar: tqdm, mean_loss: float, step_ends: collections.deque[float]) -> None:
        """The progress bar after a step, and a ``log.csv`` row of the mean loss every 10 steps (rank 0)."""
        st = self.state
        # Steps per second over the last 30 steps, data loading and validation included.
        rate = (len(step_ends) - 1) / max(step_ends[-1] - step_ends[0], 1e-9)
        postfix = {"loss": f"{mean_loss:.3f}", "lr": f"{self.schedule.last_lr:.2e}",
                   "img/s": f"{rate * self.s.batch_size * self.procs.world:.1f}"}
        if self.last_val is not None:
            postfix["val"] = f"{self.last_val:.2f}"
        if self.limit_s:
            postfix["left"] = format_minutes(max(0.0, self.limit_s - self.elapsed()))
        if self.threads is not None:
            postfix["threads"] = str(torch.get_num_threads())
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        if st.step % 10 == 0:
            self._log_loss()

    def _log_loss(self) -> None:
        """A ``log.csv`` row with the mean loss of the steps since the last one."""
        if self.loss_count and self.log is not None:
            st = self.state
            with saving(self.log.path, self.kept_note("log.csv")):
                self.log.add(st.step, st.epoch, self.loss_sum / self.loss_count, self.schedule.last_lr, None,
                             self.elapsed())
            self.loss_sum, self.loss_count = 0.0, 0

    def _validate_and_save(self, done: bool) -> None:
        """Periodic validation and saving (the end of the run does both anyway)."""
        s, step = self.s, self.state.step
        at_val = bool(s.val_every) and step % s.val_every == 0 and not done
        at_save = bool(s.save_every) and step % s.save_every == 0 and not done
        def work() -> None:
            if at_val:
                self.last_val = self.run_validation()
            if at_save:
                self.checkpoint(self.out / "last.pt")

        if at_val or at_save:  # every rank agrees on rank 0's outcome: a failure there stops them all
            on_main(self.procs, self.device, work)

    def _finish(self, interrupted: bool, signal_name: str | None) -> None:
        st = self.state
        self._log_loss()
        if interrupted:
            self.checkpoint(self.out / "last.pt")
            self.plot()
            self.say(f"\nstopped by {signal_name or 'a signal'} at step {st.step}; saved "
                     f"{self.out / 'last.pt'} (continue with: python -m dlsn.train --resume "
                     f"{self.out / 'last.pt'})")
        else:
            val_psnr = self.run_validation()
            self.checkpoint(self.out / "last.pt")
            final_report(self, val_psnr)
            if self.data.failed:
                self.say(f"dlsn.train: {self.failures_line()}", file=sys.stderr)
