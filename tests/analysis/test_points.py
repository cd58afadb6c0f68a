"""Records that differ in any field of the point key (q_len, window, softcap, docs, l2_flush, the
end-to-end settings) are distinct points everywhere: selection, fits, charts, tables, compare;
and records written before a field existed read as its default."""
import csv
import json

import pytest

pytest.importorskip("pandas")
pytest.importorskip("scipy")

from attnlab import schema  # noqa: E402
from attnlab.analysis import select  # noqa: E402
from attnlab.analysis.analyze import analyze  # noqa: E402
from attnlab.analysis.compare import compare  # noqa: E402
from attnlab.analysis.load import load  # noqa: E402
from attnlab.cli import main  # noqa: E402

LENGTHS = (1024, 2048, 4096)


def decode(seq_len, q_len=1, kernel="naive", run_id="r1", per_token_ms=1e-5, **fields):
    """An ok decode record whose time grows with its length, and with q_len."""
    ms = (0.01 + per_token_ms * seq_len) * q_len
    return {"schema": schema.RESULT_SCHEMA, "run_id": run_id, "kernel": kernel, "mode": "decode", "workload": "w",
            "batch": 1, "heads": 8, "kv_heads": 8, "head_dim": 64, "dtype": "bfloat16", "causal": True,
            "seq_len": seq_len, "q_len": q_len, "status": "ok", "times_ms": [ms * (1 + i / 1000) for i in range(5)],
            "median_ms": ms * 1.002, "bytes": 2e5 * seq_len, "gbps": 2e5 * seq_len / ms / 1e6,
            "device": "NVIDIA H100 80GB HBM3", **fields}


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def q_len_run(tmp_path, kernels=("naive",)):
    """One run: every kernel at three lengths with q_len 1 and q_len 4, nothing else different."""
    return write(tmp_path / "run.jsonl", [decode(n, q, kernel=k, per_token_ms=1e-5 * (1 + i))
                                          for i, k in enumerate(kernels) for q in (1, 4) for n in LENGTHS])


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# --- selection ---------------------------------------------------------------------------------

@pytest.mark.parametrize("field, values", [("q_len", (1, 4)), ("window", (0, 4096)), ("softcap", (0.0, 50.0)),
                                           ("docs", (1, 4)), ("l2_flush", ("write", "read"))])
def test_records_that_differ_in_one_point_field_both_stand(tmp_path, field, values):
    path = write(tmp_path / "run.jsonl", [decode(1024, **{field: value}) for value in values])
    loaded = load(path)
    assert list(loaded.results["excluded"]) == ["", ""] and not loaded.warnings


@pytest.mark.parametrize("field, values", [("decode_tokens", (128, 256)), ("prefill_kernel", ("triton", "naive"))])
def test_end_to_end_records_that_differ_in_a_setting_both_stand(tmp_path, field, values):
    path = write(tmp_path / "run.jsonl", [decode(1024, mode="e2e-prefill-decode", **{field: value})
                                          for value in values])
    assert list(load(path).results["excluded"]) == ["", ""]


@pytest.mark.parametrize("device, flush", [("NVIDIA H100 80GB HBM3", "write"), ("cpu", "none")])
def test_a_record_from_before_the_options_is_the_same_point_as_one_at_their_defaults(tmp_path, device, flush):
    old = decode(1024, run_id="20260101T000000Z-old", device=device)
    new = decode(1024, run_id="20260102T000000Z-new", device=device, window=0, softcap=0.0, docs=1, l2_flush=flush)
    del old["q_len"]
    results = load(write(tmp_path / "run.jsonl", [old, new])).results
    assert list(results["excluded"]) == ["superseded by run 20260102T000000Z-new, which measured the point later", ""]
    assert list(results["q_len"]) == [1.0, 1.0] and set(results["l2_flush"]) == {flush}


def test_the_point_key_is_the_schemas_and_holds_every_field_a_sweep_point_has():
    from dataclasses import fields

    from attnlab.bench.workloads import Point

    assert select.POINT_KEY == schema.POINT_FIELDS
    assert {f.name for f in fields(Point)} <= set(schema.POINT_FIELDS)


# --- analysis, charts and tables ------------------------------------------------------------------

def test_analyze_draws_points_that_differ_in_q_len_as_their_own_series_and_curves(tmp_path, capsys):
    pytest.importorskip("seaborn")
    out = tmp_path / "out"
    assert main(["analyze", str(q_len_run(tmp_path)), "--out", str(out), "--bootstrap", "50",
                 "--formats", "svg"]) == 0
    document = json.loads((out / "fits.json").read_text())
    assert sorted(f["shape"]["q_len"] for f in document["fits"]) == [1, 4] and document["excluded"] == []
    rows = read_csv(out / "charts" / "latency_decode_w.csv")
    measured = {(r["series"], int(r["seq_len"])): float(r["y"]) for r in rows if r["run_id"]}
    assert measured[("naive, q len 4", 4096)] == pytest.approx(4 * measured[("naive, q len 1", 4096)])
    curves = {r["series"] for r in rows if not r["run_id"]}
    assert curves == {"fit naive, q len 1", "fit naive, q len 4"}
    # Each curve runs through its own points, not the other's.
    for q in (1, 4):
        at_longest = [float(r["y"]) for r in rows if r["series"] == f"fit naive, q len {q}" and r["seq_len"] == "4096"]
        assert at_longest == [pytest.approx(measured[(f"naive, q len {q}", 4096)], rel=0.01)]
    assert "naive, q len 4" in capsys.readouterr().out      # the fits table names the curve


