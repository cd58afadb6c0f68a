"""The serving model behind "10,000 tokens/s at 1k, 130 at 120k", its calibration and its CLI."""
import json
from dataclasses import replace

import pytest

from attnlab import models
from attnlab.analysis.claim import (CLAIM, MODEL_PRESETS, STREAMING, Calibration, KvCache, ServingModel, build_claim,
                                    explain_claim, model_config, parse_what_if, what_if_named)
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


# --- what-ifs: the talk's levers, drawn by the same model ---------------------------------------

LEVERS = "kv-fp8,window-4096,cartridge-2048,weights"
LONG = 131072


def lever(name, serving):
    return what_if_named(name).applied(serving)


def test_an_8_bit_cache_doubles_the_largest_batch_within_rounding(h100_8b):
    """The planner fits B = room // (kv + a) sequences of kv cache bytes and a activation bytes.
    An 8-bit cache halves kv but not a, so B' = room // (kv / 2 + a): with a small beside kv, as
    at 128k, B' is 2 room / (kv + a) rounded down, between 2B - 1 and 2B + 1; at 1k, where the
    activations weigh more, less than 2B."""
    fp8, config, d = lever("kv-fp8", h100_8b), h100_8b.model, h100_8b.decode_tokens
    terms = dict(attention=STREAMING, dtype_bytes=2, graph=True)
    for n in (1024, 122880, LONG):
        room = h100_8b.budget_bytes - models.predicted_bytes(config, 0, n, d, **terms)
        kv = (n + d) * config.kv_bytes_per_token(2)
        activations = models.sequence_bytes(config, n, d, **terms) - kv
        base = h100_8b.max_batch(n)
        assert base == room // (kv + activations)
        assert fp8.max_batch(n) == room // (kv // 2 + activations)
    base, doubled = h100_8b.max_batch(LONG), fp8.max_batch(LONG)
    assert 2 * base - 1 <= doubled <= 2 * base + 1 and (base, doubled) == (3, 7)
    assert 2 * h100_8b.max_batch(1024) - 20 < fp8.max_batch(1024) < 2 * h100_8b.max_batch(1024)
    # At one batch the weights cost the same and attention reads half the bytes.
    same, half = h100_8b.decode_step(LONG, 3)["ops_ms"], fp8.decode_step(LONG, 3)["ops_ms"]
    assert half["attention"] == pytest.approx(same["attention"] / 2) and half["gate_up"] == same["gate_up"]
    assert fp8.point(LONG)["tok_s_max_batch"] > 2 * h100_8b.point(LONG)["tok_s_max_batch"]


def test_a_4k_window_lifts_128k_at_least_3x_and_stops_growing_past_the_window(h100_8b):
    window = lever("window-4096", h100_8b)
    assert window.point(LONG)["tok_s_max_batch"] >= 3 * h100_8b.point(LONG)["tok_s_max_batch"]
    past = [window.point(n) for n in (4096, 16384, LONG)]
    assert len({(p["max_batch"], p["tok_s_max_batch"]) for p in past}) == 1
    assert window.max_batch(LONG) == h100_8b.max_batch(4096 - 128)   # the cache holds 4096 tokens in all
    # Short of the window, it changes nothing.
    assert window.point(2048) == h100_8b.point(2048)


def test_a_window_that_fills_while_decoding_reads_the_mean_of_what_it_holds():
    held = [min(4000 + t, 4096) for t in range(129)]    # keys read at each of 128 steps, ends included
    assert KvCache(window=4096).mean_keys(4000, 128) == pytest.approx(sum(held) / len(held), abs=1)
    assert KvCache().mean_keys(4000, 128) == 4064


def test_a_cartridge_is_flat_in_context_and_the_claim_at_its_own_length(h100_8b):
    doc, _ = build_claim(seq_lens=[1024, 8192, LONG], what_if=["cartridge-2048"])
    (cartridge,) = doc["what_if"]
    at_2k = h100_8b.point(2048)
    assert {(p["max_batch"], p["tok_s_max_batch"]) for p in cartridge["points"]} == \
        {(at_2k["max_batch"], at_2k["tok_s_max_batch"])}
    assert {p["kv_tokens_per_sequence"] for p in cartridge["points"]} == {2048 + 128}
    assert cartridge["points"][-1]["tok_s_max_batch"] > 50 * doc["points"][-1]["tok_s_max_batch"]


