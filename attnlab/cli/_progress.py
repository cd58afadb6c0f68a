"""The one progress display of the CLI, on stderr: sweep and lab report points to it, e2e context lengths.

It follows the calls `run_sweep(progress=...)` makes: start(total), update(item) before each item,
advance(record) after it, close(). An item is a sweep Point or any object or dict with mode, kernel
and seq_len; a record is the dict written for it, or None for an item passed over (a sweep's point
that failed in an earlier round).
"""
from __future__ import annotations

import importlib
import sys
from typing import Optional

from attnlab.text import k


def item_label(item) -> str:
    """'decode naive 1k': the mode, kernel and context length of a point, record or e2e item."""
    field = item.get if isinstance(item, dict) else (lambda name: getattr(item, name, None))
    return f"{field('mode')} {field('kernel')} {k(field('seq_len'))}"


def record_line(record: dict) -> str:
    """What a finished item measured: its status, median time and, from e2e, output tokens/s."""
    median, tok_s = record.get("median_ms"), record.get("tokens_per_s")
    timing = f" {median:.3f} ms" if median is not None else ""
    rate = f" {tok_s:,.0f} tok/s" if tok_s is not None else ""
    return f"{item_label(record)}: {record['status']}{timing}{rate}"


class Progress:
    """A rich bar (current item, done/total, ETA) where `rich_bar` is set; else, when `enabled`, one
    plain line per finished item; silent otherwise."""

    def __init__(self, enabled: bool, stream=None, rich_bar: bool = False):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self._use_rich = enabled and rich_bar
        self._bar = None
        self._task = None
        self._done = 0
        self._total = 0

    def start(self, total: int) -> None:
        self._total = total
        if self._use_rich:
            self._bar, self._task = _start_rich_bar(self.stream, total)

    def update(self, item) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=item_label(item))

    def advance(self, record: Optional[dict]) -> None:
        self._done += 1
        if self._bar is not None:
            self._bar.advance(self._task)
        elif self.enabled and record is not None:
            print(f"[{self._done}/{self._total}] {record_line(record)}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _start_rich_bar(stream, total: int):
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TextColumn("ETA"), TimeRemainingColumn(), console=Console(file=stream), transient=False)
    bar.start()
    return bar, bar.add_task("", total=total)


def _rich_imports() -> bool:
    try:
        importlib.import_module("rich.progress")
    except ImportError:
        return False
    return True


def make_progress(enabled: Optional[bool] = None, stream=None) -> Progress:
    """Shown where `stream` (stderr) is a terminal, unless `enabled` says otherwise; a rich bar only
    on a terminal with rich installed, plain lines elsewhere."""
    stream = stream or sys.stderr
    terminal = bool(getattr(stream, "isatty", lambda: False)())
    if enabled is None:
        enabled = terminal
    return Progress(enabled, stream, rich_bar=terminal and _rich_imports())
