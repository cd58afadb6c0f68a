"""What-if levers beside the measurements that test them: kv-fp8 beside end-to-end runs with an
8-bit cache, window-W beside decode calls with a window, each with the model's error."""
import json

import pytest

from attnlab.analysis.claim import build_claim, what_if_named
from paths import SAMPLE

pytest.importorskip("pandas")
pytest.importorskip("scipy")

FP8_RUN, WINDOW_RUN = "fp8-e2e-run", "window-decode-run"
FP8_OFF, WINDOW_OFF = 1.05, 1.10        # how far above the model the synthetic points are made


def _sample_lines() -> list:
    return [json.loads(line) for line in (SAMPLE / "results.jsonl").read_text().splitlines()]


def _load(path):
    from attnlab.analysis.load import load
    return load(path)


@pytest.fixture(scope="module")
def tested(tmp_path_factory):
    """The sample run plus an FP8 end-to-end run 5% above the kv-fp8 lever's model at its own
    largest batch, and windowed decode calls 10% above the kernel's line at the keys a 4096-key
    window leaves; (folder, document from the sample alone, document with both)."""
    from attnlab.analysis.fits import fit_all
    folder = tmp_path_factory.mktemp("levers")
    lines = _sample_lines()
    (folder / "sample.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    sample = _load(folder)
    before, _ = build_claim("llama3-8b", results=sample.results, environments=sample.environments,
                            what_if=["kv-fp8"])
    lever = {p["seq_len"]: p for p in before["what_if"][0]["points"]}
    e2e = next(line for line in lines if line.get("mode") == "e2e-decode")
    fp8 = []
    for n in (1024, 16384, 131072):
        batch, tok_s = lever[n]["max_batch"], lever[n]["tok_s_max_batch"] * FP8_OFF
        fp8.append({**e2e, "run_id": FP8_RUN, "seq_len": n, "batch": batch, "kv_dtype": "float8_e4m3fn",
                    "page_size": 64, "tokens_per_s": tok_s, "median_ms": 1e3 * batch / tok_s})
    fits, _ = fit_all(sample.results, environments=sample.environments, n_boot=50)
    line = next(f for f in fits if f.kernel == "triton-decode" and f.mode == "decode")
    decode = next(r for r in lines if r.get("kernel") == "triton-decode" and r.get("mode") == "decode")
    windowed = [{**decode, "run_id": WINDOW_RUN, "workload": "llama3-8b[window=4096]", "window": 4096, "seq_len": n,
                 "median_ms": float(line.predict_ms(min(n, 4096))) * WINDOW_OFF, "times_ms": []}
                for n in (4096, 16384, 65536)]
    (folder / "levers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fp8 + windowed))
    both = _load(folder)
    after, notes = build_claim("llama3-8b", results=both.results, environments=both.environments)
    return folder, before, after, notes


def _lever(document, name):
    return next(w for w in document["what_if"] if w["name"] == name)


def test_each_tested_lever_is_drawn_unasked_with_its_measurements(tested):
    _, _, after, notes = tested
    assert [w["name"] for w in after["what_if"]] == ["kv-fp8", "window-4096"]
    fp8 = _lever(after, "kv-fp8")["measured"]
    assert [p["seq_len"] for p in fp8] == [1024, 16384, 131072]
    for point in fp8:     # the lever's model at the point's batch: the 5% the points were made above it
        assert point["run_id"] == FP8_RUN and point["kv_dtype"] == "float8_e4m3fn"
        assert point["model_error"] == pytest.approx(FP8_OFF - 1, abs=1e-6)
        assert point["model_max_batch"] == point["batch"]
    assert _lever(after, "kv-fp8")["measured_error_worst"]["model_error"] == pytest.approx(FP8_OFF - 1, abs=1e-6)
    windowed = _lever(after, "window-4096")["measured"]
    assert [(p["seq_len"], p["keys"]) for p in windowed] == [(4096, 4096), (16384, 4096), (65536, 4096)]
    for point in windowed:
        assert point["model_error"] == pytest.approx(WINDOW_OFF - 1, abs=1e-6)
        assert "decode line without a window" in point["basis"] and point["run_id"] == WINDOW_RUN
    assert any("8-bit cache" in note for note in notes)


def test_fp8_runs_stay_out_of_the_claims_curve_and_its_calibration(tested):
    _, before, after, _ = tested
    assert all(p["run_id"] != FP8_RUN for p in after["measured"])
    assert after["assumptions"]["calibration"] == before["assumptions"]["calibration"]
    assert after["points"] == before["points"]


def test_an_asked_lever_of_the_same_cache_is_drawn_once_with_the_measurements(tested):
    folder, _, _, _ = tested
    loaded = _load(folder)
    document, _ = build_claim("llama3-8b", results=loaded.results, environments=loaded.environments,
                              what_if=["window-4k", "cartridge-2k"])
    assert [w["name"] for w in document["what_if"]] == ["window-4k", "cartridge-2k", "kv-fp8"]
    assert len(_lever(document, "window-4k")["measured"]) == 3
    assert _lever(document, "cartridge-2k")["measured"] == []


def test_without_results_a_lever_has_no_measurements():
    document, _ = build_claim("llama3-8b", what_if=[what_if_named("kv-fp8")])
    assert document["what_if"][0]["measured"] == [] and document["what_if"][0]["measured_error_worst"] is None


@pytest.mark.slow
def test_claim_json_and_chart_carry_the_measured_points_on_lever_curves(tested, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("seaborn")
    from attnlab.cli import main
    folder, _, _, _ = tested
    out, chart = tmp_path / "claim.json", tmp_path / "claim.png"
    assert main(["claim", str(folder), "--json", str(out), "--chart", str(chart)]) == 0
    document = json.loads(out.read_text())
    assert {w["name"]: len(w["measured"]) for w in document["what_if"]} == {"kv-fp8": 3, "window-4096": 3}
    drawn = chart.with_suffix(".csv").read_text()
    assert drawn.count("measured, what if kv-fp8: e2e-decode, triton-decode") == 3
    assert drawn.count("measured, what if window-4096: triton-decode, batch 1") == 3
    assert drawn.count("model, what if window-4096: triton-decode, batch 1") == 3
