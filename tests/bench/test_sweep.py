"""The sweep on a CPU: its records, resume after SIGKILL, Ctrl-C, out-of-memory, errors, budget."""
import io
import json
import os
import signal
import subprocess
import sys
import time
import weakref
from collections import Counter

import numpy as np
import pytest
import torch

from attnlab.bench import records as rec
from attnlab.bench import sweep as sw
from attnlab.bench.outcomes import describe
from attnlab.bench.workloads import Workload, flops, point_key
from attnlab.cli import main
from attnlab.cli._progress import make_progress
from attnlab.kernels import registry, resolve
from attnlab.kernels.impls import naive
from paths import ROOT

TINY = Workload("tiny", batch=1, heads=2, kv_heads=1, head_dim=16, dtype="float32", causal=True,
                seq_lens=(128, 256, 512))


@pytest.fixture
def register(monkeypatch):
    """Registers a test-only implementation for one test; the registry is restored after."""
    added = []

    def add(name, prefill=None, decode=None, **fields):
        added.append(name)
        return registry.register_kernel(name, prefill=prefill, decode=decode, description="test only",
                                        dtypes=(torch.float32,), devices=("cpu",), **fields)
    yield add
    for name in added:
        registry.unregister(name)


def _sweep(tmp_path, kernels, progress=None, **kw):
    kw.setdefault("point_budget_s", 0.005)
    kw.setdefault("rounds", 1)     # one record a point; rounds are tested in test_rounds.py
    config = sw.SweepConfig(workload=TINY, device="cpu", out=tmp_path / "run.jsonl", kernels=kernels,
                            **kw)
    return sw.run_sweep(config, progress=progress)


def _by_seq_len(result, kernel, mode="prefill"):
    return {r["seq_len"]: r for r in result.records if r["kernel"] == kernel and r["mode"] == mode}


# --- the records of a real sweep -------------------------------------------------------------