def test_a_curve_too_short_to_fit_is_left_out_though_another_of_its_kernel_is_fitted(tmp_path):
    records = [decode(n, 1) for n in LENGTHS] + [decode(4096, 4)]
    result = analyze([write(tmp_path / "run.jsonl", records)], tmp_path / "out", charts=False, n_boot=50)
    assert len(result.fits) == 1
    (short,) = result.excluded
    assert short["seq_len"] == 4096 and "under 3 context lengths" in short["reason"]


def test_report_tables_set_each_kernel_against_the_baseline_at_the_same_q_len(tmp_path):
    from attnlab.analysis.report import build_report

    run = q_len_run(tmp_path, kernels=("sdpa-flash", "naive"))
    # Both baselines (a roles file beside records written without roles): the faster one is chosen.
    write(tmp_path / "roles.jsonl", [{"schema": "attnlab.roles/1", "kernel": k, "family": k, "baseline": True}
                                     for k in ("naive", "sdpa-flash")])
    report = build_report([run], tmp_path / "out", n_boot=50, formats=("png",))
    md = report.md_path.read_text()
    head_to_head = md.split("## Head to head", 1)[1].split("\n## ", 1)[0]
    header = next(line for line in head_to_head.splitlines() if line.startswith("| context |"))
    assert header == "| context | naive, q len 1 | naive, q len 4 | sdpa-flash, q len 1 | sdpa-flash, q len 4 |"
    row = next(line for line in head_to_head.splitlines() if line.startswith("| 4k |")).split(" | ")
    # sdpa-flash's time over naive's at the same q_len: 0.05096 / 0.09192 ms at either (against the
    # other q_len's baseline it would be 0.14x or 2.2x).
    assert row[1].endswith("(0.55x)") and row[2].endswith("(0.55x)")


def test_the_roofline_summary_keeps_one_row_per_curve(tmp_path):
    from attnlab.analysis.roofline import roofline, roofline_summary

    summary = roofline_summary(roofline(load(q_len_run(tmp_path)).results))
    assert sorted(summary["label"]) == ["naive, q len 1", "naive, q len 4"]


# --- compare ----------------------------------------------------------------------------------------

def test_compare_matches_points_by_q_len(tmp_path):
    base = q_len_run(tmp_path)
    slower = [dict(r, run_id="r2", times_ms=[t * (1.3 if r["q_len"] == 4 else 1.0) for t in r["times_ms"]])
              for r in map(json.loads, base.read_text().splitlines())]
    comparison = compare(base, write(tmp_path / "new.jsonl", slower))
    verdicts = {(p["q_len"], p["seq_len"]): (p["verdict"], round(p["ratio"], 3)) for p in comparison.points}
    assert verdicts == {**{(1, n): ("unchanged", 1.0) for n in LENGTHS},
                        **{(4, n): ("regressed", 1.3) for n in LENGTHS}}
    assert all(set(schema.POINT_FIELDS) <= set(p) for p in comparison.points)


def test_end_to_end_points_of_other_settings_are_their_own_series_and_ratios(tmp_path):
    pytest.importorskip("seaborn")
    from attnlab.analysis.charts import claim_chart

    e2e = [decode(n, mode="e2e-decode", workload="llama3-8b", batch=8, decode_tokens=tokens,
                  tokens_per_s=1e6 / n / (tokens / 128))
           for tokens in (128, 256) for n in (1024, 131072)]
    result = analyze([write(tmp_path / "e2e.jsonl", e2e)], tmp_path / "out", charts=False, n_boot=50)
    ratios = {r["decode_tokens"]: r["ratio"] for r in result.claim["measured_ratios"]}
    assert ratios == {128: pytest.approx(128.0), 256: pytest.approx(128.0)}
    series = set(claim_chart(result.claim).drawn["series"])
    assert {"measured e2e-decode, naive, decode tokens 128", "measured e2e-decode, naive, decode tokens 256"} <= series


def test_curves_of_one_kernel_that_share_no_length_keep_their_own_names(tmp_path):
    pytest.importorskip("seaborn")
    records = [decode(n, 1) for n in LENGTHS] + [decode(n, 4) for n in (8192, 16384, 32768)]
    result = analyze([write(tmp_path / "run.jsonl", records)], tmp_path / "out", n_boot=50, formats=("png",))
    rows = read_csv(tmp_path / "out" / "charts" / "latency_decode_w.csv")
    curves = {}
    for row in (r for r in rows if not r["run_id"]):    # the fitted lines: no record behind them
        curves.setdefault(row["series"], []).append(int(row["seq_len"]))
    assert set(curves) == {"fit naive, q len 1", "fit naive, q len 4"} and len(result.fits) == 2
    assert max(curves["fit naive, q len 1"]) == 4096 and min(curves["fit naive, q len 4"]) == 8192
