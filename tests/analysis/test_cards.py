"""Runs of one GPU model may come from different cards: every run is named with its card, no
ratio divides two runs' records, a curve that misses its points is not drawn, and the claim
model states its error on points it was not fitted to."""
import json
import math

import pytest

pytest.importorskip("seaborn")
pytest.importorskip("scipy")

from attnlab.analysis import charts, conditions  # noqa: E402
from attnlab.analysis.claim import build_claim  # noqa: E402
from attnlab.analysis.fits import fit_all  # noqa: E402
from attnlab.analysis.load import load  # noqa: E402
from paths import SAMPLE

H100 = "NVIDIA H100 80GB HBM3"
CARD_A, CARD_B = "GPU-aaaa1111-0000-0000-0000-000000000000", "GPU-bbbb2222-0000-0000-0000-000000000000"


def prefill(run_id, kernel, seq_len, median_ms, uuid, excluded=""):
    """A standing (or superseded) prefill record as the loader gives it, with its card."""
    return {"run_id": run_id, "kernel": kernel, "mode": "prefill", "workload": "llama3-8b", "device": H100,
            "dtype": "bf16", "batch": 1.0, "heads": 32.0, "kv_heads": 8.0, "head_dim": 128.0, "causal": True,
            "seq_len": float(seq_len), "q_len": float(seq_len), "status": "ok", "median_ms": median_ms,
            "p10_ms": median_ms, "p90_ms": median_ms, "tflops": 1e3 / median_ms, "gbps": math.nan,
            "peak_mem_bytes": math.nan, "predicted_mem_bytes": math.nan, "power_w_mean": math.nan,
            "power_w_max": math.nan, "joules_per_token": math.nan, "times_ms": [], "source": "synthetic",
            "excluded": excluded, "valid": True, "gpu_uuid": uuid}


def test_a_card_is_named_by_the_first_8_hex_digits_of_its_uuid():
    assert conditions.short_card("GPU-d3d8bafb-f135-3d4b-0b63-c91df7b9286f") == "d3d8bafb"
    assert conditions.short_card("MIG-1c0221f8-f9a7") == "1c0221f8"
    assert conditions.short_card(None) is conditions.short_card(float("nan")) is conditions.short_card("") is None
    cards = {"r1": "aaaa1111", "r10": "bbbb2222"}
    assert conditions.named_run("r1", cards) == "r1 (card aaaa1111)" and conditions.named_run("r2", cards) == "r2"
    name = conditions.card_namer(cards)
    # Whole run ids only, each once: r1 inside r10 is not r1, and a card already said is not said again.
    assert name("runs r1, r10 and r1 (card aaaa1111); r100") == \
        "runs r1 (card aaaa1111), r10 (card bbbb2222) and r1 (card aaaa1111); r100"
    assert conditions.several_cards_note(["aaaa1111"]) == ""
    assert "2 different cards (aaaa1111, bbbb2222)" in conditions.several_cards_note(["aaaa1111", "bbbb2222"])


def test_records_take_the_card_of_their_runs_environment():
    import pandas as pd
    results = pd.DataFrame({"run_id": ["r1", "r2", "r3"]})
    envs = pd.DataFrame({"run_id": ["r1", "r2"], "gpu_uuid": [CARD_A, None]})
    carded = conditions.with_cards(results, envs)
    assert carded["gpu_uuid"].tolist()[0] == CARD_A and carded["gpu_uuid"].isna().tolist()[1:] == [True, True]
    assert conditions.record_cards(carded) == {"r1": "aaaa1111"} and conditions.cards_of(carded) == ["aaaa1111"]
    assert conditions.run_cards(envs) == {"r1": "aaaa1111"}


@pytest.fixture
def two_cards():
    """Run r1 on card A measured both kernels at 4k and 8k; run r2 on card B measured sdpa-flash
    at 4k later, so that at 4k triton's standing record is r1's and sdpa-flash's r2's."""
    import pandas as pd
    superseded = "superseded by run r2, which measured the point later"
    return pd.DataFrame([prefill("r1", "triton", 4096, 0.35, CARD_A), prefill("r1", "sdpa-flash", 4096, 0.50, CARD_A,
                                                                              excluded=superseded),
                         prefill("r2", "sdpa-flash", 4096, 0.60, CARD_B), prefill("r1", "triton", 8192, 1.2, CARD_A),
                         prefill("r1", "sdpa-flash", 8192, 1.7, CARD_A)])


def test_a_speedup_never_divides_one_runs_time_by_anothers(two_cards):
    standing = two_cards[two_cards["excluded"] == ""]
    fig = charts.speedup_chart(standing, "sdpa-flash")
    rows = fig.drawn.set_index(["series", "seq_len"])
    assert rows.loc[("triton", 8192), "y"] == pytest.approx(1.7 / 1.2)
    assert rows.loc[("triton", 8192), "baseline_run_id"] == "r1"
    # At 4k the baseline's record is r2's (card B): triton's r1 time is not divided by it.
    gap = rows.loc[("triton", 4096)]
    assert math.isnan(gap["y"]) and gap["run_id"] == "r1"
    assert gap["note"] == ("not drawn: the sdpa-flash record of this point is of run r2 (card bbbb2222), another "
                           "card, not of this record's run r1 (card aaaa1111); a speedup never divides two runs' "
                           "times")
    (line,) = [line for line in fig.axes[0].get_lines() if line.get_label() == "triton"]
    assert line.get_xdata().tolist() == [4096, 8192] and math.isnan(line.get_ydata()[0])   # the line breaks there
    caption = charts.caption_of(fig)
    assert "triton at 4k" in caption and "r1 (card aaaa1111), r2 (card bbbb2222)" in caption
    assert "2 different cards (aaaa1111, bbbb2222)" in caption


