"""attnlab tune's bookkeeping on a CPU, with autotuning itself replaced by a stand-in (the
real one needs a GPU; tests/test_kernels_gpu.py runs it there)."""
import json

from attnlab.bench.tuning import TUNING_SCHEMA, tune
from attnlab.bench.workloads import Workload
from attnlab.kernels import triton_prefill

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
    document = tune(TINY, [64, 128], "cpu", out)
    cases = json.loads(out.read_text())["cases"]
    assert json.loads(out.read_text())["schema"] == TUNING_SCHEMA and cases == document["cases"]
    assert [(c["seq_len"], c["tma"], c["status"]) for c in cases] == [
        (64, True, "error"), (64, False, "ok"), (128, True, "error"), (128, False, "ok")]
    assert "no tile fits" in cases[0]["reason"] and cases[1]["chosen"] == {"BLOCK_M": 64}
    assert seen_on_disk == [0, 1, 2, 3]        # every finished case was on disk before the next began
    assert cases[1]["head_dim"] == 16 and cases[1]["dtype"] == "float32"


def test_unaligned_inputs_are_tuned_on_the_pointer_path_only(tmp_path, monkeypatch):
    paths = []
    monkeypatch.setattr(triton_prefill, "autotune", lambda *args: paths.append(args[-1]) or {"tiles": [], "chosen": {}})
    tune(TINY.override(head_dim=59, dtype="float16"), [64], "cpu", tmp_path / "t.json")
    assert paths == [False]
