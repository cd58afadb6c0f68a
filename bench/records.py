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
import fcntl
import importlib.metadata
import json
import math
import os
import platform
import re
import shlex
import socket
import stat
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

SCHEMA = "attnlab.result/1"
ENV_SCHEMA = "attnlab.environment/1"

# The contract: every result record has these keys, in this order; more may follow.
FIELDS = (
    "schema", "run_id", "kernel", "mode", "workload", "batch", "heads", "kv_heads", "head_dim",
    "dtype", "causal", "seq_len", "q_len", "status", "reason", "times_ms", "median_ms", "p10_ms",
    "p90_ms", "flops", "bytes", "tflops", "gbps", "tokens_per_s", "peak_mem_bytes",
    "predicted_mem_bytes", "power_w_mean", "power_w_max", "energy_j", "joules_per_token", "device",
)
STATUSES = ("ok", "oom", "error", "unsupported", "skipped")
# Statuses that settle a point: a resumed run does not measure it again.
FINAL_STATUSES = ("ok", "oom", "error", "unsupported")

_SCHEMA_RE = re.compile(r"attnlab\.result/(\d+)$")


def new_run_id() -> str:
    """A sortable, unique id: UTC time and a random suffix."""
    return f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def new_record(**fields) -> dict:
    """A result record: every FIELDS key (None where not given) in order, then the extras.

    `schema` is always SCHEMA; `status` defaults to "ok" and must be one of STATUSES.
    Energy in `energy_j` is per call; `joules_per_token` divides it by the call's tokens.
    """
    fields.pop("schema", None)
    fields.setdefault("status", "ok")
    if fields["status"] not in STATUSES:
        raise ValueError(f"status: expected one of {', '.join(STATUSES)}, got {fields['status']!r}")
    record = {"schema": SCHEMA}
    for key in FIELDS[1:]:
        record[key] = fields.pop(key, None)
    record.update(fields)
    return record


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
            self._fd = _open_regular(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
            self._tail = claim_tail(self._fd, self.path)
        except BaseException:
            self._lock.release()
            raise

    def write(self, record: dict) -> None:
        line = (dumps(record) + "\n").encode("utf-8")
        end = self._tail.cut_at if self._tail.cut_at is not None else os.fstat(self._fd).st_size
        try:
            if self._tail.cut_at is not None:
                os.ftruncate(self._fd, end)
            _write_all(self._fd, self._tail.prefix + line)
            os.fsync(self._fd)
        except OSError as exc:
            _truncate_quietly(self._fd, end)
            raise WriteFailed(self.path, self.written, exc) from None
        self._tail = _Tail()
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


class WriteFailed(OSError):
    """A record could not be written: the file ends after the records before it, whole.
    `written` counts those of this run."""

    def __init__(self, path: Path, written: int, error: OSError, what: str = "records"):
        super().__init__(f"out: writing {path} failed ({error.strerror or error}); it keeps what was "
                         f"written before, {written} of this run's {what} among it")
        self.errno, self.path, self.written = error.errno, path, written


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _truncate_quietly(fd: int, size: int) -> None:
    # Take a record that failed half-way back off, so the file ends with a whole line; where
    # even that fails, the next writer cuts the partial record.
    try:
        os.ftruncate(fd, size)
    except OSError:
        pass


# --- owning an output file ------------------------------------------------------------
#
# A writer owns its output: it writes only to a new file or to one of its own kind, and only
# one process writes a file at a time. The lock is a file beside the output that holds an
# exclusive flock for as long as the writer runs (the kernel drops it when the process
# dies), with the holder's pid, command and start time in it for the message a second
# writer gets.

LOCK_SCHEMA = "attnlab.lock/1"
LOCK_SUFFIX = ".attnlab.lock"
# Names attnlab gives its side files (lock, NVML samples, a document being written): an
# output there would be overwritten by, or read as, one of them.
SIDE_SUFFIXES = (LOCK_SUFFIX, ".nvml.csv", ".partial")
_RECORD_SCHEMAS = (SCHEMA.split("/")[0] + "/", ENV_SCHEMA.split("/")[0] + "/")
# How every line an attnlab writer starts begins (compact, and as json.dumps spaces it).
_RECORD_STARTS = (b'{"schema":"attnlab.', b'{"schema": "attnlab.')
_FILE_KINDS = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFIFO: "a pipe",
               stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}


