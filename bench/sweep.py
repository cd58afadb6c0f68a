"""The sweep: every kernel at every context length, one record per point, into a JSONL file.

    config = SweepConfig(workload=preset("llama3-8b"), device="cuda", out="run.jsonl")
    result = run_sweep(config)

Each point is measured in `rounds` rounds, interleaved: every point once per round, in an order
shuffled per round from a recorded seed, so slow drift and co-tenants fall on every kernel alike
and a point's spread between rounds says how far its time is noise. A record is one point in one
round (`round`, `rounds`, `order_seed`); a point that fails in one round is not run again.

Per point: an unsupported kernel or mode is recorded as `unsupported`; a point predicted
not to fit in free memory as `oom` without launching; a real out-of-memory error as `oom`
after its memory is released; any other exception as `error`, a SystemExit or other
BaseException included (only Ctrl-C ends the sweep). Once `budget_s` is spent
the remaining points are `skipped`. With `resume` the points already settled in the file
(FINAL_STATUSES, same device; per round) are not measured again. Ctrl-C ends the sweep after the
records already written; the point in flight is dropped and a resume measures it.
Raw NVML samples go to `nvml_csv_path(out)`, beside the JSONL. The sweep writes only to a
new file or an attnlab one, and holds it (and its samples) for the run, so that two sweeps
never measure into one file.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from attnlab.bench import records as rec
from attnlab.bench.device import check_device, free_bytes, peak_memory_bytes, release_memory, reset_peak_memory
from attnlab.bench.nvml import CSV_COLUMNS, NvmlSampler, nvml_reason
from attnlab.bench.outcomes import check_fields, describe, status_and_reason, wrong_fields
from attnlab.bench.output_file import OutputError
from attnlab.bench.point_call import build_call
from attnlab.bench.shards import Shard, partition
from attnlab.bench.timer import Timer, Timing
from attnlab.bench.workloads import (DECODE, DEFAULT_MODES, DecodeCache, Point, Workload, bytes_moved, cache_pages,
                                     flops, lengths_summary, point_key, predicted_peak_bytes, seq_len_label)
from attnlab.schema import CALIBRATION, ERROR, OK, OOM, SKIPPED, UNSUPPORTED

# Two default runs of one sweep on one machine must agree (an A/A pair). On a 2-core CPU a point's
# round medians fall in two or more states a factor of up to 2 apart; with five rounds the median
# of the round medians rarely flips between them, and the spread between rounds shows how far
# apart they are (twelve A/A pairs of default CPU sweeps: no verdict; with three rounds, some).
DEFAULT_ROUNDS = 5
MIN_REPS = 5                # timed repetitions of a point, at least, over all its rounds
MAX_ROUNDS = 100
MATMUL_N = 8192
COPY_BYTES = 1 << 30


@dataclass
class SweepConfig:
    """What to sweep and where to write it.

    `kernels` None means every implementation available on the device (Triton kernels in
    Triton's CPU interpreter excluded: name them to include them). `seq_lens` None means
    the workload's own. `point_budget_s` is the timed repetitions' budget per point,
    `energy_window_s` the back-to-back window read by the energy counter (GPU only).
    `free_memory` returns the bytes a point may use (default: what the device has free).
    `rounds` is how many times each point is measured, interleaved (the timed budget is shared
    among them); `order_seed` shuffles each round's order (default: drawn, and recorded, where
    there is more than one round). `cache` lays out the decode points' KV cache (paged, 8-bit,
    ragged lengths; default: contiguous, the workload's dtype, equal lengths).
    """

    workload: Workload
    device: str = "cpu"
    out: Path = Path("attnlab-sweep.jsonl")
    kernels: Optional[list] = None
    modes: tuple = DEFAULT_MODES
    seq_lens: Optional[list] = None
    resume: bool = False
    budget_s: Optional[float] = None
    point_budget_s: float = 0.2
    energy_window_s: float = 1.0
    calibrate: bool = True
    argv: Optional[list] = None
    free_memory: Optional[Callable[[], Optional[int]]] = None
    nvml_interval_s: float = 0.02
    shard: Optional[Shard] = None       # measure only this shard of the points (bench/shards.py)
    l2_flush: str = "write"             # how the timer empties a GPU's L2 before each repetition (timer.L2_FLUSHES)
    rounds: int = DEFAULT_ROUNDS
    order_seed: Optional[int] = None
    cache: DecodeCache = DecodeCache()


@dataclass
class SweepResult:
    out: Path
    nvml_csv: Path
    run_id: str
    planned: int = 0
    already_done: int = 0
    counts: Counter = field(default_factory=Counter)
    records: list = field(default_factory=list)
    interrupted: bool = False
    nvml_reason: Optional[str] = None


def nvml_csv_path(out) -> Path:
    """Where the raw NVML samples of a sweep written to `out` go: run.jsonl -> run.nvml.csv."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".jsonl") + ".nvml.csv")


