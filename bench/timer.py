"""Timing one call honestly: warm-up outside the timed runs, enough repetitions for
percentiles, and on a GPU CUDA events with the L2 cache flushed before each repetition.

    timer = Timer("cuda", budget_s=0.3)
    timing = timer.time(fn)            # fn: a zero-argument call, e.g. from prepare_attention
    timing.median_ms, timing.p10_ms, timing.p90_ms, timing.times_ms

On a CPU the same record comes from time.perf_counter (CPU ops are synchronous).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

DEFAULT_L2_BYTES = 128 * 1024 * 1024   # when the device does not report its L2 size


@dataclass
class Timing:
    """Every timed repetition, in milliseconds, and their summary."""

    times_ms: list = field(default_factory=list)
    median_ms: float = float("nan")
    p10_ms: float = float("nan")
    p90_ms: float = float("nan")
    warmup_reps: int = 0

    @property
    def reps(self) -> int:
        return len(self.times_ms)

    @classmethod
    def from_times(cls, times_ms, warmup_reps: int = 0) -> "Timing":
        times = [float(t) for t in times_ms]
        if not times:
            raise ValueError("times_ms: expected at least one time, got none")
        p10, median, p90 = np.percentile(times, [10, 50, 90]).tolist()
        return cls(times_ms=times, median_ms=median, p10_ms=p10, p90_ms=p90, warmup_reps=warmup_reps)

    @property
    def dispersion(self) -> float:
        """p90 over p10: how far the repetitions spread (1 where they agree)."""
        return self.p90_ms / self.p10_ms if self.p10_ms > 0 else float("nan")

    @property
    def drift(self) -> float | None:
        """The median of the last third of the repetitions over that of the first: a time that
        moved while it was measured (clocks settling, a co-tenant arriving); None under 6."""
        third = len(self.times_ms) // 3
        if third < 2:
            return None
        return float(np.median(self.times_ms[-third:]) / np.median(self.times_ms[:third]))

    def as_fields(self) -> dict:
        return {"times_ms": self.times_ms, "median_ms": self.median_ms,
                "p10_ms": self.p10_ms, "p90_ms": self.p90_ms,
                "reps": self.reps, "warmup_reps": self.warmup_reps,
                "dispersion": self.dispersion, "drift": self.drift}


# How the L2 cache is emptied before each timed call. "write" zeroes a buffer twice its size
# (the default, as every profile so far was measured): it can leave that many dirty lines to be
# written back while the next call runs. "read" sums the buffer instead, evicting with clean
# lines. "none" leaves the cache warm. A device A/B of write against read decides the default.
L2_FLUSHES = ("write", "read", "none")


class L2Flusher:
    """Touches a buffer twice the size of the device's L2 cache, so the next call starts cold."""

    def __init__(self, device, mode: str = "write"):
        if mode not in ("write", "read"):
            raise ValueError(f"l2_flush: a flusher writes or reads, got {mode!r}")
        self.device = torch.device(device)
        self.mode = mode
        l2_bytes = getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 0) or DEFAULT_L2_BYTES
        self.size_bytes = 2 * int(l2_bytes)
        self._buffer = torch.zeros(self.size_bytes, dtype=torch.int8, device=self.device)
        self._sink = torch.zeros((), dtype=torch.int32, device=self.device)

    def __call__(self) -> None:
        if self.mode == "write":
            self._buffer.zero_()
        else:
            torch.sum(self._buffer, dtype=torch.int32, out=self._sink)


