"""Train an SR network (DLSN by default) with L1 loss and Adam.

    python -m dlsn.train                                  # the default run: see below
    python -m dlsn.train --preset cnn                     # the no-GLA CNN baseline, same time budget
    python -m dlsn.train --resume                         # continue the latest default run
    python -m dlsn.train --data DIV2K --preset paper --scale 2 --out runs/x2
    python -m dlsn.train --data DIV2K --preset paper --scale 3 --init-from runs/x2/best.pt --out runs/x3
    torchrun --standalone --nproc-per-node=4 --max-restarts=3 -m dlsn.train --data DIV2K --preset paper \
        --out runs/x2 --resume                            # README "Several GPUs or nodes"

**Default run.** With no arguments this trains the ``cpu_default`` preset (a one-group DLSN: 4 LFFB,
GLA with K=32, R=1, 32 channels, its output added to a bicubic upsampling: ``DLSNResidual``) at x2 on
the real photos embedded in scikit-image / matplotlib (``dlsn.data.samples``: 8 for training, coffee
and grace_hopper held out) for 9 minutes of wall time counted from the start of the command, then
scores the final model on the two held-out photos against bicubic, on 256x256 HR centre crops (the
periodic validation) and on the whole images. It ends within 10 minutes on a 2-core CPU.
``--preset cnn`` trains the same network without GLA under the same budget, for comparison.

**Data** (``--data``): nothing, the embedded photos; a folder written by ``python -m dlsn.data.prepare``
(DIV2K decoded once into memory-mapped files, recognised by its ``prepared.json``); a DIV2K root (it holds
``DIV2K_train_HR``):
the stored ``DIV2K_train_LR_bicubic/X{s}`` pairs for BI, LR made from the HR for BD / DN, and the
first ``--val-images`` images of ``DIV2K_valid_*`` for validation when present; any other folder of
images: HR images, the last ``--val-images`` (by name) held out for validation, LR made on the fly.
With HR images (not stored LR pairs) ``--pyramid`` adds copies of the training images downscaled by
the given factors (CPU presets: 0.75, 0.5 and 0.35): a smaller copy packs more detail into each patch.

**Epochs.** As in the authors' EDSR-based code an epoch is ``--epoch-steps`` batches (1000 for the
paper presets): the training set is repeated to that length, patches being random crops anyway.

**Schedules.** ``step``: lr halved every ``--decay-epochs`` epochs (the paper: 1e-4, halved every 300
epochs for 1500 epochs at x2; every 50 epochs for 200 epochs at x3/x4 started from x2 weights).
``cosine``: lr follows a half cosine from ``--lr`` to 1% of it over the run's budget, the budget being
``--max-steps`` or ``--time-limit``, whichever ends first (the CPU presets' default). Both start with
``--warmup-steps`` of linear warm-up.

**Outputs** (``--out DIR``): ``last.pt`` (everything needed to resume; written atomically every
``--save-every`` steps, at the end and on Ctrl-C / SIGTERM), ``best.pt`` (the weights with the best
periodic validation Y-PSNR; with ``--ema`` their moving average, which validation scores) and
``model.safetensors`` (the same weights for inference tools such as spandrel), ``log.csv`` (step, epoch,
loss, lr, val_psnr, elapsed), ``curves.png``,
and ``sample_<image>_x<s>_{sr,bicubic,hr}.png`` for the first held-out image.

Periodic validation scores centre crops of the held-out images (``--val-crop``, HR pixels; 0: whole
images); the final report adds the whole held-out images (and with ``--self-ensemble`` their x8
self-ensemble score). Y-PSNR follows dlsn/metrics.py (8-bit rounding,
``scale`` border pixels shaved). Resume (``--resume``) restores the model, optimizer, schedule, step,
data order, RNG state, elapsed time and best PSNR; settings not given again on the command line are
those of the run being resumed. It continues the run's own network: a ``--preset``, ``--scale``,
``--model-arg`` or ``--init-from`` that differs from the run's is bad input (a new run with ``--init-from``
trains another scale from its weights). With ``--workers 0`` a resumed run repeats the uninterrupted one.

**Failures.** ``last.pt`` is replaced atomically, so ``kill -9`` at any moment, even during a save,
leaves the previous ``last.pt`` whole: at most ``--save-every`` steps are lost, and ``--resume``
removes the killed write's temporary file. Resume keeps the saved lr schedule (its warm-up, decay
interval and peak lr) unless ``--lr``, ``--schedule``, ``--warmup-steps``, ``--decay-epochs`` or
``--epoch-steps`` is given anew. Bad input (data, checkpoint, settings) prints one line and exits
with status 2; any other error is a bug and keeps its traceback. Unreadable images, as in eval and upscale:
the run trains on the readable ones, lists the others in one line at the start and at the end, and exits
with status 1 (fewer readable images than it needs is bad input). A run folder this command created
and left empty is removed. A second Ctrl-C stops at once, keeping the last ``last.pt`` written.

One run per folder: a run holds a lock on ``--out`` (``.dlsn-train.lock``, released however the process
ends), and a second command into that folder prints one line naming the running one's pid and exits
with 2; ``--out`` is checked writable at the start. A file that cannot be written later (full disk, a folder
turned read-only) prints one line naming it and what was kept, and exits with 1; the file it would have
replaced is intact. Divergence: a loss, weights or validation score that is not finite stops the run at
that step with one line (exit 1) and writes nothing over ``last.pt``, ``best.pt`` or ``model.safetensors``,
which keep the last finite state; the diverged state is written beside them as ``diverged.pt`` for
inspection. The loss check rides on the loss already read every step, the weight check on each save, so
neither costs a step any time.

**Precision.** Training steps run under bfloat16 autocast on a GPU and on a CPU with AVX512-BF16 or AMX
(there oneDNN's bfloat16 convolutions, most of a step, are about twice as fast), in float32 on other CPUs or
with ``--no-amp``; the opening line says which. Weights, optimizer state, EMA and checkpoints stay float32;
validation runs in ``dlsn.eval``'s default dtype for the device.

Several processes (torchrun) train with DistributedDataParallel (gloo on CPU, nccl on GPU); each
process draws its own patches, ``--batch-size`` is per process, and only rank 0 prints and writes.

This module is the command line only; the training itself is the package ``dlsn.training``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch.distributed as dist

from dlsn.cli import BACKEND_HELP, run_tool
from dlsn.data.degradations import DEGRADATIONS
from dlsn.models.presets import PRESETS
from dlsn.training.schedule import SCHEDULES
from dlsn.training.settings import DEFAULT_PRESET, LOSSES
from dlsn.training.trainer import Trainer


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
    arg("--ema", type=float, metavar="DECAY",
        help="keep a moving average of the weights with this decay, used for validation, best.pt and "
             "model.safetensors; 0: off (paper presets: 0.999, as BasicSR; CPU presets: off)")
    arg("--out", type=Path, help="output folder (default runs/<preset>_x<scale>, numbered if taken)")
    arg("--resume", nargs="?", const="auto", metavar="PATH",
        help="continue a run: its last.pt, a folder holding one, or --out's last.pt (no PATH; when --out has "
             "none yet, a new run starts there, so one command serves torchrun's restarts)")
    arg("--overwrite", action="store_true", help="start afresh in an --out folder that holds a run")
    arg("--init-from", type=Path, help="start from these weights (e.g. x2 weights for x3/x4; the tail "
                                       "and any mis-shaped layer keep their fresh init)")
    arg("--device", help="torch device (default: cuda if available, else cpu)")
    arg("--backend", help=BACKEND_HELP)
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
    arg("--no-amp", action="store_true",
        help="train in float32 (default: bfloat16 autocast on a GPU and on a CPU with AVX512-BF16 or AMX, "
             "float32 on other CPUs)")
    arg("--no-progress", action="store_true", help="no progress bar")
    return parser


# Python's start-up and imports take seconds; a process older than this was a shell that exec'd python
# (`bash -c "pip install ... && python -m dlsn.train"` runs the build in the same process), and the time
# limit must not be spent on what ran before python.
_MAX_STARTUP_S = 60.0


def _process_age() -> float:
    """Seconds since this process started (Linux; 0 elsewhere), so time limits include imports."""
    try:
        start_ticks = float(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        age = max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0
    return age if age <= _MAX_STARTUP_S else 0.0


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
            trainer.close()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(started=time.monotonic() - _process_age()))
