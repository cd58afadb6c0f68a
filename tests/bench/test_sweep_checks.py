"""Every point timed is first checked: its output against float64 on sampled rows (kernels/rowcheck.py)
and its inputs left as they were. A wrong point is recorded `wrong` with the error and the bound,
never timed; a right one carries the same figures beside its times."""
import pytest
import torch

from attnlab.bench import records as rec
from attnlab.bench import sweep as sw
from attnlab.bench.workloads import Workload
from attnlab.cli import main
from attnlab.kernels import registry
from attnlab.kernels.impls import naive

TINY = Workload("tiny", batch=1, heads=2, kv_heads=1, head_dim=16, dtype="float32", causal=True,
                seq_lens=(128, 512))


def past(length, fn):
    """A kernel right on short sequences and off by a little past `length` queries."""
    def prefill(q, k, v, causal, scale):
        out = fn(q, k, v, causal, scale)
        if q.shape[1] > length:
            out = out.clone()
            out[:, length:] *= 1.01
        return out
    return prefill


def mutates(q, k, v, causal, scale):
    out = naive.prefill(q, k, v, causal, scale)
    k.mul_(0.5)
    return out


KERNELS = {
    "test-wrong-past-256": dict(prefill=past(256, naive.prefill)),
    "test-returns-none": dict(prefill=lambda q, k, v, causal, scale: None),
    "test-float64-out": dict(prefill=lambda q, k, v, causal, scale: naive.prefill(q, k, v, causal, scale).double()),
    "test-mutates-k": dict(prefill=mutates),
    "test-leaks-nan": dict(decode=lambda q, k, v, lens, scale: naive.decode(q, k, v, lens, scale) * float("nan")),
}


@pytest.fixture
def wrong_kernels():
    for name, calls in KERNELS.items():
        registry.register_kernel(name, description="test only", dtypes=(torch.float32,), devices=("cpu",), **calls)
    yield list(KERNELS)
    for name in KERNELS:
        registry.unregister(name)


def test_wrong_points_are_recorded_wrong_and_never_timed(tmp_path, wrong_kernels):
    config = sw.SweepConfig(workload=TINY, device="cpu", out=tmp_path / "run.jsonl", kernels=wrong_kernels + ["naive"],
                            point_budget_s=0.005)
    sw.run_sweep(config)
    records = {(r["kernel"], r["mode"], r["seq_len"]): r for r in rec.read_records(config.out)
               if r["status"] != "unsupported"}
    assert records[("test-wrong-past-256", "prefill", 128)]["status"] == "ok"
    wrong = records[("test-wrong-past-256", "prefill", 512)]
    assert wrong["status"] == "wrong" and wrong["check_error"] > wrong["check_bound"] > 0
    assert wrong.get("median_ms") is None and wrong.get("times_ms") is None
    reasons = {kernel: records[(kernel, "prefill", 128)]["reason"] for kernel in
               ("test-returns-none", "test-float64-out", "test-mutates-k")}
    assert reasons == {"test-returns-none": "wrong output: returned NoneType, not a tensor",
                       "test-float64-out": "wrong output: returned dtype torch.float64, expected torch.float32",
                       "test-mutates-k": "wrong output: changed its input k"}
    assert all(records[("test-leaks-nan", "decode", n)]["status"] == "wrong" for n in (128, 512))
    right = [r for key, r in records.items() if key[0] == "naive"]
    assert len(right) == 4 and all(r["status"] == "ok" and r["check_error"] <= r["check_bound"] and r["check_rows"]
                                   for r in right)


def test_the_command_exits_1_naming_the_wrong_kernel(tmp_path, wrong_kernels, capsys):
    code = main(["sweep", "--device", "cpu", "--workload", "cpu-small", "--kernels", "test-wrong-past-256,naive",
                 "--modes", "prefill", "--seq-lens", "128,512", "--out", str(tmp_path / "run.jsonl")])
    assert code == 1
    err = capsys.readouterr().err
    assert "attnlab sweep: test-wrong-past-256 failed 1 point(s), first: wrong output: max error" in err
    assert "naive" not in err
