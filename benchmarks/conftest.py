"""The kernel x length grid under pytest-benchmark.

    pytest --benchmark-only --benchmark-json=bench.json        # from the repository root

Plain `pytest` runs the tests and leaves the grid out; `--benchmark-only`, or naming this
folder, runs it. After pytest-benchmark's table of times the grid prints the rates the
times imply (TFLOP/s for prefill and the backward, GB/s for decode), which that table has no column for.

On a GPU the grid is the llama3-8b workload, timed with CUDA events (the benchmark's clock
reads events, not the CPU clock around an asynchronous launch) with the L2 cache flushed
before every round; on a CPU it is the cpu-small preset with time.perf_counter. Each
benchmark's `extra_info` is a complete attnlab result record (records.FIELDS), and the
run's environment record is split in two: what names the machine and its software in
`machine_info["attnlab"]`, which `--benchmark-compare` holds equal between runs, and what
changes from run to run (RUN_FIELDS: run id, time, command line, order seed, commit, the GPU's
clocks and temperature at the start) in `commit_info["attnlab"]`; `attnlab analyze` joins them.
From the root, `--benchmark-only` collects the grid alone (the root conftest.py leaves tests/ out).

Each point is measured in `--attnlab-rounds` rounds (default 5), interleaved as a sweep does
(bench/sweep.py): every point once per round, each round in an order shuffled from a recorded
seed; ids end in the round (`-r0`), and `attnlab compare` reads a point's rounds as one.

Groups are "<mode> <workload> seq_len=<tokens>", so the default table compares kernels at
one length; `--benchmark-group-by=param:kernel` (or `param:mode,param:kernel`) shows one
kernel's scaling instead. Test ids (`<workload>-<mode>-<kernel>-<length>`) stay the same
between runs, so `--benchmark-save` / `--benchmark-compare` line them up.
Options below narrow the grid (lengths, kernels, modes, time per benchmark, time for all).
Kernel plugins come in as for every attnlab command: ATTNLAB_KERNEL_MODULES and the
`attnlab.kernels` entry points; one that fails to load is named in the report header.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this when a kernel module is imported; on a CPU only its interpreter runs.
    os.environ.setdefault("TRITON_INTERPRET", "1")

GPU_SEQ_LENS = "1k,4k,16k,64k"
RUN_FIELDS = ("run_id", "time", "command", "argv", "rounds", "order_seed", "git_commit", "git_dirty", "clocks",
              "temperature_c", "pstate", "throttle_reasons")


def pytest_addoption(parser):
    group = parser.getgroup("attnlab", "attnlab benchmark grid")
    group.addoption("--attnlab-workload", default=None,
                    help="preset (default: llama3-8b on CUDA, cpu-small on CPU)")
    group.addoption("--attnlab-seq-lens", default=None,
                    help=f"comma list of lengths (default: {GPU_SEQ_LENS} on CUDA, the preset's on CPU)")
    group.addoption("--attnlab-kernels", default=None,
                    help="comma list of implementations (default: all available here)")
    group.addoption("--attnlab-modes", default="prefill,decode,backward",
                    help="comma list of prefill, decode, backward and fwd_bwd (default: prefill,decode,backward)")
    group.addoption("--attnlab-device", default=None, help="cuda, cuda:N or cpu (default: cuda if present)")
    group.addoption("--attnlab-budget-s", type=float, default=0.2,
                    help="time the timed rounds of one benchmark may use (at least 5 rounds)")
    group.addoption("--attnlab-energy-s", type=float, default=1.0,
                    help="back-to-back window for the energy counter, per benchmark (GPU; 0: none)")
    group.addoption("--attnlab-nvml-csv", default=None, help="append raw NVML samples to this CSV")
    group.addoption("--attnlab-l2-flush", default="write", choices=("write", "read", "none"),
                    help="how the L2 cache is emptied before each round on a GPU (default: write)")
    group.addoption("--attnlab-rounds", type=int, default=None,
                    help="interleaved rounds per point, each in a shuffled order (default: the sweep's, 5)")
    group.addoption("--attnlab-order-seed", type=int, default=None,
                    help="seed of the rounds' order (default: drawn, and recorded in every record)")
    group.addoption("--attnlab-session-budget-s", type=float, default=None,
                    help="skip benchmarks that would start after this many seconds of the session, "
                         "so a time-boxed run still ends cleanly and writes its JSON")


@dataclass
class Grid:
    device: torch.device
    workload: object
    seq_lens: list
    kernels: list
    requested: bool         # kernels named explicitly (unavailable ones show up as skips)
    modes: tuple
    budget_s: float
    energy_s: float
    nvml_csv: Optional[Path]
    run_id: str
    session_budget_s: Optional[float] = None
    l2_flush: str = "write"
    rounds: int = 1
    order_seed: Optional[int] = None
    started_s: float = field(default_factory=time.monotonic)
    records: list = field(default_factory=list)     # what each benchmark measured, for the rates table
    _timer: object = field(default=None, init=False, repr=False)
    _env: Optional[dict] = field(default=None, init=False, repr=False)

    @property
    def timer(self):
        """One timer (and one L2 flush buffer) for the whole session."""
        if self._timer is None:
            from attnlab.bench.timer import Timer

            # The timed budget of a point is shared among its rounds, as in a sweep.
            self._timer = Timer(self.device, budget_s=self.budget_s / self.rounds, l2_flush=self.l2_flush)
        return self._timer

    def budget_spent(self) -> bool:
        return self.session_budget_s is not None and time.monotonic() - self.started_s >= self.session_budget_s

    def environment(self) -> dict:
        if self._env is None:
            from attnlab.bench.records import environment

            self._env = {**environment(device=self.device, run_id=self.run_id), "rounds": self.rounds,
                         "order_seed": self.order_seed}
        return self._env


GRID_KEY = pytest.StashKey[Grid]()
PLUGIN_FAILURES_KEY = pytest.StashKey[list]()


def pytest_configure(config):
    from attnlab.kernels import load_plugins

    config.stash[PLUGIN_FAILURES_KEY] = load_plugins()


def pytest_report_header(config):
    return [f"attnlab: not loaded: {failure}" for failure in config.stash.get(PLUGIN_FAILURES_KEY, [])]


def grid_for(config) -> Grid:
    """The grid the options describe, built once per session."""
    grid = config.stash.get(GRID_KEY, None)
    if grid is not None:
        return grid
    from attnlab.bench.records import new_run_id
    from attnlab.bench.device import check_device
    from attnlab.bench.sweep import DEFAULT_ROUNDS, check_rounds, default_kernels, order_seed
    from attnlab.bench.workloads import default_preset, parse_seq_lens, preset

    opt = config.getoption
    device = check_device(opt("--attnlab-device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    workload = preset(opt("--attnlab-workload") or default_preset(device.type))
    lens_text = opt("--attnlab-seq-lens") or (GPU_SEQ_LENS if device.type == "cuda" else None)
    kernels_text = opt("--attnlab-kernels")
    csv = opt("--attnlab-nvml-csv")
    rounds = opt("--attnlab-rounds") or DEFAULT_ROUNDS
    check_rounds(rounds)
    seed = order_seed(opt("--attnlab-order-seed"), rounds)
    grid = Grid(device=device, workload=workload,
                seq_lens=parse_seq_lens(lens_text) if lens_text else list(workload.seq_lens),
                kernels=_split(kernels_text) if kernels_text else default_kernels(device.type),
                requested=bool(kernels_text), modes=tuple(_split(opt("--attnlab-modes"))),
                budget_s=opt("--attnlab-budget-s"), energy_s=opt("--attnlab-energy-s"),
                nvml_csv=Path(csv) if csv else None, run_id=new_run_id(),
                session_budget_s=opt("--attnlab-session-budget-s"), l2_flush=opt("--attnlab-l2-flush"),
                rounds=rounds, order_seed=seed)
    config.stash[GRID_KEY] = grid
    return grid


def _split(text: str) -> list:
    return [part.strip() for part in text.split(",") if part.strip()]


def pytest_generate_tests(metafunc):
    if "kernel" not in metafunc.fixturenames:
        return
    from attnlab.bench.workloads import seq_len_label
    from attnlab.kernels import get, implementations

    grid = grid_for(metafunc.config)
    known = {impl.name for impl in implementations()}
    cases, ids = [], []
    for round_index in range(grid.rounds):
        for seq_len in grid.seq_lens:
            for mode in grid.modes:
                for kernel in grid.kernels:
                    # a kernel that never serves this mode is left out, unless it was named: then
                    # it shows up as a skip that says why
                    if kernel in known and mode not in get(kernel).modes and not grid.requested:
                        continue
                    cases.append((mode, kernel, seq_len, round_index))
                    ids.append(f"{grid.workload.name}-{mode}-{kernel}-{seq_len_label(seq_len)}-r{round_index}")
    metafunc.parametrize("mode,kernel,seq_len,round_index", cases, ids=ids)


def pytest_collection_modifyitems(config, items):
    from attnlab.bench.timer import CudaEventClock

    if _grid_left_out(config):
        grid_items = [item for item in items if "benchmark" in getattr(item, "fixturenames", ())]
        config.hook.pytest_deselected(items=grid_items)
        items[:] = [item for item in items if item not in grid_items]
        return
    grid = grid_for(config)
    _interleave(items, grid)
    # On a GPU each round starts behind a spin as long as the timer's lead, so launches queue first.
    clock = CudaEventClock(lambda: grid.timer.lead_cycles()) if grid.device.type == "cuda" else time.perf_counter
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.benchmark(timer=clock))


def _interleave(items: list, grid: Grid) -> None:
    """Each round's benchmarks in the order a sweep of the same seed would shuffle them."""
    from attnlab.bench.sweep import interleaved

    grid_items = [item for item in items if "round_index" in getattr(getattr(item, "callspec", None), "params", {})]
    if not grid_items:
        return
    order = interleaved([(item, item.callspec.params["round_index"]) for item in grid_items], grid.order_seed)
    rest = [item for item in items if item not in grid_items]
    items[:] = rest + [item for item, _ in order]


