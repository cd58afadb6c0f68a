"""Ring attention measured across ranks, one record per context length: what `attnlab ring` runs
under torchrun.

    torchrun --nproc-per-node 8 -m attnlab ring --seq-lens 4k,16k --out runs/ring.jsonl

Each rank holds its shard of random q, k, v of the workload's shapes, in the flash-attn layout
(batch, seq_len / world, heads, head_dim), at each total context length. It warms up, times
repetitions of `ring_attention_with_stats`, then times the ring's communication alone (the same
batch_isend_irecv passes of the same K/V blocks, no attention between them), so that the record
can say how much of that communication the attention hid. Rank 0 gathers every rank's figures
and alone writes the file; the ring moves at the pace of its slowest rank, so a record holds
that rank's time.

A length that fails before any block travels (one the ranks cannot cut evenly, inputs or a
block's attention that do not fit) is recorded with its status and the run goes on. A failure
inside the ring is recorded too, but the lengths after it are recorded `skipped`: its transfers
may still be in flight. A rank that dies or is stuck leaves its peers waiting at most the
process group's timeout (`RingConfig.timeout_s`): then they raise `RingBroken`, naming the rank
and the timeout, rank 0 having recorded the length with that reason.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from attnlab.bench import records as rec
from attnlab.bench.device import check_device, release_memory, synchronize
from attnlab.bench.outcomes import status_and_reason
from attnlab.bench.shards import Launch, torchrun_launch
from attnlab.bench.timer import Timing
from attnlab.bench.workloads import DTYPES, Workload
from attnlab.distributed import LAYOUTS, ring_attention_with_stats
from attnlab.kernels.impls import naive
from attnlab.schema import ERROR, OK, RING, SKIPPED

KERNEL = "ring-naive"          # the ring over naive's prefill_lse, the local attention it merges by
BACKENDS = {"cpu": "gloo", "cuda": "nccl"}
USAGE = "torchrun --nproc-per-node W -m attnlab ring --seq-lens 4k,16k --out runs/ring.jsonl"


@dataclass
class RingConfig:
    """What to measure: `workload`'s shapes at `seq_lens` total tokens (None: its own lengths),
    on `device` "cpu" (gloo) or "cuda" (NCCL, each rank on cuda:LOCAL_RANK), the sequence cut as
    `layout` says; `reps` timed repetitions after `warmup_reps` untimed ones. `timeout_s` is the
    process group's timeout: how long a rank waits for a dead or stuck peer before giving up."""

    workload: Workload
    out: Path = Path("attnlab-ring.jsonl")
    seq_lens: Optional[list] = None
    device: str = "cpu"
    layout: str = "zigzag"
    reps: int = 5
    warmup_reps: int = 2
    argv: Optional[list] = None
    timeout_s: float = 600.0


@dataclass
class RingResult:
    """What a run did. On rank 0 `records` holds what it wrote; the other ranks hold none."""

    out: Path
    run_id: str
    rank: int
    world: int
    records: list = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)


class RingBroken(RuntimeError):
    """The ranks lost each other: a peer died, or did not answer within the process group's timeout."""


def require_launch(environ=None) -> Launch:
    """Where torchrun placed this process; ValueError saying to run under torchrun where it did not
    (torchrun's variables absent, or only some of them set)."""
    launch, ignored = torchrun_launch(environ)
    if launch is None:
        found = ignored or "RANK and WORLD_SIZE are not set"
        raise ValueError(f"torchrun: the ring needs one process per rank, and {found}; run it under torchrun: {USAGE}")
    environ = os.environ if environ is None else environ
    if environ.get("MASTER_PORT") == "0":
        # torchrun --master-port 0 binds a free port for its own store but tells the ranks 0, where
        # they would wait for each other until the rendezvous timed out.
        raise ValueError("torchrun: --master-port 0 leaves the ranks no port to meet on; give torchrun "
                         "--standalone (it picks a free port) or a free --master-port")
    return launch


def check_config(config: RingConfig) -> None:
    """ValueError naming the setting the ring cannot run; the same on every rank."""
    w = config.workload
    if config.layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {', '.join(LAYOUTS)}, got {config.layout!r}")
    if config.device not in BACKENDS:
        raise ValueError(f"device: the ring runs on cpu (gloo) or cuda (NCCL, cuda:LOCAL_RANK), got {config.device!r}")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' asked for, but torch sees no CUDA device")
    if w.window or w.softcap or w.docs > 1:
        raise ValueError(f"workload: the ring attends without a window, softcap or packed documents; {w.name} has "
                         f"window {w.window}, softcap {w.softcap:g}, docs {w.docs}")
    if not config.timeout_s > 0:
        raise ValueError(f"timeout: expected a number of seconds > 0, got {config.timeout_s!r}")
    if config.reps < 1 or config.warmup_reps < 0:
        raise ValueError(f"reps: expected at least 1 timed and 0 or more warm-up repetitions, got {config.reps} "
                         f"and {config.warmup_reps}")


