"""The result record and its file: append-only JSON Lines, one object per line.

A file holds result lines (schema SCHEMA, one per measured point) and, once per run, an
environment line (schema ENV_SCHEMA) with the conditions of that run; both carry the
run's `run_id`. Readers of results skip lines of other schemas. Every line is flushed and
fsynced as it is written, so a run killed at any moment leaves at most one partial last
line, which readers ignore and the next writer cuts off before appending. A writer writes
only to a new file or to an attnlab one, and only one process writes a file at a time
(`RecordWriter`, `OutputLock`).
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterable, Optional

from attnlab.bench.output_file import (OutputLock, Tail, WriteFailed, check_output_path, claim_tail, open_regular,
                                       truncate_quietly, write_all)
from attnlab.schema import (ENVIRONMENT_SCHEMA, FIELDS, FINAL_STATUSES, OK, RESULT_SCHEMA, ROLE_FIELDS, STATUSES,
                            family, read_environments, read_lines, read_records)

# The record vocabulary and reader live in attnlab.schema; writers and readers of record files
# import them from here as well.
SCHEMA, ENV_SCHEMA = RESULT_SCHEMA, ENVIRONMENT_SCHEMA

__all__ = ["SCHEMA", "ENV_SCHEMA", "FIELDS", "STATUSES", "FINAL_STATUSES", "RECORD_SCHEMAS", "new_run_id",
           "new_record", "kernel_roles", "jsonable", "dumps", "RecordWriter", "read_lines", "read_records", "read_environments",
           "latest_per_point", "environment", "parse_device", "device_name"]


def new_run_id() -> str:
    """A sortable, unique id: UTC time and a random suffix."""
    return f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def new_record(**fields) -> dict:
    """A result record: every FIELDS key (None where not given) in order, then the extras, and
    for a kernel the registry knows, its roles (ROLE_FIELDS, `registry.roles`) where not given.

    `schema` is always SCHEMA; `status` defaults to OK and must be one of STATUSES.
    Energy in `energy_j` is per call; `joules_per_token` divides it by the call's tokens.
    """
    fields.pop("schema", None)
    fields.setdefault("status", OK)
    if fields["status"] not in STATUSES:
        raise ValueError(f"status: expected one of {', '.join(STATUSES)}, got {fields['status']!r}")
    record = {"schema": SCHEMA}
    for key in FIELDS[1:]:
        record[key] = fields.pop(key, None)
    record.update(fields)
    for key, value in kernel_roles(record["kernel"]).items():
        record.setdefault(key, value)
    return record


def kernel_roles(kernel) -> dict:
    """The roles of `kernel` where the registry knows it (ROLE_FIELDS), else {}. A process that
    has not imported the registry knows no kernel: nothing is imported here for it."""
    registry = sys.modules.get("attnlab.kernels.registry")
    if registry is None or not isinstance(kernel, str):
        return {}
    try:
        found = registry.roles(kernel)
    except ValueError:      # not registered: a calibration, a ring run, a kernel since unregistered
        return {}
    return {key: found[key] for key in ROLE_FIELDS}


def jsonable(value):
    """JSON without NaN or infinities (strict readers reject them): those become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):   # numpy and torch scalars
        return jsonable(value.item())
    if isinstance(value, Path):
        return str(value)
    return value


def dumps(record: dict) -> str:
    return json.dumps(jsonable(record), allow_nan=False, separators=(",", ":"))


# Schemas of the lines a record file holds: what makes a file attnlab's to append to.
RECORD_SCHEMAS = (family(SCHEMA), family(ENV_SCHEMA))


