"""GPU power, energy, memory, clocks and throttling, sampled by NVML while work runs.

`NvmlSampler` is the one entry point. It polls a sample source on a background thread and
reads the device's total-energy counter at the edges of measurement windows:

    with NvmlSampler("cuda:0", csv_path="run.nvml.csv", label={"run_id": rid, "point": "x"}) as s:
        warm_up()
        with s.energy_window():          # repeat the call here for >= 1 s
            run_many()
    s.summary()   # {"power_w_mean", "power_w_max", "energy_j", "energy_window_s", ...}

- Power is NVML's instantaneous field where the driver offers it; otherwise the averaged
  reading, which lags about a second on Hopper (`power_source` says which).
- `energy_j` is the total-energy counter (millijoules, updated about every 100 ms)
  differenced over the windows, summed; where the counter is missing it is the integral of
  the power samples (`energy_source` says which). Callers divide by the calls or tokens
  run inside the windows. A window shorter than about a second gives a coarse figure.
- `power_w_mean` and `power_w_max` cover the samples inside energy windows when there are
  any (the steady state), else every sample; `energy_power_w` is energy_j / energy_window_s.
- Raw samples are appended to `csv_path` (columns CSV_COLUMNS) when the sampler exits.
- Where NVML cannot be used (no package, no driver, a CPU device) the sampler does nothing
  and `summary()` gives None for every figure and the reason in `nvml_reason`. NVML is
  probed once per process.
- `source=` takes any object with `sample() -> dict | None`, `energy_mj() -> float | None`
  and `now_s() -> float`; `ReplaySource` replays a recorded trace, which is how the logic is
  tested without a GPU.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Optional

SAMPLE_COLUMNS = ("t_s", "power_w", "power_source", "memory_used_bytes", "sm_clock_mhz",
                  "mem_clock_mhz", "temperature_c", "throttle_reasons", "energy_mj")
LABEL_COLUMNS = ("run_id", "point")
CSV_COLUMNS = LABEL_COLUMNS + SAMPLE_COLUMNS + ("in_window",)

SUMMARY_KEYS = ("power_w_mean", "power_w_max", "power_source", "energy_j", "energy_window_s",
                "energy_source", "energy_power_w", "samples", "sm_clock_mhz_mean", "sm_clock_mhz_min",
                "mem_clock_mhz_mean", "temperature_c_max", "memory_used_bytes_max",
                "throttle_reasons", "sm_clock_mhz_max", "clocks_changed", "throttle_changed", "nvml_reason",
                "nvml_error")

# Clock-event (throttle) reason bits, as NVML defines them, and the names recorded here.
THROTTLE_REASONS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}

_MILLI = 1e-3


def throttle_names(mask: int) -> list[str]:
    """The reason names set in an NVML clock-event bitmask; unknown bits as "bit_N"."""
    names = []
    for bit in range(64):
        if mask >> bit & 1:
            names.append(THROTTLE_REASONS.get(1 << bit, f"bit_{bit}"))
    return names


@functools.lru_cache(maxsize=None)
def _nvml():
    """(pynvml module, "") once NVML is initialised, or (None, reason)."""
    try:
        import pynvml
    except Exception as exc:
        return None, f"nvidia-ml-py not importable ({type(exc).__name__}: {exc}); install attnlab[nvml]"
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        return None, f"NVML did not initialise ({type(exc).__name__}: {exc})"
    return pynvml, ""


def nvml_reason(device) -> str:
    """Why NVML cannot sample `device`, or "" when it can."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return f"device {device}: NVML reads NVIDIA GPUs only"
    return _nvml()[1]


def _handle(pynvml, device):
    """The NVML handle of a torch CUDA device, matched by UUID (CUDA_VISIBLE_DEVICES safe)."""
    import torch

    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is not None:
        with contextlib.suppress(Exception):
            return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def _try(read):
    try:
        return read()
    except Exception:   # NVMLError_NotSupported and kin: the field is absent here
        return None


def _clock_event_reasons(pynvml):
    """NVML's clock-event reasons call: renamed from ...ThrottleReasons in newer bindings."""
    return (getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
            or pynvml.nvmlDeviceGetCurrentClocksThrottleReasons)


def _not_opened(device, exc: Exception) -> str:
    return f"NVML could not open {device} ({type(exc).__name__}: {exc})"


