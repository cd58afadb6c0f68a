"""One record stands for each point: retractions, invalid values and re-measurements are left
out by name, never averaged in."""
import json

import pytest

pytest.importorskip("pandas")

from attnlab.analysis.load import load  # noqa: E402


def env(run_id, time):
    return {"schema": "attnlab.environment/1", "run_id": run_id, "time": time, "gpu_name": "NVIDIA H100 80GB HBM3"}


def rec(run_id, seq_len=1024, median_ms=1.0, status="ok", kernel="k", mode="decode", **extra):
    return {"schema": "attnlab.result/1", "run_id": run_id, "kernel": kernel, "mode": mode, "workload": "w",
            "dtype": "bfloat16", "batch": 1, "heads": 32, "kv_heads": 8, "head_dim": 128, "causal": True,
            "seq_len": seq_len, "q_len": 1, "status": status, "reason": None, "median_ms": median_ms,
            "times_ms": [median_ms] * 3 if median_ms is not None else [], "device": "NVIDIA H100 80GB HBM3", **extra}


def retraction(run_id, **fields):
    return {"schema": "attnlab.retraction/1", "run_id": run_id, "reason": "timer fault", **fields}


def write(path, *objects):
    path.write_text("".join(json.dumps(o) + "\n" for o in objects))
    return path


def fate(loaded, run_id, seq_len=1024, mode="decode"):
    r = loaded.results
    rows = r[(r["run_id"] == run_id) & (r["seq_len"] == seq_len) & (r["mode"] == mode)]
    assert len(rows) == 1
    return rows.iloc[0]["excluded"]


def test_a_retracted_record_is_left_out_with_its_reason(tmp_path):
    write(tmp_path / "run.jsonl", env("a", "2026-11-27T00:00:00Z"), rec("a", 1024), rec("a", 32768),
          rec("a", 1024, kernel="k2", mode="prefill"))
    write(tmp_path / "retractions.jsonl", retraction("a", mode="decode", max_seq_len=16384))
    loaded = load(tmp_path)
    assert fate(loaded, "a").startswith("retracted: timer fault")
    assert "retractions.jsonl:1" in fate(loaded, "a")
    assert fate(loaded, "a", 32768) == ""                                        # past the range
    assert fate(loaded, "a", mode="prefill") == ""                               # another mode
    assert list(loaded.results["valid"]) == [False, True, True]


def test_the_retractions_beside_a_named_file_apply_too(tmp_path):
    run = write(tmp_path / "run.jsonl", env("a", "2026-11-27T00:00:00Z"), rec("a"))
    write(tmp_path / "retractions.jsonl", retraction("a"))
    assert fate(load(run), "a").startswith("retracted")


def test_a_retraction_of_a_run_nobody_holds_is_named(tmp_path):
    write(tmp_path / "run.jsonl", env("a", "2026-11-27T00:00:00Z"), rec("a"))
    write(tmp_path / "retractions.jsonl", retraction("no-such-run"), retraction("a", kernel="other"),
          {"schema": "attnlab.retraction/1", "run_id": "a"}, retraction("a", max_seq_len="16k"))
    warnings = load(tmp_path).warnings
    assert any("'no-such-run'" in w and "none of the loaded files" in w for w in warnings)
    assert any("retractions.jsonl:2" in w and "matches none of its records" in w for w in warnings)
    assert any("retractions.jsonl:3" in w and "without a reason" in w for w in warnings)
    assert any("retractions.jsonl:4" in w and "max_seq_len" in w for w in warnings)


def test_the_latest_valid_run_stands_and_the_others_say_why(tmp_path):
    write(tmp_path / "runs.jsonl", env("early", "2026-11-27T23:51:00Z"), rec("early", median_ms=0.15),
          env("late", "2026-11-28T00:01:00Z"), rec("late", median_ms=0.02),
          env("later-skipped", "2026-11-28T01:00:00Z"), rec("later-skipped", median_ms=None, status="skipped"),
          env("later-oom", "2026-11-28T02:00:00Z"), rec("later-oom", median_ms=None, status="oom"))
    bench = {"benchmarks": [{"name": "b", "group": "g", "stats": {"median": 3e-5},
                             "extra_info": {**rec("grid", median_ms=0.03)}}],
             "machine_info": {"attnlab": {"run_id": "grid", "time": "2026-11-27T23:55:00Z"}}}
    (tmp_path / "grid.json").write_text(json.dumps(bench))
    loaded = load(tmp_path)
    assert fate(loaded, "late") == ""
    assert fate(loaded, "early") == "superseded by run late, which measured the point later"
    assert fate(loaded, "grid") == "superseded by run late, which measured the point later"   # one rule for both
    assert fate(loaded, "later-skipped") == "superseded by run late, which measured the point ok"
    assert fate(loaded, "later-oom") == "superseded by run late, which measured the point ok"
    assert list(loaded.ok["run_id"]) == ["late"]
    # Superseded records are real measurements: valid, for intervals and --all-runs.
    assert loaded.results.set_index("run_id").loc[["early", "grid"], "valid"].all()


def test_a_failure_stands_where_no_run_measured_the_point_ok(tmp_path):
    write(tmp_path / "runs.jsonl", env("a", "2026-11-27T00:00:00Z"), rec("a", median_ms=None, status="oom"),
          env("b", "2026-11-28T00:00:00Z"), rec("b", median_ms=None, status="skipped"))
    loaded = load(tmp_path)
    assert fate(loaded, "a") == "" and fate(loaded, "b").startswith("superseded by run a")


@pytest.mark.parametrize("bad, reason", [
    ({"median_ms": float("inf")}, "median_ms"),
    ({"median_ms": -1.0}, "median_ms"),
    ({"median_ms": "fast"}, "median_ms"),
    ({"median_ms": 1e308}, "below a day"),
    ({"times_ms": [1.0, float("nan"), 1.0]}, "times_ms holds nan"),
    ({"times_ms": "1,2,3"}, "times_ms is str"),
    ({"seq_len": 0}, "seq_len 0"),
    ({"seq_len": -256}, "seq_len -256"),
    ({"seq_len": 1e18}, "seq_len 1e+18"),
    ({"seq_len": 1024.5}, "seq_len 1024.5"),
    ({"mode": "sideways"}, "mode 'sideways'"),
    ({"status": None}, "no status"),
    ({"status": "fine"}, "status 'fine'"),
])
def test_values_that_cannot_be_a_measurement_are_named_with_file_and_line(tmp_path, bad, reason):
    write(tmp_path / "run.jsonl", env("a", "2026-11-27T00:00:00Z"), rec("a", seq_len=2048), {**rec("a"), **bad})
    from attnlab.analysis.fits import left_out
    loaded = load(tmp_path)
    invalid = loaded.results[loaded.results["excluded"].str.startswith("invalid")]
    assert len(invalid) == 1 and reason in invalid.iloc[0]["excluded"]
    assert not invalid.iloc[0]["valid"] and len(loaded.ok) == 1
    (entry,) = [e for e in left_out(loaded.results, []) if e["reason"].startswith("invalid")]
    assert entry["file"].endswith("run.jsonl") and entry["line"] == 3


def test_an_invalid_record_never_supersedes_a_valid_one(tmp_path):
    write(tmp_path / "runs.jsonl", env("a", "2026-11-27T00:00:00Z"), rec("a", median_ms=1.0),
          env("b", "2026-11-28T00:00:00Z"), rec("b", median_ms=float("nan")))
    loaded = load(tmp_path)
    assert fate(loaded, "a") == "" and fate(loaded, "b").startswith("invalid")
