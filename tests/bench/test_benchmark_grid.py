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
    command = [sys.executable, "-m", "pytest", "benchmarks/", "--benchmark-only", f"--benchmark-json={out}",
               "-q", "-p", "no:cacheprovider", "--attnlab-seq-lens=128,256", "--attnlab-kernels=naive,sdpa-flash",
               "--attnlab-budget-s=0.01"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads(out.read_text())
    benchmarks = data["benchmarks"]
    assert len(benchmarks) == 8          # 2 kernels x 2 modes x 2 lengths
    env = data["machine_info"]["attnlab"]
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
        assert bench["params"] == {"mode": record["mode"], "kernel": record["kernel"], "seq_len": record["seq_len"]}
        assert bench["name"].startswith(f"test_attention[cpu-small-{record['mode']}-{record['kernel']}-")
        names.add(bench["name"])
    assert len(names) == 8