def test_a_chart_of_one_card_warns_of_nothing(two_cards):
    one = two_cards[two_cards["run_id"] == "r1"]
    caption = charts.caption_of(charts.rate_chart(one.assign(excluded=""), None, "tflops"))
    assert "runs: r1 (card aaaa1111)" in caption and "different cards" not in caption


def decode_records(kernel, times):
    return [{"schema": "attnlab.result/1", "run_id": "r", "kernel": kernel, "mode": "decode", "workload": "w",
             "batch": 1, "heads": 8, "kv_heads": 8, "head_dim": 64, "dtype": "bfloat16", "causal": True,
             "seq_len": n, "q_len": 1, "status": "ok", "times_ms": [ms] * 5, "median_ms": ms, "bytes": 1e5 * n,
             "device": H100} for n, ms in zip((1024, 4096, 16384, 65536), times)]


def test_a_fit_that_misses_its_points_is_not_drawn_but_its_points_are(tmp_path):
    records = decode_records("steady", (0.02, 0.05, 0.17, 0.65)) + decode_records("erratic", (0.3, 0.1, 0.4, 0.15))
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    results = load(tmp_path).results
    fits, _ = fit_all(results, n_boot=20)
    r2 = {f.kernel: f.r2 for f in fits}
    assert r2["steady"] >= 0.9 > r2["erratic"]
    fig = charts.latency_chart(results, fits)
    drawn = fig.drawn
    assert len(drawn[drawn["series"] == "erratic"]) == 4                  # its points are drawn
    (unfit,) = drawn[drawn["series"] == "fit erratic"].to_dict("records")
    assert math.isnan(unfit["y"]) and unfit["note"].startswith("not drawn: the linear fit misses its own points")
    assert len(drawn[drawn["series"] == "fit steady"]) > 10
    ax = fig.axes[0]
    curves = [line for line in ax.get_lines() if line.get_label() == "_nolegend_" and line.get_marker() in ("", None)]
    assert len(curves) == 1                                               # the steady kernel's curve alone
    assert f"fit erratic (R^2 {r2['erratic']:.2f})" in charts.caption_of(fig)


def test_the_claim_says_which_records_set_each_parameter_and_its_error_out_of_sample():
    results = load(SAMPLE).results
    envs = load(SAMPLE).environments
    doc, _ = build_claim("llama3-8b", results=results, environments=envs)
    provenance = {" and ".join(item["parameters"]): item for item in doc["assumptions"]["calibration"]["provenance"]}
    fitted = provenance["compute_efficiency and overhead_ms"]
    assert [p["seq_len"] for p in fitted["points"]] == [p["seq_len"] for p in doc["validation"]["points"]]
    assert {p["kernel"] for p in fitted["points"]} == {"triton-decode"} and len(fitted["points"]) == 8
    assert fitted["cards"] == ["00000000"] and all(p["card"] == "00000000" for p in doc["measured"])
    assert provenance["weights_bw_efficiency"]["points"][0]["kernel"].startswith("copy")
    validation = doc["validation"]
    # The sample's step times were made from the model itself, so even left out each point is met.
    assert all(abs(p["leave_one_out_error"]) < 0.01 for p in validation["points"])
    assert validation["worst"]["uncalibrated"]["error"] != pytest.approx(0, abs=0.01)
    assert all(p["in_sample_error"] == pytest.approx(m["model_error"])
               for p, m in zip(validation["points"], [m for m in doc["measured"] if m["kernel"] == "triton-decode"]))
    json.dumps(doc, allow_nan=False)


def test_a_point_left_out_is_predicted_without_it(tmp_path):
    """Scaling one end-to-end point's time changes its in-sample prediction, not its
    leave-one-out one: that model never saw it."""
    lines = [json.loads(line) for line in (SAMPLE / "results.jsonl").read_text().splitlines()]
    e2e = [line for line in lines if line.get("mode") == "e2e-decode"]
    target = e2e[3]
    predictions = []
    for scale in (1.0, 1.3):
        changed = dict(target, median_ms=target["median_ms"] * scale, tokens_per_s=target["tokens_per_s"] / scale)
        (tmp_path / "r.jsonl").write_text("".join(json.dumps(changed if line is target else line) + "\n"
                                                  for line in lines))
        doc, _ = build_claim("llama3-8b", results=load(tmp_path / "r.jsonl").results)
        point = next(p for p in doc["validation"]["points"] if p["seq_len"] == target["seq_len"])
        predictions.append({kind: point["tok_s"] / (1 + point[f"{kind}_error"])
                            for kind in ("in_sample", "leave_one_out", "uncalibrated")})
    assert predictions[1]["leave_one_out"] == pytest.approx(predictions[0]["leave_one_out"], rel=1e-6)
    assert predictions[1]["uncalibrated"] == pytest.approx(predictions[0]["uncalibrated"], rel=1e-6)
    assert predictions[1]["in_sample"] != pytest.approx(predictions[0]["in_sample"], rel=1e-3)


def test_the_report_names_each_runs_card_once():
    from attnlab.analysis.report import carded
    sections = [("s", [("p", "run r1 and run r2 (card bbbb2222)"), ("table", ["run"], [["r1"], ["r3"]])])]
    [(_, blocks)] = carded(sections, {"r1": "aaaa1111", "r2": "bbbb2222"})
    assert blocks[0] == ("p", "run r1 (card aaaa1111) and run r2 (card bbbb2222)")
    assert blocks[1] == ("table", ["run"], [["r1 (card aaaa1111)"], ["r3"]])