def run_ring(config: RingConfig, launch: Launch) -> RingResult:
    """Measure every length on every rank; rank 0 appends one record per length to config.out.
    Joins the process group (this process's one), and leaves it at the end."""
    check_config(config)
    device = _join(config, launch)
    try:
        return _Run(config, device).all_lengths()
    finally:
        dist.destroy_process_group()


def _join(config: RingConfig, launch: Launch) -> torch.device:
    """Join the process group with config.timeout_s as its timeout; RingBroken where the ranks do
    not all arrive within it."""
    timeout = _dt.timedelta(seconds=config.timeout_s)
    if config.device == "cpu":
        device = torch.device("cpu")
        options = {}
    else:
        device = check_device(f"cuda:{launch.local_rank}")
        torch.cuda.set_device(device)
        # NCCL's wait() returns at once and holds back only the GPU's stream; a blocking wait makes the
        # ring's wait_s the time the rank waited for its block rather than the time to queue the wait,
        # and makes a collective that outlives the timeout raise here rather than abort the process.
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
        options = {"device_id": device}
    try:
        dist.init_process_group(BACKENDS[config.device], timeout=timeout, **options)
    except RuntimeError as exc:     # the store's and the backends' errors (DistError) are RuntimeErrors
        raise RingBroken(_broken(launch.rank, launch.world, "joining the process group", config.timeout_s,
                                 exc)) from None
    return device


def _broken(rank: int, world: int, what: str, timeout_s: float, exc: BaseException) -> str:
    """Why a rank gave up on its peers, on one line."""
    cause = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return (f"rank {rank} of {world} gave up {what}: a rank died or did not answer within the process group's "
            f"timeout of {timeout_s:g} s (--timeout): {type(exc).__name__}: {cause}")


# --- across ranks ---------------------------------------------------------------------------------

def _attempt(fn):
    """(fn(), None), or (None, (status, reason)) where it raised: the failure the ranks then agree on."""
    try:
        return fn(), None
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        return None, status_and_reason(exc)


def _agree(failure) -> list:
    """Every rank's failure, as (rank, status, reason), on every rank: all go on, or none does."""
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, failure)
    return [(rank, *f) for rank, f in enumerate(every) if f is not None]


def _from_rank0(value):
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def ring_passes(block: torch.Tensor, world: int, rank: int) -> None:
    """The ring's communication alone: W-1 steps that each send the block in hand to the next rank
    and receive the previous rank's, as ring_attention does, with no attention between them."""
    send_to, recv_from = (rank + 1) % world, (rank - 1) % world
    spare = torch.empty_like(block)
    for _ in range(world - 1):
        for request in dist.batch_isend_irecv([dist.P2POp(dist.isend, block, send_to),
                                               dist.P2POp(dist.irecv, spare, recv_from)]):
            request.wait()
        block, spare = spare, block


# --- one run ----------------------------------------------------------------------------------------