class Timer:
    """Times zero-argument calls on one device.

    `budget_s` is the time the timed repetitions may use per call: at least `min_reps`
    repetitions run, and more until the budget is spent (at most `max_reps`).
    `warmup_reps` untimed calls come first, so compilation and autotuning stay out.
    `l2_flush` (L2_FLUSHES) says how a GPU's L2 is emptied before each repetition; a CPU has
    none to empty, so its `l2_flush` is "none".
    """

    def __init__(self, device="cpu", *, budget_s: float = 0.3, min_reps: int = 5,
                 max_reps: int = 1000, warmup_reps: int = 2, l2_flush: str = "write"):
        if l2_flush not in L2_FLUSHES:
            raise ValueError(f"l2_flush: expected one of {', '.join(L2_FLUSHES)}, got {l2_flush!r}")
        if min_reps < 1:
            raise ValueError(f"min_reps: expected at least 1, got {min_reps}")
        if max_reps < min_reps:
            raise ValueError(f"max_reps: expected at least min_reps ({min_reps}), got {max_reps}")
        if budget_s < 0:
            raise ValueError(f"budget_s: expected a non-negative number of seconds, got {budget_s}")
        self.device = torch.device(device)
        self.budget_s = budget_s
        self.min_reps = min_reps
        self.max_reps = max_reps
        self.warmup_reps = warmup_reps
        self.is_cuda = self.device.type == "cuda"
        self.l2_flush = l2_flush if self.is_cuda else "none"
        self._flush = L2Flusher(self.device, l2_flush) if self.l2_flush != "none" else None
        self._host_s = 0.0            # how long the host takes to enqueue one call
        self._sleep_cycles_per_s = None

    def sync(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def warm_up(self, fn: Callable) -> None:
        for _ in range(self.warmup_reps):
            start = time.perf_counter()
            fn()
            self._host_s = time.perf_counter() - start
        self.sync()

    def time(self, fn: Callable, *, warm: bool = False) -> Timing:
        """Warm up, then time repetitions until the budget is spent.

        `warm=True` says the caller already ran `warm_up(fn)` (to reset memory statistics
        between the two, say); the record counts those warm-up calls all the same.
        """
        if not warm:
            self.warm_up(fn)
        times: list[float] = []
        want = self.min_reps
        while True:
            times += self._round(fn, want - len(times))
            spent_s = sum(times) / 1e3
            if len(times) >= self.max_reps or spent_s >= self.budget_s:
                break
            per_call_s = max(spent_s / len(times), 1e-7)
            # aim a little past the budget so one more round is rarely needed
            want = min(self.max_reps, len(times) + max(1, int((self.budget_s - spent_s) / per_call_s) + 1))
        return Timing.from_times(times, warmup_reps=self.warmup_reps)

    def estimate_ms(self, fn: Callable) -> float:
        """One repetition, timed as the timed runs are: for sizing a later measurement."""
        return self._round(fn, 1)[0]

    def _round(self, fn: Callable, reps: int) -> list[float]:
        return self._cuda_round(fn, reps) if self.is_cuda else self._cpu_round(fn, reps)

    def _cpu_round(self, fn: Callable, reps: int) -> list[float]:
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return times

    def _cuda_round(self, fn: Callable, reps: int) -> list[float]:
        # All events are recorded first and read after one synchronisation, so the CPU never
        # waits between repetitions; the flush runs before each start event, outside the time.
        # A short call launches slower than the GPU runs it: without a lead, the GPU would sit
        # idle between the start event and the kernel and the time would be the host's. So the
        # GPU spins before each start event for longer than the host takes to enqueue the call.
        # (A call that synchronises with the host inside still pays for it, as its users do.)
        lead_cycles = self.lead_cycles()
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                 for _ in range(reps)]
        for start, end in pairs:
            self.flush()
            torch.cuda._sleep(lead_cycles)
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(self.device)
        return [start.elapsed_time(end) for start, end in pairs]

    def lead_cycles(self) -> int:
        """GPU clock cycles to spin before a timed call: twice the host's enqueue time seen in
        the last warm-up, 50 us to 20 ms."""
        if self._sleep_cycles_per_s is None:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(1_000_000)
            end.record()
            end.synchronize()
            self._sleep_cycles_per_s = 1_000_000 / max(start.elapsed_time(end) / 1e3, 1e-9)
        lead_s = min(max(2 * self._host_s, 50e-6), 20e-3)
        return int(lead_s * self._sleep_cycles_per_s)

    def flush(self) -> None:
        """Flush the L2 cache (no-op on a CPU); pytest-benchmark calls it as `setup`."""
        if self._flush is not None:
            self._flush()

    def run_for(self, fn: Callable, min_s: float, per_call_s: float) -> tuple[int, float]:
        """Call fn back to back for at least `min_s` seconds; return (calls, seconds).

        Used for energy windows: calls go out in batches sized from `per_call_s` and the
        device is synchronised only between batches, so it never idles inside the window.
        """
        calls, start = 0, time.perf_counter()
        while True:
            elapsed = time.perf_counter() - start
            if elapsed >= min_s:
                return calls, elapsed
            batch = max(1, min(10000, int((min_s - elapsed) / max(per_call_s, 1e-6)) + 1))
            for _ in range(batch):
                fn()
            self.sync()
            calls += batch


class CudaEventClock:
    """A clock for pytest-benchmark's `timer` option that reads CUDA events, not the CPU.

    pytest-benchmark reads the clock before and after each round. A start reading spins the
    GPU for `lead_cycles()` cycles (so the round's launches queue up behind it, as in
    `Timer`), records an event and returns the GPU time counted so far, without waiting; an
    end reading records an event, waits for it and adds the time between the two events.
    So a difference of two readings is the GPU time of the round, never the host's launch
    time, and flushes or spins between rounds are not counted. Differences are taken event
    to event (float32 milliseconds from CUDA) and accumulated in float64.
    `event` and `sleep` are torch.cuda's unless a test replaces them.
    """

    __name__ = "cuda_event_clock"

    def __init__(self, lead_cycles: Callable[[], int] = lambda: 0, *, event=None, sleep=None):
        self._lead_cycles = lead_cycles
        self._event = event or (lambda: torch.cuda.Event(enable_timing=True))
        self._sleep = sleep or torch.cuda._sleep
        self._start = None
        self._total_s = 0.0

    def __call__(self) -> float:
        if self._start is None:
            cycles = self._lead_cycles()
            if cycles:
                self._sleep(cycles)
            self._start = self._event()
            self._start.record()
            return self._total_s
        end = self._event()
        end.record()
        end.synchronize()
        self._total_s += self._start.elapsed_time(end) / 1e3
        self._start = None
        return self._total_s
