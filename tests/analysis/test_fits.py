"""Scaling fits recover known curves; the roofline judges points against the right peak."""
import csv
import json

import numpy as np
import pytest

pytest.importorskip("pandas")
pytest.importorskip("scipy")

from attnlab.analysis.fits import CONTRACT_FIELDS, fit_all, fit_group, fit_quadratic, write_fits  # noqa: E402
from attnlab.analysis.load import load  # noqa: E402
from attnlab.analysis.roofline import gpu_spec, match_gpu, roofline, roofline_summary  # noqa: E402

LENGTHS = [1024 * 2**i for i in range(8)]  # 1k .. 128k


def noisy_reps(a, b, c, noise=0.02, reps=10, seed=0, lengths=LENGTHS):
    rng = np.random.default_rng(seed)
    return [(a + b * n + c * n * n) * np.exp(rng.normal(0, noise, reps)) for n in lengths]


def record(kernel, mode, seq_len, times, status="ok", **extra):
    times = [float(t) for t in times]
    return {"schema": "attnlab.result/1", "run_id": "r1", "kernel": kernel, "mode": mode, "workload": "w",
            "batch": 1, "heads": 8, "kv_heads": 8, "head_dim": 64, "dtype": "bf16", "causal": True,
            "seq_len": seq_len, "q_len": seq_len if mode == "prefill" else 1, "status": status, "reason": None,
            "times_ms": times, "median_ms": float(np.median(times)) if times else None,
            "device": "NVIDIA H100 80GB HBM3", **extra}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_recovers_known_coefficients_within_tolerance():
    # Each term matters somewhere in 1k..128k: a at 1k, b n in the middle, c n^2 at the top.
    a, b, c = 0.05, 1e-5, 1e-9
    fit = fit_group(LENGTHS, noisy_reps(a, b, c))
    assert fit["a_ms"] == pytest.approx(a, rel=0.25)
    assert fit["b_ms_per_token"] == pytest.approx(b, rel=0.15)
    assert fit["c_ms_per_token2"] == pytest.approx(c, rel=0.05)
    assert fit["crossover_seq_len"] == pytest.approx(b / c, rel=0.2)
    assert fit["r2"] > 0.999
    assert fit["ci_method"] == "bootstrap over repetitions"


def test_exponent_is_two_for_quadratic_data():
    fit = fit_group(LENGTHS, noisy_reps(0.01, 1e-7, 2e-8))
    lo, hi = fit["exponent_ci"]
    assert 1.95 <= fit["exponent"] <= 2.02
    assert lo <= fit["exponent"] <= hi and hi - lo < 0.1
    assert fit["exponent_seq_lens"] == (16384, 131072)  # the longer half of the lengths


def test_exponent_is_one_for_linear_data():
    fit = fit_group(LENGTHS, noisy_reps(0.001, 2e-6, 0.0))
    assert 0.95 <= fit["exponent"] <= 1.03
    # No real quadratic term: c n^2 stays under 2% of b n at 128k, so the crossover is far away.
    assert fit["c_ms_per_token2"] * LENGTHS[-1] < 0.02 * fit["b_ms_per_token"]
    assert fit["crossover_seq_len"] is None or fit["crossover_seq_len"] > 4 * LENGTHS[-1]


def test_extrapolation_intervals_cover_the_truth():
    a, b, c = 0.05, 1e-5, 1e-9
    fit = fit_group(LENGTHS, noisy_reps(a, b, c, noise=0.03, seed=3))
    labels = [p["label"] for p in fit["extrapolation"]]
    assert labels == ["256k", "1m"]
    for point in fit["extrapolation"]:
        n = point["seq_len"]
        truth = a + b * n + c * n * n
        assert point["lo_ms"] <= point["latency_ms"] <= point["hi_ms"]
        assert point["latency_ms"] == pytest.approx(truth, rel=0.1)
        assert point["hi_ms"] > point["lo_ms"]


def test_fit_is_weighted_by_relative_error():
    # Plain least squares would trade the 1k points' relative error for the 128k points'
    # absolute error (off by 25% or more there); on relative error every length fits alike.
    n = np.array(LENGTHS, dtype=float)
    for seed in range(5):
        fit = fit_group(LENGTHS, noisy_reps(0.02, 1e-6, 1e-8, noise=0.05, seed=seed), n_boot=50)
        predicted = fit["a_ms"] + fit["b_ms_per_token"] * n + fit["c_ms_per_token2"] * n * n
        assert np.max(np.abs(predicted / np.array(fit["median_ms"]) - 1)) < 0.08