def test_knowledge_in_the_weights_is_the_model_with_no_context_above_every_point(h100_8b):
    """Only the decoded tokens are cached: the claim's model at a context of 0, whatever the
    context; so flat, and above the claim's model at every length, 1k included."""
    doc, _ = build_claim(what_if=["weights"])
    (weights,) = doc["what_if"]
    no_context = h100_8b.point(0)
    assert {(p["max_batch"], p["tok_s_max_batch"]) for p in weights["points"]} == \
        {(no_context["max_batch"], no_context["tok_s_max_batch"])}
    assert weights["points"][0]["max_batch"] == models.largest_batch(
        h100_8b.model, 0, 128, h100_8b.budget_bytes, attention=STREAMING, dtype_bytes=2, graph=True)
    assert min(p["tok_s_max_batch"] for p in weights["points"]) > 3 * max(p["tok_s_max_batch"] for p in doc["points"])


def test_what_if_names_parse_strictly():
    assert [w.name for w in parse_what_if("weights, kv-fp8,weights")] == ["weights", "kv-fp8"]
    assert what_if_named("window-4k").kv == what_if_named("window-4096").kv == KvCache(window=4096)
    assert what_if_named("cartridge-2k").kv == KvCache(stand_in=2048)
    for bad in ("kv-fp16", "window", "window-0", "window-04k", "window-4kk", "cartridge-1.5k", "Weights", "", "w-4k"):
        with pytest.raises(ValueError, match="what_if: .* not a what-if; expected kv-fp8, window-W, cartridge-C"):
            what_if_named(bad)


@pytest.mark.parametrize("value", ["kv-fp8,window-4k,bogus", "window-0", "cartridge--2", "kv-fp8,", "window-64"])
def test_cli_refuses_a_bad_what_if_naming_the_flag(value, tmp_path, capsys):
    from attnlab.cli import main
    assert main(["claim", "--what-if", value, "--json", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnlab claim: error: --what-if: ") and "Traceback" not in err
    assert ("kv-fp8, window-W, cartridge-C or weights" in err) != (value == "window-64")   # 64 < 128 decoded
    assert not (tmp_path / "c.json").exists()


def test_without_what_ifs_the_document_holds_an_empty_list():
    doc, _ = build_claim(seq_lens=[1024])
    assert doc["what_if"] == []


def test_cli_writes_what_ifs_to_the_json_the_table_and_the_charts_csv(tmp_path, capsys):
    pytest.importorskip("seaborn")
    import csv
    from attnlab.cli import main
    out = tmp_path / "claim.json"
    assert main(["claim", "--what-if", LEVERS, "--seq-lens", "1k,16k,128k", "--json", str(out),
                 "--chart", str(tmp_path / "claim.png")]) == 0
    doc = json.loads(out.read_text())
    assert [w["name"] for w in doc["what_if"]] == LEVERS.split(",")
    for entry in doc["what_if"]:
        assert entry["description"] and [p["seq_len"] for p in entry["points"]] == [1024, 16384, LONG]
        assert all(POINT_FIELDS <= set(p) and p["tok_s_with_prefill"] is None for p in entry["points"])
    printed = capsys.readouterr().out
    assert "what if:" in printed and "cartridge-2048" in printed
    rows = list(csv.DictReader((tmp_path / "claim.csv").open()))
    for entry in doc["what_if"]:
        mine = [r for r in rows if r["series"] == entry["name"]]
        assert [int(r["seq_len"]) for r in mine] == [1024, 16384, LONG]
        for row, point in zip(mine, entry["points"]):
            assert float(row["y"]) == pytest.approx(point["tok_s_max_batch"], rel=1e-12)
            assert int(row["batch"]) == point["max_batch"] and row["y_from"] == "tok_s_max_batch"


def test_the_chart_draws_each_what_if_in_its_own_labelled_line_style():
    pytest.importorskip("seaborn")
    from attnlab.analysis.charts import claim_chart
    doc, _ = build_claim(seq_lens=[1024, 16384, LONG], what_if=LEVERS.split(","))
    (ax,) = claim_chart(doc).axes[:1]
    lines = {line.get_label(): line for line in ax.get_lines()}
    drawn = [lines[f"what if: {name}"] for name in LEVERS.split(",")]
    assert all(line.is_dashed() for line in drawn)     # the model's own lines are solid
    # get_linestyle() says "--" for every custom dash; the pattern itself tells them apart.
    assert len({str(line._unscaled_dash_pattern) for line in drawn}) == 4
    assert "what if: weights" in [t.get_text() for t in ax.get_legend().get_texts()]
    plain = claim_chart(build_claim(seq_lens=[1024, 16384, LONG])[0])
    assert not any(label.startswith("what if") for label in plain.drawn["series"])