class RecordWriter:
    """Appends records to a JSONL file it holds, each written and fsynced before `write` returns.

    Opening takes the file's lock (`OutputLock`) before anything reads the file, then refuses
    a file that is not attnlab's (`claim_tail`). The first write cuts a partial record a
    killed run left at the end, so the next record starts on a line of its own; a writer
    closed without writing leaves an existing file as it was. A write that fails (a full
    disk) raises WriteFailed with the file ending after the last whole record. Use as a
    context manager, or call `close()`.
    """

    def __init__(self, path, command: Optional[str] = None):
        self.path = check_output_path(path)
        self.written = 0       # result records this writer wrote
        self._lock = OutputLock(self.path, command)
        try:
            self._fd = open_regular(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
            self._tail = claim_tail(self._fd, self.path, RECORD_SCHEMAS)
        except BaseException:
            self._lock.release()
            raise

    def write(self, record: dict) -> None:
        line = (dumps(record) + "\n").encode("utf-8")
        end = self._tail.cut_at if self._tail.cut_at is not None else os.fstat(self._fd).st_size
        try:
            if self._tail.cut_at is not None:
                os.ftruncate(self._fd, end)
            write_all(self._fd, self._tail.prefix + line)
            os.fsync(self._fd)
        except OSError as exc:
            truncate_quietly(self._fd, end)
            raise WriteFailed(self.path, self.written, exc) from None
        self._tail = Tail()
        self.written += int(record.get("schema") == SCHEMA)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._lock.release()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def latest_per_point(records: Iterable[dict], key) -> list[dict]:
    """The last record of each point (key(record) -> hashable), in first-seen order.

    A resumed run re-measures points an earlier run left `skipped`; this keeps the result.
    """
    latest: dict = {}
    for record in records:
        latest[key(record)] = record
    return list(latest.values())


# --- the run's environment -------------------------------------------------------------

def environment(argv=None, *, device=None, run_id: Optional[str] = None) -> dict:
    """The conditions of a run, as the ENV_SCHEMA line written once per run.

    GPU name, UUID, driver, CUDA, torch, Triton and flash-attn versions, power limit,
    `clocks` and throttle reasons (through NVML, where it can be read), attnlab's
    `git_commit`, host, time and command line. `device` defaults to the first GPU, else the CPU.
    """
    import torch

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    argv = list(sys.argv if argv is None else argv)
    env = {
        "schema": ENV_SCHEMA,
        "run_id": run_id or new_run_id(),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "command": shlex.join(str(a) for a in argv),
        "argv": [str(a) for a in argv],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "flash_attn": _version("flash-attn", "flash_attn"),
        "nvidia_ml_py": _version("nvidia-ml-py"),
        "attnlab": _version("attnlab"),
        **_git_commit(),
        "device": str(device),
        "device_type": device.type,
    }
    if device.type == "cuda":
        env.update(_torch_gpu(device))
    from attnlab.bench.nvml import gpu_conditions

    env.update(gpu_conditions(device))
    return env


_DEVICE_RE = re.compile(r"cpu|cuda(:(0|[1-9][0-9]*))?")


def parse_device(text: str) -> str:
    """'cpu', 'cuda' or 'cuda:N', as given; whether this machine has it is for the run to check
    (no torch here, so a command line can be read without importing it)."""
    if not _DEVICE_RE.fullmatch(str(text)):
        raise ValueError(f"device: expected cpu, cuda or cuda:N, got {text!r}")
    return str(text)


def device_name(device) -> str:
    """What records put in `device`: the GPU's name, or "cpu"."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def _torch_gpu(device) -> dict:
    import torch

    props = torch.cuda.get_device_properties(device)
    uuid_ = getattr(props, "uuid", None)
    return {
        "gpu_name": props.name,
        "gpu_uuid": f"GPU-{uuid_}" if uuid_ is not None else None,
        "compute_capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "gpu_memory_bytes": props.total_memory,
        "l2_cache_bytes": getattr(props, "L2_cache_size", None),
        "cudnn": torch.backends.cudnn.version(),
    }


def _version(*names) -> Optional[str]:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _git_commit() -> dict:
    """attnlab's commit and whether the tree had changes, where it runs from a checkout."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return {"git_commit": None, "git_dirty": None}
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
    # A copied tree can hold a .git without its objects: rev-parse then echoes "HEAD" and fails.
    commit = head.stdout.strip()
    if head.returncode or not re.fullmatch(r"[0-9a-f]{40}", commit):
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit, "git_dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}
