"""The timer: warm-up stays out, repetitions fill the budget, percentiles are right."""
import time

import pytest
import torch

from attnlab.bench.timer import CudaEventClock, L2Flusher, Timer, Timing


def _sleeper(first_s, then_s):
    calls = []

    def fn():
        time.sleep(first_s if not calls else then_s)
        calls.append(1)
    return fn, calls


def test_warm_up_is_not_timed():
    fn, calls = _sleeper(0.25, 0.001)      # the first call stands in for compilation
    timing = Timer("cpu", budget_s=0.0, warmup_reps=1).time(fn)
    assert max(timing.times_ms) < 100
    assert len(calls) == 1 + timing.reps and timing.warmup_reps == 1


def test_at_least_min_reps_even_when_one_call_exceeds_the_budget():
    fn, _ = _sleeper(0.0, 0.02)
    timing = Timer("cpu", budget_s=0.001, min_reps=5).time(fn)
    assert timing.reps == 5


def test_more_reps_until_the_budget_is_used():
    fn, _ = _sleeper(0.0, 0.002)
    timing = Timer("cpu", budget_s=0.06, min_reps=5).time(fn)
    assert timing.reps > 5
    assert sum(timing.times_ms) >= 60


def test_max_reps_caps_the_repetitions():
    timing = Timer("cpu", budget_s=10.0, min_reps=3, max_reps=7).time(lambda: None)
    assert timing.reps == 7


def test_percentiles_and_fields():
    timing = Timing.from_times(range(1, 12))          # 1 .. 11 ms
    assert (timing.p10_ms, timing.median_ms, timing.p90_ms) == (2.0, 6.0, 10.0)
    fields = timing.as_fields()
    assert fields["times_ms"] == [float(t) for t in range(1, 12)] and fields["reps"] == 11
    with pytest.raises(ValueError, match="times_ms"):
        Timing.from_times([])


def test_bad_settings_name_the_argument():
    with pytest.raises(ValueError, match="min_reps"):
        Timer("cpu", min_reps=0)
    with pytest.raises(ValueError, match="max_reps"):
        Timer("cpu", min_reps=5, max_reps=2)
    with pytest.raises(ValueError, match="budget_s"):
        Timer("cpu", budget_s=-1)


def test_run_for_keeps_calling_for_the_window():
    fn, calls = _sleeper(0.0, 0.005)
    n, seconds = Timer("cpu").run_for(fn, 0.1, per_call_s=0.005)
    assert seconds >= 0.1 and n == len(calls) and n >= 10


@pytest.mark.gpu
def test_cuda_events_time_the_gpu_and_flush_covers_twice_the_l2():
    device = torch.device("cuda")
    flusher = L2Flusher(device)
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    assert flusher.size_bytes >= 2 * l2 > 0
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    small = Timer(device, budget_s=0.05).time(lambda: a @ a)
    large_a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    large = Timer(device, budget_s=0.05).time(lambda: large_a @ large_a)
    assert small.reps >= 5 and 0 < small.median_ms < large.median_ms
    # 8x the FLOPs: the GPU time grows with the work, which a CPU clock around an async launch would miss
    assert large.median_ms > 4 * small.median_ms


@pytest.mark.gpu
def test_cuda_event_clock_measures_device_time():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    clock = CudaEventClock()
    a @ a
    start = clock()
    for _ in range(5):
        a @ a
    elapsed_s = clock() - start
    reference = Timer("cuda", budget_s=0.05, l2_flush="none").time(lambda: a @ a).median_ms / 1e3
    assert 3 * reference < elapsed_s < 10 * reference


@pytest.mark.gpu
def test_a_slow_launch_is_not_counted_as_gpu_time():
    # The call spends 300 us on the host before a kernel of a few microseconds; the timer
    # must report the kernel, not the launch.
    x = torch.zeros(1024, device="cuda")

    def slow_launch():
        start = time.perf_counter()
        while time.perf_counter() - start < 300e-6:
            pass
        x.add_(1.0)

    timing = Timer("cuda", budget_s=0.05).time(slow_launch)
    assert timing.median_ms < 0.1, timing.median_ms


class FakeGpu:
    """A replayed GPU timeline for CudaEventClock: work and spins advance the device clock,
    events stamp it; the host's time never enters."""

    def __init__(self):
        self.now_ms, self.spins = 0.0, []

    def event(self):
        gpu = self

        class Event:
            def record(self):
                self.at_ms = gpu.now_ms

            def synchronize(self):
                pass

            def elapsed_time(self, later):
                return later.at_ms - self.at_ms
        return Event()

    def sleep(self, cycles):
        self.spins.append(cycles)
        self.now_ms += cycles / 1e6   # 1 GHz: a million cycles a millisecond


def test_event_clock_counts_rounds_not_the_spins_between_them():
    gpu = FakeGpu()
    clock = CudaEventClock(lambda: 500_000, event=gpu.event, sleep=gpu.sleep)
    rounds_ms = [2.0, 3.0, 0.25]
    readings = []
    for work_ms in rounds_ms:
        start = clock()
        gpu.now_ms += work_ms          # the round's kernels
        readings.append(clock() - start)
        gpu.now_ms += 7.0              # a flush between rounds, not counted
    assert readings == pytest.approx([w / 1e3 for w in rounds_ms])
    assert gpu.spins == [500_000] * 3  # every round started behind the lead


def test_the_l2_flush_is_chosen_checked_and_recorded(tmp_path):
    from attnlab.bench import records as rec
    from attnlab.cli import main

    with pytest.raises(ValueError, match=r"^l2_flush: expected one of write, read, none"):
        Timer("cpu", l2_flush="sometimes")
    assert Timer("cpu", l2_flush="read").l2_flush == "none"          # a CPU has no L2 of the GPU's to empty
    out = tmp_path / "s.jsonl"
    assert main(["sweep", "--device", "cpu", "--workload", "cpu-small", "--kernels", "naive", "--seq-lens", "128",
                 "--l2-flush", "read", "--out", str(out)]) == 0
    assert {r["l2_flush"] for r in rec.read_records(out)} == {"none"}
