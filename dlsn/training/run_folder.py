"""A training run's folder: where it goes, which checkpoint ``--resume`` reads, and ``log.csv`` / ``curves.png``."""

from __future__ import annotations

import contextlib
import csv
import math
import os
import tempfile
from pathlib import Path

from .settings import TrainError

try:  # POSIX; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".dlsn-train.lock"

LOG_COLUMNS = ("step", "epoch", "loss", "lr", "val_psnr", "elapsed")


def run_folder(out: Path | None, preset: str, scale: int, resuming: bool, overwrite: bool) -> Path:
    """``--out``, or ``runs/<preset>_x<scale>`` numbered ``_2``, ``_3`` ... past folders holding a run or
    locked by a running one (for a resume without --out: the most recent run)."""
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
    # A folder another run is training in (locked, maybe no last.pt yet) is taken too.
    return next(p for p in taken if p not in existing and not is_locked(p))


def is_locked(folder: Path) -> bool:
    """True while a training run holds ``folder``'s :class:`RunLock`."""
    if fcntl is None:
        return False
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # also drops the shared lock just taken
    return False


class RunLock:
    """An exclusive lock on a run folder, so that two trainings never write into one (their checkpoints and
    log.csv would overwrite each other's).

    ``fcntl.flock`` on ``<folder>/.dlsn-train.lock``, which holds the owner's pid for the message of the run
    refused. The kernel drops the lock when its process ends, however it ends (kill -9 too), so a lock file
    left behind never blocks a later run. :meth:`acquire` also checks that the folder is writable, so a
    read-only ``--out`` is found at the start, not at the first save.
    """

    NAME = LOCK_NAME

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Locks the folder (creating it), or raises :class:`TrainError` naming the running pid."""
        folder = self.folder
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise TrainError(f"--out {folder} is not writable ({error.strerror or error})") from error
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise TrainError(f"--out {folder} is in use by another training run (pid {owner}); wait for it "
                                 "to end, or choose another --out") from None
            except OSError:  # a file system without locks (some network mounts): run unlocked
                pass
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            # What the checkpoint writes need: a new file in the folder (the lock file may be an old one).
            probe_fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
            os.close(probe_fd)
            os.unlink(probe)
        except OSError as error:
            self.release()
            raise TrainError(f"--out {folder} is not writable ({error.strerror or error})") from error

    def release(self, remove: bool = False) -> None:
        """Unlocks; ``remove``: also deletes the lock file (a folder about to be removed as empty)."""
        if self._fd is None:
            return
        if remove:
            with contextlib.suppress(OSError):
                self.path.unlink()
        with contextlib.suppress(OSError):
            os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None


def find_resume_file(resume_arg: str, out: Path) -> Path:
    path = out / "last.pt" if resume_arg == "auto" else Path(resume_arg)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise TrainError(f"--resume: no checkpoint at {path}")
    return path


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
        import matplotlib.pyplot as plt

        fig = self.figure(bicubic_psnr, title)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def figure(self, bicubic_psnr: float | None, title: str):  # -> matplotlib.figure.Figure
        """The two panels of ``curves.png``: training loss (log scale) and validation Y-PSNR vs bicubic."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

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
            # A loss spans a decade or less: labelled ticks at 1, 2, 5 x 10^k (every digit within about a
            # decade, evenly spaced values within less), written as plain numbers, instead of matplotlib's
            # labels at powers of ten only (two, or none, on such a range).
            positive = [v for v in values if v > 0]
            decades = math.log10(max(positive) / min(positive)) if positive else 0.0
            if decades > 1.2:
                ax_loss.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            elif decades > 0.5:
                ax_loss.yaxis.set_major_locator(LogLocator(base=10, subs=tuple(float(d) for d in range(1, 10))))
            else:
                ax_loss.yaxis.set_major_locator(MaxNLocator(nbins=6))
            ax_loss.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            ax_loss.yaxis.set_minor_formatter(NullFormatter())
        ax_loss.set(xlabel="step", ylabel="L1 loss (0-255 scale)", title="training loss")
        if psnr:
            ax_psnr.plot(*zip(*psnr, strict=True), "o-", color="tab:green", label="model")
        if bicubic_psnr is not None:
            ax_psnr.axhline(bicubic_psnr, color="tab:gray", linestyle="--", label="bicubic")
        ax_psnr.set(xlabel="step", ylabel="Y-PSNR (dB)", title="validation")
        if psnr or bicubic_psnr is not None:
            # Outside the axes, under the title: inside, it covered the bicubic line or the curve.
            ax_psnr.legend(loc="lower right", bbox_to_anchor=(1.0, 1.08), ncol=2, frameon=False,
                           borderaxespad=0.0)
        fig.suptitle(title)
        fig.tight_layout()
        return fig
