"""The NVML sampler. The CPU tests drive its logic with a replayed trace (ReplaySource),
not a real GPU: power statistics, energy from the counter or from the power integral,
throttle reasons, the CSV and the null result without NVML. Real NVML runs under `gpu`.
"""
import csv
import statistics
import sys
import time

import pytest
import torch

from attnlab.bench import nvml
from attnlab.bench.nvml import CSV_COLUMNS, NvmlSampler, ReplaySource, throttle_names


def _trace(n=21, step_s=0.1, energy=True):
    """A GPU warming up: power ramps 100 -> 300 W, energy integrates it, throttling at the top."""
    rows, energy_mj = [], 5_000_000.0
    for i in range(n):
        power = 100.0 + 10.0 * i
        if i:
            energy_mj += power * step_s * 1e3
        rows.append({"t_s": 1000.0 + i * step_s, "power_w": power, "power_source": "instant",
                     "memory_used_bytes": 1e9 + i * 1e6, "sm_clock_mhz": 1980.0 - 5 * i,
                     "mem_clock_mhz": 2619.0, "temperature_c": 40.0 + i,
                     "throttle_reasons": ["sw_power_cap"] if power >= 200 else [],
                     "energy_mj": energy_mj if energy else None})
    return rows


def test_replayed_trace_on_the_thread_is_sampled_whole():
    rows = _trace()
    source = ReplaySource(rows)
    with NvmlSampler("cuda", source=source, interval_s=0.001) as sampler:
        assert source.done.wait(5)
    summary = sampler.summary()
    assert summary["samples"] == len(rows)
    assert summary["power_w_mean"] == pytest.approx(statistics.fmean(r["power_w"] for r in rows))
    assert summary["power_w_max"] == 300.0
    assert summary["power_source"] == "instant"
    assert summary["energy_j"] is None            # no energy window was opened
    assert summary["nvml_reason"] is None


def test_energy_window_uses_the_counter_and_power_stats_cover_the_window():
    rows = _trace()
    with NvmlSampler("cuda", source=ReplaySource(rows), interval_s=0) as sampler:   # row 0
        for _ in range(4):
            sampler.poll()                                                            # rows 1-4
        with sampler.energy_window():                                                 # opens at row 4
            for _ in range(10):
                sampler.poll()                                                        # rows 5-14
        sampler.poll()                                                                # row 15
    summary = sampler.summary()                                                       # exit: row 16
    assert summary["samples"] == 17
    assert summary["energy_source"] == "counter"
    assert summary["energy_j"] == pytest.approx((rows[14]["energy_mj"] - rows[4]["energy_mj"]) / 1e3)
    assert summary["energy_window_s"] == pytest.approx(1.0)
    window_power = [r["power_w"] for r in rows[4:15]]
    assert summary["power_w_mean"] == pytest.approx(statistics.fmean(window_power))
    assert summary["power_w_max"] == max(window_power)
    # energy over the window agrees with the mean power it saw (the ramp is linear)
    assert summary["energy_power_w"] == pytest.approx(summary["power_w_mean"], rel=0.05)
    assert summary["throttle_reasons"] == ["sw_power_cap"]
    assert summary["sm_clock_mhz_min"] == rows[14]["sm_clock_mhz"]
    assert summary["temperature_c_max"] == rows[14]["temperature_c"]


def test_energy_falls_back_to_the_power_integral_without_a_counter():
    rows = [{"t_s": 10.0 + 0.1 * i, "power_w": 200.0, "energy_mj": None} for i in range(12)]
    with NvmlSampler("cuda", source=ReplaySource(rows), interval_s=0) as sampler:
        with sampler.energy_window():
            for _ in range(10):
                sampler.poll()
    summary = sampler.summary()
    assert summary["energy_source"] == "power-integral"
    assert summary["energy_j"] == pytest.approx(200.0 * 1.0)
    assert summary["throttle_reasons"] is None and summary["sm_clock_mhz_mean"] is None