def default_kernels(device_type: str) -> list[str]:
    """Implementations that run on this device type, less those only emulated here (Triton's
    interpreter on a CPU: right, but its times say nothing, and a long point takes minutes)
    and the ablations, which run when named."""
    from attnlab.kernels import implementations

    return [impl.name for impl in implementations()
            if impl.available(device_type) and device_type not in impl.emulated_on and not impl.ablation_of]


def plan(config: SweepConfig) -> list[Point]:
    """Every point to measure. Named kernels are tried in every mode asked for (a mode one
    does not serve is recorded as unsupported); by default each kernel runs only its modes."""
    device_type = torch.device(config.device).type
    kernels = list(config.kernels or default_kernels(device_type))
    points = config.workload.points(kernels, tuple(config.modes), config.seq_lens, config.cache)
    if not config.kernels:
        from attnlab.kernels import get
        points = [p for p in points if p.mode in get(p.kernel).modes]
    return partition(points, config.shard.count)[config.shard.index] if config.shard else points


def check_window(window: int, seq_lens) -> None:
    """ValueError naming `window` where it is longer than the longest of `seq_lens`: a window of
    that length already lets every query see every key, so a longer one measures nothing new."""
    longest = max(seq_lens)
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= longest:
        raise ValueError(f"window: expected a whole number of keys from 1 to the longest length swept, {longest} "
                         f"(a window that long already masks nothing), got {window!r}")


def check_nvml_csv(path) -> None:
    """Refuse to append NVML samples to a file that is not an NVML samples file (an empty or
    missing one is new); ValueError naming `out`, whose samples go there."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise OutputError(f"out: its NVML samples go to {path}, which is not a regular file; "
                              f"move it or choose another file")
    if not path.exists():
        return
    with open(path, "rb") as f:
        first = f.readline(1 << 16).strip()
    if first and first != ",".join(CSV_COLUMNS).encode():
        raise OutputError(f"out: its NVML samples go to {path}, which holds something else; "
                              f"move it or choose another file")


class _Quiet:
    """The progress calls run_sweep makes, doing nothing (advance(None): a point passed over)."""

    def start(self, total: int) -> None:
        pass

    def update(self, point: Point) -> None:
        pass

    def advance(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def run_sweep(config: SweepConfig, progress=None) -> SweepResult:
    """Measure every planned point and append its record to `config.out`; see the module doc.

    `progress` is told of the work: start(total points), update(point) before each point,
    advance(record) after it, close() at the end (the command line draws a bar from these).
    The file is held for the whole run (`records.RecordWriter`); a record that cannot be
    written (a full disk) stops the run with `output_file.WriteFailed`, the file whole.
    """
    device = check_device(config.device)
    check_rounds(config.rounds)
    out = Path(config.out)
    points = plan(config)
    with rec.RecordWriter(out) as writer:
        # Decided under the lock, so no other run can write the file between reading and appending.
        done = _already_done(out, config.resume, device)
        todo = [(p, r) for r in range(config.rounds) for p in points if (p.key(), r) not in done]
        result = SweepResult(out=out, nvml_csv=nvml_csv_path(out), run_id=rec.new_run_id(),
                             planned=len(points) * config.rounds,
                             already_done=len(points) * config.rounds - len(todo),
                             nvml_reason=nvml_reason(device) or None)
        if result.nvml_reason is None:
            check_nvml_csv(result.nvml_csv)
        _measure(writer, result, todo, config, device, progress or _Quiet())
    return result


def check_rounds(rounds) -> None:
    if isinstance(rounds, bool) or not isinstance(rounds, int) or not 1 <= rounds <= MAX_ROUNDS:
        raise ValueError(f"rounds: expected a whole number of rounds from 1 to {MAX_ROUNDS}, got {rounds!r}")


def order_seed(given: Optional[int], rounds: int) -> Optional[int]:
    """The seed that shuffles the rounds' order: `given`, else one drawn where there are rounds
    to shuffle; None for a single round, which keeps the plan's order."""
    if given is None and rounds > 1:
        return int(torch.randint(2**31 - 1, ()).item())
    return given


