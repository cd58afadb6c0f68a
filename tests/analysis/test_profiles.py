"""The committed H100 profiles, analysed as a skeptical reader would: every number traces to
one valid record, decode is linear, nothing is extrapolated past memory, and the claim model
meets the measured end-to-end points."""
import json
from pathlib import Path

import pytest

pytest.importorskip("pandas")
pytest.importorskip("scipy")

from attnlab.analysis.analyze import analyze  # noqa: E402
from paths import PROFILES

H100 = PROFILES / "h100-80gb-hbm3"
STALE_RUNS = {"20261127T235130Z-cb1e4645", "20261127T235510Z-079f38a4"}   # the timer before its fix


@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis")
    return analyze([PROFILES], out, charts=False, n_boot=100), out


def records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def test_no_fit_uses_a_point_the_old_timer_measured_short(analysis):
    result, _ = analysis
    for fit in result.fits:
        for point in fit.points:
            if point["run_id"] in STALE_RUNS:
                assert (fit.mode, point["seq_len"]) not in {("decode", n) for n in range(1, 32768)}
                assert not (fit.mode == "prefill" and point["seq_len"] <= 2048)


def test_decode_is_linear_and_describes_the_kernels_that_stream(analysis):
    result, _ = analysis
    decode = {f.kernel: f for f in result.fits if f.mode == "decode" and f.workload == "llama3-8b"}
    assert all(f.c_ms_per_token2 == 0 and f.model == "linear" for f in decode.values())
    for kernel in ("triton-decode", "naive", "sdpa-math", "sdpa-efficient"):
        assert decode[kernel].r2 >= 0.97, (kernel, decode[kernel].r2)


def test_no_latency_is_stated_past_the_memory_wall(analysis):
    result, _ = analysis
    for fit in result.fits:
        for point in fit.extrapolation:
            assert point["fits_in_memory"] is not False or point["latency_ms"] is None
    # naive and sdpa-math prefill ran out of memory at 16k: nothing beyond is stated.
    assert not [f for f in result.fits if f.mode == "prefill" and f.kernel in ("naive", "sdpa-math")
                and any(p["latency_ms"] is not None for p in f.extrapolation)]


def test_every_record_left_out_is_listed_with_its_reason(analysis):
    result, out = analysis
    document = json.loads((out / "fits.json").read_text())
    listed = {(e["file"], e["line"]) for e in document["excluded"]}
    used = {(p["run_id"], f["kernel"], f["mode"], p["seq_len"]) for f in document["fits"] for p in f["points"]}
    results = result.results
    fitted_modes = results[results["mode"].isin(("prefill", "decode"))]
    for _, row in fitted_modes.iterrows():
        point = (row["run_id"], row["kernel"], row["mode"], int(row["seq_len"]))
        assert (point in used) != ((row["source"], row["source_line"]) in listed), point
    assert all(e["reason"] for e in document["excluded"])
    retracted = [e for e in document["excluded"] if e["reason"].startswith("retracted")]
    assert {e["run_id"] for e in retracted} == STALE_RUNS


def test_the_claim_model_is_calibrated_within_physical_bounds(analysis):
    result, out = analysis
    claim = json.loads((out / "claim.json").read_text())
    calibration = claim["assumptions"]["calibration"]
    assert calibration["weights_bw_efficiency"] <= 0.95
    assert calibration["kv_bw_efficiency"] >= 0.70
    triton = [m for m in claim["measured"] if m["kernel"] == "triton-decode"]
    assert len(triton) == 8
    for point in triton:
        assert abs(point["tok_s"] / point["model_tok_s"] - 1) <= 0.15, point
    assert 122880 in [p["seq_len"] for p in claim["points"]]
    assert [r["what"] for r in claim["ratios_side_by_side"]][:2] == ["paper", "model"]


