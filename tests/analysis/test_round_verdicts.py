"""A point's rounds read as one record (analysis/rounds.py): its time the median of the round
medians, its interval over rounds, a wrong round making the point wrong; and compare's verdicts
against the point's own noise: two runs of the same code do not disagree, a planted change does."""
import json

import numpy as np
import pytest

from attnlab.analysis.compare import compare
from attnlab.analysis.load import load
from attnlab.analysis.rounds import center, resampled_centers, spread

ENV = {"schema": "attnlab.environment/1", "run_id": "RUN", "host": "here", "cpu": "cpu"}


def round_record(run, kernel, round_index, times, status="ok", seq_len=1024, rounds=3):
    median = float(np.median(times)) if times else None
    return {"schema": "attnlab.result/1", "run_id": run, "kernel": kernel, "mode": "prefill", "workload": "w",
            "batch": 1, "heads": 2, "kv_heads": 1, "head_dim": 16, "dtype": "float32", "causal": True,
            "seq_len": seq_len, "q_len": seq_len, "status": status, "reason": None, "times_ms": times or None,
            "median_ms": median, "p10_ms": median, "p90_ms": median, "flops": 2e9, "bytes": 1e6,
            "tflops": 2e9 / (median / 1e3) / 1e12 if median else None, "device": "cpu", "harness": "sweep",
            "round": round_index, "rounds": rounds, "order_seed": 1}


def write_run(path, run, rounds_by_kernel, status_of=lambda kernel, r: "ok"):
    lines = [dict(ENV, run_id=run)]
    for kernel, rounds in rounds_by_kernel.items():
        for r, times in enumerate(rounds):
            status = status_of(kernel, r)
            lines.append(round_record(run, kernel, r, times if status == "ok" else [], status))
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_the_rounds_of_a_point_read_as_one_record(tmp_path):
    path = write_run(tmp_path / "run.jsonl", "R1", {"k": [[1.0, 1.1, 0.9], [2.0, 2.1, 1.9], [1.2, 1.3, 1.1]]})
    loaded = load(path)
    standing = loaded.ok
    assert len(standing) == 1
    row = standing.iloc[0]
    assert row["median_ms"] == pytest.approx(1.2) and row["rounds_measured"] == 3
    assert row["round_medians_ms"] == [1.0, 2.0, 1.2] and len(row["times_ms"]) == 9
    assert row["tflops"] == pytest.approx(2e9 / 1.2e-3 / 1e12)
    assert (loaded.results["excluded"] == "").sum() == 1


def test_a_wrong_round_makes_the_point_wrong_in_that_run(tmp_path):
    path = write_run(tmp_path / "run.jsonl", "R1", {"k": [[1.0], [1.0], [1.0]]},
                     status_of=lambda kernel, r: "wrong" if r == 1 else "ok")
    loaded = load(path)
    assert loaded.ok.empty
    assert list(loaded.standing["status"]) == ["wrong"]
    left = loaded.results[loaded.results["excluded"] != ""]
    assert len(left) == 2 and all("round 1 of this run gave a wrong output" in why for why in left["excluded"])


def test_center_spread_and_resampling():
    rounds = [np.array([1.0, 1.0]), np.array([3.0, 3.0]), np.array([2.0, 2.0])]
    assert center(rounds) == 2.0 and spread(rounds) == 3.0
    assert spread([np.array([1.0, 2.0, 3.0, 4.0, 5.0])]) == pytest.approx(4.6 / 1.4)
    draws = resampled_centers(rounds, 4000, np.random.default_rng(0))
    assert set(np.unique(draws)) <= {1.0, 2.0, 3.0} and 0.3 < np.mean(draws == 2.0) < 0.6


def noisy_rounds(rng, level, rounds=3, reps=8, jitter=0.15):
    """Rounds of a point whose time varies between rounds by about `jitter`."""
    return [list(level * rng.lognormal(rng.normal(0, jitter), 0.03, size=reps)) for _ in range(rounds)]


def test_an_aa_pair_of_noisy_runs_does_not_regress_and_a_planted_slowdown_does(tmp_path):
    rng = np.random.default_rng(7)
    kernels = {f"k{i}": 0.5 * (i + 1) for i in range(12)}
    base = write_run(tmp_path / "a1.jsonl", "A1", {k: noisy_rounds(rng, v) for k, v in kernels.items()})
    same = write_run(tmp_path / "a2.jsonl", "A2", {k: noisy_rounds(rng, v) for k, v in kernels.items()})
    aa = compare(base, same)
    assert aa.counts["regressed"] == aa.counts["improved"] == 0
    slowed = write_run(tmp_path / "b.jsonl", "B", {k: noisy_rounds(rng, v * (3.0 if k == "k4" else 1.0))
                                                   for k, v in kernels.items()})
    judged = {p["kernel"]: p["verdict"] for p in compare(base, slowed).points}
    assert judged.pop("k4") == "regressed" and "regressed" not in judged.values()
    sped = {p["kernel"]: p["verdict"] for p in compare(slowed, base).points}
    assert sped.pop("k4") == "improved" and "improved" not in sped.values()


def test_an_aa_pairs_reach_is_the_noise_floor_of_a_later_comparison(tmp_path):
    a1 = write_run(tmp_path / "a1.jsonl", "A1", {"k": [[1.0, 1.01, 0.99]]})
    a2 = write_run(tmp_path / "a2.jsonl", "A2", {"k": [[1.2, 1.21, 1.19]]})     # a run's own shift, 20%
    noise_file = tmp_path / "aa.json"
    noise_file.write_text(json.dumps(compare(a1, a2).document()))
    b = write_run(tmp_path / "b.jsonl", "B", {"k": [[1.15, 1.16, 1.14]]})
    without, with_aa = compare(a1, b).points[0], compare(a1, b, noise=noise_file).points[0]
    assert without["verdict"] == "regressed" and without["decided_by"] == "within-run dispersion"
    assert with_aa["verdict"] == "noisy" and with_aa["decided_by"] == "A/A noise" and with_aa["noise"] > 1.19
    with pytest.raises(ValueError, match="^noise: expected the --json document"):
        compare(a1, b, noise=a1)


def unstable_run(path, spread_at):
    """Four lengths of one kernel in three rounds; the rounds of `spread_at` lie 2x apart."""
    lines = [dict(ENV, run_id="U")]
    for n in (256, 512, 1024, 2048):
        level = n / 256
        for r in range(3):
            times = [level * (2.0 if n == spread_at and r == 2 else 1.0)] * 5
            lines.append(round_record("U", "k", r, times, seq_len=n))
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_an_unstable_point_is_named_and_left_out_of_its_fit(tmp_path):
    from attnlab.analysis.fits import fit_all

    run = unstable_run(tmp_path / "u.jsonl", spread_at=1024)
    loaded = load(run)
    (fit,) = [f for f in fit_all(loaded.results, environments=loaded.environments, n_boot=200)[0] if f.kernel == "k"]
    assert fit.unstable == [{"seq_len": 1024, "run_id": "U", "reason": "rounds x2.00 apart", "left_out": True}]
    assert 1024 not in fit.seq_lens and fit.seq_lens == [256, 512, 2048]
    from attnlab.cli import main
    assert main(["report", str(run), "--out", str(tmp_path / "report"), "--formats", "png"]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    section = text[text.index("## Unstable points"):]
    assert "rounds x2.00 apart" in section.split("##")[1]