def test_coefficients_are_never_negative():
    # Pure n^2 with noise: an unconstrained fit would trade a negative a or b against c.
    for seed in range(5):
        coef = fit_quadratic(LENGTHS, [np.median(r) for r in noisy_reps(0.0, 0.0, 3e-8, noise=0.05, seed=seed)])
        assert min(coef) >= 0.0


def test_single_repetition_falls_back_to_residual_bootstrap():
    reps = [[float(np.median(r))] for r in noisy_reps(0.01, 1e-7, 2e-8)]
    fit = fit_group(LENGTHS, reps)
    assert fit["ci_method"] == "bootstrap over fit residuals"
    lo, hi = fit["exponent_ci"]
    assert np.isfinite(lo) and np.isfinite(hi) and lo <= hi


def test_fit_all_leaves_failed_points_out(tmp_path):
    reps = noisy_reps(0.01, 1e-7, 2e-8)
    good = [record("k", "prefill", n, r) for n, r in zip(LENGTHS, reps)]
    bad = [record("k", "prefill", 2 * LENGTHS[-1], [1e9] * 5, status="error", reason="boom"),
           record("k", "prefill", 4 * LENGTHS[-1], [], status="oom", reason="predicted")]
    alone = load(write_jsonl(tmp_path / "a.jsonl", good)).results
    mixed = load(write_jsonl(tmp_path / "b.jsonl", good + bad)).results
    assert len(mixed) == len(alone) + 2  # kept for the memory views ...
    (fit_alone,), _ = fit_all(alone)
    (fit_mixed,), _ = fit_all(mixed)
    assert fit_mixed.n_points == len(LENGTHS)  # ... and out of the fit
    assert fit_mixed.c_ms_per_token2 == pytest.approx(fit_alone.c_ms_per_token2)


def test_groups_with_too_few_lengths_are_skipped_with_a_reason(tmp_path):
    records = [record("k", "decode", n, [1.0, 1.1, 0.9]) for n in LENGTHS[:2]]
    fits, skipped = fit_all(load(write_jsonl(tmp_path / "r.jsonl", records)).results)
    assert fits == []
    assert skipped[0]["kernel"] == "k" and "at least 3" in skipped[0]["reason"]


def test_fits_files_follow_the_contract(tmp_path):
    records = [record(k, "prefill", n, r) for k in ("k1", "k2")
               for n, r in zip(LENGTHS, noisy_reps(0.01, 1e-7, 2e-8, seed=len(k)))]
    fits, skipped = fit_all(load(write_jsonl(tmp_path / "r.jsonl", records)).results)
    json_path, csv_path = write_fits(fits, tmp_path / "out", skipped)
    document = json.loads(json_path.read_text())
    assert [f["kernel"] for f in document["fits"]] == ["k1", "k2"]
    for entry in document["fits"]:
        assert set(CONTRACT_FIELDS) <= set(entry)
        assert len(entry["exponent_ci"]) == 2 and entry["n_points"] == 8
        assert entry["device"] == "NVIDIA H100 80GB HBM3" and entry["workload"] == "w"
    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2
    assert {"a_ms", "b_ms_per_token", "c_ms_per_token2", "exponent", "exponent_ci_lo", "exponent_ci_hi", "r2",
            "n_points", "crossover_seq_len", "latency_ms_1m"} <= set(rows[0])


# --- roofline ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, key", [
    ("NVIDIA H100 80GB HBM3", "h100-sxm"), ("NVIDIA H100 SXM5 80GB", "h100-sxm"), ("NVIDIA H100 PCIe", "h100-pcie"),
    ("NVIDIA H100 NVL", "h100-nvl"), ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
    ("NVIDIA A100-SXM4-80GB", "a100-80gb"), ("NVIDIA A100 80GB PCIe", "a100-pcie-80gb"), ("NVIDIA L4", "l4"),
    ("NVIDIA L40S", "l40s"), ("h100-sxm", "h100-sxm"), ("NVIDIA GH200 480GB", None), ("cpu", None),
])
def test_gpu_names_match_robustly(name, key):
    assert getattr(match_gpu(name), "key", None) == key


def test_unknown_gpu_error_names_the_argument():
    with pytest.raises(ValueError, match="gpu: 'tpu-v5'"):
        gpu_spec("tpu-v5")


