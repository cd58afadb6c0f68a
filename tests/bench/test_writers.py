"""Who may write an output file: a writer appends only to a new file or to an attnlab one,
one process at a time; a bad flag or a full disk ends a command with one line and exit 2."""
import errno
import json
import os
import stat
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from attnlab.bench import output_file
from attnlab.bench import records as rec
from attnlab.bench.nvml import CSV_COLUMNS
from attnlab.bench.sweep import check_nvml_csv
from attnlab.bench.workloads import point_key
from attnlab.cli import main

HAS_CUDA = torch.cuda.is_available()
ENV_LINE = json.dumps({"schema": rec.ENV_SCHEMA, "run_id": "r1"}) + "\n"
RESULT_LINE = rec.dumps(rec.new_record(run_id="r1", kernel="k1")) + "\n"

FOREIGN = {
    "text-without-newline": b"buy milk",
    "json-config": b'{"lr": 0.1}',
    "other-tools-jsonl": b'{"event": "start", "t": 1}\n{"event": "stop", "t": 2}\n',
    "attnlab-then-a-note": (ENV_LINE + RESULT_LINE + "buy milk").encode(),
}
SWEEP = ["sweep", "--device", "cpu", "--rounds", "1", "--kernels", "naive", "--seq-lens", "128"]
E2E = ["e2e", "--device", "cpu", "--kernels", "naive", "--seq-lens", "16,32", "--decode-tokens", "2",
       "--batch", "1", "--warmup-steps", "0"]
TUNE = ["tune", "--seq-lens", "64"]
COMMANDS = {"sweep": SWEEP, "sweep-resume": SWEEP + ["--resume"], "e2e": E2E}