def _grid_left_out(config) -> bool:
    # Collected only because it is in testpaths, without --benchmark-only: a plain `pytest` run.
    from_testpaths = config.args_source == pytest.Config.ArgsSource.TESTPATHS
    return from_testpaths and not config.getoption("benchmark_only", False)


@pytest.hookimpl(trylast=True)     # after pytest-benchmark's own tables
def pytest_terminal_summary(terminalreporter, config):
    grid = config.stash.get(GRID_KEY, None)
    if grid is None or not grid.records:
        return
    from statistics import median

    from attnlab.text import table

    points = {}
    for r in grid.records:      # a point's rounds: its time is the median of their medians, as compare reads it
        points.setdefault((r["mode"], r["seq_len"], r["kernel"]), []).append(r)
    rows = []
    for (mode, seq_len, kernel), rounds in sorted(points.items()):
        ms = median(r["median_ms"] for r in rounds)
        scale = rounds[0]["median_ms"] / ms
        rows.append((mode, kernel, seq_len, f"{ms:.4g}", _rate(_scaled(rounds[0].get("tflops"), scale)),
                     _rate(_scaled(rounds[0].get("gbps"), scale))))
    terminalreporter.write_sep("-", f"attnlab rates: {grid.workload.name} on {grid.device}, the median of each "
                                    f"point's {grid.rounds} round(s)")
    terminalreporter.write_line(table(("mode", "kernel", "seq_len", "median ms", "TFLOP/s", "GB/s"), rows,
                                      align="numbers"))


def _scaled(rate, scale):
    return None if rate is None else rate * scale


def _rate(value) -> str:
    return "-" if value is None else f"{value:.4g}"


@pytest.fixture(scope="session")
def grid(request) -> Grid:
    return grid_for(request.config)


try:
    import pytest_benchmark  # noqa: F401
except ImportError:   # the hook below belongs to pytest-benchmark; without it pytest would reject it
    pass
else:
    def pytest_benchmark_update_machine_info(config, machine_info):
        machine_info["attnlab"] = _environment_part(config, machine=True)

    def pytest_benchmark_update_commit_info(config, commit_info):
        commit_info["attnlab"] = _environment_part(config, machine=False)


def _environment_part(config, machine: bool) -> dict:
    """The run's environment record without RUN_FIELDS (`machine`), or only those."""
    from attnlab.bench.records import jsonable

    env = jsonable(grid_for(config).environment())
    return {key: value for key, value in env.items() if (key in RUN_FIELDS) != machine}
