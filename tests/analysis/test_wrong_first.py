"""A wrong point comes first in the report, and nowhere as a speed."""
import json

from attnlab.cli import main

ENV = {"schema": "attnlab.environment/1", "run_id": "RUN", "host": "here", "cpu": "cpu"}


def record(kernel, seq_len, status, median=None, reason=None):
    return {"schema": "attnlab.result/1", "run_id": "RUN", "kernel": kernel, "mode": "prefill", "workload": "w",
            "batch": 1, "heads": 2, "kv_heads": 1, "head_dim": 16, "dtype": "float32", "causal": True,
            "seq_len": seq_len, "q_len": seq_len, "status": status, "reason": reason,
            "times_ms": [median] * 5 if median else None, "median_ms": median, "p10_ms": median, "p90_ms": median,
            "flops": 1e9, "bytes": 1e6, "tflops": 1e9 / (median / 1e3) / 1e12 if median else None, "device": "cpu",
            "check_error": 0.5 if status == "wrong" else 1e-7, "check_bound": 1e-6}


def test_a_wrong_point_is_listed_first_and_never_as_a_speed(tmp_path):
    lines = [ENV] + [record("good", n, "ok", 0.001 * n) for n in (256, 512, 1024)]
    lines += [record("bad", 256, "ok", 0.1), record("bad", 512, "wrong", reason="wrong output: max error 0.5 over "
                                                                                "bound 1e-06 (40 rows)")]
    run = tmp_path / "run.jsonl"
    run.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["report", str(run), "--out", str(tmp_path / "report"), "--formats", "png"]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert text.index("## Wrong answers") < text.index("## Summary")
    section = text[text.index("## Wrong answers"):text.index("## Summary")]
    assert "bad" in section and "max error 0.5 over bound 1e-06" in section and "good" not in section
    failures = text[text.index("## Failed and out-of-memory points"):]
    assert "wrong output" not in failures.split("##")[1]
    fits = json.loads((tmp_path / "report" / "fits.json").read_text())
    assert all(512 not in f["seq_lens"] for f in fits["fits"] if f["kernel"] == "bad")