def _run(capsys, argv):
    """main(argv)'s exit status and stderr, whether it returned or argparse exited."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def _refused(capsys, argv, *expected):
    """Exit 2 and one stderr line (after argparse's usage, where argparse refused) that holds
    every expected text, and no traceback."""
    code, err = _run(capsys, argv)
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0] == lines[-1], err
    if not lines[0].startswith("usage:"):
        assert len(lines) == 1, err
    for text in expected:
        assert text in errors[0], err
    return errors[0]


def _no_lock_left(folder: Path) -> bool:
    return not list(folder.glob("*" + output_file.LOCK_SUFFIX))


# --- another program's file is left as it is ------------------------------------------------

@pytest.mark.parametrize("content", FOREIGN.values(), ids=FOREIGN.keys())
@pytest.mark.parametrize("command", COMMANDS.values(), ids=COMMANDS.keys())
def test_a_foreign_file_is_refused_byte_for_byte(tmp_path, capsys, command, content):
    out = tmp_path / "notes.txt"
    out.write_bytes(content)
    _refused(capsys, command + ["--out", out], "--out", str(out))
    assert out.read_bytes() == content
    assert _no_lock_left(tmp_path)


def test_an_empty_file_counts_as_new(tmp_path, capsys):
    out = tmp_path / "empty.jsonl"
    out.write_bytes(b"")
    code, err = _run(capsys, SWEEP + ["--out", out])
    assert code == 0, err
    assert len(rec.read_records(out)) == 2 and _no_lock_left(tmp_path)


def test_a_missing_folder_is_created(tmp_path, capsys):
    out = tmp_path / "new" / "folder" / "run.jsonl"
    code, err = _run(capsys, E2E + ["--out", out])
    assert code == 0, err
    assert [r["seq_len"] for r in rec.read_records(out)] == [16, 32]


# --- the tail a killed run left ----------------------------------------------------------------

def _write_one(path):
    with rec.RecordWriter(path) as writer:
        writer.write(rec.new_record(run_id="r2", kernel="k2"))


@pytest.mark.parametrize("tail", ['{"schema": "attnlab.result/1", "kernel": "na', '{"schema":"attnlab.res', '{"sch'])
def test_a_partial_attnlab_record_is_cut(tmp_path, tail):
    path = tmp_path / "run.jsonl"
    path.write_text(ENV_LINE + RESULT_LINE + tail)
    _write_one(path)
    assert path.read_text() == ENV_LINE + RESULT_LINE + rec.dumps(rec.new_record(run_id="r2", kernel="k2")) + "\n"


def test_a_whole_file_is_appended_to_as_it_is(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_text(ENV_LINE + RESULT_LINE)
    _write_one(path)
    assert path.read_text() == ENV_LINE + RESULT_LINE + rec.dumps(rec.new_record(run_id="r2", kernel="k2")) + "\n"


def test_a_file_killed_in_its_first_line_is_attnlabs(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_text('{"schema":"attnlab.environment/1","run_id":"r1","ti')
    _write_one(path)
    assert [r["kernel"] for r in rec.read_records(path)] == ["k2"]


def test_a_whole_record_without_its_newline_is_kept(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_text(ENV_LINE + RESULT_LINE.rstrip("\n"))
    _write_one(path)
    assert [r["kernel"] for r in rec.read_records(path)] == ["k1", "k2"]


def test_a_writer_that_writes_nothing_changes_nothing(tmp_path):
    path = tmp_path / "run.jsonl"
    before = (ENV_LINE + '{"schema":"attnlab.res').encode()
    path.write_bytes(before)
    rec.RecordWriter(path).close()
    assert path.read_bytes() == before


def test_a_sweep_refused_for_holding_records_leaves_its_partial_tail(tmp_path, capsys):
    out = tmp_path / "run.jsonl"
    before = (ENV_LINE + RESULT_LINE + '{"schema":"attnlab.res').encode()
    out.write_bytes(before)
    _refused(capsys, SWEEP + ["--out", out], "--out", "--resume")
    assert out.read_bytes() == before


# --- one writer per file -----------------------------------------------------------------------

def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    path = tmp_path / "run.jsonl"
    with rec.RecordWriter(path, command="attnlab sweep --out run.jsonl"):
        lock = json.loads(output_file.lock_path(path).read_text())
        assert lock["pid"] == os.getpid() and lock["command"] == "attnlab sweep --out run.jsonl"
        for other in (path, tmp_path / "run", tmp_path / "." / "run.jsonl"):   # run.nvml.csv is shared too
            with pytest.raises(output_file.OutputError, match=rf"^out: .* is being written by .*pid {os.getpid()} .*"
                                                      r"attnlab sweep --out run.jsonl"):
                rec.RecordWriter(other)
    assert _no_lock_left(tmp_path)
    _write_one(path)      # free again


def test_a_link_to_a_held_file_is_held_too(tmp_path):
    path = tmp_path / "run.jsonl"
    (tmp_path / "link.jsonl").symlink_to(path)
    with rec.RecordWriter(path):
        with pytest.raises(output_file.OutputError, match="being written"):
            rec.RecordWriter(tmp_path / "link.jsonl")


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path):
    path = tmp_path / "run.jsonl"
    stale = {"schema": output_file.LOCK_SCHEMA, "pid": 999999999, "command": "attnlab sweep", "started": "then"}
    output_file.lock_path(path).write_text(json.dumps(stale))
    _write_one(path)
    assert [r["kernel"] for r in rec.read_records(path)] == ["k2"] and _no_lock_left(tmp_path)


def test_a_foreign_file_where_the_lock_goes_is_refused_untouched(tmp_path):
    lock = tmp_path / ("run" + output_file.LOCK_SUFFIX)
    lock.write_text("mine")
    with pytest.raises(output_file.OutputError, match="holds something else"):
        rec.RecordWriter(tmp_path / "run.jsonl")
    assert lock.read_text() == "mine"


def test_samples_go_only_to_an_nvml_samples_file(tmp_path):
    csv = tmp_path / "run.nvml.csv"
    check_nvml_csv(csv)                                  # missing: new
    csv.write_text(",".join(CSV_COLUMNS) + "\r\n" + "r,p" + "," * (len(CSV_COLUMNS) - 2) + "\r\n")
    check_nvml_csv(csv)                                  # an earlier run's samples
    csv.write_text(ENV_LINE)
    with pytest.raises(output_file.OutputError, match="NVML samples go to .*holds something else"):
        check_nvml_csv(csv)


# --- bad flags ------------------------------------------------------------------------------

PER_COMMAND = {"sweep": SWEEP, "e2e": E2E, "tune": TUNE}


@pytest.mark.parametrize("value", ["tpu", "cuda:abc", "cuda:-1", "cuda:007", ""])
@pytest.mark.parametrize("command", PER_COMMAND.values(), ids=PER_COMMAND.keys())
def test_a_device_that_is_no_device_name(tmp_path, capsys, command, value):
    _refused(capsys, command + ["--device", value, "--out", tmp_path / "x.jsonl"], "--device",
             "expected cpu, cuda or cuda:N", repr(value))


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a GPU")
@pytest.mark.parametrize("command", PER_COMMAND.values(), ids=PER_COMMAND.keys())
def test_cuda_without_a_gpu(tmp_path, capsys, command):
    _refused(capsys, command + ["--device", "cuda", "--out", tmp_path / "x.jsonl"],
             "--device: 'cuda' asked for, but torch sees no CUDA device")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", PER_COMMAND.values(), ids=PER_COMMAND.keys())
def test_a_gpu_index_past_the_last(tmp_path, capsys, monkeypatch, command):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    _refused(capsys, command + ["--device", "cuda:7", "--out", tmp_path / "x.jsonl"],
             "--device: 'cuda:7' asked for, but torch sees 1 CUDA device (cuda:0)")


def _bad_outs(tmp_path):
    (tmp_path / "a-file").write_text("x")
    return {
        "folder": (tmp_path, "is a folder"),
        "device": ("/dev/null", "is a character device"),
        "under-a-file": (tmp_path / "a-file" / "run.jsonl", "a-file is a file, not a folder"),
        "lock-name": (tmp_path / ("run" + output_file.LOCK_SUFFIX), "attnlab keeps for its side files"),
        "samples-name": (tmp_path / "run.nvml.csv", "attnlab keeps for its side files"),
    }


@pytest.mark.parametrize("case", ["folder", "device", "under-a-file", "lock-name", "samples-name"])
@pytest.mark.parametrize("command", PER_COMMAND.values(), ids=PER_COMMAND.keys())
def test_an_out_that_is_no_file_to_write(tmp_path, capsys, monkeypatch, command, case):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)    # tune gets as far as --out
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    device = ["--device", "cuda"] if command is TUNE else []
    out, why = _bad_outs(tmp_path)[case]
    _refused(capsys, command + device + ["--out", out], "--out", why)


def _unwritable_folder(tmp_path) -> Path:
    """A folder this process cannot create files in: a read-only one, or (as root, whom no
    mode stops) /sys."""
    if os.geteuid() == 0:
        return Path("/sys")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    return folder


@pytest.mark.parametrize("command", [SWEEP, E2E], ids=["sweep", "e2e"])
def test_an_out_in_a_folder_that_cannot_be_written(tmp_path, capsys, command):
    folder = _unwritable_folder(tmp_path)
    _refused(capsys, command + ["--out", folder / "run.jsonl"], "--out", "Permission denied")


# --- a full disk ---------------------------------------------------------------------------

class _DiskFillsAt:
    """Stands in for os.fsync: the n-th call (and every later one) finds the disk full."""

    def __init__(self, n):
        self.n, self.calls, self.real = n, 0, os.fsync

    def __call__(self, fd):
        self.calls += 1
        if self.calls >= self.n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.real(fd)


def test_a_full_disk_ends_the_sweep_keeping_what_was_written(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run.jsonl"
    argv = ["sweep", "--device", "cpu", "--rounds", "1", "--kernels", "naive", "--seq-lens", "128,256", "--out", out]
    monkeypatch.setattr(rec.os, "fsync", _DiskFillsAt(3))       # the environment and one record fit
    line = _refused(capsys, argv, "--out", "No space left on device", "1 of this run's records", "--resume")
    assert "run the same command with --resume" in line
    assert out.read_text().endswith("\n") and len(rec.read_records(out)) == 1
    assert all(json.loads(text) for text in out.read_text().splitlines())   # the failed record is gone
    monkeypatch.undo()
    code, err = _run(capsys, argv + ["--resume"])
    assert code == 0, err
    seen = Counter(point_key(r) for r in rec.read_records(out))
    assert len(seen) == 4 and max(seen.values()) == 1


def test_a_full_disk_ends_e2e_saying_which_lengths_are_left(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run.jsonl"
    monkeypatch.setattr(rec.os, "fsync", _DiskFillsAt(3))
    _refused(capsys, E2E + ["--out", out], "--out", "No space left on device", "--seq-lens 32")
    assert [r["seq_len"] for r in rec.read_records(out)] == [16]


def test_a_record_cut_short_by_a_full_disk_is_taken_back(tmp_path, monkeypatch):
    path = tmp_path / "run.jsonl"
    path.write_text(ENV_LINE)
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, bytes(data[:len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rec.os, "write", half_then_full)
    with rec.RecordWriter(path) as writer, pytest.raises(output_file.WriteFailed, match="No space left"):
        writer.write(rec.new_record(run_id="r2", kernel="k2"))
    monkeypatch.undo()
    assert path.read_text() == ENV_LINE


# --- Ctrl-C before the sweep starts ----------------------------------------------------------

@pytest.mark.slow    # the command in a process of its own
@pytest.mark.parametrize("delay_s", [0.5, 1.5])
def test_ctrl_c_during_start_up_prints_no_traceback(tmp_path, delay_s):
    """While torch is imported, the parser built and the kernels probed."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "attnlab", *SWEEP, "--out", str(tmp_path / "run.jsonl")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for_exec(proc.pid)   # a signal sent between fork and exec would meet the parent's handler
    time.sleep(delay_s)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    # 130, or ended by the signal itself where it lands as Python shuts down: a shell reports 130 for both
    assert proc.returncode in (130, -signal.SIGINT) and "Traceback" not in err, err


def _wait_for_exec(pid: int, timeout_s: float = 30.0) -> None:
    """Until the child runs attnlab: its command line changes when it execs."""
    import time
    deadline = time.monotonic() + timeout_s
    cmdline = Path(f"/proc/{pid}/cmdline")
    while time.monotonic() < deadline:
        try:
            if b"attnlab" in cmdline.read_bytes():
                return
        except OSError:
            return      # no /proc here, or the child is gone: nothing left to wait for
        time.sleep(0.01)
