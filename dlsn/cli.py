"""What the command-line tools share at their boundary: how errors, Ctrl-C and notes are printed.

- A :class:`~dlsn.errors.UserInputError` prints as ``<prog>: error: <one line>`` and exits 2.
- Unreadable images, one policy for train, eval and upscale: the tool goes on with the readable ones,
  lists the others in one ``failed: ...`` line at the end (``format_failures``) and exits 1.
- Ctrl-C prints ``<prog>: interrupted ...`` (one line, saying what was kept) and exits 130.
- Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import torch

from dlsn.errors import UserInputError, one_line

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_SOME_FAILED",
    "EXIT_USAGE",
    "check_backend",
    "format_conversions",
    "format_failures",
    "pick_device",
    "run_tool",
]

EXIT_SOME_FAILED = 1  # done with every readable image; the others are listed
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a process stopped by Ctrl-C


def run_tool(prog: str, body: Callable[[], int], interrupted: Callable[[], str] | None = None) -> int:
    """``body()``'s exit status; bad input and Ctrl-C become one line on stderr.

    ``interrupted()`` says what the tool kept when Ctrl-C arrived (e.g. "wrote 3 of 10 images").
    """
    try:
        return body()
    except UserInputError as error:
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        kept = interrupted() if interrupted is not None else ""
        print(f"\n{prog}: interrupted" + (f"; {kept}" if kept else ""), file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


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
