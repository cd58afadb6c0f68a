"""A sweep split across processes: shards of its points, one file each.

The points are cut along (mode, seq_len): every kernel of one length lands in one shard, so
each run still sets the kernels side by side under one set of conditions. The groups go to
the shards by predicted cost, heaviest first to the least loaded (LPT), which is
deterministic, so `--shard 0/2` and `--shard 1/2` of one sweep, run anywhere, measure every
point exactly once. Each shard writes its own file (`out.shard-0-of-2.jsonl`, or
`out.rank0.jsonl` under torchrun), so no two processes append to one file; the analysis
reads them side by side.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from attnlab.bench.workloads import Point, bytes_moved, flops

# FLOPs per byte at which a kernel turns from memory- to compute-bound on current GPUs (an
# H100: 989 TFLOP/s over 3.35 TB/s, about 300): a point costs the larger of its FLOPs and
# this many times its bytes, which orders prefill and decode points on one scale.
RIDGE_FLOPS_PER_BYTE = 300.0


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0-based)."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def path(self, out) -> Path:
        """This shard's file beside `out`: run.jsonl -> run.shard-0-of-2.jsonl."""
        out = Path(out)
        return out.with_name(f"{out.name.removesuffix('.jsonl')}.shard-{self.index}-of-{self.count}.jsonl")


def parse_shard(text: str) -> Shard:
    """'0/2' -> Shard(0, 2); ValueError naming `shard` otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match or not int(match.group(1)) < int(match.group(2)):
        raise ValueError(f"shard: expected I/N with 0 <= I < N, e.g. 0/2, got {text!r}")
    return Shard(int(match.group(1)), int(match.group(2)))


def predicted_cost(point: Point) -> float:
    return max(flops(point), RIDGE_FLOPS_PER_BYTE * bytes_moved(point))


def partition(points: list, count: int) -> list[list]:
    """`count` lists of the points, each in the order given; see the module docstring."""
    groups: dict = {}
    for point in points:
        groups.setdefault((point.mode, point.seq_len), []).append(point)
    heaviest_first = sorted(groups.items(), key=lambda item: (-sum(map(predicted_cost, item[1])), item[0]))
    loads, owner = [0.0] * count, {}
    for key, members in heaviest_first:
        target = min(range(count), key=lambda i: (loads[i], i))
        loads[target] += sum(map(predicted_cost, members))
        owner[key] = target
    return [[p for p in points if owner[(p.mode, p.seq_len)] == i] for i in range(count)]


@dataclass(frozen=True)
class Launch:
    """Where torchrun placed this process: its rank among `world` and its GPU on the node."""

    rank: int
    world: int
    local_rank: int

    @property
    def shard(self) -> Shard:
        return Shard(self.rank, self.world)

    def path(self, out) -> Path:
        out = Path(out)
        return out.with_name(f"{out.name.removesuffix('.jsonl')}.rank{self.rank}.jsonl")


def torchrun_launch(environ=None) -> Launch | None:
    """The Launch torchrun's variables describe (RANK, WORLD_SIZE, LOCAL_RANK), or None."""
    environ = os.environ if environ is None else environ
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        return None
    try:
        launch = Launch(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers, got {environ['RANK']!r}, "
                         f"{environ['WORLD_SIZE']!r}, {environ.get('LOCAL_RANK')!r}") from None
    if not 0 <= launch.rank < launch.world:
        raise ValueError(f"RANK {launch.rank} is not in [0, WORLD_SIZE {launch.world})")
    return launch


@dataclass
class Outcome:
    """What one submitted shard did: its file, run and record counts, or why it failed."""

    shard: Shard
    job_id: str
    out: Path
    run_id: str = ""
    counts: dict = field(default_factory=dict)
    error: str = ""


def run_shard(config) -> dict:
    """One shard's sweep, as a submitted task runs it (a top-level function, so it pickles)."""
    from attnlab.bench.sweep import run_sweep

    result = run_sweep(config)
    return {"run_id": result.run_id, "counts": dict(result.counts)}


def submit(config, shards: int, executor: str, *, partition: str | None = None, timeout_min: int = 60,
           folder=None) -> list[Outcome]:
    """Run `shards` shards of the sweep `config` describes through submitit: a SLURM job array
    (`executor` "slurm"), or processes on this machine ("local"); wait for them all. Each task
    writes its shard's file beside config.out; submitit's logs go to `folder` (default
    OUT.submitit/ beside it)."""
    submitit = _submitit()
    out = Path(config.out)
    folder = Path(folder or out.with_name(out.name.removesuffix(".jsonl") + ".submitit"))
    runner = submitit.AutoExecutor(folder=folder, cluster="local" if executor == "local" else "slurm")
    gpus = 1 if config.device.startswith("cuda") else 0
    runner.update_parameters(timeout_min=timeout_min, gpus_per_node=gpus, tasks_per_node=1, nodes=1,
                             slurm_array_parallelism=shards, **({"slurm_partition": partition} if partition else {}))
    plans = [dataclasses.replace(config, shard=Shard(i, shards), out=Shard(i, shards).path(out), free_memory=None,
                                 device="cuda" if gpus else config.device) for i in range(shards)]
    jobs = runner.map_array(run_shard, plans)
    return [_outcome(job, plan) for job, plan in zip(jobs, plans)]


def _outcome(job, plan) -> Outcome:
    outcome = Outcome(plan.shard, str(job.job_id), Path(plan.out))
    try:
        done = job.result()
    except Exception as exc:     # a failed task is reported with its error; the others stand
        outcome.error = " ".join(str(exc).split())[:500]
        return outcome
    outcome.run_id, outcome.counts = done["run_id"], done["counts"]
    return outcome


def _submitit():
    try:
        import submitit
    except ImportError:
        raise ValueError("executor: needs submitit; install attnlab[slurm] (pip install submitit)") from None
    return submitit
