"""The serving model behind "10,000 tokens/s at 1k, 130 at 120k", its calibration and its CLI."""
import json
from dataclasses import replace

import pytest

from attnlab.analysis.claim import (CLAIM, MODEL_PRESETS, Calibration, ServingModel, build_claim, explain_claim,
                                    model_config)
from attnlab.analysis.roofline import GPU_SPECS
from paths import SAMPLE

POINT_FIELDS = {"seq_len", "max_batch", "tok_s_max_batch", "tok_s_batch1", "tok_s_with_prefill"}
TOP_FIELDS = {"model", "gpu", "claim", "points", "ratio_max_batch", "ratio_batch1", "ratio_with_prefill",
              "explanation"}


@pytest.fixture(scope="module")
def h100_8b():
    return ServingModel(MODEL_PRESETS["llama3-8b"], GPU_SPECS["h100-sxm"])


def test_llama3_8b_kv_cache_is_128_kib_per_token():
    assert model_config("llama3-8b").kv_bytes_per_token(2) == 128 * 1024
    assert model_config("llama3-70b").kv_bytes_per_token(2) == 320 * 1024


def test_largest_batch_is_hundreds_at_1k_and_a_few_at_128k(h100_8b):
    assert 200 <= h100_8b.max_batch(1024) <= 999
    assert 2 <= h100_8b.max_batch(131072) <= 4
    assert h100_8b.max_batch(122880) >= h100_8b.max_batch(131072)
    # The batch falls about as 1/n: doubling the context halves it, give or take rounding.
    assert h100_8b.max_batch(2048) == pytest.approx(h100_8b.max_batch(1024) / 2, rel=0.1)


def test_the_drop_is_large_at_max_batch_and_about_2x_at_batch_1(h100_8b):
    doc = explain_claim(h100_8b)
    assert 50 <= doc["ratio_max_batch"] <= 150
    assert 1.5 <= doc["ratio_batch1"] <= 3.0
    assert doc["ratio_with_prefill"] > doc["ratio_max_batch"]  # prefill is quadratic and left out of the claim
    # The max-batch ratio is the batch lost to memory times the change in step time.
    f = doc["factors"]
    assert doc["ratio_max_batch"] == pytest.approx(f["batch_falls"] * f["step_time_grows"], rel=1e-9)
    assert 0.7 < f["step_time_grows"] < 1.3  # memory is full of KV at both lengths
    assert "largest batch falls from" in doc["explanation"] and "77x" in doc["explanation"]


def test_the_document_follows_the_contract():
    doc, notes = build_claim("llama3-8b", "h100-sxm", seq_lens=[1024, 4096, 131072])
    assert TOP_FIELDS <= set(doc) and notes == []
    assert doc["claim"] == {"short_ctx": 1024, "short_tok_s": 10000, "long_ctx": 122880, "long_tok_s": 130}
    assert doc["model"] == "llama3-8b" and doc["gpu"] == "h100-sxm"
    assert [p["seq_len"] for p in doc["points"]] == [1024, 4096, 131072]
    assert all(POINT_FIELDS <= set(p) for p in doc["points"])
    short, long = ServingModel(MODEL_PRESETS["llama3-8b"], GPU_SPECS["h100-sxm"]).point(1024), \
        ServingModel(MODEL_PRESETS["llama3-8b"], GPU_SPECS["h100-sxm"]).point(122880)
    assert doc["ratio_max_batch"] == pytest.approx(short["tok_s_max_batch"] / long["tok_s_max_batch"])
    assert [r["what"] for r in doc["ratios_side_by_side"]] == ["paper", "model"]
    assert doc["ratios_side_by_side"][0]["ratio"] == pytest.approx(10000 / 130)
    json.dumps(doc, allow_nan=False)  # plain JSON, no NaN


def test_the_default_lengths_hold_the_papers_120k():
    doc, _ = build_claim()
    assert 122880 in [p["seq_len"] for p in doc["points"]]


def test_a_step_is_the_sum_of_its_operations(h100_8b):
    step = h100_8b.decode_step(1024, 431)
    assert step["step_ms"] == pytest.approx(sum(step["ops_ms"].values()))
    assert set(step["ops_ms"]) == {"qkv", "out", "gate_up", "down", "lm_head", "attention", "overhead"}
    # At batch 431 a GEMM does 431 FLOPs per weight byte, past an H100's ~295: compute-bound.
    assert {"qkv", "gate_up", "down"} <= set(step["compute_bound"])
    assert step["ops_ms"]["gate_up"] == pytest.approx(1e3 * 32 * 2 * 431 * 4096 * 2 * 14336 / 989.4e12)
    one = h100_8b.decode_step(1024, 1)
    assert one["compute_bound"] == [] and one["weights_ms"] == pytest.approx(
        1e3 * MODEL_PRESETS["llama3-8b"].streamed_weight_bytes(2) / 3350e9, rel=1e-4)   # norms aside


def test_a_model_that_does_not_fit_serves_nothing_and_says_so():
    doc, _ = build_claim("llama3-70b", "h100-sxm")
    assert all(p["max_batch"] == 0 and p["tok_s_max_batch"] == 0 for p in doc["points"])
    assert doc["ratio_max_batch"] is None and "Not even one sequence" in doc["explanation"]
    four, _ = build_claim("llama3-70b", "h100-sxm", num_gpus=4)
    assert 50 <= four["ratio_max_batch"] <= 200


