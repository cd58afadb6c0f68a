"""`attnlab ring`: ring attention timed across torchrun's ranks, one record per length written by
rank 0, with what the communication cost and how much of it the attention hid. Two gloo ranks
under torchrun run the command end to end; one rank in this process shows how failures are
recorded; without torchrun the command refuses, naming it."""
import os
import socket
import subprocess
import sys

import pytest

from attnlab.bench import records as rec
from attnlab.bench.ring import RingConfig, run_ring
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
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_PORT", "0")
    assert main(["ring", "--device", "cpu", "--seq-lens", "256", "--out", str(tmp_path / "ring.jsonl")]) == 2
    assert "--standalone" in capsys.readouterr().err


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