def _field_value(value) -> float:
    kind = int(value.valueType)
    name = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}[kind]
    return float(getattr(value.value, name))


class NvmlSource:
    """Reads one GPU through NVML. Fields a device does not support read as None."""

    def __init__(self, device):
        pynvml, reason = _nvml()
        if pynvml is None:
            raise RuntimeError(f"device: {reason}")
        self._nvml = pynvml
        self._h = _handle(pynvml, device)
        self._instant = _try(self._instant_power_w) is not None
        self._reasons = _clock_event_reasons(pynvml)

    def _instant_power_w(self) -> float:
        value = self._nvml.nvmlDeviceGetFieldValues(self._h, [self._nvml.NVML_FI_DEV_POWER_INSTANT])[0]
        if value.nvmlReturn != self._nvml.NVML_SUCCESS:
            raise RuntimeError("instantaneous power not offered")
        return _field_value(value) * _MILLI

    def _power(self):
        if self._instant:
            watts = _try(self._instant_power_w)
            if watts is not None:
                return watts, "instant"
        watts = _try(lambda: self._nvml.nvmlDeviceGetPowerUsage(self._h) * _MILLI)
        return watts, "average" if watts is not None else None

    def sample(self) -> dict:
        n, h = self._nvml, self._h
        power_w, source = self._power()
        mask = _try(lambda: self._reasons(h))
        return {
            "t_s": time.time(),
            "power_w": power_w,
            "power_source": source,
            "memory_used_bytes": _try(lambda: n.nvmlDeviceGetMemoryInfo(h).used),
            "sm_clock_mhz": _try(lambda: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM)),
            "mem_clock_mhz": _try(lambda: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_MEM)),
            "temperature_c": _try(lambda: n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU)),
            "throttle_reasons": None if mask is None else throttle_names(int(mask)),
            "energy_mj": self.energy_mj(),
        }

    def energy_mj(self) -> Optional[float]:
        return _try(lambda: float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._h)))

    def now_s(self) -> float:
        return time.time()


class ReplaySource:
    """Plays back recorded samples in order, one per `sample()` call, then None.

    The trace's own `t_s` is the clock and its `energy_mj` column the energy counter, both
    as of the last sample handed out; `done` is set once the trace is exhausted.
    """

    def __init__(self, rows):
        self._rows = [dict(r) for r in rows]
        self._next = 0
        self._current: Optional[dict] = None
        self._lock = threading.Lock()
        self.done = threading.Event()
        if not self._rows:
            self.done.set()

    @classmethod
    def from_csv(cls, path) -> "ReplaySource":
        """A trace written by NvmlSampler (CSV_COLUMNS), its types restored."""
        with open(path, newline="", encoding="utf-8") as f:
            return cls([_parse_csv_row(row) for row in csv.DictReader(f)])

    def sample(self) -> Optional[dict]:
        with self._lock:
            if self._next >= len(self._rows):
                self.done.set()
                return None
            self._current = self._rows[self._next]
            self._next += 1
            if self._next >= len(self._rows):
                self.done.set()
            return {key: self._current.get(key) for key in SAMPLE_COLUMNS}

    def energy_mj(self) -> Optional[float]:
        with self._lock:
            return None if self._current is None else self._current.get("energy_mj")

    def now_s(self) -> float:
        with self._lock:
            return 0.0 if self._current is None else float(self._current["t_s"])


