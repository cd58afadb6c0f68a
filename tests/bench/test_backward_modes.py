"""The training modes: a backward point's work (FLOPs, bytes, predicted memory), the call the
bench times (the gradients alone, or forward and backward), the float64 check of every gradient
it returns, and the records a sweep writes of them."""
import subprocess
import sys

import pytest
import torch

from attnlab.bench import records as rec
from attnlab.bench import sweep as sw
from attnlab.bench.point_call import build_call
from attnlab.bench.workloads import Workload, bytes_moved, flops, predicted_peak_bytes
from attnlab.cli import build_parser
from attnlab.kernels import registry
from attnlab.kernels.gradcheck import check_backward, sampled_kv_heads
from attnlab.kernels.impls import naive
from attnlab.models import AttentionMemory
from attnlab.schema import BACKWARD, FWD_BWD, PREFILL, point_defaults
from paths import ROOT

TINY = Workload("tiny", batch=1, heads=4, kv_heads=2, head_dim=16, dtype="float32", causal=True, seq_lens=(64, 96))
FUSED = AttentionMemory()
QUADRATIC = AttentionMemory(expands_kv=True, fp32_scores=True)


def test_backward_flops_are_two_and_a_half_forwards_and_fwd_bwd_three_and_a_half():
    forward = flops(TINY.point("naive", PREFILL, 1024))
    assert flops(TINY.point("naive", BACKWARD, 1024)) == 2.5 * forward
    assert flops(TINY.point("naive", FWD_BWD, 1024)) == 3.5 * forward
    assert forward == 4 * 4 * 1024 * 1024 / 2 * 16        # causal: half the square


def test_backward_bytes_are_flash_attention_s_reads_and_writes():
    point = TINY.point("naive", BACKWARD, 1024)
    q_sized, kv_sized, lse = 1024 * 4 * 16 * 4, 1024 * 2 * 16 * 4, 1024 * 4 * 4
    # q, out, dout read and dq written; k, v read and dk, dv written; the log-sum-exp read
    assert bytes_moved(point) == 4 * q_sized + 4 * kv_sized + lse
    # forward and backward add the forward's q, k, v read and out and log-sum-exp written
    assert bytes_moved(TINY.point("naive", FWD_BWD, 1024)) == bytes_moved(point) + 2 * q_sized + 2 * kv_sized + lse


def test_predicted_backward_memory_keeps_what_the_backward_needs():
    n = 1024
    point, forward = TINY.point("naive", BACKWARD, n), TINY.point("naive", PREFILL, n)
    rows, q_sized, kv_sized = 4 * n, n * 4 * 16 * 4, n * 2 * 16 * 4
    fused = predicted_peak_bytes(point, FUSED)
    # q, k, v and out; dout and dq, dk, dv; a log-sum-exp and a delta per query row
    assert fused == 2 * q_sized + 2 * kv_sized + 2 * q_sized + 2 * kv_sized + 2 * 4 * rows
    assert predicted_peak_bytes(TINY.point("naive", FWD_BWD, n), FUSED) == fused
    # autograd through the quadratic forward keeps its score and probability matrices and adds dP and dS
    quadratic = predicted_peak_bytes(point, QUADRATIC)
    kept = predicted_peak_bytes(forward, QUADRATIC) - 2 * q_sized - 2 * kv_sized
    expanded_grads = 2 * n * 4 * 16 * 4
    assert quadratic - fused == kept + rows * n * (2 * 4 + 4) + expanded_grads - 4 * rows
    assert quadratic > 10 * fused


def test_training_points_are_prefill_shaped_and_older_records_default_so():
    point = TINY.point("naive", BACKWARD, 96)
    assert point.q_len == 96 and point.tokens_per_call == 96
    assert point_defaults({"mode": "fwd_bwd", "seq_len": 512})["q_len"] == 512


def counting(log: list):
    """naive's backward, noting each forward and each gradient call."""
    backward = registry.autograd_backward(naive.prefill)

    def forward(q, k, v, causal, scale, **options):
        log.append("forward")
        out, grads = backward(q, k, v, causal, scale, **options)
        return out, lambda dout: (log.append("grads"), grads(dout))[1]
    return forward


def off(name: str, factor: float):
    """naive's backward with one gradient scaled by `factor`."""
    backward = registry.autograd_backward(naive.prefill)

    def forward(q, k, v, causal, scale, **options):
        out, grads = backward(q, k, v, causal, scale, **options)

        def wrong(dout):
            found = dict(zip(("dq", "dk", "dv"), grads(dout)))
            found[name] = found[name] * factor
            return found["dq"], found["dk"], found["dv"]
        return out, wrong
    return forward


@pytest.fixture
def fake_kernels():
    log = []
    kernels = {"test-counting-backward": counting(log), "test-dk-off": off("dk", 1.05)}
    for name, backward in kernels.items():
        registry.register_kernel(name, prefill=naive.prefill, backward=backward, description="test only",
                                 dtypes=(torch.float32,), devices=("cpu",))
    yield log
    for name in kernels:
        registry.unregister(name)


def test_the_backward_call_times_the_gradients_alone_on_one_forward(fake_kernels):
    call = build_call(TINY.point("test-counting-backward", BACKWARD, 64), "cpu")
    assert fake_kernels == ["forward"]             # the forward ran once, when the call was built
    assert call.verify().ok
    for _ in range(3):
        dq, dk, dv = call.run()
    assert fake_kernels == ["forward"] + ["grads"] * 4
    assert dk.shape == (1, 64, 2, 16) and set(call.inputs) == {"q", "k", "v", "dout"}


