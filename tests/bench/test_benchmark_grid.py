"""The pytest-benchmark grid on the CPU preset, run as a user would, its JSON checked as the
analysis reads it: each benchmark's extra_info is a complete attnlab record."""
import json
import os
import subprocess
import sys

import pytest

from attnlab.bench import records as rec
from paths import ROOT

pytestmark = pytest.mark.slow     # pytest-benchmark in a process of its own

pytest.importorskip("pytest_benchmark")


def test_benchmark_grid_json_holds_complete_records(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "pytest", "--benchmark-only", f"--benchmark-json={out}",
               "-q", "-p", "no:cacheprovider", "--attnlab-seq-lens=128,256", "--attnlab-kernels=naive,sdpa-flash",
               "--attnlab-modes=prefill,decode", "--attnlab-budget-s=0.01", "--attnlab-rounds=3"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads(out.read_text())
    benchmarks = data["benchmarks"]
    assert len(benchmarks) == 24         # 2 kernels x 2 modes x 2 lengths x 3 rounds
    env = {**data["machine_info"]["attnlab"], **data["commit_info"]["attnlab"]}
    assert not {"run_id", "time", "argv"} & set(data["machine_info"]["attnlab"])   # --benchmark-compare's
    assert env["schema"] == rec.ENV_SCHEMA and env["device_type"] == "cpu"
    names = set()
    for bench in benchmarks:
        record, stats = bench["extra_info"], bench["stats"]
        assert list(record)[:len(rec.FIELDS)] == list(rec.FIELDS)
        assert record["schema"] == rec.SCHEMA and record["status"] == "ok" and record["run_id"] == env["run_id"]
        assert record["workload"] == "cpu-small" and record["harness"] == "pytest-benchmark"
        # the record's times are pytest-benchmark's own rounds, in milliseconds
        assert len(record["times_ms"]) == stats["rounds"] >= 5
        assert record["median_ms"] == pytest.approx(stats["median"] * 1e3)
        assert record["tflops"] == pytest.approx(record["flops"] / (record["median_ms"] / 1e3) / 1e12)
        assert bench["group"] == f"{record['mode']} cpu-small seq_len={record['seq_len']:06d}"
        assert bench["params"] == {"mode": record["mode"], "kernel": record["kernel"], "seq_len": record["seq_len"],
                                   "round_index": record["round"]}
        assert bench["name"].startswith(f"test_attention[cpu-small-{record['mode']}-{record['kernel']}-")
        assert bench["name"].endswith(f"-r{record['round']}]") and record["rounds"] == 3
        assert record["order_seed"] == env["order_seed"] is not None
        names.add(bench["name"])
    assert len(names) == 24
    # the rounds of each point read as one record, as compare and the fits read them
    from attnlab.analysis.load import load
    standing = load(out).ok
    assert len(standing) == 8 and set(standing["rounds_measured"]) == {3}


def run_pytest(*args, cwd=ROOT):
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return done, done.stdout + done.stderr


QUICK = ("--attnlab-seq-lens=128", "--attnlab-kernels=naive,sdpa-flash", "--attnlab-modes=prefill",
         "--attnlab-budget-s=0.01")


def test_benchmark_only_from_the_root_runs_the_grid_and_prints_its_rates(tmp_path):
    out = tmp_path / "root.json"
    done, output = run_pytest("--benchmark-only", f"--benchmark-json={out}", *QUICK)
    assert done.returncode == 0, output[-3000:]
    assert {b["params"]["kernel"] for b in json.loads(out.read_text())["benchmarks"]} == {"naive", "sdpa-flash"}
    rates = output[output.index("attnlab rates"):].splitlines()
    assert rates[1].split() == ["mode", "kernel", "seq_len", "median", "ms", "TFLOP/s", "GB/s"]
    assert {row.split()[1] for row in rates[3:5]} == {"naive", "sdpa-flash"}


def test_plain_pytest_leaves_the_grid_out():
    done, output = run_pytest("--collect-only", "-q", *QUICK)
    assert done.returncode == 0, output[-3000:]
    assert "test_attention[" not in output and "deselected" in output.splitlines()[-1]


def test_saved_runs_compare_in_pytest_benchmark_and_in_attnlab(tmp_path):
    # pytest-benchmark keeps saved runs under the working folder: the grid is named from tmp_path
    storage, here = f"--benchmark-storage=file://{tmp_path / 'saved'}", ("-c", str(ROOT / "pytest.ini"),
                                                                       str(ROOT / "benchmarks"))
    for _ in range(2):
        done, output = run_pytest(*here, "--benchmark-only", "--benchmark-autosave", storage, *QUICK, cwd=tmp_path)
        assert done.returncode == 0, output[-3000:]
    saved = sorted((tmp_path / "saved").rglob("*.json"))
    assert [p.name[:4] for p in saved] == ["0001", "0002"]
    done, output = run_pytest(*here, "--benchmark-only", storage, "--benchmark-compare=0001", *QUICK, cwd=tmp_path)
    assert done.returncode == 0 and "0001" in output and "NOW" in output, output[-3000:]
    assert "machine_info is different" not in output      # run id, time and argv live in commit_info
    compared = subprocess.run([sys.executable, "-m", "attnlab", "compare", str(saved[0]), str(saved[1]),
                               "--json", str(tmp_path / "compare.json")], capture_output=True, text=True, timeout=120)
    assert compared.returncode in (0, 1), compared.stderr
    points = json.loads((tmp_path / "compare.json").read_text())["points"]
    assert {(p["kernel"], p["seq_len"]) for p in points} == {("naive", 128), ("sdpa-flash", 128)}
    assert all(p["p_value"] is not None and len(p["ci"]) == 2 for p in points)
