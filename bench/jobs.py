"""A sweep's shards run elsewhere, through submitit: a SLURM job array, or processes on this
machine. Each task measures one shard (bench/shards.py) into its own file, loading the plugins
the launching command loaded; a task that fails is reported with its exception, the others stand.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from attnlab.bench.shards import Shard
from attnlab.bench.sweep import run_sweep


@dataclass
class Outcome:
    """What one submitted shard did: its file, run and record counts, or why it failed."""

    shard: Shard
    job_id: str
    out: Path
    run_id: str = ""
    counts: dict = field(default_factory=dict)
    error: str = ""


def run_shard(config, kernel_modules=(), env_modules=None, plugin_timeout_s=None) -> dict:
    """One shard's sweep, as a submitted task runs it (a top-level function, so it pickles).

    The task loads the plugins the launching command loaded: ATTNLAB_KERNEL_MODULES set to
    `env_modules` (the launcher's value, unset where None) and `kernel_modules` (its
    --kernel-module list), both as `task_plugins` gives them, each within `plugin_timeout_s` (its
    --plugin-timeout). A plugin that fails to load fails the task, named: its kernels would
    otherwise be recorded as unknown.
    """
    from attnlab.kernels import ENV_VAR, load_plugins

    if env_modules is None:
        os.environ.pop(ENV_VAR, None)
    else:
        os.environ[ENV_VAR] = env_modules
    failures = load_plugins(list(kernel_modules), timeout_s=plugin_timeout_s)
    if failures:
        raise ValueError(f"kernel-module: {len(failures)} plugin(s) did not load in this task: "
                         + "; ".join(map(str, failures)))
    result = run_sweep(config)
    return {"run_id": result.run_id, "counts": dict(result.counts)}


def task_plugins(kernel_modules=(), environ=None) -> tuple[list, str | None]:
    """(kernel_modules, ATTNLAB_KERNEL_MODULES) as a task elsewhere loads them: each plugin given as a
    file made absolute, since a SLURM task's working folder may differ; module names as they are.
    The variable is passed explicitly too, as a cluster may start tasks without the caller's
    environment."""
    from attnlab.kernels import ENV_VAR

    environ = os.environ if environ is None else environ
    value = environ.get(ENV_VAR)
    if value is not None:
        value = os.pathsep.join(_absolute(part) if part.strip() else part for part in value.split(os.pathsep))
    return [_absolute(name) for name in kernel_modules], value


def _absolute(name: str) -> str:
    """A plugin named as a file (the rule load_plugins applies: a .py name, a path separator, or
    an existing path) as an absolute path; a module name as it is."""
    stripped = name.strip()
    path = Path(stripped).expanduser()
    if stripped.endswith(".py") or os.sep in stripped or path.exists():
        return str(path.absolute())
    return name


def submit(config, shards: int, executor: str, *, partition: str | None = None, timeout_min: int = 60,
           folder=None, kernel_modules=(), environ=None, plugin_timeout_s=None) -> list[Outcome]:
    """Run `shards` shards of the sweep `config` describes through submitit: a SLURM job array
    (`executor` "slurm"), or processes on this machine ("local"); wait for them all. Each task
    writes its shard's file beside config.out and loads the plugins this process loaded
    (`kernel_modules`, the --kernel-module list, and `environ`'s ATTNLAB_KERNEL_MODULES);
    submitit's logs go to `folder` (default OUT.submitit/ beside it)."""
    submitit = _submitit()
    out = Path(config.out)
    folder = Path(folder or out.with_name(out.name.removesuffix(".jsonl") + ".submitit"))
    runner = submitit.AutoExecutor(folder=folder, cluster="local" if executor == "local" else "slurm")
    gpus = 1 if config.device.startswith("cuda") else 0
    runner.update_parameters(timeout_min=timeout_min, gpus_per_node=gpus, tasks_per_node=1, nodes=1,
                             slurm_array_parallelism=shards, **({"slurm_partition": partition} if partition else {}))
    plans = [dataclasses.replace(config, shard=Shard(i, shards), out=Shard(i, shards).path(out), free_memory=None,
                                 device="cuda" if gpus else config.device) for i in range(shards)]
    modules, env_modules = task_plugins(kernel_modules, environ)
    jobs = runner.map_array(run_shard, plans, [modules] * shards, [env_modules] * shards,
                            [plugin_timeout_s] * shards)
    return [_outcome(job, plan) for job, plan in zip(jobs, plans)]


def _outcome(job, plan) -> Outcome:
    outcome = Outcome(plan.shard, str(job.job_id), Path(plan.out))
    try:
        done = job.result()
    except Exception as exc:     # a failed task is reported with its error; the others stand
        outcome.error = task_error(str(exc))
        return outcome
    outcome.run_id, outcome.counts = done["run_id"], done["counts"]
    return outcome


def task_error(message: str) -> str:
    """Why a task failed, on one line, from submitit's message: the exception that ends the last
    traceback in it (`Type: message`, every line of the message), after the message's first
    line where that says more than that the task failed (a time limit, a lost node); the
    message's opening lines where it holds no traceback."""
    lines = message.splitlines()
    head = " ".join(" ".join(_opening(lines)).split())
    exception = _last_exception(lines)
    if not exception:
        return head or " ".join(message.split())
    if "failed during processing" in head:      # the task raised: its exception is the reason
        return exception
    return f"{head}: {exception}"


def _opening(lines: list) -> list:
    """The lines before submitit's first rule of dashes or quoted log."""
    stops = [i for i, line in enumerate(lines) if _is_rule(line) or line.startswith("Error stream produced")]
    return lines[:stops[0]] if stops else lines


def _last_exception(lines: list) -> str:
    """The exception line(s) closing the last traceback in `lines`, joined on one line; '' if none."""
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if not starts:
        return ""
    body = lines[starts[-1] + 1:]
    body = body[:next((i for i, line in enumerate(body) if _is_rule(line)), len(body))]
    # Frames are indented; the exception starts at the first line that is not.
    first = next((i for i, line in enumerate(body) if line.strip() and not line[0].isspace()), None)
    return "" if first is None else " ".join(" ".join(body[first:]).split())


def _is_rule(line: str) -> bool:
    return len(line.strip()) >= 3 and set(line.strip()) == {"-"}


def _submitit():
    try:
        import submitit
    except ImportError:
        raise ValueError("executor: needs submitit; install attnlab[slurm] (pip install submitit)") from None
    return submitit