def test_csv_holds_every_sample_and_replays_to_the_same_trace(tmp_path):
    rows = _trace(n=8)
    path = tmp_path / "run.nvml.csv"
    label = {"run_id": "r1", "point": "decode/naive/1k"}
    with NvmlSampler("cuda", source=ReplaySource(rows), interval_s=0, csv_path=path, label=label) as s:
        with s.energy_window():
            for _ in range(3):
                s.poll()
        for _ in range(10):
            s.poll()
    with open(path, newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(CSV_COLUMNS)
    assert len(table) == 8 and {r["run_id"] for r in table} == {"r1"}
    assert [int(r["in_window"]) for r in table] == [1, 1, 1, 1, 0, 0, 0, 0]
    replayed = ReplaySource.from_csv(path)
    again = [replayed.sample() for _ in range(8)]
    assert again == [{k: r.get(k) for k in nvml.SAMPLE_COLUMNS} for r in rows]
    assert replayed.sample() is None


def test_a_source_that_fails_ends_sampling_but_not_the_measurement():
    class Failing(ReplaySource):
        def sample(self):
            if self._next >= 3:
                raise RuntimeError("GPU is lost")
            return super().sample()

    with NvmlSampler("cuda", source=Failing(_trace()), interval_s=0.001) as sampler:
        time.sleep(0.05)
    summary = sampler.summary()
    assert summary["samples"] == 3 and "GPU is lost" in summary["nvml_error"]
    assert summary["power_w_max"] == 120.0


def test_throttle_reason_names():
    assert throttle_names(0) == []
    assert throttle_names(0x4 | 0x40) == ["sw_power_cap", "hw_thermal_slowdown"]
    assert throttle_names(0x1 | 1 << 12) == ["gpu_idle", "bit_12"]


def test_no_nvml_on_a_cpu_gives_a_null_result_and_its_reason(tmp_path):
    path = tmp_path / "x.csv"
    with NvmlSampler("cpu", csv_path=path) as sampler:
        with sampler.energy_window():
            pass
    assert not sampler.active and not sampler.poll()
    summary = sampler.summary()
    assert "NVML reads NVIDIA GPUs only" in summary["nvml_reason"]
    assert all(summary[k] is None for k in summary if k != "nvml_reason")
    assert not path.exists()


def test_a_missing_nvml_package_is_reported_once_with_its_reason(monkeypatch):
    nvml._nvml.cache_clear()
    monkeypatch.setitem(sys.modules, "pynvml", None)      # as if nvidia-ml-py were not installed
    try:
        reason = nvml.nvml_reason("cuda:0")
        assert "nvidia-ml-py" in reason and "attnlab[nvml]" in reason
        sampler = NvmlSampler("cuda:0")
        assert not sampler.active and sampler.summary()["nvml_reason"] == reason
        assert nvml.gpu_conditions("cuda:0") == {"nvml_reason": reason}
    finally:
        nvml._nvml.cache_clear()


@pytest.mark.gpu
def test_real_nvml_power_energy_and_clocks(tmp_path):
    if nvml.nvml_reason("cuda"):
        pytest.skip(nvml.nvml_reason("cuda"))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    path = tmp_path / "real.csv"
    with NvmlSampler("cuda", csv_path=path, interval_s=0.02) as sampler:
        with sampler.energy_window():
            start = time.perf_counter()
            while time.perf_counter() - start < 1.2:
                for _ in range(20):
                    a @ a
                torch.cuda.synchronize()
    s = sampler.summary()
    assert s["samples"] >= 20 and s["nvml_reason"] is None and s["nvml_error"] is None
    assert 20 < s["power_w_mean"] <= s["power_w_max"] < 2000
    assert s["energy_window_s"] >= 1.0 and s["energy_j"] > 0
    # energy over the window agrees roughly with the sampled power
    assert 0.5 < s["energy_j"] / s["energy_window_s"] / s["power_w_mean"] < 2.0
    assert s["sm_clock_mhz_mean"] > 100 and s["memory_used_bytes_max"] > a.numel() * 2
    assert s["power_source"] in ("instant", "average", "average+instant")
    with open(path) as f:
        assert sum(1 for _ in f) == s["samples"] + 1


@pytest.mark.gpu
def test_real_nvml_conditions_for_the_environment():
    from attnlab.bench.records import environment

    env = environment(["test"], device="cuda")
    if env.get("nvml_reason"):
        pytest.skip(env["nvml_reason"])
    assert env["gpu_uuid"].startswith("GPU-") and env["driver"]
    assert env["power_limit_w"] > 0 and env["clocks"]["sm_max_mhz"] > 0
    assert env["gpu_name"] == torch.cuda.get_device_name()
