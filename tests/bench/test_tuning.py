"""attnlab tune's bookkeeping on a CPU, with autotuning itself replaced by a stand-in (the
real one needs a GPU; tests/kernels/test_kernels_gpu.py runs it there)."""
import errno
import json
import os

import pytest
import torch

from attnlab.bench import output_file, tuning
from attnlab.bench.tuning import TUNING_SCHEMA, tune
from attnlab.bench.workloads import Workload
from attnlab.kernels import triton_prefill

TINY_DTYPE = torch.float32
TINY = Workload("tiny", batch=1, heads=2, kv_heads=1, head_dim=16, dtype="float32", causal=True, seq_lens=(64,))


def test_each_case_is_written_as_it_ends_and_a_failure_does_not_stop_the_rest(tmp_path, monkeypatch):
    out = tmp_path / "tuning.json"
    seen_on_disk = []

    def stand_in(q, k, v, causal, scale, tma):
        seen_on_disk.append(len(json.loads(out.read_text())["cases"]) if out.exists() else 0)
        if tma:
            raise RuntimeError("no tile fits")
        return {"tiles": [{"BLOCK_M": 64, "median_ms": 1.5}], "chosen": {"BLOCK_M": 64}}

    monkeypatch.setattr(triton_prefill, "autotune", stand_in)
    monkeypatch.setattr(triton_prefill, "tma_unfit_reason", lambda k, v: None)   # as on a Hopper GPU
    document = tune(TINY, [64, 128], "cpu", out)
    cases = json.loads(out.read_text())["cases"]
    assert json.loads(out.read_text())["schema"] == TUNING_SCHEMA and cases == document["cases"]
    assert [(c["seq_len"], c["kernel"], c["status"]) for c in cases] == [
        (64, "triton", "error"), (64, "triton-ptr", "ok"), (128, "triton", "error"), (128, "triton-ptr", "ok")]
    assert "no tile fits" in cases[0]["reason"] and cases[1]["chosen"] == {"BLOCK_M": 64}
    assert seen_on_disk == [0, 1, 2, 3]        # every finished case was on disk before the next began
    assert cases[1]["head_dim"] == 16 and cases[1]["dtype"] == "float32"


def test_unaligned_inputs_are_tuned_on_the_pointer_path_only(tmp_path, monkeypatch):
    paths = []
    monkeypatch.setattr(triton_prefill, "autotune", lambda *args: paths.append(args[-1]) or {"tiles": [], "chosen": {}})
    tune(TINY.override(head_dim=59, dtype="float16"), [64], "cpu", tmp_path / "t.json")
    assert paths == [False, False]     # triton falls back to pointers; triton-ptr never uses TMA


def test_only_kernels_that_declare_a_tune_hook_are_tuned(tmp_path, monkeypatch):
    _stand_in(monkeypatch)
    assert set(tuning.tunable("cpu", TINY_DTYPE, 16)) == {"triton", "triton-ptr"}
    with pytest.raises(ValueError, match=r"^kernels: naive cannot be tuned here"):
        tune(TINY, [64], "cpu", tmp_path / "t.json", kernels=["naive"])
    document = tune(TINY, [64], "cpu", tmp_path / "t.json", kernels=["triton-ptr"])
    assert [(c["kernel"], c["tma"]) for c in document["cases"]] == [("triton-ptr", False)]


def _stand_in(monkeypatch):
    monkeypatch.setattr(triton_prefill, "autotune", lambda *args: {"tiles": [], "chosen": {}})


@pytest.mark.parametrize("content", [b"buy milk", b'{"lr": 0.1}\n', b'{"schema": "attnlab.result/1"}\n'])
def test_a_file_that_is_no_tuning_document_is_left_as_it_is(tmp_path, monkeypatch, content):
    _stand_in(monkeypatch)
    out = tmp_path / "tuning.json"
    out.write_bytes(content)
    with pytest.raises(output_file.OutputError, match="not an attnlab tuning document"):
        tune(TINY, [64], "cpu", out)
    assert out.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tuning.json"]


def test_an_earlier_tuning_document_is_replaced(tmp_path, monkeypatch):
    _stand_in(monkeypatch)
    out = tmp_path / "tuning.json"
    tune(TINY, [64], "cpu", out)
    tune(TINY, [128], "cpu", out)
    assert {c["seq_len"] for c in json.loads(out.read_text())["cases"]} == {128}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tuning.json"]     # no lock or partial file left


def test_a_second_tune_on_one_document_is_refused(tmp_path, monkeypatch):
    _stand_in(monkeypatch)
    out = tmp_path / "tuning.json"
    with output_file.OutputLock(out, command="attnlab tune"):
        with pytest.raises(output_file.OutputError, match=f"being written by .*pid {os.getpid()}"):
            tune(TINY, [64], "cpu", out)
    assert not out.exists()


def test_a_full_disk_keeps_the_document_before(tmp_path, monkeypatch):
    _stand_in(monkeypatch)
    out = tmp_path / "tuning.json"
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_replace(src, dst)

    monkeypatch.setattr(tuning.os, "replace", replace)
    with pytest.raises(output_file.WriteFailed, match="No space left on device.*1 of this run's cases"):
        tune(TINY.override(head_dim=59, dtype="float16"), [64, 128], "cpu", out)
    assert [c["seq_len"] for c in json.loads(out.read_text())["cases"]] == [64]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tuning.json"]