def test_roofline_prefers_measured_peaks_and_says_which(tmp_path):
    prefill = record("k", "prefill", 8192, [1.0] * 3, tflops=500.0)
    decode = record("k", "decode", 8192, [1.0] * 3, gbps=2000.0)
    other_run = {**record("k", "decode", 16384, [1.0] * 3, gbps=1675.0), "run_id": "r2"}
    calibration = [
        {"schema": "attnlab.result/1", "run_id": "r1", "kernel": "matmul-bf16", "mode": "calibration",
         "status": "ok", "tflops": 800.0, "device": "NVIDIA H100 80GB HBM3"},
        {"schema": "attnlab.result/1", "run_id": "r1", "kernel": "copy-d2d", "mode": "calibration",
         "status": "ok", "gbps": 3000.0, "device": "NVIDIA H100 80GB HBM3"}]
    results = load(write_jsonl(tmp_path / "r.jsonl", [prefill, decode, other_run, *calibration])).results
    roof = roofline(results).set_index(["run_id", "mode"])
    assert roof.loc[("r1", "prefill"), "pct_of_peak"] == pytest.approx(62.5)
    assert roof.loc[("r1", "prefill"), "peak_source"].startswith("measured")
    assert roof.loc[("r1", "decode"), "pct_of_peak"] == pytest.approx(100 * 2000 / 3000)
    # A run without calibration falls back to the spec sheet, and says so.
    assert roof.loc[("r2", "decode"), "pct_of_peak"] == pytest.approx(50.0)
    assert roof.loc[("r2", "decode"), "peak_source"] == "spec: H100 SXM 80GB"
    assert len(roofline_summary(roofline(results))) == 2


def test_roofline_gives_no_percentage_without_a_known_peak(tmp_path):
    rows = [record("k", "prefill", 1024, [1.0] * 3, tflops=0.1, device="cpu"),
            record("k", "decode", 1024, [1.0] * 3, gbps=10.0, dtype="float32")]
    roof = roofline(load(write_jsonl(tmp_path / "r.jsonl", rows)).results)
    assert roof["pct_of_peak"].isna().all()
    assert "no spec for device 'cpu'" in roof.iloc[0]["peak_source"]
    assert "dtype float32" in roof.iloc[1]["peak_source"]


# --- the model per mode, the memory wall, one record per point ------------------------------------

def test_decode_is_fitted_linear_and_prefill_quadratic(tmp_path):
    # The same slightly curved data (a stale fixed cost) in both modes: decode must stay linear.
    reps = noisy_reps(0.05, 1e-6, 1e-12, noise=0.01)
    records = [record("k", mode, n, r) for mode in ("decode", "prefill") for n, r in zip(LENGTHS, reps)]
    fits, _ = fit_all(load(write_jsonl(tmp_path / "r.jsonl", records)).results, n_boot=50)
    by_mode = {f.mode: f for f in fits}
    assert by_mode["decode"].model == "linear" and by_mode["decode"].c_ms_per_token2 == 0
    assert by_mode["decode"].crossover_seq_len is None
    assert by_mode["prefill"].model == "quadratic" and by_mode["prefill"].c_ms_per_token2 > 0
    assert "linear" in by_mode["decode"].model_reason and "AICc" in by_mode["decode"].model_reason
    assert set(by_mode["decode"].aicc) == {"linear", "quadratic"}


def test_an_extrapolation_past_the_memory_wall_states_no_latency(tmp_path):
    reps = noisy_reps(0.01, 1e-7, 2e-8, lengths=LENGTHS[:4])
    # Predicted memory grows as n^2 (a score matrix): 1 GiB at 8k, so 1M needs 16 TiB.
    memory = {n: (n / 8192) ** 2 * 2**30 for n in LENGTHS}
    records = [record("naive", "prefill", n, r, predicted_mem_bytes=memory[n]) for n, r in zip(LENGTHS[:4], reps)]
    (fit,), _ = fit_all(load(write_jsonl(tmp_path / "a.jsonl", records)).results, n_boot=50)
    by_label = {p["label"]: p for p in fit.extrapolation}
    assert by_label["256k"]["fits_in_memory"] is False and by_label["256k"]["latency_ms"] is None
    assert "1,024.0 GiB beyond" in by_label["256k"]["memory"]
    # An out-of-memory point says so as well, whatever the prediction.
    oom = record("naive", "prefill", 16384, [], status="oom", reason="predicted", predicted_mem_bytes=1.0)
    (fit,), _ = fit_all(load(write_jsonl(tmp_path / "b.jsonl", records + [oom])).results, n_boot=50)
    assert all(p["fits_in_memory"] is False and p["latency_ms"] is None for p in fit.extrapolation)
    assert "ran out of memory at 16k" in fit.extrapolation[0]["memory"]
    # Within memory, a latency with its interval.
    small = [{**r, "predicted_mem_bytes": 2**30} for r in records]
    (fit,), _ = fit_all(load(write_jsonl(tmp_path / "c.jsonl", small)).results, n_boot=50)
    assert all(p["fits_in_memory"] and p["lo_ms"] <= p["latency_ms"] <= p["hi_ms"] for p in fit.extrapolation)


