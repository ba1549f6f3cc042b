"""How the engine talks to whoever shows progress (the CLI's rich bar; nothing in tests).

Only rank 0 reports. Calls happen at log intervals, never inside the step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol


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

    On resume, lines past the checkpoint's step are dropped first, so an interrupted-and-resumed
    run has exactly the lines of an uninterrupted one.
    """

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None:
            path.write_text("")
        self._file = path.open("a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()