def test_cli_sweep_writes_valid_records_with_derived_figures(tmp_path, capsys):
    out = tmp_path / "cpu.jsonl"
    code = main(["sweep", "--device", "cpu", "--rounds", "1", "--kernels", "naive,sdpa-math,sdpa-flash",
                 "--seq-lens", "128,256", "--heads", "4", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "12 ok" in printed and "median ms per call" in printed
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    env = lines[0]
    assert env["schema"] == rec.ENV_SCHEMA and env["device_type"] == "cpu" and env["torch"] == torch.__version__
    assert "NVML" in env["nvml_reason"]
    records = rec.read_records(out)
    assert len(records) == 12 and all(r["run_id"] == env["run_id"] for r in records)
    assert {(r["kernel"], r["mode"], r["seq_len"]) for r in records} == {
        (k, m, n) for k in ("naive", "sdpa-math", "sdpa-flash") for m in ("prefill", "decode") for n in (128, 256)}
    for r in records:
        assert list(r)[:len(rec.FIELDS)] == list(rec.FIELDS)
        assert r["schema"] == rec.SCHEMA and r["status"] == "ok" and r["device"] == "cpu"
        assert r["workload"] == "cpu-small[heads=4]" and (r["heads"], r["kv_heads"]) == (4, 2)
        assert len(r["times_ms"]) >= 5
        assert r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
        assert r["median_ms"] == pytest.approx(float(np.median(r["times_ms"])))
        seconds = r["median_ms"] / 1e3
        n, d = r["seq_len"], r["head_dim"]
        if r["mode"] == "prefill":
            assert r["q_len"] == n and r["flops"] == 4 * 1 * 4 * n * n * d / 2
            assert r["tokens_per_s"] == pytest.approx(n / seconds)
            assert r["bytes"] == (2 * n * 4 * d + 2 * n * 2 * d) * 4
        else:
            assert r["q_len"] == 1 and r["flops"] == 4 * 1 * 4 * n * d
            assert r["tokens_per_s"] == pytest.approx(1 / seconds)
            assert r["bytes"] == (2 * 4 * d + 2 * n * 2 * d) * 4
        assert r["tflops"] == pytest.approx(r["flops"] / seconds / 1e12)
        assert r["gbps"] == pytest.approx(r["bytes"] / seconds / 1e9)
        assert r["predicted_mem_bytes"] > r["bytes"]
        assert r["power_w_mean"] is None and r["energy_j"] is None and r["peak_mem_bytes"] is None
    # the same file again without --resume is refused, naming the flag
    assert main(["sweep", "--device", "cpu", "--kernels", "naive", "--seq-lens", "128", "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_unknown_kernel_and_mode_are_refused(tmp_path, capsys):
    assert main(["sweep", "--device", "cpu", "--kernels", "nope", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "unknown implementation 'nope'" in capsys.readouterr().err
    assert main(["sweep", "--device", "cpu", "--modes", "train", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "--modes" in capsys.readouterr().err


def test_unsupported_points_say_why(tmp_path):
    result = _sweep(tmp_path, ["naive", "triton", "flash-attn"], modes=("decode",), seq_lens=[128])
    status = {r["kernel"]: r for r in result.records}
    assert status["naive"]["status"] == "ok"
    assert status["triton"]["status"] == "unsupported" and "not decode" in status["triton"]["reason"]
    assert status["flash-attn"]["status"] == "unsupported" and "not cpu" in status["flash-attn"]["reason"]


# --- resume and interruption, in a real subprocess ----------------------------------------

SUBPROCESS_ARGS = ["--device", "cpu", "--rounds", "1", "--kernels", "naive,sdpa-math", "--seq-lens", "128,192,256", "--heads", "4"]
PLANNED = {(k, m, n) for k in ("naive", "sdpa-math") for m in ("prefill", "decode") for n in (128, 192, 256)}


def _start_sweep(out, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # Ctrl-C as at a terminal: a pytest started in the background by a shell ignores SIGINT,
    # and its children would inherit that.
    return subprocess.Popen([sys.executable, "-m", "attnlab", "sweep", *SUBPROCESS_ARGS, "--out", str(out), *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_results(out, count, proc, timeout_s=60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if out.exists() and sum('"attnlab.result/1"' in line for line in out.read_text().splitlines()) >= count:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError(f"fewer than {count} records after {timeout_s} s")


@pytest.mark.slow    # a sweep in a process of its own
def test_resume_after_sigkill_loses_and_duplicates_nothing(tmp_path):
    out = tmp_path / "killed.jsonl"
    proc = _start_sweep(out)
    _wait_for_results(out, 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    before = rec.read_records(out)
    assert 3 <= len(before) < len(PLANNED)
    with open(out, "a") as f:      # as if the kill had landed in the middle of a line
        f.write('{"schema": "attnlab.result/1", "kernel": "nai')
    finished = subprocess.run([sys.executable, "-m", "attnlab", "sweep", *SUBPROCESS_ARGS, "--out", str(out),
                               "--resume"], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                              capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    after = rec.read_records(out)
    seen = Counter((r["kernel"], r["mode"], r["seq_len"]) for r in after)
    assert set(seen) == PLANNED and max(seen.values()) == 1
    assert after[:len(before)] == before                  # what the killed run wrote is kept as it was
    assert len(rec.read_environments(out)) == 2           # one environment line per run
    assert all(json.loads(line) for line in out.read_text().splitlines())   # the partial line is gone
    assert f"({len(before)} already in the file)" in finished.stdout


@pytest.mark.slow    # a sweep in a process of its own
def test_ctrl_c_stops_cleanly_and_says_how_to_go_on(tmp_path):
    out = tmp_path / "interrupted.jsonl"
    proc = _start_sweep(out)
    _wait_for_results(out, 2, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "--resume" in err
    text = out.read_text()
    assert text.endswith("\n")
    records = rec.read_records(out)
    assert 2 <= len(records) < len(PLANNED) and all(r["status"] == "ok" for r in records)


@pytest.mark.parametrize("resume", [False, True], ids=["new", "resume"])
def test_two_sweeps_on_one_file_one_runs_and_the_other_is_told_who(tmp_path, resume):
    out = tmp_path / "shared.jsonl"
    extra = ("--resume",) if resume else ()
    procs = [_start_sweep(out, *extra) for _ in range(2)]     # started together: they race for the file
    errs = {proc.pid: proc.communicate(timeout=180)[1] for proc in procs}
    assert sorted(proc.returncode for proc in procs) == [0, 2], errs
    winner = next(proc for proc in procs if proc.returncode == 0)
    refused = errs[next(proc for proc in procs if proc.returncode == 2).pid]
    assert refused.strip().splitlines() == [refused.strip()] and "Traceback" not in refused
    assert f"--out: {out} is being written by" in refused and f"pid {winner.pid} " in refused
    seen = Counter((r["kernel"], r["mode"], r["seq_len"]) for r in rec.read_records(out))
    assert set(seen) == PLANNED and max(seen.values()) == 1
    assert len(rec.read_environments(out)) == 1 and not list(tmp_path.glob("*.lock"))


# --- out of memory, errors and the budget -------------------------------------------------------

def test_predicted_oom_is_recorded_without_launching(tmp_path, register):
    launched = []

    def spy(q, k, v, causal, scale):
        launched.append(q.shape[1])
        return naive.prefill(q, k, v, causal, scale)

    register("test-spy", prefill=spy)
    limit = sw.predicted_point_bytes(TINY.point("test-spy", "prefill", 256), "cpu") + 1
    result = _sweep(tmp_path, ["test-spy"], modes=("prefill",), free_memory=lambda: limit)
    records = _by_seq_len(result, "test-spy")
    assert records[128]["status"] == records[256]["status"] == "ok"
    oom = records[512]
    assert oom["status"] == "oom" and oom["oom_predicted"] and "predicted peak" in oom["reason"]
    assert oom["predicted_mem_bytes"] > oom["free_mem_bytes"] == limit
    assert oom["times_ms"] is None and 512 not in launched and 256 in launched


def test_raised_oom_is_caught_memory_released_and_the_sweep_goes_on(tmp_path, register):
    held = []

    def runs_out_at_256(q, k, v, causal, scale):
        if q.shape[1] >= 256:
            held.append(weakref.ref(k))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
        return naive.prefill(q, k, v, causal, scale)

    register("test-oom", prefill=runs_out_at_256)
    result = _sweep(tmp_path, ["test-oom", "naive"], modes=("prefill",))
    records = _by_seq_len(result, "test-oom")
    assert records[128]["status"] == "ok"
    assert records[256]["status"] == "oom" and "Tried to allocate" in records[256]["reason"]
    assert records[512]["status"] == "oom" and "ran out of memory at seq_len 256" in records[512]["reason"]
    assert len(held) == 1 and held[0]() is None        # the point's tensors were freed
    assert all(r["status"] == "ok" for r in _by_seq_len(result, "naive").values())
    assert result.counts == Counter({"ok": 4, "oom": 2})


def test_a_kernel_that_raises_is_an_error_record_and_the_sweep_goes_on(tmp_path, register):
    def broken(q, k, v, causal, scale):
        raise RuntimeError("illegal instruction in tile 7")

    register("test-broken", prefill=broken)
    result = _sweep(tmp_path, ["test-broken", "sdpa-flash"], modes=("prefill",), seq_lens=[128, 256])
    errors = [r for r in result.records if r["status"] == "error"]
    assert len(errors) == 2 and all(r["kernel"] == "test-broken" for r in errors)
    assert errors[0]["reason"] == "RuntimeError: illegal instruction in tile 7"
    assert errors[0]["flops"] == flops(TINY.point("test-broken", "prefill", 128))
    assert [r["status"] for r in _by_seq_len(result, "sdpa-flash").values()] == ["ok", "ok"]
    # errors are settled: a resume does not run them again
    again = _sweep(tmp_path, ["test-broken", "sdpa-flash"], modes=("prefill",), seq_lens=[128, 256], resume=True)
    assert again.records == [] and again.already_done == 4


@pytest.mark.parametrize("raised", [SystemExit(0), SystemExit(7), GeneratorExit("closed"),
                                    RuntimeError("an ordinary error")], ids=["exit0", "exit7", "base", "ordinary"])
def test_a_kernel_that_exits_is_its_points_failure_and_the_command_goes_on(tmp_path, register, capsys, raised):
    """sys.exit() in a kernel is recorded like any error, and the command exits as it does for an
    ordinary error: 1, naming the kernel, once every point is measured."""
    def leaves(q, k, v, causal, scale):
        raise raised

    register("test-exits", prefill=leaves)
    out = tmp_path / "run.jsonl"
    assert main(["sweep", "--device", "cpu", "--rounds", "1", "--workload", "cpu-small", "--kernels",
                 "test-exits,naive", "--modes", "prefill", "--seq-lens", "128,256", "--out", str(out)]) == 1
    records = {(r["kernel"], r["seq_len"]): r for r in rec.read_records(out)}
    assert len(records) == 4 and all(records[("naive", n)]["status"] == "ok" for n in (128, 256))
    expected = describe(raised)
    assert all(records[("test-exits", n)]["status"] == "error" for n in (128, 256))
    assert all(records[("test-exits", n)]["reason"] == expected for n in (128, 256))
    printed = capsys.readouterr()
    assert "2 error, 2 ok" in printed.out
    assert f"attnlab sweep: test-exits failed 2 point(s), first: {expected}" in printed.err


def test_a_systemexit_reason_says_it_was_an_exit_and_its_status():
    assert describe(SystemExit(7)) == "SystemExit: exit status 7"
    assert describe(SystemExit()) == "SystemExit: exit status None"


@pytest.mark.parametrize("window", [str(10 ** 30), "257"])
def test_a_window_longer_than_every_length_is_refused_in_one_line(tmp_path, capsys, window):
    out = tmp_path / "run.jsonl"
    code = main(["sweep", "--device", "cpu", "--workload", "cpu-small", "--kernels", "naive", "--seq-lens", "128,256",
                 "--window", window, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [
        f"attnlab sweep: error: --window: expected a whole number of keys from 1 to the longest length swept, 256 "
        f"(a window that long already masks nothing), got {window}"]
    assert not out.exists()


@pytest.mark.parametrize("window", ["1e30", "4096.5", "0"])
def test_a_window_that_is_no_whole_number_of_keys_is_refused_by_argparse(tmp_path, capsys, window):
    with pytest.raises(SystemExit) as exited:
        main(["sweep", "--device", "cpu", "--window", window, "--out", str(tmp_path / "run.jsonl")])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"argument --window: expected a positive integer, got {window!r}")
    assert not list(tmp_path.iterdir())


def test_a_window_up_to_the_longest_length_is_taken():
    sw.check_window(256, [128, 256])
    sw.check_window(1, [128])
    for window in (0, 257, 2.5, True):
        with pytest.raises(ValueError, match="^window: "):
            sw.check_window(window, [128, 256])


class _FakeClock:
    """Stands in for the sweep's clock: every call of the slow kernel takes 10 s of it."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def test_budget_skips_the_rest_and_a_resume_measures_them(tmp_path, register, monkeypatch):
    clock = _FakeClock()
    monkeypatch.setattr(sw, "time", clock)

    def slow(q, k, v, causal, scale):
        clock.now += 10.0
        return naive.prefill(q, k, v, causal, scale)

    register("test-slow", prefill=slow)
    result = _sweep(tmp_path, ["test-slow"], modes=("prefill",), budget_s=15.0)
    statuses = {n: r["status"] for n, r in _by_seq_len(result, "test-slow").items()}
    assert statuses == {128: "ok", 256: "skipped", 512: "skipped"}
    assert "budget of 15 s" in _by_seq_len(result, "test-slow")[256]["reason"]
    monkeypatch.setattr(sw, "time", time)
    resumed = _sweep(tmp_path, ["test-slow"], modes=("prefill",), resume=True)
    assert [r["seq_len"] for r in resumed.records] == [256, 512] and resumed.counts == Counter({"ok": 2})
    everything = rec.read_records(tmp_path / "run.jsonl")
    latest = rec.latest_per_point(everything, point_key)
    assert [r["status"] for r in latest] == ["ok", "ok", "ok"]
    assert sum(r["status"] == "ok" for r in everything) == 3


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_quiet_off_a_terminal_and_plain_without_rich(tmp_path, monkeypatch):
    quiet = io.StringIO()
    _sweep(tmp_path, ["naive"], modes=("decode",), seq_lens=[128], progress=make_progress(stream=quiet))
    assert quiet.getvalue() == ""
    monkeypatch.setitem(sys.modules, "rich.progress", None)      # as if rich were not installed
    terminal = _Terminal()
    config = sw.SweepConfig(workload=TINY, device="cpu", out=tmp_path / "b.jsonl", kernels=["naive"],
                            modes=("decode",), seq_lens=[128, 256], point_budget_s=0.005, rounds=1)
    sw.run_sweep(config, progress=make_progress(stream=terminal))
    lines = terminal.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("[1/2] decode naive 128: ok")


# --- the record file ---------------------------------------------------------------------

def test_new_record_has_every_contract_field_in_order():
    r = rec.new_record(kernel="k", mode="decode", seq_len=1024, extra_figure=3)
    assert list(r)[:len(rec.FIELDS)] == list(rec.FIELDS) and list(r)[-1] == "extra_figure"
    assert r["schema"] == rec.SCHEMA and r["status"] == "ok" and r["median_ms"] is None
    with pytest.raises(ValueError, match="status"):
        rec.new_record(status="fine")


def test_writer_and_reader_survive_a_cut_last_line(tmp_path):
    path = tmp_path / "r.jsonl"
    with rec.RecordWriter(path) as w:
        w.write({"schema": rec.ENV_SCHEMA, "run_id": "a"})
        w.write(rec.new_record(run_id="a", kernel="k1", median_ms=float("nan")))
    with open(path, "a") as f:
        f.write('{"schema": "attnlab.result/1", "ker')
    assert [r["kernel"] for r in rec.read_records(path)] == ["k1"]
    assert rec.read_records(path)[0]["median_ms"] is None          # NaN is written as null
    with rec.RecordWriter(path) as w:
        w.write(rec.new_record(run_id="b", kernel="k2"))
    assert [r["kernel"] for r in rec.read_records(path)] == ["k1", "k2"]
    # a record complete but for its newline is kept, not cut
    with open(path, "a") as f:
        f.write(rec.dumps(rec.new_record(run_id="b", kernel="k3")))
    with rec.RecordWriter(path) as w:
        w.write(rec.new_record(run_id="b", kernel="k4"))
    assert [r["kernel"] for r in rec.read_records(path)] == ["k1", "k2", "k3", "k4"]


def test_reader_names_a_bad_line_and_a_newer_schema(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"schema": "attnlab.result/1"}\nnot json\n{"schema": "attnlab.result/1"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        rec.read_records(bad)
    newer = tmp_path / "newer.jsonl"
    newer.write_text('{"schema": "attnlab.result/2"}\n')
    with pytest.raises(ValueError, match="newer than this reader"):
        rec.read_records(newer)


def test_environment_on_a_cpu():
    env = rec.environment(["attnlab", "sweep", "--out", "a b.jsonl"], device="cpu")
    assert env["schema"] == rec.ENV_SCHEMA and env["command"] == "attnlab sweep --out 'a b.jsonl'"
    assert env["torch"] == torch.__version__ and env["host"] and env["time"].endswith("+00:00")
    assert env["device_type"] == "cpu" and env["nvml_reason"]
    if (ROOT / ".git").exists():
        assert len(env["git_commit"]) == 40


@pytest.mark.gpu
def test_gpu_sweep_measures_memory_power_and_calibrates(tmp_path):
    workload = Workload("gpu-small", batch=1, heads=8, kv_heads=2, head_dim=128, dtype="bfloat16", causal=True)
    config = sw.SweepConfig(workload=workload, device="cuda", out=tmp_path / "gpu.jsonl",
                            kernels=["naive", "sdpa-flash"], seq_lens=[2048], point_budget_s=0.05,
                            energy_window_s=1.0)
    result = sw.run_sweep(config)
    calibration = [r for r in result.records if r["mode"] == "calibration"]
    assert {r["kernel"] for r in calibration} == {"matmul-bf16", "copy-d2d"}
    matmul = next(r for r in calibration if r["kernel"] == "matmul-bf16")
    copy = next(r for r in calibration if r["kernel"] == "copy-d2d")
    assert 10 < matmul["tflops"] < 5000 and 50 < copy["gbps"] < 20000
    points = [r for r in result.records if r["mode"] != "calibration"]
    assert len(points) == 4 and all(r["status"] == "ok" for r in points)
    for r in points:
        # the prediction from shapes is close to what torch allocated
        assert 0.5 < r["predicted_mem_bytes"] / r["peak_mem_bytes"] < 2.5, r
        if r["power_w_mean"] is not None:
            assert r["energy_j"] > 0 and r["joules_per_token"] > 0 and r["energy_window_s"] >= 1.0
    assert sw.nvml_csv_path(config.out).exists() or result.nvml_reason


def test_default_plan_runs_each_kernel_only_in_its_modes(monkeypatch, tmp_path):
    monkeypatch.setattr(sw, "default_kernels", lambda device_type: ["naive", "triton", "triton-decode"])
    workload = Workload("w", batch=1, heads=2, kv_heads=1, head_dim=16, dtype="float32", causal=True)
    pairs = {(p.kernel, p.mode) for p in sw.plan(sw.SweepConfig(workload, seq_lens=[64], out=tmp_path / "r"))}
    assert pairs == {("naive", "prefill"), ("naive", "decode"), ("triton", "prefill"), ("triton-decode", "decode")}
    named = sw.plan(sw.SweepConfig(workload, seq_lens=[64], kernels=["triton"], out=tmp_path / "r"))
    assert {p.mode for p in named} == {"prefill", "decode"}  # a named kernel is tried, and told no


def test_ablations_run_only_when_named(register, tmp_path):
    calls = []
    register("test-ablation", prefill=lambda *args: calls.append(1) or args[0], ablation_of="naive",
             speed_rank={"cpu": -1})
    assert "test-ablation" not in sw.default_kernels("cpu")
    q = torch.zeros(1, 4, 2, 16)
    assert resolve("auto", "prefill", q).name != "test-ablation"   # though ranked fastest
    _sweep(tmp_path, ["test-ablation"], seq_lens=[128])
    assert calls


def test_default_kernels_on_a_cpu_leave_out_the_emulated_ones():
    kernels = sw.default_kernels("cpu")
    assert {"naive", "sdpa-math", "sdpa-flash"} <= set(kernels)
    assert not {"triton", "triton-decode"} & set(kernels)   # available here, but only interpreted


def test_a_variant_sweep_records_its_options_and_who_refused_them(tmp_path):
    out = tmp_path / "variants.jsonl"
    code = main(["sweep", "--device", "cpu", "--workload", "cpu-small", "--window", "32", "--docs", "2",
                 "--kernels", "naive,sdpa-math", "--modes", "prefill", "--seq-lens", "128", "--out", str(out)])
    assert code == 0
    records = {r["kernel"]: r for r in rec.read_records(out)}
    assert records["naive"]["status"] == "ok" and records["naive"]["workload"] == "cpu-small[window=32,docs=2]"
    assert (records["naive"]["window"], records["naive"]["docs"], records["naive"]["softcap"]) == (32, 2, 0.0)
    # two documents of 64 tokens, each query seeing at most 32 keys: 2 x (32 x 33 / 2 + 32 x 32) pairs
    assert records["naive"]["flops"] == 4 * 8 * (2 * (32 * 33 // 2 + 32 * 32)) * 64
    assert records["sdpa-math"]["status"] == "unsupported" and "varlen" in records["sdpa-math"]["reason"]
