"""The one progress display of the CLI, on stderr: sweep and lab report points to it, e2e context lengths.

It follows the calls `run_sweep(progress=...)` makes: start(total), update(item) before each item,
advance(record) after it, close(). An item is a sweep Point or any object or dict with mode, kernel
and seq_len; a record is the dict written for it, or None for an item passed over (a sweep's point
that failed in an earlier round).
"""
from __future__ import annotations

import importlib
import sys
import threading
import time
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


class Heartbeat:
    """A line on `stream` whenever `interval_s` passes without one, saying what is still running and
    for how long: off a terminal (a pipe, CI, a log) a long step is never silent. A context manager;
    `doing(what)` names the step, `said()` counts a line printed elsewhere."""

    def __init__(self, stream, interval_s: float, what: str = "", prefix=lambda: ""):
        self.stream, self.interval_s, self.prefix = stream, interval_s, prefix
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._what, self._since, self._last = what, time.monotonic(), time.monotonic()
        self._thread = threading.Thread(target=self._run, name="attnlab-heartbeat", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def doing(self, what: str) -> None:
        with self._lock:
            self._what, self._since = what, time.monotonic()

    def said(self) -> None:
        with self._lock:
            self._last = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.interval_s / 4)):
            with self._lock:
                now = time.monotonic()
                if now - self._last < self.interval_s:
                    continue
                self._last = now
                line = f"{self.prefix()}still {self._what} ({now - self._since:.0f} s)"
            print(line, file=self.stream, flush=True)


class Progress:
    """A rich bar (current item, done/total, ETA) where `rich_bar` is set; else, when `enabled`, one
    plain line per finished item, and with `heartbeat_s` a line naming the item in hand whenever
    that long passes without one; silent otherwise."""

    def __init__(self, enabled: bool, stream=None, rich_bar: bool = False, heartbeat_s: Optional[float] = None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self._use_rich = enabled and rich_bar
        self._heartbeat_s = heartbeat_s if enabled and not self._use_rich else None
        self._heartbeat = None
        self._bar = None
        self._task = None
        self._done = 0
        self._total = 0

    def start(self, total: int) -> None:
        self._total = total
        if self._use_rich:
            self._bar, self._task = _start_rich_bar(self.stream, total)
        elif self._heartbeat_s:
            self._heartbeat = Heartbeat(self.stream, self._heartbeat_s, "starting", self._count).__enter__()

    def update(self, item) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=item_label(item))
        if self._heartbeat is not None:
            self._heartbeat.doing(f"on {item_label(item)}")

    def advance(self, record: Optional[dict]) -> None:
        self._done += 1
        if self._bar is not None:
            self._bar.advance(self._task)
        elif self.enabled and record is not None:
            print(f"{self._count()}{record_line(record)}", file=self.stream, flush=True)
            if self._heartbeat is not None:
                self._heartbeat.said()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self._heartbeat is not None:
            self._heartbeat.__exit__(None, None, None)
            self._heartbeat = None

    def _count(self) -> str:
        return f"[{self._done}/{self._total}] "


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


def make_progress(enabled: Optional[bool] = None, stream=None, heartbeat_s: Optional[float] = None) -> Progress:
    """Shown where `stream` (stderr) is a terminal, unless `enabled` says otherwise; a rich bar only
    on a terminal with rich installed, plain lines elsewhere (with `heartbeat_s`, at least one
    that often)."""
    stream = stream or sys.stderr
    terminal = bool(getattr(stream, "isatty", lambda: False)())
    if enabled is None:
        enabled = terminal
    return Progress(enabled, stream, rich_bar=terminal and _rich_imports(), heartbeat_s=heartbeat_s)
