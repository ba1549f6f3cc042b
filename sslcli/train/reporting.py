"""How the engine talks to whoever shows progress (the CLI's rich bar; nothing in tests).

Only rank 0 reports. Calls happen at log intervals, never inside the step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from sslcli import runfiles


class Reporter(Protocol):
    def start(self, total_steps: int, start_step: int, steps_per_epoch: int) -> None: ...

    def update(self, step: int, metrics: dict[str, Any]) -> None: ...

    def epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None: ...

    def warn(self, message: str) -> None: ...

    def close(self) -> None: ...


class NullReporter:
    """Reports nothing (non-zero ranks, --quiet, library use)."""

    def start(self, total_steps: int, start_step: int, steps_per_epoch: int) -> None:
        return None

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        return None

    def epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        return None

    def warn(self, message: str) -> None:
        return None

    def close(self) -> None:
        return None


class MetricsWriter:
    """metrics.jsonl: one JSON object per line, flushed per line (readable while training).

    On resume, lines past the checkpoint's step (and a line cut by a crash) are dropped first, in
    one atomic rewrite, so an interrupted-and-resumed run has exactly the lines of an uninterrupted one.
    """

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        kept = [r for r in runfiles.read_jsonl(path) if r.get("step", 0) <= resume_step] if resume_step is not None else []
        runfiles.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept), what="metrics")
        self._file = path.open("a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()
