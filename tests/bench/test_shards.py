"""A sweep across processes: shards that partition the points by whole lengths, torchrun
ranks that each take one, and submitit's local executor running the same path a SLURM job
array would. Every point is measured once, into one file per process."""
import collections
import os
import subprocess
import sys
import traceback

import pytest

from attnlab.bench import records as rec
from attnlab.bench import jobs, shards
from attnlab.bench.sweep import SweepConfig, plan
from attnlab.bench.workloads import preset
from attnlab.cli import main
from paths import ROOT

QUICK = ["--device", "cpu", "--rounds", "1", "--workload", "cpu-small", "--kernels", "naive,sdpa-flash",
         "--seq-lens", "128,256,512"]


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


LAUNCHED = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_torchrun_variables_give_the_rank_its_shard_and_its_file():
    launch, ignored = shards.torchrun_launch(LAUNCHED)
    assert launch.shard == shards.Shard(1, 4) and launch.path("d/sweep.jsonl").name == "sweep.rank1.jsonl"
    assert ignored == ""
    assert shards.torchrun_launch({}) == (None, "")
    assert shards.torchrun_launch({"MASTER_ADDR": "node7", "MASTER_PORT": "29500"}) == (None, "")   # no rank
    with pytest.raises(ValueError, match="RANK 4 is not in"):
        shards.torchrun_launch(dict(LAUNCHED, RANK="4"))


@pytest.mark.parametrize("missing", ["LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"])
def test_part_of_torchruns_variables_is_ignored_and_the_reason_names_them(missing):
    environ = {name: value for name, value in LAUNCHED.items() if name != missing}
    launch, ignored = shards.torchrun_launch(environ)
    assert launch is None
    assert ignored.startswith("ignoring ") and f"{missing} is not set" in ignored
    assert all(name in ignored.split(":")[0] for name in environ)     # names what it ignored


def test_a_stray_rank_without_a_launcher_leaves_the_sweep_whole(tmp_path, monkeypatch, capsys):
    for name in shards.LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    out = tmp_path / "sweep.jsonl"
    assert main(["sweep", *QUICK, "--out", str(out)]) == 0
    assert [f.name for f in tmp_path.glob("*.jsonl")] == ["sweep.jsonl"]       # not sweep.rank1.jsonl
    counts = measured([out])
    assert len(counts) == 12 and set(counts.values()) == {1}
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "RANK and WORLD_SIZE" in warnings[0] and "LOCAL_RANK" in warnings[0]


# --- tasks an executor runs -------------------------------------------------------------------------

def _trace(exc: BaseException) -> str:
    """The traceback text submitit's task sends back for an exception raised there."""
    try:
        raise exc
    except BaseException:
        return traceback.format_exc()


def _failed_job_message(trace: str) -> str:
    """submitit's FailedJobError message around a task's traceback (submitit/core/core.py)."""
    return (f"Job (task=0) failed during processing with trace:\n----------------------\n{trace}\n"
            "----------------------\nYou can check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at paths:\n"
            "  - /runs/sweep.submitit/1_0_log.err\n  - /runs/sweep.submitit/1_0_log.out")


def test_a_task_failure_keeps_its_exception_whole_on_one_line():
    long = "out: " + "x" * 700
    assert jobs.task_error(_failed_job_message(_trace(ValueError(long)))) == f"ValueError: {long}"
    chained = _trace_of_chained()
    assert jobs.task_error(_failed_job_message(chained)) == "OSError: raised in the handler, over two lines"


def _trace_of_chained() -> str:
    try:
        try:
            raise RuntimeError("first")
        except RuntimeError:
            raise OSError("raised in the handler,\nover two lines")     # the one raised last is the reason
    except OSError:
        return traceback.format_exc()


def test_a_task_that_never_finished_says_so():
    message = ("Job 7 (task: 0) with path /runs/7_0_result.pkl\nhas not produced any output (state: TIMEOUT)\n"
               "Error stream produced:\n----------------------------------------\nslurmstepd: error: *** CANCELLED ***")
    assert jobs.task_error(message) == ("Job 7 (task: 0) with path /runs/7_0_result.pkl has not produced any "
                                          "output (state: TIMEOUT)")


class _Job:
    def __init__(self, index, error=None):
        self.job_id, self.error = f"7_{index}", error

    def result(self):
        if self.error:
            raise RuntimeError(self.error)
        return {"run_id": "r", "counts": {"ok": 1}}


class _Executor:
    """Stands in for submitit.AutoExecutor: keeps what each task would be called with."""
    calls = []

    def __init__(self, folder, cluster):
        self.cluster = cluster

    def update_parameters(self, **parameters):
        pass

    def map_array(self, fn, *columns):
        _Executor.calls = list(zip(*columns))
        return [_Job(i, _failed_job_message(_trace(ValueError("kernel-module: no"))) if i else None)
                for i in range(len(_Executor.calls))]


