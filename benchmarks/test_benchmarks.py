"""One benchmark per (mode, kernel, length) of the grid; see benchmarks/conftest.py.

    pytest --benchmark-only --benchmark-json=bench.json
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from attnlab.bench.device import free_bytes, peak_memory_bytes, release_memory, reset_peak_memory  # noqa: E402
from attnlab.bench.nvml import NvmlSampler  # noqa: E402
from attnlab.bench.outcomes import check_fields, classify  # noqa: E402
from attnlab.bench.records import FIELDS, SCHEMA, device_name, jsonable  # noqa: E402
from attnlab.bench.point_call import build_call  # noqa: E402
from attnlab.bench.sweep import (energy_calls, measured_fields, point_label, point_record,  # noqa: E402
                                 predicted_point_bytes, support_reason)
from attnlab.bench.timer import Timing  # noqa: E402

MIN_ROUNDS, MAX_ROUNDS = 5, 1000


def group_name(point) -> str:
    # zero-padded so that groups sort by length in pytest-benchmark's tables
    return f"{point.mode} {point.workload} seq_len={point.seq_len:06d}"


def test_attention(benchmark, grid, mode, kernel, seq_len, round_index):
    if grid.budget_spent():
        pytest.skip(f"session budget of {grid.session_budget_s:g} s spent")
    point = grid.workload.point(kernel, mode, seq_len)
    why_not = support_reason(point, grid.device.type)
    if why_not:
        pytest.skip(f"{kernel}: {why_not}")
    predicted, free = predicted_point_bytes(point, grid.device.type), free_bytes(grid.device)
    if free is not None and predicted > free:
        pytest.skip(f"predicted peak {predicted} bytes exceeds {free} free")
    benchmark.group = group_name(point)
    failure = None
    try:
        record = _measure(benchmark, grid, point)
    except Exception as exc:
        failure = (classify(exc), f"{type(exc).__name__}: {exc}")
    if failure is not None:
        benchmark.has_error = True     # keeps a half-measured benchmark out of the JSON
        release_memory(grid.device)
        if failure[0] == "error":
            pytest.fail(failure[1])
        pytest.skip(f"{failure[0]}: {failure[1]}")
    if record is None:
        return   # --benchmark-disable: the call ran once, nothing was timed
    record.update(round=round_index, rounds=grid.rounds, order_seed=grid.order_seed)
    benchmark.extra_info.update(jsonable(record))
    grid.records.append(record)
    assert record["schema"] == SCHEMA and list(record)[:len(FIELDS)] == list(FIELDS)
    assert record["median_ms"] > 0 and math.isfinite(record["tflops"])


def _measure(benchmark, grid, point):
    """Time the point's call under pytest-benchmark, sampling NVML; return its record."""
    device, timer = grid.device, grid.timer
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
    call = build_call(point, device)
    verdict = call.verify()
    if not verdict.ok:       # a wrong answer is no speed: the benchmark fails, untimed
        benchmark.has_error = True
        pytest.fail(f"{point.kernel}: wrong output: {verdict.describe()}")
    fn = call.run
    label = {"run_id": grid.run_id, "point": "bench/" + point_label(point)}
    with NvmlSampler(device, csv_path=grid.nvml_csv, label=label) as sampler:
        timer.warm_up(fn)
        estimate_s = max(timer.estimate_ms(fn) / 1e3, 1e-7)
        rounds = min(MAX_ROUNDS, max(MIN_ROUNDS, math.ceil(grid.budget_s / estimate_s)))
        reset_peak_memory(device)
        # The L2 flush is pytest-benchmark's setup, so it runs before each round, untimed.
        benchmark.pedantic(fn, setup=timer.flush, rounds=rounds, warmup_rounds=1, iterations=1)
        if benchmark.stats is None:
            return None
        times_ms = [seconds * 1e3 for seconds in benchmark.stats.stats.data]
        calls = energy_calls(sampler, timer, fn, grid.energy_s, estimate_s)
    peak = peak_memory_bytes(device) - base if cuda else None
    timing = Timing.from_times(times_ms, warmup_reps=timer.warmup_reps + 1)
    fields = measured_fields(point, timing, sampler.summary(), calls, peak)
    return point_record(point, run_id=grid.run_id, device=device_name(device), status="ok",
                        device_type=device.type, harness="pytest-benchmark",
                        benchmark=benchmark.fullname, clock="cuda-events" if cuda else "perf_counter",
                        l2_flush=timer.l2_flush, **fields, **check_fields(verdict))

