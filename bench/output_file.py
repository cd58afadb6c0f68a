"""Owning an output file: a writer writes only to a new file or to one of its own kind, only one
process writes a file at a time, and a failed write leaves the file ending after its last whole
record. The record writer (records.RecordWriter) and attnlab tune's document build on these.
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import shlex
import socket
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


class WriteFailed(OSError):
    """A record could not be written: the file ends after the records before it, whole.
    `written` counts those of this run."""

    def __init__(self, path: Path, written: int, error: OSError, what: str = "records"):
        super().__init__(f"out: writing {path} failed ({error.strerror or error}); it keeps what was "
                         f"written before, {written} of this run's {what} among it")
        self.errno, self.path, self.written = error.errno, path, written


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def truncate_quietly(fd: int, size: int) -> None:
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


def open_regular(path: Path, flags: int, role: str = "") -> int:
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
            fd = open_regular(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, f", the lock of {self.out}")
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
class Tail:
    """What the first write does to the file's end: cut it at `cut_at`, then write `prefix`."""

    cut_at: Optional[int] = None
    prefix: bytes = b""


def claim_tail(fd: int, path: Path, schemas: tuple) -> Tail:
    """How to append to the file open as `fd`; OutputError, and the file untouched, where it
    is not attnlab's.

    An empty file (or one of blank lines) is new. Otherwise its first line must be an attnlab
    record (a schema starting with one of `schemas`); its last line, where no newline ends
    it, a whole attnlab record (kept: it gets its newline) or a partial one a killed run left
    (cut off). Anything else is another program's.
    """
    size = os.fstat(fd).st_size
    first, first_ends = _first_line(fd, size)
    if first is None:
        return Tail()
    last_start = _last_line_start(fd, size)
    last = os.pread(fd, size - last_start, last_start)
    if not (_is_record(first, schemas) or (first_ends == size and _is_partial_record(first))):
        raise OutputError(f"out: {path} is not an attnlab record file (its first line is not an attnlab "
                          f"record); attnlab writes only to a new file or one of its own: choose another file")
    if last.endswith(b"\n") or not last.strip():
        return Tail()
    if _is_record(last, schemas):
        return Tail(prefix=b"\n")     # complete but for its newline: readers counted it, so keep it
    if _is_partial_record(last):
        return Tail(cut_at=last_start)
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


def _is_record(line: bytes, schemas: tuple) -> bool:
    try:
        obj = json.loads(line)
    except ValueError:
        return False
    return isinstance(obj, dict) and str(obj.get("schema", "")).startswith(schemas)


def _is_partial_record(line: bytes) -> bool:
    """A line an attnlab writer began and did not finish: it starts as every record does, or
    stops before the start itself is complete."""
    line = line.strip()
    return bool(line) and any(line.startswith(s) or s.startswith(line) for s in _RECORD_STARTS)