def test_tasks_get_the_launchers_plugins_as_absolute_paths(tmp_path, monkeypatch):
    from attnlab.kernels import ENV_VAR

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(jobs, "_submitit", lambda: type("submitit", (), {"AutoExecutor": _Executor}))
    config = SweepConfig(workload=preset("cpu-small"), device="cpu", out=tmp_path / "sweep.jsonl")
    outcomes = jobs.submit(config, 2, "slurm", kernel_modules=["mine.py", "plugins/more", "my_pkg.kernels"],
                           environ={ENV_VAR: f"env.py{os.pathsep}my_pkg.other"}, plugin_timeout_s=5.0)
    for _, modules, env_modules, timeout_s in _Executor.calls:
        assert timeout_s == 5.0
        assert modules == [str(tmp_path / "mine.py"), str(tmp_path / "plugins" / "more"), "my_pkg.kernels"]
        assert env_modules == f"{tmp_path / 'env.py'}{os.pathsep}my_pkg.other"
    assert [o.error for o in outcomes] == ["", "ValueError: kernel-module: no"]
    jobs.submit(config, 1, "local", environ={})
    assert _Executor.calls[0][1:] == ([], None, None)     # none set: none in the task either


def test_a_plugin_that_fails_in_a_task_fails_the_task_naming_it(tmp_path, monkeypatch):
    from attnlab.kernels import ENV_VAR

    for name in ("flag.py", "env.py"):
        (tmp_path / name).write_text(f"raise ImportError('{name} needs a package this node lacks')\n")
    monkeypatch.setenv(ENV_VAR, "something-the-launcher-did-not-have.py")
    config = SweepConfig(workload=preset("cpu-small"), device="cpu", out=tmp_path / "sweep.jsonl")
    with pytest.raises(ValueError, match=r"^kernel-module: 2 plugin\(s\) did not load") as raised:
        jobs.run_shard(config, [str(tmp_path / "flag.py")], str(tmp_path / "env.py"))
    for name in ("flag.py", "env.py"):
        assert f"{tmp_path / name}: ImportError: {name} needs a package this node lacks" in str(raised.value)
    assert os.environ[ENV_VAR] == str(tmp_path / "env.py")       # the launcher's value, not the task's own
    assert not (tmp_path / "sweep.jsonl").exists()


PLUGIN = ["--kernel-module", "examples/chunked_attention.py", "--kernels", "naive,torch-chunked"]


def attnlab(*argv, launcher=(), env=None):
    """The command in a process of its own, from the repository's root (a plugin loaded there stays
    out of this process's registry)."""
    return subprocess.run([sys.executable, *launcher, "-m", "attnlab", *map(str, argv)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))


def assert_every_point_once_with_the_plugin(files) -> None:
    counts = measured(files)
    assert len(counts) == 12 and set(counts.values()) == {1}
    chunked = [r for f in files for r in rec.read_records(f) if r["kernel"] == "torch-chunked"]
    assert len(chunked) == 6 and {r["status"] for r in chunked} == {"ok"}      # loaded, not "unknown"


@pytest.mark.slow    # two processes started by torchrun
def test_torchrun_with_two_cpu_ranks_records_each_point_once(tmp_path):
    """Each rank parses the same command line, so loads the same plugins."""
    done = attnlab("sweep", *QUICK, *PLUGIN, "--out", tmp_path / "sweep.jsonl",
                   launcher=("-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "0"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    files = sorted(tmp_path.glob("*.jsonl"))
    assert [f.name for f in files] == ["sweep.rank0.jsonl", "sweep.rank1.jsonl"]
    assert_every_point_once_with_the_plugin(files)


@pytest.mark.slow    # tasks in processes of their own, as SLURM would run them
def test_the_submitit_local_executor_runs_every_shard_with_the_launchers_plugins(tmp_path):
    pytest.importorskip("submitit")
    done = attnlab("sweep", *QUICK, *PLUGIN, "--executor", "local", "--shards", "3", "--out", tmp_path / "sweep.jsonl")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    files = sorted(tmp_path.glob("sweep.shard-*.jsonl"))
    assert len(files) == 3
    assert_every_point_once_with_the_plugin(files)
    assert all(f"{i}/3" in done.stdout for i in range(3)) and "ok" in done.stdout


@pytest.mark.slow    # a task in a process of its own
def test_a_plugin_that_fails_in_the_task_fails_it_with_the_whole_reason(tmp_path):
    pytest.importorskip("submitit")
    plugin = tmp_path / "cluster_only.py"
    plugin.write_text("import os\nif os.environ.get('SUBMITIT_EXECUTOR'):\n"
                      f"    raise ImportError('this node lacks a package {'x' * 600}')\n")
    done = attnlab("sweep", *QUICK, "--kernel-module", plugin, "--executor", "local", "--shards", "1",
                   "--out", tmp_path / "sweep.jsonl")
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    reason = (f"ValueError: kernel-module: 1 plugin(s) did not load in this task: kernel module {plugin}: "
              f"ImportError: this node lacks a package {'x' * 600}")
    assert reason in done.stdout
    assert not list(tmp_path.glob("sweep.shard-*.jsonl"))
