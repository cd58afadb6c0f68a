"""Off a terminal (a pipe, CI, a log) the main job is never silent for long: a line per finished
point, and one naming the step in hand whenever the heartbeat's interval passes without a line."""
import io
import time

from attnlab.cli._progress import Heartbeat, Progress, make_progress

RECORD = {"mode": "decode", "kernel": "naive", "seq_len": 1024, "status": "ok", "median_ms": 1.25}


def wait_for(stream, text, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while text not in stream.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    return stream.getvalue()


def test_a_silent_step_gets_a_line_each_interval_naming_it():
    stream = io.StringIO()
    with Heartbeat(stream, 0.05, "writing the report", prefix=lambda: "lab: ") as beat:
        said = wait_for(stream, "lab: still writing the report")
        beat.doing("drawing charts")
        said = wait_for(stream, "still drawing charts")
    assert "lab: still writing the report (0 s)" in said and "lab: still drawing charts" in said
    after = stream.getvalue()
    time.sleep(0.15)
    assert stream.getvalue() == after                     # stopped with its block


def test_a_line_printed_elsewhere_resets_the_interval():
    stream = io.StringIO()
    with Heartbeat(stream, 0.3, "x") as beat:
        for _ in range(6):
            time.sleep(0.1)
            beat.said()
    assert stream.getvalue() == ""


def test_plain_progress_with_a_heartbeat_names_the_point_in_hand():
    stream = io.StringIO()
    progress = make_progress(enabled=True, stream=stream, heartbeat_s=0.05)
    progress.start(2)
    progress.update(RECORD)
    progress.advance(RECORD)
    progress.update({**RECORD, "kernel": "sdpa-math"})
    said = wait_for(stream, "still on decode sdpa-math 1k")
    progress.close()
    lines = said.splitlines()
    assert lines[0] == "[1/2] decode naive 1k: ok 1.250 ms"
    assert lines[1].startswith("[1/2] still on decode sdpa-math 1k (")


def test_no_heartbeat_unless_asked_or_behind_a_rich_bar():
    assert Progress(True, io.StringIO(), rich_bar=True, heartbeat_s=1)._heartbeat_s is None
    assert Progress(False, io.StringIO(), heartbeat_s=1)._heartbeat_s is None
    assert make_progress(enabled=True, stream=io.StringIO())._heartbeat_s is None
