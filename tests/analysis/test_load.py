"""Loading sweep JSONL and pytest-benchmark JSON: formats, odd content, optional packages."""
import json
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("pandas")

from attnlab.analysis import MissingExtra  # noqa: E402
from attnlab.analysis.load import load  # noqa: E402
from paths import SAMPLE


def result(seq_len=1024, status="ok", **extra):
    base = {"schema": "attnlab.result/1", "run_id": "r1", "kernel": "naive", "mode": "prefill", "workload": "w",
            "batch": 1, "heads": 2, "kv_heads": 2, "head_dim": 16, "dtype": "float32", "causal": False,
            "seq_len": seq_len, "q_len": seq_len, "status": status, "reason": None, "times_ms": [1.0, 2.0, 3.0],
            "median_ms": 2.0, "device": "cpu"}
    return {**base, **extra}


def lines(*objects) -> str:
    return "".join(json.dumps(o) + "\n" for o in objects)


def test_committed_benchmark_json_loads_from_extra_info():
    loaded = load(SAMPLE / "benchmark.json")
    results = loaded.results
    assert len(results) == 6 and not loaded.warnings
    assert set(results["source_format"]) == {"pytest-benchmark"}
    assert set(results["kernel"]) == {"triton", "sdpa-flash"}
    # sdpa-flash's extra_info has no times: they come from stats, seconds -> ms.
    stats_only = results[results["kernel"] == "sdpa-flash"].iloc[0]
    document = json.loads((SAMPLE / "benchmark.json").read_text())
    bench = next(b for b in document["benchmarks"] if b["extra_info"]["kernel"] == "sdpa-flash")
    assert stats_only["times_ms"] == pytest.approx([t * 1e3 for t in bench["stats"]["data"]])
    assert stats_only["median_ms"] == pytest.approx(bench["stats"]["median"] * 1e3)
    assert loaded.environments.iloc[0]["host"] == "sample-host"


def test_real_pytest_benchmark_output_loads(tmp_path):
    pytest.importorskip("pytest_benchmark")
    (tmp_path / "test_tiny.py").write_text(textwrap.dedent('''
        import pytest

        @pytest.mark.parametrize("seq_len", [256, 512])
        def test_attention(benchmark, seq_len):
            benchmark.group = "prefill w"
            benchmark.extra_info.update({"schema": "attnlab.result/1", "run_id": "pb", "kernel": "naive",
                "mode": "prefill", "workload": "w", "seq_len": seq_len, "status": "ok", "device": "cpu"})
            benchmark.pedantic(sum, args=(range(seq_len),), rounds=5, iterations=1)
    '''))
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path),
                           f"--benchmark-json={out}"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    loaded = load(out)
    results = loaded.results.sort_values("seq_len")
    assert list(results["seq_len"]) == [256, 512] and not loaded.warnings
    assert all(len(t) == 5 for t in results["times_ms"])  # from stats.data
    assert (results["median_ms"] > 0).all()
    assert results.iloc[0]["benchmark_group"] == "prefill w"


def test_files_and_folders_mix_and_each_file_counts_once():
    loaded = load([SAMPLE, SAMPLE / "results.jsonl"])
    assert len(loaded.files) == 3       # results.jsonl, benchmark.json and the roles beside them
    assert len(loaded.results) == 80
    assert {"sample-h100-20261127", "sample-h100-20261127-pytest-benchmark"} <= set(loaded.environments["run_id"])


def test_failed_points_are_kept_with_their_reasons():
    loaded = load(SAMPLE / "results.jsonl")
    statuses = loaded.results["status"].value_counts()
    assert statuses["oom"] == 4 and statuses["error"] == 1 and statuses["unsupported"] == 8
    assert (loaded.ok["status"] == "ok").all() and len(loaded.ok) == statuses["ok"]
    oom = loaded.results[loaded.results["status"] == "oom"].iloc[0]
    assert "predicted peak" in oom["reason"] and oom["predicted_mem_bytes"] > 80e9