class OutputError(ValueError):
    """An output attnlab will not write; the message starts `out:` and says why."""


def check_output_path(path) -> Path:
    """`path` as an output file attnlab may create or append to, its folder created where
    missing; OutputError for a folder, a device or pipe, a side file's name, or a folder that
    cannot be created."""
    path = Path(path)
    for suffix in SIDE_SUFFIXES:
        if path.name.endswith(suffix):
            raise OutputError(f"out: {path} ends in {suffix}, which attnlab keeps for its side files; "
                              f"expected another name, such as run.jsonl")
    if path.exists() and not path.is_file():
        raise OutputError(f"out: {path} is {_kind(path.stat().st_mode)}; expected a regular file")
    nearest = next(folder for folder in (path.parent, *path.parent.parents) if folder.exists())
    if not nearest.is_dir():
        raise OutputError(f"out: {path} cannot be created: {nearest} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"out: cannot create the folder {path.parent} ({exc.strerror})") from None
    return path


def _kind(mode: int) -> str:
    return _FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")


def _open_regular(path: Path, flags: int, role: str = "") -> int:
    """os.open, refusing (after the fact, so that no check races the open) anything but a
    regular file; `role` says in an error what the file is for."""
    try:
        fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise OutputError(f"out: cannot open {path}{role} ({exc.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise OutputError(f"out: {path} is {_kind(mode)}; expected a regular file")
    return fd


def lock_path(out) -> Path:
    """The lock beside `out`, after following links; run.jsonl and its run.nvml.csv share
    run.attnlab.lock, so two runs cannot share a samples file either."""
    out = Path(os.path.realpath(out))
    return out.with_name(out.name.removesuffix(".jsonl") + LOCK_SUFFIX)


class OutputLock:
    """An exclusive, non-blocking hold on `out` for this process, until `release()` (or its
    death). OutputError naming the holder when another process has it."""

    def __init__(self, out, command: Optional[str] = None):
        self.out = Path(out)
        self.path = lock_path(out)
        self._fd = self._take()
        try:
            self._write_holder(command or shlex.join(sys.argv))
        except BaseException:
            os.close(self._fd)
            raise

    def _take(self) -> int:
        # Open (or create) and flock; where the holder removed the file between the two, the
        # lock taken is on a file nobody else will see: try again on the new one.
        while True:
            fd = _open_regular(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, f", the lock of {self.out}")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise OutputError(f"out: {self.out} is being written by {holder}; "
                                  f"wait for it to end or choose another file") from None
            if self._is_current(fd):
                return fd
            os.close(fd)

    def _is_current(self, fd: int) -> bool:
        try:
            here = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)

    def _write_holder(self, command: str) -> None:
        text = os.pread(self._fd, 1 << 16, 0)
        if text.strip() and _lock_info(text) is None:
            raise OutputError(f"out: {self.path}, where attnlab keeps the lock of {self.out}, holds "
                              f"something else; move it or choose another file")
        info = {"schema": LOCK_SCHEMA, "pid": os.getpid(), "host": socket.gethostname(), "command": command,
                "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
        except OSError:
            pass    # the lock holds without its note; a full disk stops the run at its first record

    def release(self) -> None:
        if self._fd is None:
            return
        if self._is_current(self._fd):   # removed while held, so a new holder's file is spared
            self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def _lock_info(text: bytes) -> Optional[dict]:
    try:
        info = json.loads(text)
    except ValueError:
        return None
    return info if isinstance(info, dict) and info.get("schema") == LOCK_SCHEMA else None


def _holder(fd: int, wait_s: float = 1.0) -> str:
    """Who holds a lock, from what it wrote in the file (given a moment to write it)."""
    deadline = time.monotonic() + wait_s
    while (info := _lock_info(os.pread(fd, 1 << 16, 0))) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if info is None:
        return "another process"
    return f"another attnlab process, pid {info.get('pid')} on {info.get('host')} since {info.get('started')} " \
           f"({info.get('command')})"


# --- what is already in the file ------------------------------------------------------

@dataclass
class _Tail:
    """What the first write does to the file's end: cut it at `cut_at`, then write `prefix`."""

    cut_at: Optional[int] = None
    prefix: bytes = b""


def claim_tail(fd: int, path: Path) -> _Tail:
    """How to append to the file open as `fd`; OutputError, and the file untouched, where it
    is not attnlab's.

    An empty file (or one of blank lines) is new. Otherwise its first line must be an attnlab
    record; its last line, where no newline ends it, a whole attnlab record (kept: it gets its
    newline) or a partial one a killed run left (cut off). Anything else is another program's.
    """
    size = os.fstat(fd).st_size
    first, first_ends = _first_line(fd, size)
    if first is None:
        return _Tail()
    last_start = _last_line_start(fd, size)
    last = os.pread(fd, size - last_start, last_start)
    if not (_is_record(first) or (first_ends == size and _is_partial_record(first))):
        raise OutputError(f"out: {path} is not an attnlab record file (its first line is not an attnlab "
                          f"record); attnlab writes only to a new file or one of its own: choose another file")
    if last.endswith(b"\n") or not last.strip():
        return _Tail()
    if _is_record(last):
        return _Tail(prefix=b"\n")     # complete but for its newline: readers counted it, so keep it
    if _is_partial_record(last):
        return _Tail(cut_at=last_start)
    raise OutputError(f"out: {path} ends in a line that is neither an attnlab record nor one cut short "
                      f"by a killed run; leaving the file as it is: choose another file")


def _first_line(fd: int, size: int, block: int = 1 << 16) -> tuple[Optional[bytes], int]:
    """The first non-blank line and the offset where it ends (its newline, or the file's end)."""
    start = 0
    while start < size:
        data = b""
        while True:     # read on until the line ends (lines may be longer than a block)
            chunk = os.pread(fd, block, start + len(data))
            data += chunk
            newline = data.find(b"\n")
            if newline >= 0 or not chunk:
                break
        end = start + (newline if newline >= 0 else len(data))
        if data[:end - start].strip():
            return data[:end - start].strip(), end
        start = end + 1
    return None, size


def _last_line_start(fd: int, size: int, block: int = 1 << 16) -> int:
    """Where the last line begins: after the last newline that is not the file's last byte."""
    end = size - 1 if size and os.pread(fd, 1, size - 1) == b"\n" else size
    while end > 0:
        start = max(0, end - block)
        cut = os.pread(fd, end - start, start).rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        end = start
    return 0


def _is_record(line: bytes) -> bool:
    try:
        obj = json.loads(line)
    except ValueError:
        return False
    return isinstance(obj, dict) and str(obj.get("schema", "")).startswith(_RECORD_SCHEMAS)


def _is_partial_record(line: bytes) -> bool:
    """A line an attnlab writer began and did not finish: it starts as every record does, or
    stops before the start itself is complete."""
    line = line.strip()
    return bool(line) and any(line.startswith(s) or s.startswith(line) for s in _RECORD_STARTS)


def read_lines(path) -> list[dict]:
    """Every JSON object in a JSONL file, of any schema.

    A last line that does not parse (a run killed mid-write) is ignored; a bad line
    anywhere else is an error that names the file and line.
    """
    path = Path(path)
    with open(path, encoding="utf-8", errors="replace") as f:   # a cut may split a character
        lines = f.read().split("\n")
    objects = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):   # no newline after it: the line in flight when killed
                break
            raise ValueError(f"{path}:{number}: not a JSON object ({exc.msg})") from None
        if isinstance(obj, dict):
            objects.append(obj)
    return objects


def read_records(path) -> list[dict]:
    """The result records of a JSONL file, in file order; other schemas are skipped.

    Records of an older result schema are returned as they are; a newer one is an error
    saying which version this reader knows.
    """
    records = []
    known = int(_SCHEMA_RE.match(SCHEMA).group(1))
    for obj in read_lines(path):
        match = _SCHEMA_RE.match(str(obj.get("schema", "")))
        if not match:
            continue
        if int(match.group(1)) > known:
            raise ValueError(f"{path}: record schema {obj['schema']} is newer than this reader's "
                             f"{SCHEMA}; upgrade attnlab to read it")
        records.append(obj)
    return records


def read_environments(path) -> list[dict]:
    """The environment lines of a JSONL file, one per run."""
    return [obj for obj in read_lines(path) if obj.get("schema") == ENV_SCHEMA]


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