class _Run:
    """One run over the lengths, on one rank."""

    def __init__(self, config: RingConfig, device: torch.device):
        self.config, self.device = config, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.workload = config.workload
        run_id = rec.new_run_id() if self.rank == 0 else None
        self.run_id = self._together("starting the run", lambda: _from_rank0(run_id))
        self.device_name = rec.device_name(device)
        self.broken = None           # why lengths are no longer run, after a failure inside the ring

    def all_lengths(self) -> RingResult:
        result = RingResult(Path(self.config.out), self.run_id, self.rank, self.world)
        writer = self._open()
        try:
            if writer:
                writer.write(self._environment())
            for seq_len in self.config.seq_lens or self.workload.seq_lens:
                try:
                    record = self._length(seq_len)
                except RingBroken as exc:     # the ranks cannot go on together: rank 0 says where it stopped
                    if writer:
                        self._keep(writer, result, self._record(seq_len, ERROR, reason=str(exc)))
                    raise
                if writer:
                    self._keep(writer, result, record)
        finally:
            if writer:
                writer.close()
        return result

    @staticmethod
    def _keep(writer, result: RingResult, record: dict) -> None:
        writer.write(record)
        result.records.append(record)
        result.counts[record["status"]] += 1

    def _together(self, what: str, collective):
        """collective(), where every rank must take part; RingBroken naming this rank and the timeout
        where a peer has died or does not answer within it (gloo and NCCL raise RuntimeErrors)."""
        try:
            return collective()
        except RuntimeError as exc:
            raise RingBroken(_broken(self.rank, self.world, what, self.config.timeout_s, exc)) from None

    def _agree(self, failure, seq_len: int) -> list:
        """Every rank's failure at seq_len (see `_agree`); where the ranks cannot meet, RingBroken also
        holds this rank's own failure, often the first sign of a peer's (a receive that timed out)."""
        try:
            return self._together(f"at seq_len {seq_len}", lambda: _agree(failure))
        except RingBroken as exc:
            if failure is None:
                raise
            raise RingBroken(f"{exc}; before that, this rank's ring failed: {failure[1]}") from None

    def _open(self):
        """Rank 0's RecordWriter; every rank raises the reason where rank 0 cannot hold the file."""
        writer, failure = None, None
        if self.rank == 0:
            try:
                writer = rec.RecordWriter(self.config.out)
            except (OSError, ValueError) as exc:
                failure = str(exc)
        try:
            failure = self._together("opening the output", lambda: _from_rank0(failure))
        except RingBroken:
            if writer:
                writer.close()
            raise
        if failure:
            raise ValueError(failure)
        return writer

    def _environment(self) -> dict:
        env = rec.environment(self.config.argv, device=self.device, run_id=self.run_id)
        env.update(harness="ring", world=self.world, layout=self.config.layout,
                   workload_config=dataclasses.asdict(self.workload))
        return env

    def _length(self, seq_len: int) -> Optional[dict]:
        """One length on every rank: rank 0's record of it (None elsewhere)."""
        started = time.perf_counter()
        if self.broken:
            return self._record(seq_len, SKIPPED, reason=self.broken)
        inputs, failure = _attempt(lambda: self._prepare(seq_len))
        failures = self._agree(failure, seq_len)
        if not failures:
            measured, failure = _attempt(lambda: self._measure(*inputs))
            del inputs
            failures = self._agree(failure, seq_len)
            if failures:
                self.broken = f"not run: the ring failed at seq_len {seq_len}, its transfers perhaps in flight"
        else:
            del inputs
        release_memory(self.device)
        if failures:
            return self._failed(seq_len, failures, time.perf_counter() - started)
        every = [None] * self.world if self.rank == 0 else None
        self._together(f"gathering seq_len {seq_len}", lambda: dist.gather_object(measured, every, dst=0))
        return self._measured(seq_len, every, time.perf_counter() - started) if self.rank == 0 else None

    # --- measuring -------------------------------------------------------------------------------

    def _prepare(self, seq_len: int) -> tuple:
        """This rank's q (B, n/W, H, D), k and v (B, n/W, KVH, D), random, after one attention over
        a whole block: the largest a step attends, so a length that does not fit fails here,
        before any transfer starts."""
        pieces = self.world * (2 if self.config.layout == "zigzag" else 1)
        if seq_len % pieces:
            raise ValueError(f"seq_len: the {self.config.layout} layout cuts the sequence into {pieces} equal chunks "
                             f"for {self.world} ranks; expected a multiple of {pieces}, got {seq_len}")
        w, n = self.workload, seq_len // self.world
        gen = torch.Generator(device=self.device).manual_seed(seq_len * self.world + self.rank)
        kw = dict(dtype=DTYPES[w.dtype], device=self.device, generator=gen)
        b = w.batch_for(seq_len)
        q, k, v = (torch.randn(b, n, heads, w.head_dim, **kw) for heads in (w.heads, w.kv_heads, w.kv_heads))
        naive.prefill_lse(q, k, v, False, w.head_dim ** -0.5)
        synchronize(self.device)
        return q, k, v

    def _measure(self, q, k, v) -> dict:
        """Times (ms) of the ring and of its communication alone, and the ring's per-step stats."""
        ring = lambda: ring_attention_with_stats(q, k, v, causal=self.workload.causal, layout=self.config.layout)
        block = torch.stack((k, v)).contiguous()
        passes = lambda: ring_passes(block, self.world, self.rank)
        for _ in range(self.config.warmup_reps):
            ring()
        passes()
        measured = {"times_ms": [], "compute_ms": [], "wait_ms": [], "comm_ms": []}
        for _ in range(self.config.reps):
            elapsed_ms, (_, stats) = self._timed(ring)
            measured["times_ms"].append(elapsed_ms)
            measured["compute_ms"].append([s * 1e3 for s in stats.compute_s])
            measured["wait_ms"].append([s * 1e3 for s in stats.wait_s])
            measured["sent_bytes"] = stats.total_sent_bytes
        for _ in range(self.config.reps):
            measured["comm_ms"].append(self._timed(passes)[0])
        return measured

    def _timed(self, fn) -> tuple:
        """(ms, fn()) on this rank, every rank starting together."""
        dist.barrier()
        start = time.perf_counter()
        value = fn()
        synchronize(self.device)
        return (time.perf_counter() - start) * 1e3, value

    # --- records ---------------------------------------------------------------------------------

    def _measured(self, seq_len: int, every: list, duration_s: float) -> dict:
        """The record of a length every rank measured.

        times_ms: per repetition the slowest rank's time (the ring waits for it); compute_ms,
        wait_ms and per_step (per step: compute_ms, wait_ms) are the medians over repetitions on
        the rank slowest at the median (`slowest_rank`); comm_alone_ms: the median over
        repetitions of the slowest rank's time for the same passes with no attention.
        hidden_fraction = 1 - wait_ms / comm_alone_ms, clamped to [0, 1]: how much of the
        communication the attention hid (None with one rank, where nothing travels). wait_ms also
        holds time spent waiting for a slower peer's attention, so where compute is uneven
        (causal, contiguous) it understates what was hidden.
        """
        timing = Timing.from_times([max(r["times_ms"][i] for r in every) for i in range(self.config.reps)],
                                   warmup_reps=self.config.warmup_reps)
        slowest = max(range(self.world), key=lambda r: statistics.median(every[r]["times_ms"]))
        mine = every[slowest]
        steps = list(zip(*mine["compute_ms"])), list(zip(*mine["wait_ms"]))
        per_step = [{"compute_ms": statistics.median(c), "wait_ms": statistics.median(w)} for c, w in zip(*steps)]
        compute_ms = statistics.median(sum(rep) for rep in mine["compute_ms"])
        wait_ms = statistics.median(sum(rep) for rep in mine["wait_ms"])
        comm_ms = statistics.median(max(r["comm_ms"][i] for r in every) for i in range(self.config.reps))
        hidden = min(1.0, max(0.0, 1.0 - wait_ms / comm_ms)) if self.world > 1 and comm_ms > 0 else None
        sent, seconds = mine["sent_bytes"], timing.median_ms / 1e3
        w = self.workload
        return self._record(
            seq_len, OK, times_ms=timing.times_ms, median_ms=timing.median_ms, p10_ms=timing.p10_ms,
            p90_ms=timing.p90_ms, tflops=self._flops(seq_len) / seconds / 1e12, gbps=sent / seconds / 1e9,
            tokens_per_s=w.batch_for(seq_len) * seq_len / seconds, sent_bytes_per_rank=sent, compute_ms=compute_ms,
            wait_ms=wait_ms, comm_alone_ms=comm_ms, hidden_fraction=hidden, per_step=per_step,
            comm_gbps=sent / (comm_ms / 1e3) / 1e9 if sent and comm_ms > 0 else None, slowest_rank=slowest,
            reps=timing.reps, warmup_reps=timing.warmup_reps, duration_s=duration_s)

    def _failed(self, seq_len: int, failures: list, duration_s: float) -> Optional[dict]:
        rank, status, reason = failures[0]
        others = f" (also rank {', '.join(str(f[0]) for f in failures[1:])})" if len(failures) > 1 else ""
        return self._record(seq_len, status, reason=f"rank {rank}: {reason}{others}"[:2000], duration_s=duration_s)

    def _record(self, seq_len: int, status: str, **fields) -> Optional[dict]:
        """A record of a length with its shapes and work (rank 0; None elsewhere). flops: attention
        over the whole context, 4 x batch x heads x seq_len^2 x head_dim, halved for causal; bytes:
        the K/V blocks each rank sends, (world - 1) of them."""
        if self.rank != 0:
            return None
        w = self.workload
        blocks = self.world - 1
        block_bytes = 2 * w.batch_for(seq_len) * (seq_len // self.world) * w.kv_heads * w.head_dim
        extras = {"world": self.world, "layout": self.config.layout}
        if status != OK:
            extras["sent_bytes_per_rank"] = None
        finished = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        return rec.new_record(
            run_id=self.run_id, kernel=KERNEL, mode=RING, workload=self._workload_name(), batch=w.batch_for(seq_len),
            heads=w.heads,
            kv_heads=w.kv_heads, head_dim=w.head_dim, dtype=w.dtype, causal=w.causal, seq_len=seq_len, q_len=seq_len,
            status=status, flops=self._flops(seq_len), bytes=blocks * block_bytes * DTYPES[w.dtype].itemsize,
            device=self.device_name, **extras, **fields, tokens_per_device=seq_len // self.world,
            device_type=self.device.type, harness="ring", time=finished)

    def _workload_name(self) -> str:
        # The ring's size and layout change what is measured: named in the workload, as a sweep's
        # overrides are, so that runs of another ring never stand for these points.
        return f"{self.workload.name}[ring={self.world},layout={self.config.layout}]"

    def _flops(self, seq_len: int) -> float:
        w = self.workload
        return 4.0 * w.batch_for(seq_len) * w.heads * seq_len ** 2 * w.head_dim / (2 if w.causal else 1)