def interleaved(todo: list, seed: Optional[int]) -> list:
    """(point, round) pairs round by round, each round's points in an order shuffled from `seed`
    and the round: every point once per round, none in the same place each time. Without a
    seed (a single round) the plan's order stands: short lengths first."""
    ordered = []
    for r in sorted({r for _, r in todo}):
        mine = [p for p, rr in todo if rr == r]
        order = range(len(mine)) if seed is None else \
            torch.randperm(len(mine), generator=torch.Generator().manual_seed(seed * 1009 + r)).tolist()
        ordered += [(mine[i], r) for i in order]
    return ordered


def _already_done(out: Path, resume: bool, device: torch.device) -> set:
    if resume:
        return _settled(out, rec.device_name(device))
    if rec.read_lines(out):
        raise ValueError(f"out: {out} already holds records; resume it (--resume) or choose another file")
    return set()


def _measure(writer, result: SweepResult, todo: list, config: SweepConfig, device, progress) -> None:
    progress.start(len(todo))
    start_s = time.perf_counter()
    seed = order_seed(config.order_seed, config.rounds)
    try:
        env = rec.environment(config.argv, device=device, run_id=result.run_id)
        env.update(workload_config=dataclasses.asdict(config.workload), rounds=config.rounds, order_seed=seed,
                   decode_cache=dataclasses.asdict(config.cache))
        if config.shard:
            env["shard"] = str(config.shard)
        writer.write(env)
        runner = PointRunner(device, result.run_id, config, result.nvml_csv)
        if device.type == "cuda" and config.calibrate:
            for record in calibrate(device, result.run_id, runner.timer):
                _keep(writer, result, record)
        failed = set()      # a point that failed in one round is not run again
        for point, round_index in interleaved(todo, seed):
            progress.update(point)
            if point.key() in failed:
                progress.advance(None)
                continue
            record = _point_or_skip(runner, point, config.budget_s, start_s, round_index)
            _keep(writer, result, {**record, "round": round_index, "rounds": config.rounds, "order_seed": seed})
            if record["status"] != OK:
                failed.add(point.key())
            progress.advance(result.records[-1])
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        progress.close()


def _point_or_skip(runner: "PointRunner", point: Point, budget_s: Optional[float], start_s: float,
                   round_index: int = 0) -> dict:
    if budget_s is not None and time.perf_counter() - start_s >= budget_s:
        return runner.record(point, SKIPPED, reason=f"sweep budget of {budget_s:g} s spent")
    return runner.run(point, energy=round_index == 0)


def _keep(writer, result: SweepResult, record: dict) -> None:
    writer.write(record)
    result.records.append(record)
    result.counts[record["status"]] += 1


def _settled(out: Path, device_name: str) -> set:
    """(point key, round) of every round measured in the file; a point that failed settles every
    round, since the sweep does not run it again. A record from before rounds is round 0."""
    settled = [r for r in rec.read_records(out) if r.get("status") in rec.FINAL_STATUSES
               and r.get("device") == device_name and r.get("mode") != CALIBRATION]
    failed = {point_key(r) for r in settled if r["status"] != OK}
    return ({(point_key(r), r.get("round") or 0) for r in settled}
            | {(key, i) for key in failed for i in range(MAX_ROUNDS)})


