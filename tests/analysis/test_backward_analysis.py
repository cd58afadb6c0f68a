"""Backward and forward+backward records through the analysis: fitted as quadratic curves like
prefill, judged against the compute peak on the roofline, charted per mode, compared run
against run, and set in the report's tables by mode."""
import json

import numpy as np
import pytest

pytest.importorskip("pandas")
pytest.importorskip("scipy")

from attnlab.analysis.compare import compare  # noqa: E402
from attnlab.analysis.fits import fit_all  # noqa: E402
from attnlab.analysis.load import load  # noqa: E402
from attnlab.analysis.roofline import roofline  # noqa: E402
from attnlab.cli import main  # noqa: E402
from attnlab.schema import ENVIRONMENT_SCHEMA, RESULT_SCHEMA  # noqa: E402

LENGTHS = [1024, 2048, 4096, 8192, 16384]
H100 = "NVIDIA H100 80GB HBM3"
# Per mode: FLOPs per n^2 (llama3-8b, causal: 4 x 32 heads x 128 / 2, times 2.5 or 3.5) and a time curve.
MODES = {"backward": (2.5, (0.05, 1e-6, 4e-8)), "fwd_bwd": (3.5, (0.08, 1e-6, 6e-8))}


def record(kernel, mode, seq_len, run_id="run-a", factor=1.0, seed=0):
    per_forward, (a, b, c) = MODES[mode]
    median = (a + b * seq_len + c * seq_len ** 2) * factor
    times = (median * (1 + 0.01 * np.random.default_rng(seed + seq_len).standard_normal(20))).tolist()
    flops = per_forward * 4 * 32 * 128 * seq_len ** 2 / 2
    return {"schema": RESULT_SCHEMA, "run_id": run_id, "kernel": kernel, "mode": mode, "workload": "llama3-8b",
            "batch": 1, "heads": 32, "kv_heads": 8, "head_dim": 128, "dtype": "bfloat16", "causal": True,
            "seq_len": seq_len, "q_len": seq_len, "status": "ok", "reason": None, "times_ms": times,
            "median_ms": float(np.median(times)), "flops": flops, "tflops": flops / (np.median(times) / 1e3) / 1e12,
            "device": H100, "check_error": 1e-3, "check_bound": 4e-3, "check_rows": 200}


def run_file(path, run_id="run-a", factor=1.0, seed=0):
    env = {"schema": ENVIRONMENT_SCHEMA, "run_id": run_id, "gpu_name": H100, "driver": "580.159.04",
           "torch": "2.11.0", "triton": "3.6.0", "power_limit_w": 700.0, "time": "2026-12-01T10:00:00+00:00"}
    records = [record(kernel, mode, n, run_id, factor if kernel == "triton" else 1.0, seed)
               for mode in MODES for kernel in ("triton", "sdpa-flash") for n in LENGTHS]
    path.write_text("".join(json.dumps(o) + "\n" for o in [env, *records]))
    return path


def test_training_curves_are_fitted_quadratic_with_their_reason(tmp_path):
    loaded = load([run_file(tmp_path / "run.jsonl")])
    fits, _ = fit_all(loaded.results, n_boot=50)
    by_curve = {(f.kernel, f.mode): f for f in fits}
    assert set(by_curve) == {(k, m) for k in ("triton", "sdpa-flash") for m in MODES}
    fit = by_curve[("triton", "backward")]
    assert fit.model == "quadratic" and "2.5x prefill's n^2 work" in fit.model_reason
    assert fit.c_ms_per_token2 == pytest.approx(4e-8, rel=0.1)
    assert "3.5x" in by_curve[("sdpa-flash", "fwd_bwd")].model_reason


def test_training_points_are_judged_against_the_compute_peak(tmp_path):
    roof = roofline(load([run_file(tmp_path / "run.jsonl")]).results)
    assert set(roof["mode"]) == set(MODES)
    assert set(roof["peak_unit"]) == {"TFLOP/s"}
    row = roof[(roof["mode"] == "backward") & (roof["seq_len"] == 16384)].iloc[0]
    assert row["achieved"] == pytest.approx(row["tflops"]) and 0 < row["pct_of_peak"] < 100


def test_compare_finds_a_slower_backward_and_only_it(tmp_path):
    base = run_file(tmp_path / "base.jsonl")
    new = run_file(tmp_path / "new.jsonl", "run-b", factor=1.3, seed=1)
    verdicts = {(p["kernel"], p["mode"], p["seq_len"]): p["verdict"] for p in compare(base, new).points}
    assert len(verdicts) == 2 * 2 * len(LENGTHS)
    assert {v for (kernel, _, n), v in verdicts.items() if kernel == "triton" and n >= 4096} == {"regressed"}
    assert {v for (kernel, _, _), v in verdicts.items() if kernel == "sdpa-flash"} == {"unchanged"}


def test_the_analysis_charts_each_training_mode_and_the_report_tables_them(tmp_path, capsys):
    results = run_file(tmp_path / "run.jsonl")
    assert main(["analyze", str(results), "--out", str(tmp_path / "analysis"), "--formats", "png",
                 "--bootstrap", "50"]) == 0
    charts = {p.name for p in (tmp_path / "analysis" / "charts").iterdir()}
    assert {"latency_backward_llama3-8b.png", "tflops_backward_llama3-8b.png"} <= charts
    assert any(name.startswith("tflops_fwd-bwd") for name in charts)
    assert main(["report", str(results), "--out", str(tmp_path / "report"), "--formats", "png"]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "llama3-8b backward, bfloat16" in report and "llama3-8b fwd\\_bwd, bfloat16" in report  # markdown escapes _
