"""Typed errors. The CLI maps them to exit codes in one place (sslcli/cli/app.py).

- UsageError and subclasses: bad input (flag, preset, config key, dataset, checkpoint) -> exit 2.
- TrainingError: a failure during work (e.g. a non-finite loss, a crashed process) -> exit 1.
- StorageError: a file could not be written (disk full, quota, permissions) -> exit 1; the
  previous version of the file is intact (every write goes to a temporary file first).
- Interrupted: Ctrl-C after a clean checkpoint -> exit 130.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The `n` candidates that look most like `name` (for "did you mean" hints)."""
    return difflib.get_close_matches(str(name), list(candidates), n=n, cutoff=0.5)


def hint(name: str, candidates: Iterable[str]) -> str:
    """' (did you mean: a, b?)' or '' when nothing is close."""
    near = closest(name, candidates)
    return f" (did you mean: {', '.join(near)}?)" if near else ""


class SSLError(Exception):
    """Base class of every error the tool reports as one line."""

    exit_code = 1


class UsageError(SSLError):
    """Bad input from the user: exit code 2."""

    exit_code = 2


class ConfigError(UsageError):
    """Unknown preset, unknown config key, value of the wrong type or out of range."""


class DataError(UsageError):
    """Missing, empty or malformed dataset."""


class CheckpointError(UsageError):
    """Missing or incompatible checkpoint / weights file."""


class TrainingError(SSLError):
    """Failure during training (diverged loss, ...): exit code 1, last good checkpoint kept."""

    exit_code = 1


class StorageError(SSLError):
    """A write failed (disk full, file-size limit, permissions): exit code 1, the old file kept."""

    exit_code = 1


class Interrupted(SSLError):
    """Ctrl-C: a checkpoint was written, exit code 130."""

    exit_code = 130
