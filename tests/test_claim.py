"""The serving model behind "10,000 tokens/s at 1k, 130 at 128k", its calibration and its CLI."""
import json
from dataclasses import replace
from pathlib import Path

import pytest

from attnlab.analysis.claim import (CLAIM, MODEL_PRESETS, Calibration, ServingModel, build_claim, explain_claim,
                                    model_config)
from attnlab.analysis.roofline import GPU_SPECS

SAMPLE = Path(__file__).parent / "data" / "sample_run"
POINT_FIELDS = {"seq_len", "max_batch", "tok_s_max_batch", "tok_s_batch1", "tok_s_with_prefill"}
TOP_FIELDS = {"model", "gpu", "claim", "points", "ratio_max_batch", "ratio_batch1", "ratio_with_prefill",
              "explanation"}


@pytest.fixture(scope="module")
def h100_8b():
    return ServingModel(MODEL_PRESETS["llama3-8b"], GPU_SPECS["h100-sxm"])


def test_llama3_8b_kv_cache_is_128_kib_per_token():
    assert model_config("llama3-8b").kv_bytes_per_token == 128 * 1024
    assert model_config("llama3-70b").kv_bytes_per_token == 320 * 1024


def test_largest_batch_is_hundreds_at_1k_and_a_few_at_128k(h100_8b):
    assert 200 <= h100_8b.max_batch(1024) <= 999
    assert 2 <= h100_8b.max_batch(131072) <= 4
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
    assert doc["claim"] == {"short_ctx": 1024, "short_tok_s": 10000, "long_ctx": 131072, "long_tok_s": 130}
    assert doc["model"] == "llama3-8b" and doc["gpu"] == "h100-sxm"
    assert [p["seq_len"] for p in doc["points"]] == [1024, 4096, 131072]
    assert all(POINT_FIELDS <= set(p) for p in doc["points"])
    first, last = doc["points"][0], doc["points"][-1]
    assert doc["ratio_max_batch"] == pytest.approx(first["tok_s_max_batch"] / last["tok_s_max_batch"])
    json.dumps(doc, allow_nan=False)  # plain JSON, no NaN


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
    with pytest.raises(ValueError, match="mem_fraction"):
        build_claim(mem_fraction=1.5)
    with pytest.raises(ValueError, match="seq_lens"):
        build_claim(seq_lens=[0])


def test_calibration_on_measured_records():
    pytest.importorskip("pandas")
    pytest.importorskip("scipy")
    from attnlab.analysis.load import load
    results = load(SAMPLE).results
    doc, notes = build_claim("llama3-8b", results=results)
    cal = doc["assumptions"]["calibration"]
    assert not cal["ideal"] and notes == []
    assert cal["compute_efficiency"] == pytest.approx(712.4 / 989.4)  # the sample's matmul calibration
    assert 0.5 < cal["kv_bw_efficiency"] < 0.65  # triton-decode's share of 3.35 TB/s in the sample
    assert len(doc["measured"]) == 8 and "ideal_points" in doc
    model = {p["seq_len"]: p["tok_s_max_batch"] for p in doc["points"]}
    for measured in doc["measured"]:  # the calibrated model meets the end-to-end points
        assert model[measured["seq_len"]] == pytest.approx(measured["tok_s"], rel=0.03)
    assert doc["measured_ratios"][0]["ratio"] == pytest.approx(doc["ratio_max_batch"], rel=0.05)


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
    assert "128k" in printed and "at the largest batch" in printed
    assert main(["claim", "--seq-lens", "1k,zero"]) == 2
    assert "seq_lens: 'zero'" in capsys.readouterr().err
