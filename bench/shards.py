"""A sweep split across processes: shards of its points, one file each.

The points are cut along (mode, seq_len): every kernel of one length lands in one shard, so
each run still sets the kernels side by side under one set of conditions. The groups go to
the shards by predicted cost, heaviest first to the least loaded (LPT), which is
deterministic, so `--shard 0/2` and `--shard 1/2` of one sweep, run anywhere, measure every
point exactly once. Each shard writes its own file (`out.shard-0-of-2.jsonl`, or
`out.rank0.jsonl` under torchrun), so no two processes append to one file; the analysis
reads them side by side. bench/jobs.py runs the shards through submitit.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
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


# What torchrun sets for every rank (it sets more, such as LOCAL_WORLD_SIZE and TORCHELASTIC_RUN_ID;
# these five are what a rank needs to join the group and find its GPU, and what any launcher sets).
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Those that would make a process measure only its share of the points.
RANK_VARIABLES = LAUNCH_VARIABLES[:3]


def torchrun_launch(environ=None) -> tuple[Launch | None, str]:
    """(the Launch torchrun's variables describe, "") where a launcher set all LAUNCH_VARIABLES;
    (None, why they were ignored) where only some are set, as a stray RANK or WORLD_SIZE left in
    a shell would be; (None, "") where none of RANK_VARIABLES is set."""
    environ = os.environ if environ is None else environ
    present = [name for name in LAUNCH_VARIABLES if environ.get(name, "").strip()]
    if len(present) < len(LAUNCH_VARIABLES):
        if not any(name in present for name in RANK_VARIABLES):
            return None, ""
        missing = [name for name in LAUNCH_VARIABLES if name not in present]
        return None, (f"ignoring {_names(present)} from the environment: a launcher such as torchrun sets "
                      f"{_names(LAUNCH_VARIABLES)} together, and {_names(missing)} "
                      f"{'is' if len(missing) == 1 else 'are'} not set")
    try:
        launch = Launch(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ["LOCAL_RANK"]))
    except ValueError:
        raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers, got {environ['RANK']!r}, "
                         f"{environ['WORLD_SIZE']!r}, {environ['LOCAL_RANK']!r}") from None
    if not 0 <= launch.rank < launch.world:
        raise ValueError(f"RANK {launch.rank} is not in [0, WORLD_SIZE {launch.world})")
    return launch, ""


def _names(names) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
