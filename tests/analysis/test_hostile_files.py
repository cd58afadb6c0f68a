"""Files of any shape load without a traceback: odd content is skipped or marked invalid by
file and line, repeated faults are summarised, and conflicts between files are reported."""
import json

import pytest

pytest.importorskip("pandas")
pytest.importorskip("scipy")

from attnlab.analysis.analyze import analyze  # noqa: E402
from attnlab.analysis.load import load  # noqa: E402


def rec(seq_len=1024, **extra):
    return {"schema": "attnlab.result/1", "run_id": "r", "kernel": "k", "mode": "decode", "workload": "w",
            "dtype": "bfloat16", "batch": 1, "heads": 8, "kv_heads": 8, "head_dim": 64, "causal": True,
            "seq_len": seq_len, "q_len": 1, "status": "ok", "median_ms": 1.0 + seq_len / 1e5,
            "times_ms": [1.0 + seq_len / 1e5] * 3, "device": "cpu", **extra}


GOOD = [rec(n) for n in (1024, 2048, 4096)]
DEEP = "[" * 100_000 + "]" * 100_000
HOSTILE_JSON = {
    "deeply nested": DEEP,
    "a number too long to read": "[" + "9" * 5000 + "]",
    "benchmarks of null": json.dumps({"benchmarks": [None, 3, "x"]}),
    "extra_info a string": json.dumps({"benchmarks": [{"name": "b", "extra_info": "attnlab.result/1"}]}),
    "stats a string": json.dumps({"benchmarks": [{"name": "b", "extra_info": rec(), "stats": "fast"}]}),
    "stats data of strings": json.dumps({"benchmarks": [{"name": "b", "stats": {"data": ["a"], "median": "b"},
                                                         "extra_info": {**rec(), "median_ms": None}}]}),
    "machine_info a list": json.dumps({"benchmarks": [{"name": "b"}], "machine_info": [1], "commit_info": "c"}),
}
HOSTILE_RECORDS = {
    "run_id a list": {"run_id": ["a", "b"]},
    "kernel an object": {"kernel": {"name": "k"}},
    "string times": {"times_ms": ["1", "2"]},
    "seq_len 10^30": {"seq_len": 10**30},
    "an infinite median": {"median_ms": 1e999},
    "status a number": {"status": 1},
}


@pytest.mark.parametrize("case", sorted(HOSTILE_JSON))
def test_a_hostile_json_file_is_skipped_or_read_without_a_traceback(tmp_path, case):
    (tmp_path / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    (tmp_path / "bad.json").write_text(HOSTILE_JSON[case])
    result = analyze([tmp_path], tmp_path / "out", charts=False, n_boot=50)
    assert len(result.fits) == 1 and result.fits[0].n_points == 3
    problems = result.warnings + [e["reason"] for e in result.excluded]
    assert any("bad.json" in w for w in result.warnings) or any("invalid" in p for p in problems), problems


@pytest.mark.parametrize("case", sorted(HOSTILE_RECORDS))
def test_a_hostile_record_is_named_by_file_and_line(tmp_path, case):
    lines = GOOD + [{**rec(8192), **HOSTILE_RECORDS[case]}]
    (tmp_path / "run.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    result = analyze([tmp_path], tmp_path / "out", charts=False, n_boot=50)
    (bad,) = [e for e in result.excluded if e["reason"].startswith("invalid")]
    assert bad["file"].endswith("run.jsonl") and bad["line"] == 4
    assert result.fits[0].n_points == 3


def test_a_deeply_nested_line_in_jsonl_is_skipped(tmp_path):
    (tmp_path / "run.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GOOD[:2]) + DEEP + "\n"
                                        + json.dumps(GOOD[2]) + "\n")
    loaded = load(tmp_path)
    assert len(loaded.ok) == 3 and any("run.jsonl:3: skipped a line that is not JSON" in w for w in loaded.warnings)


def test_repeated_faults_in_a_file_make_one_warning(tmp_path):
    garbage = "".join(f"garbage {i}\n" for i in range(1728))
    (tmp_path / "run.jsonl").write_text(garbage + "".join(json.dumps(r) + "\n" for r in GOOD))
    (tmp_path / "grid.json").write_text(json.dumps({"benchmarks": [{"name": f"b{i}"} for i in range(500)]}))
    warnings = load(tmp_path).warnings
    assert len(warnings) == 2
    assert "skipped 1728 lines (1, 2, 3, 4, 5 and 1723 more) that are not JSON" in " ".join(warnings)
    assert "skipped 500 benchmark(s)" in " ".join(warnings)


def test_two_files_under_one_run_id_are_reported(tmp_path):
    env = {"schema": "attnlab.environment/1", "run_id": "r", "time": "2026-11-27T00:00:00Z", "gpu_name": "A"}
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [env, *GOOD]))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in
                                              [{**env, "gpu_name": "B"}, {**GOOD[0], "median_ms": 9.0}]))
    loaded = load(tmp_path)
    assert any("run 'r'" in w and "gpu_name" in w for w in loaded.warnings)
    assert any("run 'r' recorded 1 point(s) more than once" in w and "a.jsonl" in w and "b.jsonl" in w
               for w in loaded.warnings)
    assert len(loaded.ok) == 3   # still one record per point