def test_unknown_schemas_warn_and_an_unfinished_last_line_is_ignored_with_one_warning(tmp_path):
    path = tmp_path / "run.jsonl"
    env = {"schema": "attnlab.environment/1", "run_id": "r1", "gpu_name": "NVIDIA L4"}
    text = lines(env, result(1024, device=None), {"schema": "other.tool/9", "x": 1}, result(2048))
    path.write_text(text + "not json at all\n" + json.dumps(result(4096))[:40])  # killed mid-write
    loaded = load(path)
    assert list(loaded.results["seq_len"]) == [1024, 2048]
    assert any("'other.tool/9'" in w for w in loaded.warnings)
    assert any(":5: skipped a line that is not JSON" in w for w in loaded.warnings)
    # The unfinished tail is no error, but it is said once, by file and line.
    (tail,) = [w for w in loaded.warnings if ":6" in w]
    assert tail.startswith(f"{path}:6: ignored an unfinished last line")
    # A record without a device takes its run's GPU name.
    assert loaded.results.iloc[0]["device"] == "NVIDIA L4"


def test_a_bad_line_that_ends_in_a_newline_is_not_taken_for_an_unfinished_one(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_text(lines(result(1024)) + json.dumps(result(2048))[:40] + "\n")
    warnings = load(path).warnings
    assert len(warnings) == 1 and warnings[0].startswith(f"{path}:2: skipped a line that is not JSON")


@pytest.mark.parametrize("schema", ["attnlab.result/2", "attnlab.environment/7", "attnlab.retraction/2"])
def test_a_line_of_a_newer_schema_is_refused_by_file_and_line(tmp_path, schema):
    path = tmp_path / "run.jsonl"
    path.write_text(lines(result(1024), {"schema": schema, "run_id": "r1", "reason": "?"}))
    known = schema.rsplit("/", 1)[0] + "/1"
    with pytest.raises(ValueError, match=rf"run.jsonl:2: written by a newer attnlab \(schema {schema} is newer than "
                                         rf"this reader's {known}\)"):
        load(path)


def test_a_benchmark_of_a_newer_schema_is_refused_by_name(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"benchmarks": [{"name": "b1", "extra_info": result(schema="attnlab.result/2")}]}))
    with pytest.raises(ValueError, match=r"bench.json: benchmark b1: written by a newer attnlab"):
        load(path)


def test_missing_paths_are_named():
    with pytest.raises(FileNotFoundError, match="paths: '/no/such/run'"):
        load(["/no/such/run"])
    with pytest.raises(ValueError, match="paths"):
        load([])


def test_a_missing_extra_is_named_when_a_function_needs_it(monkeypatch, tmp_path):
    (tmp_path / "run.jsonl").write_text(lines(result()))
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if not installed
    with pytest.raises(MissingExtra, match=r"pandas.*attnlab\[analysis\]"):
        load(tmp_path)


def test_the_package_and_the_claim_model_import_without_the_extra():
    code = ("import sys\n"
            "for name in ('pandas', 'scipy', 'seaborn', 'matplotlib'): sys.modules[name] = None\n"
            "import attnlab.analysis\n"
            "from attnlab.analysis.claim import build_claim\n"
            "print(build_claim()[0]['points'][0]['max_batch'])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 100


def test_a_committed_report_or_tuning_beside_the_runs_is_not_read_as_data(tmp_path):
    (tmp_path / "fits.json").write_text(json.dumps({"fits": []}))
    (tmp_path / "claim.json").write_text(json.dumps({"model": "llama3-8b", "claim": {}}))
    (tmp_path / "tuning.json").write_text(json.dumps({"schema": "attnlab.tuning/1", "cases": []}))
    (tmp_path / "other.json").write_text(json.dumps({"something": 1}))
    rec = {"schema": "attnlab.result/1", "run_id": "r", "kernel": "k", "mode": "prefill", "status": "ok",
           "seq_len": 1024, "median_ms": 1.0}
    (tmp_path / "r.jsonl").write_text(json.dumps(rec) + "\n")
    loaded = load([tmp_path])
    assert len(loaded.results) == 1
    assert len(loaded.warnings) == 1
    assert "other.json" in loaded.warnings[0] and "pytest-benchmark" in loaded.warnings[0]
