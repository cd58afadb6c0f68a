"""The sweep's progress display: what `run_sweep(progress=...)` reports to, drawn on stderr."""
from __future__ import annotations

import sys
from typing import Optional

from attnlab.bench.workloads import Point, seq_len_label


class Progress:
    """A progress bar (rich) with the current kernel, length and ETA, on stderr.

    Quiet when `enabled` is False; without rich, one plain line per point.
    """

    def __init__(self, enabled: bool, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self._bar = None
        self._task = None
        self._done = 0
        self._total = 0

    def start(self, total: int) -> None:
        self._total = total
        if not self.enabled:
            return
        try:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress,
                                       TextColumn, TimeElapsedColumn, TimeRemainingColumn)
        except ImportError:
            return
        self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 console=Console(file=self.stream), transient=False)
        self._bar.start()
        self._task = self._bar.add_task("sweep", total=total)

    def update(self, point: Point) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=f"{point.mode:7} {point.kernel:15} "
                                                     f"{seq_len_label(point.seq_len):>5}")

    def advance(self, record: dict) -> None:
        self._done += 1
        if self._bar is not None:
            self._bar.advance(self._task)
        elif self.enabled:
            median = record.get("median_ms")
            timing = f" {median:.3f} ms" if median is not None else ""
            print(f"[{self._done}/{self._total}] {record['mode']} {record['kernel']} "
                  f"{seq_len_label(record['seq_len'])}: {record['status']}{timing}",
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def make_progress(enabled: Optional[bool] = None, stream=None) -> Progress:
    """A Progress that shows only where `stream` (stderr) is a terminal, unless told."""
    stream = stream or sys.stderr
    if enabled is None:
        enabled = bool(getattr(stream, "isatty", lambda: False)())
    return Progress(enabled, stream)