def test_more_bandwidth_raises_throughput_but_not_the_batch():
    h100, _ = build_claim("llama3-8b", "h100-sxm", seq_lens=[1024])
    h200, _ = build_claim("llama3-8b", "h200", seq_lens=[1024])
    assert h200["points"][0]["max_batch"] > h100["points"][0]["max_batch"]  # 141 GB
    slower = replace(ServingModel(MODEL_PRESETS["llama3-8b"], GPU_SPECS["h100-sxm"]),
                     calibration=Calibration(weights_bw_efficiency=0.5, kv_bw_efficiency=0.5))
    assert slower.point(1024)["tok_s_batch1"] == pytest.approx(h100["points"][0]["tok_s_batch1"] / 2)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="model: 'gpt-9'"):
        build_claim("gpt-9")
    with pytest.raises(ValueError, match="gpu: 'abacus'"):
        build_claim("llama3-8b", "abacus")
    with pytest.raises(ValueError, match="decode_tokens"):
        build_claim(decode_tokens=0)
    with pytest.raises(ValueError, match="seq_lens"):
        build_claim(seq_lens=[0])


def test_calibration_recovers_the_rates_behind_the_end_to_end_points():
    pytest.importorskip("pandas")
    pytest.importorskip("scipy")
    from attnlab.analysis.load import load
    results = load(SAMPLE).results
    doc, notes = build_claim("llama3-8b", results=results)
    cal = doc["assumptions"]["calibration"]
    assert not cal["ideal"] and notes == []
    # The sample's e2e step times were made from these rates (tests/data/sample_run/make_sample.py).
    assert cal["weights_bw_efficiency"] == pytest.approx(2941 / 3350)          # the measured copy
    assert cal["kv_bw_efficiency"] == pytest.approx(4096 / 1.9e-9 / 3350e9, rel=0.01)   # triton-decode's b
    assert cal["compute_efficiency"] == pytest.approx(0.6 * 712.4 / 989.4, rel=0.01)
    assert cal["compute_efficiency"] <= 712.4 / 989.4                          # never above the matmul
    assert cal["overhead_ms"] == pytest.approx(1.0, abs=0.05)
    assert len(doc["measured"]) == 8 and "ideal_points" in doc
    for measured in doc["measured"]:  # the calibrated model meets each end-to-end point at its batch
        assert abs(measured["model_error"]) < 0.01
        assert measured["model_tok_s"] == pytest.approx(measured["tok_s"], rel=0.01)
    measured_row = next(r for r in doc["ratios_side_by_side"] if r["what"] == "attnlab measured")
    modelled_row = next(r for r in doc["ratios_side_by_side"] if r["what"] == "model at the measured batches")
    assert modelled_row["ratio"] == pytest.approx(measured_row["ratio"], rel=0.02)


def test_calibration_stays_within_what_the_gpu_was_measured_to_do(tmp_path):
    """A decode kernel that seems to read faster than the device copies is held to the copy."""
    pytest.importorskip("scipy")
    from attnlab.analysis.load import load
    lines = [json.loads(line) for line in (SAMPLE / "results.jsonl").read_text().splitlines()]
    for line in lines:
        if line.get("kernel") == "triton-decode" and line.get("mode") == "decode" and line.get("times_ms"):
            line["times_ms"] = [t / 4 for t in line["times_ms"]]
            line["median_ms"] /= 4
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    doc, _ = build_claim("llama3-8b", results=load(tmp_path).results)
    cal = doc["assumptions"]["calibration"]
    assert cal["kv_bw_efficiency"] == pytest.approx(2941 / 3350)
    assert "held to the measured copy" in " ".join(cal["sources"])


def test_measurements_of_another_model_or_gpu_are_left_out():
    pytest.importorskip("pandas")
    from attnlab.analysis.load import load
    results = load(SAMPLE / "results.jsonl").results
    e2e = results["mode"] == "e2e-decode"
    other = results.copy()
    other.loc[e2e, "device"] = "NVIDIA A100-SXM4-80GB"
    doc, notes = build_claim("llama3-8b", "h100-sxm", results=other)
    assert doc["measured"] == [] and any("A100" in n for n in notes)
    doc, notes = build_claim("llama3-70b", "h100-sxm", num_gpus=2, results=results)
    assert doc["measured"] == [] and any("model llama3-8b" in n for n in notes)


def test_cli_writes_the_json_contract(tmp_path, capsys):
    from attnlab.cli import main
    out = tmp_path / "claim.json"
    assert main(["claim", "--json", str(out), "--seq-lens", "1k,16k,128k"]) == 0
    doc = json.loads(out.read_text())
    assert TOP_FIELDS <= set(doc) and [p["seq_len"] for p in doc["points"]] == [1024, 16384, 131072]
    assert doc["claim"]["long_tok_s"] == CLAIM["long_tok_s"]
    printed = capsys.readouterr().out
    assert "128k" in printed and "1k/120k" in printed and "at the largest batch" in printed
    assert main(["claim", "--seq-lens", "1k,zero"]) == 2
    assert "--seq-lens: 'zero'" in capsys.readouterr().err