def test_the_fwd_bwd_call_times_both(fake_kernels):
    call = build_call(TINY.point("test-counting-backward", FWD_BWD, 64), "cpu")
    assert fake_kernels == []
    out, (dq, dk, dv) = call.run()
    call.run()
    assert fake_kernels == ["forward", "grads"] * 2 and out.shape == dq.shape


def test_the_check_catches_a_wrong_dk(fake_kernels):
    verdict = build_call(TINY.point("test-dk-off", BACKWARD, 96), "cpu").verify()
    assert not verdict.ok and verdict.reason.startswith("dk:")


def _autograd(q, k, v, dout, **shape):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = naive.prefill(*leaves, shape["causal"], shape["scale"], window=shape["window"], softcap=shape["softcap"])
    return out.detach(), torch.autograd.grad(out, leaves, dout)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradients_of_autograd_pass_and_one_wrong_gradient_fails_by_name(dtype):
    torch.manual_seed(0)      # past 256 rows, so that rows are sampled
    q, dout = torch.randn(1, 272, 4, 16, dtype=dtype), torch.randn(1, 272, 4, 16, dtype=dtype)
    k, v = torch.randn(1, 272, 2, 16, dtype=dtype), torch.randn(1, 272, 2, 16, dtype=dtype)
    shape = dict(causal=True, scale=0.25, window=(100, -1), softcap=5.0)
    out, grads = _autograd(q, k, v, dout, **shape)
    assert check_backward(q, k, v, dout, grads, out=out, **shape).ok
    for i, name in enumerate(("dq", "dk", "dv")):
        wrong = list(grads)
        wrong[i] = wrong[i] * 1.1
        verdict = check_backward(q, k, v, dout, wrong, **shape)
        assert not verdict.ok and verdict.reason.startswith(f"{name}:")
    verdict = check_backward(q, k, v, dout, grads, out=out * 1.1, **shape)
    assert verdict.reason.startswith("out:")


def test_gradients_of_the_wrong_form_are_named():
    q = k = v = dout = torch.randn(1, 8, 2, 16)
    assert "expected (dq, dk, dv)" in check_backward(q, k, v, dout, (q, k), causal=False, scale=0.25).reason
    wrong = check_backward(q, k, v, dout, (q, k.double(), v), causal=False, scale=0.25)
    assert wrong.reason.startswith("dk: returned dtype")


def test_the_sampled_kv_heads_are_one_or_two_and_seeded():
    assert sampled_kv_heads(1) == [0]
    assert len(sampled_kv_heads(8)) == 2 and sampled_kv_heads(8, seed=3) == sampled_kv_heads(8, seed=3)


def test_a_sweep_records_checked_training_points_and_a_wrong_gradient_untimed(tmp_path, fake_kernels):
    config = sw.SweepConfig(workload=TINY, device="cpu", out=tmp_path / "run.jsonl", modes=(BACKWARD, FWD_BWD),
                            kernels=["naive", "test-dk-off"], point_budget_s=0.01, rounds=1)
    sw.run_sweep(config)
    records = {(r["kernel"], r["mode"], r["seq_len"]): r for r in rec.read_records(config.out)}
    assert len(records) == 8
    good = records[("naive", BACKWARD, 96)]
    assert good["status"] == "ok" and good["check_error"] <= good["check_bound"] and good["check_rows"] > 96
    assert good["flops"] == flops(TINY.point("naive", BACKWARD, 96)) and good["tflops"] > 0 and good["q_len"] == 96
    assert records[("naive", FWD_BWD, 64)]["status"] == "ok"
    wrong = records[("test-dk-off", BACKWARD, 64)]
    assert wrong["status"] == "wrong" and "dk:" in wrong["reason"] and wrong.get("times_ms") is None


def test_the_command_lines_take_the_training_modes(tmp_path):
    args = build_parser().parse_args(["sweep", "--modes", "backward,fwd_bwd", "--device", "cpu"])
    assert args.modes == ["backward", "fwd_bwd"]
    from attnlab.cli.sweep import build_config
    assert build_config(args).modes == (BACKWARD, FWD_BWD)
    assert build_parser().parse_args(["lab", "--modes", "backward"]).modes == ["backward"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["lab", "--modes", "backwards"])
    args = build_parser().parse_args(["sweep", "--modes", "backwards", "--device", "cpu"])
    with pytest.raises(ValueError, match="--modes: expected some of prefill, decode, backward, fwd_bwd"):
        build_config(args)


@pytest.mark.slow      # pytest in a process of its own
def test_the_benchmark_grid_includes_the_backward_by_default():
    done = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "--benchmark-only", "--collect-only", "-q",
                           "-p", "no:cacheprovider", "--attnlab-kernels=naive", "--attnlab-seq-lens=128",
                           "--attnlab-rounds=1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "test_attention[cpu-small-backward-naive-128-r0]" in done.stdout


def test_an_option_the_backward_does_not_take_leaves_its_points_unsupported():
    name = "test-window-forward-only"
    registry.register_kernel(name, prefill=naive.prefill, backward=registry.autograd_backward(naive.prefill),
                             options=("window",), backward_options=(), description="test only",
                             dtypes=(torch.float32,), devices=("cpu",))
    try:
        windowed = TINY.override(window=32)
        assert "window in its backward" in sw.support_reason(windowed.point(name, BACKWARD, 64), "cpu")
        assert sw.support_reason(windowed.point(name, PREFILL, 64), "cpu") == ""
    finally:
        registry.unregister(name)