class PointRunner:
    """Measures points on one device and turns each outcome into a record."""

    def __init__(self, device: torch.device, run_id: str, config: SweepConfig, nvml_csv: Optional[Path]):
        self.device = device
        self.run_id = run_id
        self.config = config
        self.nvml_csv = nvml_csv
        self.device_name = rec.device_name(device)
        # A point's timed budget and its least repetitions are shared among its rounds; the call
        # that checks the output is the first warm-up, so one more call warms it.
        self.timer = Timer(device, budget_s=config.point_budget_s / config.rounds, warmup_reps=1,
                           min_reps=math.ceil(MIN_REPS / config.rounds), l2_flush=config.l2_flush)
        self.free_memory = config.free_memory or (lambda: free_bytes(device))
        self._oom_at: dict = {}     # (kernel, mode) -> shortest seq_len that ran out of memory

    def run(self, point: Point, energy: bool = True) -> dict:
        """One point's record, whatever happens short of Ctrl-C; `energy`: read the energy
        counter over a window of back-to-back calls (one round of a point is enough)."""
        why_not = support_reason(point, self.device.type)
        if why_not:
            return self.record(point, UNSUPPORTED, reason=why_not)
        predicted = predicted_point_bytes(point, self.device.type)
        failed_at = self._oom_at.get((point.kernel, point.mode))
        if failed_at is not None and point.seq_len >= failed_at:
            return self.record(point, OOM, predicted_mem_bytes=predicted,
                               reason=f"not launched: ran out of memory at seq_len {failed_at}")
        free = self.free_memory()
        if free is not None and predicted > free:
            return self.record(point, OOM, predicted_mem_bytes=predicted, oom_predicted=True,
                               free_mem_bytes=free,
                               reason=f"not launched: predicted peak {_gib(predicted)} exceeds "
                                      f"{_gib(free)} free")
        return self._launch(point, predicted, free, energy)

    def _launch(self, point: Point, predicted: int, free: Optional[int], energy: bool) -> dict:
        started = time.perf_counter()
        failure = None
        try:
            fields = self.measure(point, energy)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:    # a kernel's sys.exit() is its point's failure, not the sweep's end
            failure = status_and_reason(exc)
        if failure is not None:
            # Outside the except block, so the traceback and the tensors its frames hold are gone.
            release_memory(self.device)
            status, reason = failure
            if status == OOM:
                key = (point.kernel, point.mode)
                self._oom_at[key] = min(point.seq_len, self._oom_at.get(key, point.seq_len))
            return self.record(point, status, reason=reason, predicted_mem_bytes=predicted,
                               free_mem_bytes=free, duration_s=time.perf_counter() - started)
        status = fields.pop("status", OK)
        return self.record(point, status, predicted_mem_bytes=predicted, free_mem_bytes=free,
                           duration_s=time.perf_counter() - started, **fields)

    def measure(self, point: Point, energy: bool = True) -> dict:
        """Check one point's output, then time it, sample NVML meanwhile and read energy over a
        window; return the fields (a wrong output's, with status `wrong`, untimed)."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            base = torch.cuda.memory_allocated(self.device)
        call = build_call(point, self.device)
        verdict = call.verify()
        if not verdict.ok:
            return wrong_fields(verdict)
        fn = call.run
        label = {"run_id": self.run_id, "point": point_label(point)}
        with NvmlSampler(self.device, csv_path=self.nvml_csv, label=label,
                         interval_s=self.config.nvml_interval_s) as sampler:
            self.timer.warm_up(fn)
            reset_peak_memory(self.device)   # warm-up transients (autotuning buffers) stay out of the peak
            timing = self.timer.time(fn, warm=True)
            window_s = self.config.energy_window_s if energy else 0.0
            calls = energy_calls(sampler, self.timer, fn, window_s, timing.median_ms / 1e3)
        peak = peak_memory_bytes(self.device) - base if cuda else None
        del fn, call
        return {**measured_fields(point, timing, sampler.summary(), calls, peak), **check_fields(verdict)}

    def record(self, point: Point, status: str, **fields) -> dict:
        return point_record(point, run_id=self.run_id, device=self.device_name, status=status,
                            device_type=self.device.type, l2_flush=self.timer.l2_flush, **fields)


def energy_calls(sampler: NvmlSampler, timer: Timer, fn: Callable, window_s: float, per_call_s: float) -> int:
    """Run fn back to back for `window_s` inside the sampler's energy window; the calls made
    (0, and nothing run, without NVML or a window)."""
    if not sampler.active or window_s <= 0:
        return 0
    with sampler.energy_window():
        calls, _ = timer.run_for(fn, window_s, per_call_s)
    return calls


def measured_fields(point: Point, timing: Timing, nvml: dict, energy_calls: int, peak) -> dict:
    """Timing, power and memory fields of a measured point (derived figures come later)."""
    fields = timing.as_fields()
    fields["peak_mem_bytes"] = peak
    renamed = {"samples": "nvml_samples"}
    fields.update({renamed.get(k, k): v for k, v in nvml.items() if k not in ("nvml_reason", "energy_j")})
    energy_j = nvml.get("energy_j")
    if energy_j is not None and energy_calls:
        fields["energy_j"] = energy_j / energy_calls
        fields["energy_calls"] = energy_calls
    return fields


def point_record(point: Point, *, run_id: str, device: str, device_type: str, status: str = OK,
                 **fields) -> dict:
    """A complete record for a point: its shapes, work, and figures derived from its time."""
    work = {"flops": flops(point), "bytes": bytes_moved(point)}
    if "predicted_mem_bytes" not in fields:
        fields["predicted_mem_bytes"] = predicted_point_bytes(point, device_type)
    fields.setdefault("harness", "sweep")
    if point.mode == DECODE:
        fields = {**cache_fields(point), **fields}
    median_ms = fields.get("median_ms")
    if status == OK and median_ms:
        seconds = median_ms / 1e3
        work["tflops"] = work["flops"] / seconds / 1e12
        work["gbps"] = work["bytes"] / seconds / 1e9
        work["tokens_per_s"] = point.tokens_per_call / seconds
    if fields.get("energy_j") is not None:
        work["joules_per_token"] = fields["energy_j"] / point.tokens_per_call
    finished = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return rec.new_record(run_id=run_id, status=status, device=device, **point.fields(), **work,
                          device_type=device_type, **fields, tokens_per_call=point.tokens_per_call, time=finished)


def cache_fields(point: Point) -> dict:
    """What a decode record says of its cache beyond the point fields: its lengths' min, median
    and max, and the pages a paged cache holds."""
    return {**lengths_summary(point.cache_lengths()), **({"pages": cache_pages(point)} if point.page_size else {})}


def point_label(point: Point) -> str:
    return f"{point.mode}/{point.kernel}/{seq_len_label(point.seq_len)}"


def predicted_point_bytes(point: Point, device_type: str) -> Optional[int]:
    """`predicted_peak_bytes` with the working memory point.kernel declares on this device
    type; None for a kernel the registry does not know."""
    from attnlab.kernels import get

    try:
        impl = get(point.kernel)
    except ValueError:
        return None
    return predicted_peak_bytes(point, impl.attention_memory(device_type))


def support_reason(point: Point, device_type: str) -> str:
    """Why `point.kernel` cannot run this point here, or "" when it can."""
    from attnlab.kernels import get

    try:
        impl = get(point.kernel)
    except ValueError as exc:
        return str(exc)
    checks = [lambda: impl.available(device_type),
              lambda: impl.supports(point.mode, point.torch_dtype, point.head_dim, device_type),
              lambda: impl.takes(point.variant, varlen=point.docs > 1, mode=point.mode)]
    if point.mode == DECODE:
        checks.append(lambda: impl.takes_cache(point.torch_dtype, point.page_size, point.kv_torch_dtype))
    for check in checks:
        status = check()
        if not status:
            return status.reason
    return ""


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


# --- calibration ----------------------------------------------------------------------

def calibrate(device, run_id: str, timer: Timer) -> list[dict]:
    """What this GPU achieves: a bf16 matmul (TFLOP/s) and a device-to-device copy (GB/s)."""
    name = rec.device_name(device)
    out = []
    for kernel, measure in (("matmul-bf16", _matmul), ("copy-d2d", _copy)):
        try:
            out.append(measure(device, run_id, timer, name, kernel))
        except Exception as exc:   # calibration is context, never a reason to stop
            failure = describe(exc)
            release_memory(device)
            out.append(rec.new_record(run_id=run_id, kernel=kernel, mode=CALIBRATION, status=ERROR,
                                      reason=failure, device=name, harness="sweep"))
    return out


def _matmul(device, run_id, timer, name, kernel) -> dict:
    n = MATMUL_N
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    timing = timer.time(lambda: a @ b)
    work = 2.0 * n ** 3
    return rec.new_record(run_id=run_id, kernel=kernel, mode=CALIBRATION, workload=f"{n}x{n}x{n}",
                          dtype="bfloat16", device=name, flops=work, bytes=3 * n * n * 2,
                          tflops=work / (timing.median_ms / 1e3) / 1e12, harness="sweep", **timing.as_fields())


def _copy(device, run_id, timer, name, kernel) -> dict:
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    timing = timer.time(lambda: dst.copy_(src))
    moved = 2 * COPY_BYTES     # each byte read once and written once
    return rec.new_record(run_id=run_id, kernel=kernel, mode=CALIBRATION, workload=f"{COPY_BYTES} bytes",
                          device=name, bytes=moved, gbps=moved / (timing.median_ms / 1e3) / 1e9,
                          harness="sweep", **timing.as_fields())
