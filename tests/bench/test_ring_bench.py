"""`attnlab ring`: ring attention timed across torchrun's ranks, one record per length written by
rank 0, with what the communication cost and how much of it the attention hid. Two gloo ranks
under torchrun run the command end to end; one rank in this process shows how failures are
recorded; without torchrun the command refuses, naming it."""
import datetime
import os
import socket
import subprocess
import sys
import time

import pytest

from attnlab.bench import records as rec
from attnlab.bench.ring import RingBroken, RingConfig, run_ring
from attnlab.bench.shards import Launch
from attnlab.bench.workloads import preset
from attnlab.cli import main
from attnlab.schema import FIELDS, RING
from paths import ROOT

WORLD = 2
SEQ_LENS = (256, 512)
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory):
    """One run of two CPU ranks, shared by the checks on what it wrote. --standalone rather than
    --master-port 0: torchrun hands the ranks port 0 itself, and they could not meet."""
    out = tmp_path_factory.mktemp("ring") / "ring.jsonl"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
               "-m", "attnlab", "ring", "--device", "cpu", "--workload", "cpu-small",
               "--seq-lens", ",".join(map(str, SEQ_LENS)), "--reps", "3", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env=dict(env, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out, done.stdout


def kv_block_bytes(seq_len: int, world: int) -> int:
    w = preset("cpu-small")
    return 2 * w.batch_for(seq_len) * (seq_len // world) * w.kv_heads * w.head_dim * 4     # float32


@pytest.mark.slow    # two processes started by torchrun: seconds
def test_rank0_writes_one_record_per_length_in_the_result_schema(torchrun_run):
    out, stdout = torchrun_run
    records = rec.read_records(out)
    assert [r["seq_len"] for r in records] == list(SEQ_LENS)        # one per length, not one per rank
    assert len(rec.read_environments(out)) == 1
    for r in records:
        assert list(r)[:len(FIELDS)] == list(FIELDS)
        assert (r["status"], r["mode"], r["kernel"], r["world"], r["layout"]) == ("ok", RING, "ring-naive", WORLD,
                                                                              "zigzag")
        assert r["q_len"] == r["seq_len"] and len(r["times_ms"]) == 3 and r["median_ms"] > 0
        assert r["flops"] == 4 * 8 * r["seq_len"] ** 2 * 64 / 2         # cpu-small: 8 heads of 64, causal
    assert "hidden" in stdout and f"{len(SEQ_LENS)} ok" in stdout


@pytest.mark.slow
def test_each_rank_sends_world_minus_one_kv_blocks_and_the_hidden_share_is_a_fraction(torchrun_run):
    for r in rec.read_records(torchrun_run[0]):
        assert r["sent_bytes_per_rank"] == r["bytes"] == (WORLD - 1) * kv_block_bytes(r["seq_len"], WORLD)
        assert 0.0 <= r["hidden_fraction"] <= 1.0
        assert r["comm_alone_ms"] > 0 and r["compute_ms"] > 0 and r["wait_ms"] >= 0
        assert len(r["per_step"]) == WORLD
        assert all(set(step) == {"compute_ms", "wait_ms"} for step in r["per_step"])


@pytest.mark.slow
def test_the_analysis_reads_the_records_as_valid(torchrun_run):
    pytest.importorskip("pandas")
    from attnlab.analysis.load import load

    loaded = load(torchrun_run[0])
    assert loaded.warnings == []
    assert loaded.results["valid"].all() and list(loaded.standing["seq_len"]) == list(SEQ_LENS)


# --- without torchrun ---------------------------------------------------------------------------

def test_without_torchrun_it_refuses_naming_torchrun(tmp_path, monkeypatch, capsys):
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "ring.jsonl"
    assert main(["ring", "--device", "cpu", "--seq-lens", "256", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "run it under torchrun" in err and "--nproc-per-node" in err
    assert not out.exists()


def test_a_master_port_of_zero_is_refused_before_the_ranks_wait_on_it(tmp_path, monkeypatch, capsys):
    for name, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="0").items():
        monkeypatch.setenv(name, value)
    assert main(["ring", "--device", "cpu", "--seq-lens", "256", "--out", str(tmp_path / "ring.jsonl")]) == 2
    assert "--standalone" in capsys.readouterr().err


def test_a_stray_rank_without_a_launcher_is_refused_naming_what_was_ignored(tmp_path, monkeypatch, capsys):
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "1")        # not rank 0, yet the only process: it must say why it stops
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "ring.jsonl"
    assert main(["ring", "--device", "cpu", "--seq-lens", "256", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "run it under torchrun" in err
    assert "ignoring RANK and WORLD_SIZE" in err and "LOCAL_RANK, MASTER_ADDR and MASTER_PORT are not set" in err
    assert not out.exists()


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_a_timeout_that_is_no_positive_number_of_seconds_is_refused(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exited:
        main(["ring", "--timeout", value, "--out", str(tmp_path / "ring.jsonl")])
    assert exited.value.code == 2 and "argument --timeout: expected a number of seconds" in capsys.readouterr().err


# --- failures, on one rank in this process ----------------------------------------------------

@pytest.fixture
def one_rank(monkeypatch):
    """torchrun's variables for a world of one in this process, on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(port)).items():
        monkeypatch.setenv(name, value)
    return Launch(0, 1, 0)


def test_a_length_the_ranks_cannot_cut_is_recorded_and_the_run_goes_on(one_rank, tmp_path):
    config = RingConfig(preset("cpu-small"), out=tmp_path / "ring.jsonl", seq_lens=[255, 128], reps=2,
                        warmup_reps=1)
    result = run_ring(config, one_rank)
    assert [(r["seq_len"], r["status"]) for r in result.records] == [(255, "error"), (128, "ok")]
    assert "seq_len: the zigzag layout cuts the sequence into 2 equal chunks" in result.records[0]["reason"]
    assert result.records[1]["hidden_fraction"] is None       # one rank: nothing travels, nothing to hide
    assert [r["seq_len"] for r in rec.read_records(config.out)] == [255, 128]


def test_a_failure_inside_the_ring_is_recorded_and_later_lengths_are_skipped(one_rank, tmp_path, monkeypatch):
    from attnlab.bench import ring

    def broken(*args, **kwargs):
        raise RuntimeError("the link went down")

    monkeypatch.setattr(ring, "ring_attention_with_stats", broken)
    config = RingConfig(preset("cpu-small"), out=tmp_path / "ring.jsonl", seq_lens=[128, 256], reps=2)
    records = run_ring(config, one_rank).records
    assert [r["status"] for r in records] == ["error", "skipped"]
    assert records[0]["reason"] == "rank 0: RuntimeError: the link went down"
    assert records[1]["reason"].startswith("not run: the ring failed at seq_len 128")


def test_the_process_group_waits_for_a_peer_no_longer_than_the_timeout(one_rank, tmp_path, monkeypatch):
    import torch.distributed as dist

    joined = []
    real = dist.init_process_group
    monkeypatch.setattr(dist, "init_process_group", lambda *args, **kw: joined.append(kw) or real(*args, **kw))
    config = RingConfig(preset("cpu-small"), out=tmp_path / "ring.jsonl", seq_lens=[128], reps=1, timeout_s=7.5)
    assert run_ring(config, one_rank).counts == {"ok": 1}
    assert [kw["timeout"] for kw in joined] == [datetime.timedelta(seconds=7.5)]


def test_ranks_that_do_not_all_join_in_time_are_named_with_the_timeout(one_rank, tmp_path, monkeypatch):
    import torch.distributed as dist

    def never_joined(*args, **kwargs):
        raise dist.DistStoreError("Timed out after 3 seconds waiting for clients. 1/2 clients joined.")

    monkeypatch.setattr(dist, "init_process_group", never_joined)
    config = RingConfig(preset("cpu-small"), out=tmp_path / "ring.jsonl", seq_lens=[128], timeout_s=3)
    with pytest.raises(RingBroken) as broken:
        run_ring(config, one_rank)
    assert str(broken.value).startswith("rank 0 of 1 gave up joining the process group: a rank died or did not "
                                        "answer within the process group's timeout of 3 s (--timeout)")
    assert "1/2 clients joined" in str(broken.value)


@pytest.mark.parametrize("content", [b"buy milk", b'{"event": "start"}\n'], ids=["text", "other-jsonl"])
def test_a_file_the_ring_did_not_write_is_refused_untouched(one_rank, tmp_path, capsys, content):
    out = tmp_path / "notes.jsonl"
    out.write_bytes(content)
    assert main(["ring", "--device", "cpu", "--seq-lens", "128", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"attnlab ring: error: --out: {out} is not an attnlab record")
    assert out.read_bytes() == content
    assert not list(tmp_path.glob("*.lock"))


STUCK_RANK = """
import os, sys, time
from attnlab.bench import ring
if os.environ["RANK"] == "1":      # this rank never takes part in the ring
    ring.ring_attention_with_stats = lambda *args, **kwargs: time.sleep(120)
from attnlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow    # two processes started by torchrun, one stuck: about 10 s
def test_a_stuck_rank_ends_the_others_within_the_timeout_naming_it(tmp_path):
    script = tmp_path / "stuck_rank.py"
    script.write_text(STUCK_RANK)
    out = tmp_path / "ring.jsonl"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
               "ring", "--device", "cpu", "--workload", "cpu-small", "--seq-lens", "128,256", "--reps", "1",
               "--timeout", "2", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=dict(env, OMP_NUM_THREADS="1"))
    assert time.monotonic() - started < 30
    assert done.returncode != 0
    said = [line for line in done.stderr.splitlines() if line.startswith("attnlab ring: error: ")]
    assert len(said) == 1, done.stderr[-3000:]
    assert said[0].startswith("attnlab ring: error: rank 0 of 2 gave up at seq_len 128: a rank died or did not "
                              "answer within the process group's timeout of 2 s (--timeout)")
    records = rec.read_records(out)       # rank 0 recorded where the ring stopped, and why
    assert [(r["seq_len"], r["status"]) for r in records] == [(128, "error")]
    assert records[0]["reason"] == said[0].removeprefix("attnlab ring: error: ")