def test_two_runs_of_a_point_are_not_averaged_and_their_spread_is_in_the_interval(tmp_path):
    reps = noisy_reps(0.01, 1e-7, 2e-8, noise=0.005)
    first = [{**record("k", "prefill", n, r), "run_id": "old"} for n, r in zip(LENGTHS, reps)]
    again = {**record("k", "prefill", 16384, [t * 1.11 for t in reps[4]]), "run_id": "new"}
    envs = [{"schema": "attnlab.environment/1", "run_id": "old", "time": "2026-11-27T00:00:00Z"},
            {"schema": "attnlab.environment/1", "run_id": "new", "time": "2026-11-28T00:00:00Z"}]
    loaded = load(write_jsonl(tmp_path / "r.jsonl", envs + first + [again]))
    (fit,), _ = fit_all(loaded.results, n_boot=400)
    point = next(p for p in fit.points if p["seq_len"] == 16384)
    assert point["run_id"] == "new" and point["runs"] == 2
    assert point["median_ms"] == pytest.approx(again["median_ms"])           # the standing record, not a mean
    assert point["lo_ms"] <= first[4]["median_ms"] and point["hi_ms"] >= again["median_ms"]
    assert "between runs at 16k (2 runs)" in fit.ci_method
    alone = next(p for p in fit.points if p["seq_len"] == 8192)
    assert alone["runs"] == 1 and alone["hi_ms"] / alone["lo_ms"] < 1.02    # repetition noise only


def test_every_record_is_a_fit_point_or_left_out_with_a_reason(tmp_path):
    from attnlab.analysis.fits import left_out
    reps = noisy_reps(0.01, 1e-7, 2e-8)
    records = ([record("k", "prefill", n, r) for n, r in zip(LENGTHS, reps)]
               + [record("lonely", "decode", 1024, [1.0] * 3), record("k", "prefill", 2**18, [], status="oom"),
                  {**record("k", "prefill", 1024, [1.0] * 3), "median_ms": -1.0}])
    results = load(write_jsonl(tmp_path / "r.jsonl", records)).results
    fits, _ = fit_all(results, n_boot=50)
    excluded = left_out(results, fits)
    assert len(excluded) + sum(len(f.points) for f in fits) == len(results)
    reasons = sorted(e["reason"].split(":")[0].split(",")[0] for e in excluded)
    assert reasons == ["invalid", "its curve has under 3 context lengths", "status oom"]
    assert all(e["file"].endswith("r.jsonl") and e["line"] for e in excluded)


def test_a_curve_that_misses_its_own_points_states_nothing_beyond_them(tmp_path):
    # Times that fall and rise with context (a host sync per call, say): no line describes them.
    times = [0.3, 0.15, 0.4, 0.12, 0.35, 0.14, 0.2, 0.3]
    records = [record("k", "decode", n, [t] * 3) for n, t in zip(LENGTHS, times)]
    (fit,), _ = fit_all(load(write_jsonl(tmp_path / "r.jsonl", records)).results, n_boot=50)
    assert fit.r2 < 0.9
    assert all(p["latency_ms"] is None and "misses its own points" in p["refused"] for p in fit.extrapolation)


@pytest.mark.parametrize("n", [3, 4, 7, 8, 25])
def test_resampled_medians_follow_the_brute_force_bootstrap(n):
    from attnlab.analysis.rounds import resampled_medians
    rng = np.random.default_rng(n)
    times = rng.lognormal(0, 0.3, n)
    brute = np.median(times[rng.integers(0, n, size=(40_000, n))], axis=1)
    fast = resampled_medians(times, 40_000, np.random.default_rng(1))
    for q in (2.5, 25, 50, 75, 97.5):
        assert np.percentile(fast, q) == pytest.approx(np.percentile(brute, q), rel=0.02), q
    assert fast.mean() == pytest.approx(brute.mean(), rel=0.005)
    assert set(np.unique(fast)) <= set(np.unique(brute)) | {(a + b) / 2 for a in times for b in times}


def test_a_record_of_200k_repetitions_fits_in_bounded_memory():
    import tracemalloc
    reps = noisy_reps(0.01, 1e-7, 2e-8, reps=200_000, lengths=LENGTHS[:3], noise=0.01)
    tracemalloc.start()
    fit = fit_group(LENGTHS[:3], reps, n_boot=2000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 200 * 2**20, peak          # the resample matrix alone would be 3.2 GB per length
    lo, hi = fit["exponent_ci"]
    assert lo <= fit["exponent"] <= hi and fit["ci_method"] == "bootstrap over repetitions"