def test_the_claim_says_which_records_set_it_and_its_error_on_points_it_did_not_see(analysis):
    _, out = analysis
    claim = json.loads((out / "claim.json").read_text())
    provenance = {" and ".join(item["parameters"]): item for item in claim["assumptions"]["calibration"]["provenance"]}
    fitted = provenance["compute_efficiency and overhead_ms"]
    assert [p["seq_len"] for p in fitted["points"]] == [1024 * 2**i for i in range(8)]
    assert fitted["runs"] == ["20261127T235402Z-34be7376"] and fitted["cards"] == ["d3d8bafb"]
    assert fitted["compute_efficiency_binds_at"] == [1024, 2048]        # compute-bound only at the largest batches
    assert fitted["compute_efficiency_at_most"]["cards"] == ["1c0221f8"]
    assert provenance["kv_bw_efficiency"]["cards"] == provenance["weights_bw_efficiency"]["cards"] == ["1c0221f8"]
    assert provenance["prefill_attention"]["cards"] == ["1c0221f8", "d3d8bafb"]
    worst = claim["validation"]["worst"]
    assert (round(worst["in_sample"]["error"], 3), worst["in_sample"]["seq_len"]) == (0.041, 131072)
    assert (round(worst["leave_one_out"]["error"], 3), worst["leave_one_out"]["seq_len"]) == (0.053, 131072)
    assert (round(worst["uncalibrated"]["error"], 3), worst["uncalibrated"]["seq_len"]) == (-0.137, 1024)


def test_claim_prints_the_error_out_of_sample_beside_the_one_in_sample(capsys):
    from attnlab.cli import main
    assert main(["claim", str(H100)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert ("in sample at most 4.1% (at 128k); out of sample at most 5.3% (at 128k) refitted without each point in "
            "turn (leave-one-out), and at most 13.7% (at 1k) with no end-to-end calibration") in printed


def test_every_fitted_point_is_its_records_median(analysis):
    result, _ = analysis
    medians = {}
    for path in H100.glob("*/*.jsonl"):
        for line in records(path):
            if line.get("schema") == "attnlab.result/1" and line.get("median_ms"):
                medians[(line["run_id"], line["kernel"], line["mode"], line["seq_len"])] = line["median_ms"]
    for fit in result.fits:
        for point in fit.points:
            key = (point["run_id"], fit.kernel, fit.mode, point["seq_len"])
            if key in medians:   # the pytest-benchmark run's records live in benchmark.json
                assert point["median_ms"] == pytest.approx(medians[key])


@pytest.mark.slow     # draws every chart of the committed profiles
def test_every_charted_number_is_one_runs_record(analysis, tmp_path):
    import csv
    from attnlab.analysis.charts import render_all
    result, _ = analysis
    render_all(result.results, tmp_path / "charts", fits=result.fits, roof=result.roof, claim=result.claim,
               formats=("png",))
    by_point = {(r["run_id"], r["kernel"], r["mode"], r["workload"], int(r["seq_len"])): r
                for _, r in result.results.iterrows() if r["seq_len"] == r["seq_len"]}
    checked = 0
    for path in (tmp_path / "charts").glob("*.csv"):
        for row in csv.DictReader(path.open()):
            if row.get("baseline_run_id") or (path.name.startswith("speedup") and not row["y"]):
                assert row["baseline_run_id"] == row["run_id"] or row["note"].startswith("not drawn"), row
            field = row["y_from"] if row["y_from"] in ("median_ms", "tflops", "gbps") else (
                "median_ms" if row.get("median_ms") else None)
            if not row["run_id"] or not field or row["mode"] not in ("prefill", "decode"):
                continue
            record = by_point[(row["run_id"], row["kernel"], row["mode"], row["workload"], int(float(row["seq_len"])))]
            assert record["excluded"] == "", (path.name, row)          # the standing record, not another run's
            drawn = float(row["y"] if field == row["y_from"] else row["median_ms"])
            assert drawn == pytest.approx(record[field]), (path.name, row)
            checked += 1
    assert checked > 100
    # The two decode fits that miss their points (R^2 below 0) are named, not drawn.
    unfit = {row["series"]: row for row in csv.DictReader((tmp_path / "charts" / "latency_decode_llama3-8b.csv").open())
             if row["series"] in ("fit sdpa-flash", "fit sdpa-cudnn")}
    assert sorted(unfit) == ["fit sdpa-cudnn", "fit sdpa-flash"]
    assert all(not row["y"] and float(row["r2"]) < 0 for row in unfit.values())
