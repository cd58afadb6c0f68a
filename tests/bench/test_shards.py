"""A sweep across processes: shards that partition the points by whole lengths, torchrun
ranks that each take one, and submitit's local executor running the same path a SLURM job
array would. Every point is measured once, into one file per process."""
import collections
import os
import subprocess
import sys

import pytest

from attnlab.bench import records as rec
from attnlab.bench import shards
from attnlab.bench.sweep import SweepConfig, plan
from attnlab.bench.workloads import preset
from attnlab.cli import main
from paths import ROOT

QUICK = ["--device", "cpu", "--workload", "cpu-small", "--kernels", "naive,sdpa-flash", "--seq-lens", "128,256,512"]


def measured(files) -> collections.Counter:
    """How often each point was measured across the files."""
    return collections.Counter((r["mode"], r["kernel"], r["seq_len"]) for f in files for r in rec.read_records(f))


def test_shards_partition_the_points_by_whole_lengths_and_balance_their_cost():
    config = SweepConfig(workload=preset("llama3-8b"), device="cpu", kernels=["naive", "sdpa-flash", "sdpa-math"])
    every = plan(config)
    for count in (1, 2, 3, 5):
        parts = shards.partition(every, count)
        assert sorted(p.key() for part in parts for p in part) == sorted(p.key() for p in every)
        assert parts == shards.partition(every, count)                      # the same on every machine
        for part in parts:                                                  # each length's kernels side by side
            lengths = {(p.mode, p.seq_len) for p in part}
            assert all(len([p for p in part if (p.mode, p.seq_len) == key]) == 3 for key in lengths)
        loads = sorted(sum(map(shards.predicted_cost, part)) for part in parts)
        heaviest_group = max(sum(shards.predicted_cost(p) for p in every if (p.mode, p.seq_len) == key)
                             for key in {(p.mode, p.seq_len) for p in every})
        assert loads[-1] - loads[0] <= heaviest_group                       # LPT: within one group of even


def test_two_shards_of_one_sweep_measure_every_point_once(tmp_path):
    out = tmp_path / "sweep.jsonl"
    for i in (0, 1):
        assert main(["sweep", *QUICK, "--shard", f"{i}/2", "--out", str(out)]) == 0
    files = sorted(tmp_path.glob("*.jsonl"))
    assert [f.name for f in files] == ["sweep.shard-0-of-2.jsonl", "sweep.shard-1-of-2.jsonl"]
    counts = measured(files)
    assert len(counts) == 12 and set(counts.values()) == {1}
    assert [e["shard"] for f in files for e in rec.read_environments(f)] == ["0/2", "1/2"]
    assert main(["sweep", *QUICK, "--shard", "1/2", "--out", str(out), "--resume"]) == 0     # resumes per shard
    assert measured(files) == counts


def exit_status(argv) -> int:
    """What the command exits with, whether argparse or the command itself refused."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("flags,argument", [(["--shard", "2/2"], "--shard"), (["--shard", "x"], "--shard"),
                                            (["--executor", "local"], "--shards"),
                                            (["--executor", "local", "--shards", "2", "--shard", "0/2"], "--shard")])
def test_contradictory_or_bad_flags_are_named(tmp_path, capsys, flags, argument):
    assert exit_status(["sweep", *QUICK, *flags, "--out", str(tmp_path / "s.jsonl")]) == 2
    assert argument in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_torchrun_variables_give_the_rank_its_shard_and_its_file():
    launch = shards.torchrun_launch({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert launch.shard == shards.Shard(1, 4) and launch.path("d/sweep.jsonl").name == "sweep.rank1.jsonl"
    assert shards.torchrun_launch({}) is None
    with pytest.raises(ValueError, match="RANK 4 is not in"):
        shards.torchrun_launch({"RANK": "4", "WORLD_SIZE": "4"})


@pytest.mark.slow    # two processes started by torchrun
def test_torchrun_with_two_cpu_ranks_records_each_point_once(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "0",
               "-m", "attnlab", "sweep", *QUICK, "--out", str(tmp_path / "sweep.jsonl")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    files = sorted(tmp_path.glob("*.jsonl"))
    assert [f.name for f in files] == ["sweep.rank0.jsonl", "sweep.rank1.jsonl"]
    counts = measured(files)
    assert len(counts) == 12 and set(counts.values()) == {1}


@pytest.mark.slow    # tasks in processes of their own, as SLURM would run them
def test_the_submitit_local_executor_runs_every_shard(tmp_path, capsys):
    pytest.importorskip("submitit")
    assert main(["sweep", *QUICK, "--executor", "local", "--shards", "3", "--out", str(tmp_path / "sweep.jsonl")]) == 0
    files = sorted(tmp_path.glob("sweep.shard-*.jsonl"))
    assert len(files) == 3
    counts = measured(files)
    assert len(counts) == 12 and set(counts.values()) == {1}
    table = capsys.readouterr().out
    assert all(f"{i}/3" in table for i in range(3)) and "ok" in table