class NvmlSampler:
    """Samples one GPU on a background thread while a block runs; see the module docstring.

    NvmlSampler(device="cuda", *, source=None, interval_s=0.02, csv_path=None, label=None)

    `device` is a torch device ("cuda:0"); `source` replaces NVML (tests replay traces with
    it); `label` fills the CSV's run_id and point columns. `interval_s=0` runs no thread:
    samples are taken at entry, exit and on `poll()`, which makes a replay deterministic.
    Methods: `energy_window()` (a context manager), `poll()`, `summary()` (a dict with
    SUMMARY_KEYS); `samples` holds the raw sample dicts.
    """

    def __init__(self, device="cuda", *, source=None, interval_s: float = 0.02,
                 csv_path=None, label: Optional[dict] = None):
        if interval_s < 0:
            raise ValueError(f"interval_s: expected a number of seconds >= 0, got {interval_s}")
        self.interval_s = interval_s
        self.csv_path = Path(csv_path) if csv_path else None
        self.label = dict(label or {})
        self.reason = ""
        self.error: Optional[str] = None
        self.samples: list[dict] = []
        self._windows: list[tuple] = []       # (t_start, t_end, energy_start_mj, energy_end_mj)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._source = source
        if source is None:
            self.reason = nvml_reason(device)
            if not self.reason:
                try:
                    self._source = NvmlSource(device)
                except Exception as exc:
                    self.reason = _not_opened(device, exc)

    @property
    def active(self) -> bool:
        return self._source is not None

    def __enter__(self) -> "NvmlSampler":
        if self.active:
            self._take()
            if self.interval_s > 0:
                self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
                self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self.active:
            self._take()
        if self.csv_path is not None and self.samples:
            self._write_csv()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if not self._take():
                return

    def poll(self) -> bool:
        """Take one sample now; False once the source has nothing more (or failed)."""
        return self.active and self._take()

    def _take(self) -> bool:
        try:
            sample = self._source.sample()
        except Exception as exc:   # a device lost mid-run ends sampling, not the measurement
            self.error = f"{type(exc).__name__}: {exc}"
            return False
        if sample is None:
            return False
        self.samples.append(sample)
        return True

    @contextlib.contextmanager
    def energy_window(self):
        """Reads the energy counter and the clock at entry and exit of the block."""
        if not self.active:
            yield self
            return
        start = (self._source.now_s(), self._read_energy())
        try:
            yield self
        finally:
            self._windows.append((start[0], self._source.now_s(), start[1], self._read_energy()))

    def _read_energy(self) -> Optional[float]:
        try:
            return self._source.energy_mj()
        except Exception:
            return None

    def _in_window(self, sample: dict) -> bool:
        return any(t0 <= sample["t_s"] <= t1 for t0, t1, _, _ in self._windows)

    def summary(self) -> dict:
        """Figures over the sampled period; every value None (and `nvml_reason`) without NVML."""
        result = dict.fromkeys(SUMMARY_KEYS)
        result["nvml_reason"] = self.reason or None
        result["nvml_error"] = self.error
        if not self.active:
            return result
        result["samples"] = len(self.samples)
        steady = [s for s in self.samples if self._in_window(s)] or self.samples
        power = [s["power_w"] for s in steady if s.get("power_w") is not None]
        if power:
            result["power_w_mean"] = statistics.fmean(power)
            result["power_w_max"] = max(power)
        sources = {s.get("power_source") for s in steady} - {None}
        result["power_source"] = "+".join(sorted(sources)) or None
        result.update(self._energy())
        if result["energy_j"] is not None and result["energy_window_s"]:
            # mean power from the energy counter: free of the averaged reading's lag
            result["energy_power_w"] = result["energy_j"] / result["energy_window_s"]
        result.update(_spread(steady))
        return result

    def _energy(self) -> dict:
        if not self._windows:
            return {}
        seconds = sum(t1 - t0 for t0, t1, _, _ in self._windows)
        if all(e0 is not None and e1 is not None for _, _, e0, e1 in self._windows):
            joules = sum(e1 - e0 for _, _, e0, e1 in self._windows) * _MILLI
            return {"energy_j": joules, "energy_window_s": seconds, "energy_source": "counter"}
        parts = [_integrate_power(self.samples, t0, t1) for t0, t1, _, _ in self._windows]
        if None in parts:
            return {"energy_window_s": seconds}
        return {"energy_j": sum(parts), "energy_window_s": seconds, "energy_source": "power-integral"}

    def _write_csv(self) -> None:
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
        with open(self.csv_path, "a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            if new:
                writer.writeheader()
            for sample in self.samples:
                row = {key: self.label.get(key) for key in LABEL_COLUMNS}
                row.update({key: sample.get(key) for key in SAMPLE_COLUMNS})
                if row["throttle_reasons"] is not None:   # "none": read, and nothing held clocks back
                    row["throttle_reasons"] = "|".join(row["throttle_reasons"]) or "none"
                row["in_window"] = int(self._in_window(sample))
                writer.writerow(row)
            f.flush()
            os.fsync(f.fileno())


def _spread(samples: list[dict]) -> dict:
    def values(key):
        return [s[key] for s in samples if s.get(key) is not None]

    sm, mem, temp, used = (values(key) for key in
                           ("sm_clock_mhz", "mem_clock_mhz", "temperature_c", "memory_used_bytes"))
    reasons = sorted({name for s in samples for name in (s.get("throttle_reasons") or [])})
    return {
        "sm_clock_mhz_mean": statistics.fmean(sm) if sm else None,
        "sm_clock_mhz_min": min(sm) if sm else None,
        "mem_clock_mhz_mean": statistics.fmean(mem) if mem else None,
        "temperature_c_max": max(temp) if temp else None,
        "memory_used_bytes_max": max(used) if used else None,
        "throttle_reasons": reasons if any(s.get("throttle_reasons") is not None for s in samples) else None,
        # Whether the card's state moved while the point ran: its time is then of two states.
        "sm_clock_mhz_max": max(sm) if sm else None,
        "clocks_changed": len(set(sm)) > 1 if sm else None,
        "throttle_changed": len({tuple(s.get("throttle_reasons") or ()) for s in samples}) > 1 if samples else None,
    }


def _integrate_power(samples: list[dict], t0: float, t1: float) -> Optional[float]:
    """Joules between t0 and t1 by the trapezoid rule over the power samples inside."""
    points = [(s["t_s"], s["power_w"]) for s in samples
              if s.get("power_w") is not None and t0 <= s["t_s"] <= t1]
    if len(points) < 2:
        return None
    return sum((tb - ta) * (pa + pb) / 2 for (ta, pa), (tb, pb) in zip(points, points[1:]))


def _parse_csv_row(row: dict) -> dict:
    parsed = {}
    for key in SAMPLE_COLUMNS:
        text = row.get(key)
        if text in (None, ""):
            parsed[key] = None
        elif key == "power_source":
            parsed[key] = text
        elif key == "throttle_reasons":
            parsed[key] = [name for name in text.split("|") if name and name != "none"]
        else:
            parsed[key] = float(text)
    return parsed


def gpu_conditions(device) -> dict:
    """The GPU's conditions as NVML reports them (driver, power limit, clocks, reasons), for
    the run's environment record; {"nvml_reason": ...} where NVML cannot be used."""
    reason = nvml_reason(device)
    if reason:
        return {"nvml_reason": reason}
    pynvml, _ = _nvml()
    try:
        h = _handle(pynvml, device)
    except Exception as exc:
        return {"nvml_reason": _not_opened(device, exc)}
    n = pynvml

    def read(fn, scale=1.0):
        value = _try(fn)
        return value * scale if isinstance(value, (int, float)) and scale != 1.0 else value

    mask = read(lambda: _clock_event_reasons(n)(h))
    return {
        "nvml_reason": None,
        "gpu_uuid": read(lambda: n.nvmlDeviceGetUUID(h)),
        "driver": read(n.nvmlSystemGetDriverVersion),
        "cuda_driver": read(n.nvmlSystemGetCudaDriverVersion_v2),
        "power_limit_w": read(lambda: n.nvmlDeviceGetEnforcedPowerLimit(h), _MILLI),
        "power_limit_default_w": read(lambda: n.nvmlDeviceGetPowerManagementDefaultLimit(h), _MILLI),
        "clocks": {
            "sm_mhz": read(lambda: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM)),
            "mem_mhz": read(lambda: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_MEM)),
            "sm_max_mhz": read(lambda: n.nvmlDeviceGetMaxClockInfo(h, n.NVML_CLOCK_SM)),
            "mem_max_mhz": read(lambda: n.nvmlDeviceGetMaxClockInfo(h, n.NVML_CLOCK_MEM)),
            "sm_app_mhz": read(lambda: n.nvmlDeviceGetApplicationsClock(h, n.NVML_CLOCK_SM)),
            "mem_app_mhz": read(lambda: n.nvmlDeviceGetApplicationsClock(h, n.NVML_CLOCK_MEM)),
        },
        "temperature_c": read(lambda: n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU)),
        "pstate": read(lambda: n.nvmlDeviceGetPerformanceState(h)),
        "persistence_mode": read(lambda: n.nvmlDeviceGetPersistenceMode(h)),
        "throttle_reasons": None if mask is None else throttle_names(int(mask)),
        "memory_total_bytes": read(lambda: n.nvmlDeviceGetMemoryInfo(h).total),
    }
