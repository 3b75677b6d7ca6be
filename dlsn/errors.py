"""The exception types for bad input from the user (a file, a folder, a setting, a checkpoint).

The command-line tools print a :class:`UserInputError` as one line and exit with status 2, a
:class:`RunFailed` (a run that stopped for a reason outside the program: a full disk, a diverged
training) as one line with its ``exit_code`` (1); every other exception is a bug (ours, or in a kernel)
and propagates with its traceback. Library code
raises it where the input is what is wrong: an unreadable image, a file that is not a checkpoint,
an image outside ``[0, 1]``. It is a ``ValueError``, so callers that catch ``ValueError`` keep
working.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "CheckpointNotFoundError", "DivergedError", "RunFailed", "SaveError",
           "UserInputError", "one_line"]


class UserInputError(ValueError):
    """Input the user can fix; the message names the argument or file and what is wrong with it."""


class CheckpointError(UserInputError, RuntimeError):
    """A checkpoint that cannot be read, or does not fit what it is loaded into.

    A :class:`UserInputError` (the tools print it as one line); still a RuntimeError, as it always was.
    """


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist (also a FileNotFoundError)."""


class RunFailed(Exception):
    """A run that cannot go on for a reason the message states (not bad input, not a bug); the tools print
    it as one line, saying what was kept, and exit with ``exit_code``."""

    exit_code = 1


class SaveError(RunFailed, OSError):
    """A file could not be written (full disk, read-only folder); the message names it and what was kept.
    Also an OSError, as the failure underneath it was."""


class DivergedError(RunFailed):
    """Training diverged: a non-finite loss, weight or validation score. Nothing non-finite was saved over
    the run's checkpoints; the message names the step and what was kept."""


def one_line(error: BaseException) -> str:
    """The error's message on one line (a multi-line message's lines joined with "; ")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    head, rest = lines[0], lines[1:]
    if not rest:
        return head
    return f"{head.rstrip(':')}: {'; '.join(rest)}"
