"""What the command-line tools share at their boundary: how errors, Ctrl-C and notes are printed.

- A :class:`~dlsn.errors.UserInputError` prints as ``<prog>: error: <one line>`` and exits 2, and so do the
  kernels' refusals of a call (``dlsn_kernels.BackendUnavailableError``, a ``ValueError`` raised by a check in
  ``dlsn_kernels``: e.g. a backend that cannot run this image size within memory).
- A :class:`~dlsn.errors.RunFailed` (a file that could not be saved, a diverged training) prints as
  ``<prog>: error: <one line>`` and exits with its ``exit_code`` (1).
- Unreadable images, one policy for train, eval and upscale: the tool goes on with the readable ones,
  lists the others in one ``failed: ...`` line at the end (``format_failures``) and exits 1.
- Ctrl-C prints ``<prog>: interrupted ...`` (one line, saying what was kept) and exits 130.
- Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from dlsn.errors import RunFailed, SaveError, UserInputError, one_line

__all__ = [
    "BACKEND_HELP",
    "EXIT_INTERRUPTED",
    "EXIT_SOME_FAILED",
    "EXIT_USAGE",
    "check_backend",
    "format_conversions",
    "format_failures",
    "pick_device",
    "kernel_refusal",
    "run_tool",
    "saving",
    "write_failure",
]

EXIT_SOME_FAILED = 1  # done with every readable image; the others are listed
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a process stopped by Ctrl-C

# Every choice of ``--backend`` (dlsn_kernels.BACKENDS; tests/test_robustness.py keeps the two in step). Written
# out rather than read from dlsn_kernels: eval --bicubic and --help must work where the kernels cannot load.
BACKEND_HELP = ("attention kernel backend: reference, cpu, cuda, triton or flex (FlexAttention; forward only on "
                "a CPU) (default: automatic: the first that supports the call in the device's order, as measured "
                "by python -m dlsn_kernels.check when it has run; $DLSN_BACKEND overrides)")
_KERNELS_DIR = str(Path(__file__).resolve().parent.parent / "dlsn_kernels") + os.sep


def kernel_refusal(error: BaseException) -> bool:
    """True for the kernels' refusal of a call: ``dlsn_kernels.BackendUnavailableError``, or a ``ValueError``
    raised inside ``dlsn_kernels`` (its argument checks). Such an error is about what was asked (a backend, a
    size), not a bug here, and is printed as one line."""
    kernels = sys.modules.get("dlsn_kernels")
    unavailable = getattr(kernels, "BackendUnavailableError", None)
    if unavailable is not None and isinstance(error, unavailable):
        return True
    if not isinstance(error, ValueError) or isinstance(error, UserInputError):
        return False
    trace = error.__traceback__
    while trace is not None and trace.tb_next is not None:  # the frame that raised it
        trace = trace.tb_next
    return trace is not None and trace.tb_frame.f_code.co_filename.startswith(_KERNELS_DIR)


def run_tool(prog: str, body: Callable[[], int], interrupted: Callable[[], str] | None = None) -> int:
    """``body()``'s exit status; bad input and Ctrl-C become one line on stderr.

    ``interrupted()`` says what the tool kept when Ctrl-C arrived (e.g. "wrote 3 of 10 images").
    """
    try:
        return body()
    except UserInputError as error:
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except RunFailed as error:
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr, flush=True)
        return error.exit_code
    except (ValueError, RuntimeError) as error:
        if not kernel_refusal(error):
            raise
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        kept = interrupted() if interrupted is not None else ""
        print(f"\n{prog}: interrupted" + (f"; {kept}" if kept else ""), file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


def write_failure(path: Path | str, error: BaseException, kept: str) -> SaveError:
    """The :class:`~dlsn.errors.SaveError` for ``path`` not written because of ``error``: which file, why (the
    space left when the disk looks full) and ``kept``, what is still there."""
    reason = one_line(error)
    if isinstance(error, OSError) and error.strerror:
        reason = error.strerror  # without the temporary file's name OSError appends
    folder = Path(path).parent
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(folder if folder.exists() else Path.cwd()).free
        if getattr(error, "errno", None) == errno.ENOSPC or not isinstance(error, OSError) or free < 64 << 20:
            reason += f"; {free / 2**20:.0f} MiB free on that disk"
    return SaveError(f"cannot write {path} ({reason}); {kept}")


@contextlib.contextmanager
def saving(path: Path | str, kept: str) -> Iterator[None]:
    """Turns a failed write of ``path`` into a one-line :class:`~dlsn.errors.SaveError` (``kept``: what is
    still there, e.g. "the previous last.pt (step 100) is intact"). torch.save reports a full disk as a
    RuntimeError from its zip writer, so RuntimeErrors count too."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        if isinstance(error, SaveError) or isinstance(error, torch.OutOfMemoryError):
            raise
        raise write_failure(path, error, kept) from error


def format_failures(failures: Sequence[tuple[str, str]], total: int) -> str:
    """``failed: 2 of 5 images: a.png (cannot read ...); b.png (...)``."""
    listed = "; ".join(f"{name} ({reason})" for name, reason in failures)
    return f"failed: {len(failures)} of {total} images: {listed}"


def format_conversions(conversions: Sequence[tuple[str, str]], limit: int = 4) -> str:
    """One line naming the images converted on reading: ``converted to 8-bit RGB: a.png (RGBA, alpha
    dropped), b.png (16-bit greyscale)``; more than ``limit`` are counted, not listed."""
    shown = ", ".join(f"{name} ({what})" for name, what in conversions[:limit])
    more = f" and {len(conversions) - limit} more" if len(conversions) > limit else ""
    return f"converted to 8-bit RGB on reading: {shown}{more}"


def pick_device(device_arg: str | None) -> torch.device:
    """``--device``, or cuda when available, else cpu; a device this machine lacks is bad input."""
    try:
        device = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        raise UserInputError(f"--device {device_arg!r} is not a torch device ({one_line(error)})") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"--device {device_arg}: CUDA is not available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserInputError(f"--device {device_arg}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def kernels_line(net: torch.nn.Module, backend: str | None, device: torch.device, dtype: torch.dtype) -> str | None:
    """``kernels: ...``: the backend each pass of the attention ops runs on ``device`` in ``dtype`` and where that
    choice came from (``--backend``, ``$DLSN_BACKEND``, the check's cache, a probe or the static order), for a
    tool's opening lines; None when ``net`` has no hashed-attention block (nothing of dlsn_kernels runs)."""
    from dlsn.models.gla import has_attention_blocks

    if not has_attention_blocks(net):
        return None
    import dlsn_kernels

    named = dlsn_kernels.requested(backend)
    if named is not None:
        return f"kernels: {named} for every pass ({'--backend' if backend else '$DLSN_BACKEND'})"
    return f"kernels: {dlsn_kernels.backend_summary(device, dtype)}"


def check_backend(backend: str | None, device: torch.device) -> str | None:
    """``--backend`` checked against what can run on ``device`` here (None: automatic choice)."""
    if backend is None:
        return None
    # Imported here: eval --bicubic must work where the kernels package cannot load.
    import dlsn_kernels

    name = backend.strip().lower()
    if name not in dlsn_kernels.BACKENDS:
        raise UserInputError(f"--backend {backend!r} is not a backend; choose one of "
                             f"{', '.join(dlsn_kernels.BACKENDS)}")
    reason = dlsn_kernels.available_backends(device)[name].reason
    if reason is not None:
        raise UserInputError(f"--backend {name} cannot run on {device.type} here: {reason}")
    return name
