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
    "causal a list": {"causal": [1]},
    "l2_flush a number": {"l2_flush": 3},
}
# Values of any point field that must neither break a chart nor join the record to another point.
ODD_VALUES = ([1, 2], {"a": 1}, "text", True, 10**30, -1, "", 1.5)


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


# --- one reader, one rule ---------------------------------------------------------------------

def cut(record) -> str:
    """The start of a record, as a writer killed mid-line leaves it: no newline after it."""
    return json.dumps(record)[:30]


@pytest.mark.parametrize("command", ["analyze", "report", "compare"])
def test_an_unfinished_last_line_is_read_past_with_one_warning_naming_it(command, tmp_path, capsys):
    from attnlab.cli import main

    run = tmp_path / "run.jsonl"
    run.write_text("".join(json.dumps(r) + "\n" for r in GOOD) + cut(rec(8192)))
    argv = [str(run), str(run)] if command == "compare" else [str(run), "--out", str(tmp_path / "out"),
                                                             "--bootstrap", "50", "--formats", "png"]
    assert main([command, *argv]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "unfinished last line" in line]
    assert len(warned) == (2 if command == "compare" else 1)      # compare reads the file as both sides
    assert all(f"{run}:4: ignored an unfinished last line" in line for line in warned)


def test_a_bad_line_before_the_last_stops_compare_but_analyze_reads_past_it(tmp_path, capsys):
    from attnlab.cli import main

    run = tmp_path / "run.jsonl"
    run.write_text("".join(json.dumps(r) + "\n" for r in GOOD[:2]) + cut(rec(8192)) + "\n" + json.dumps(GOOD[2]))
    assert main(["compare", str(run), str(run)]) == 2
    assert f"{run}:3: skipped a line that is not JSON" in capsys.readouterr().err
    assert main(["analyze", str(run), "--out", str(tmp_path / "out"), "--no-charts", "--bootstrap", "50"]) == 0
    assert f"{run}:3: skipped a line that is not JSON" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["analyze", "compare"])
def test_a_file_of_a_newer_schema_is_named_as_written_by_a_newer_attnlab(command, tmp_path, capsys):
    from attnlab.cli import main

    newer = tmp_path / "newer.jsonl"
    newer.write_text("".join(json.dumps({**r, "schema": "attnlab.result/2"}) + "\n" for r in GOOD))
    argv = [str(newer), str(newer)] if command == "compare" else [str(newer), "--out", str(tmp_path / "out")]
    assert main([command, *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no" not in err
    assert (f"{newer}:1: written by a newer attnlab (schema attnlab.result/2 is newer than this reader's "
            f"attnlab.result/1); upgrade attnlab to read it") in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field", ["batch", "q_len", "window", "softcap", "docs", "l2_flush", "decode_tokens",
                                   "prefill_kernel", "device", "workload"])
def test_odd_values_of_a_point_field_are_charted_or_named_without_a_traceback(field, tmp_path):
    lines = GOOD + [rec(n, **{field: value}) for n, value in zip(range(8192, 8192 + len(ODD_VALUES)), ODD_VALUES)]
    (tmp_path / "run.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    result = analyze([tmp_path / "run.jsonl"], tmp_path / "out", n_boot=50, formats=("png",))
    assert result.fits[0].n_points == 3 and result.charts
