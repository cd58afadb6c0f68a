"""`attnlab compare`: planted changes in a committed run are found, noise is not, and every
input it cannot compare is refused with a line naming the argument."""
import copy
import csv
import json
import re

import numpy as np
import pytest
from paths import PROFILES, SAMPLE

from attnlab.analysis.compare import VERDICTS, compare, parse_threshold, verdict
from attnlab.cli import main
from attnlab.schema import COMPARE_SCHEMA, ENVIRONMENT_SCHEMA, RESULT_SCHEMA

PROFILE = PROFILES / "h100-80gb-hbm3" / "2026-11-27" / "sweep.jsonl"
PROFILE_RUN = "20261127T235130Z-cb1e4645"
SAMPLE_BENCHMARK = SAMPLE / "benchmark.json"
SLOWED = {"mode": "prefill", "kernel": "triton", "seq_len": 16384}         # 45 repetitions
SPED_UP = {"mode": "prefill", "kernel": "sdpa-cudnn", "seq_len": 65536}    # 5 repetitions: the fewest the run has
POINT_KEYS = {"kernel", "mode", "workload", "device", "dtype", "seq_len", "batch", "heads", "kv_heads", "head_dim",
              "causal", "base_ms", "new_ms", "base_run_id", "new_run_id", "ratio", "ci", "p_value", "verdict"}


# --- helpers -----------------------------------------------------------------------------------

def run_cli(capsys, *argv):
    """(exit status, stdout, stderr) of `attnlab compare ARGV`."""
    try:
        status = main(["compare", *map(str, argv)])
    except SystemExit as exc:   # argparse refuses a flag
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def write_jsonl(path, objects):
    path.write_text("".join(json.dumps(o) + "\n" for o in objects), encoding="utf-8")
    return path


def scaled(record: dict, factor: float) -> dict:
    """The record as if every repetition took `factor` times as long."""
    out = dict(record, times_ms=[t * factor for t in record["times_ms"]])
    for name in ("median_ms", "p10_ms", "p90_ms"):
        if out.get(name) is not None:
            out[name] = record[name] * factor
    return out


def noisy(record: dict, rng, sd: float = 0.01) -> dict:
    """The record with every repetition multiplied by 1 + N(0, sd): a rerun of the same code."""
    times = np.asarray(record["times_ms"]) * (1 + sd * rng.standard_normal(len(record["times_ms"])))
    return dict(record, times_ms=times.tolist(), median_ms=float(np.median(times)))


def is_point(record: dict, where: dict) -> bool:
    return all(record.get(k) == v for k, v in where.items())


@pytest.fixture(scope="module")
def profile_run():
    """One committed run: its environment line and its ok records with raw times."""
    lines = [json.loads(line) for line in PROFILE.read_text().splitlines() if line.strip()]
    env = next(o for o in lines if o["schema"] == ENVIRONMENT_SCHEMA and o["run_id"] == PROFILE_RUN)
    records = [o for o in lines if o["schema"] == RESULT_SCHEMA and o["run_id"] == PROFILE_RUN
               and o["status"] == "ok" and o.get("times_ms")]
    assert any(is_point(r, SLOWED) for r in records) and any(is_point(r, SPED_UP) for r in records)
    return env, records


def profile_pair(tmp_path, profile_run, change=None, noise: bool = True):
    """BASE: the committed run as it is; NEW: its copy, every repetition with 1% noise (seeded)
    and `change(record)` applied to each record."""
    env, records = profile_run
    rng = np.random.default_rng(7)
    changed = []
    for record in records:
        new = noisy(record, rng) if noise and record["mode"] != "calibration" else dict(record)
        changed.append(change(new) if change else new)
    base = write_jsonl(tmp_path / "base.jsonl", [env, *records])
    new = write_jsonl(tmp_path / "new.jsonl", [env, *changed])
    return base, new


def compared_points(records) -> int:
    return sum(r["mode"] in ("prefill", "decode") for r in records)


def env_line(run_id: str, **fields) -> dict:
    return {"schema": ENVIRONMENT_SCHEMA, "run_id": run_id, "gpu_name": "NVIDIA H100 80GB HBM3", "driver": "550.90.07",
            "torch": "2.11.0", "triton": "3.6.0", "power_limit_w": 700.0, "time": "2026-11-27T10:00:00+00:00",
            **fields}


def record(kernel: str, times, run_id: str = "run-a", seq_len: int = 4096, mode: str = "prefill", **fields) -> dict:
    times = [float(t) for t in times]
    return {"schema": RESULT_SCHEMA, "run_id": run_id, "kernel": kernel, "mode": mode, "workload": "llama3-8b",
            "batch": 1, "heads": 32, "kv_heads": 8, "head_dim": 128, "dtype": "bfloat16", "causal": True,
            "seq_len": seq_len, "q_len": seq_len if mode == "prefill" else 1, "status": "ok", "reason": None,
            "times_ms": times, "median_ms": float(np.median(times)) if times else None,
            "device": "NVIDIA H100 80GB HBM3", **fields}


def times_near(median: float, n: int = 30, seed: int = 0, sd: float = 0.01):
    return median * (1 + sd * np.random.default_rng(seed).standard_normal(n))


def by_kernel(document: dict) -> dict:
    return {p["kernel"]: p for p in document["points"]}


@pytest.fixture
def synthetic(tmp_path):
    """BASE and NEW with one point per verdict, a point NEW measured oom, and a calibration record."""
    calibration = {"schema": RESULT_SCHEMA, "run_id": "run-a", "kernel": "matmul-bf16", "mode": "calibration",
                   "status": "ok", "tflops": 700.0, "times_ms": [1.0, 1.1, 1.0], "median_ms": 1.0,
                   "device": "NVIDIA H100 80GB HBM3", "dtype": "bf16"}
    base = [env_line("run-a"), calibration, record("same", times_near(1.0, seed=1)),
            record("slower", times_near(1.0, seed=2)), record("faster", times_near(1.0, seed=3)),
            record("gone", times_near(1.0, seed=4)), record("ooms", times_near(1.0, seed=5))]
    new = [env_line("run-b"), dict(calibration, run_id="run-b", median_ms=2.0, times_ms=[2.0, 2.1, 2.0]),
           record("same", times_near(1.0, seed=11), "run-b"), record("slower", times_near(1.3, seed=12), "run-b"),
           record("faster", times_near(0.7, seed=13), "run-b"), record("added", times_near(1.0, seed=14), "run-b"),
           dict(record("ooms", [], "run-b"), status="oom", reason="CUDA out of memory", median_ms=None)]
    return write_jsonl(tmp_path / "base.jsonl", base), write_jsonl(tmp_path / "new.jsonl", new)


# --- the committed run, with planted changes ------------------------------------------------------

def test_a_planted_slowdown_is_the_only_regression(tmp_path, profile_run, capsys):
    base, new = profile_pair(tmp_path, profile_run, lambda r: scaled(r, 1.25) if is_point(r, SLOWED) else r)
    status, out, _ = run_cli(capsys, base, new, "--json", tmp_path / "c.json")
    document = json.loads((tmp_path / "c.json").read_text())
    regressed = [p for p in document["points"] if p["verdict"] == "regressed"]
    assert status == 1
    assert [(p["kernel"], p["mode"], p["seq_len"]) for p in regressed] == [("triton", "prefill", 16384)]
    point = regressed[0]
    assert point["ratio"] == pytest.approx(1.25, abs=0.02)
    assert 1.05 < point["ci"][0] <= point["ratio"] <= point["ci"][1] and point["p_value"] < 1e-6
    assert document["counts"]["unchanged"] == compared_points(profile_run[1]) - 1
    assert re.search(r"triton\s+prefill\s+16k\s.*regressed", out)


def test_one_percent_noise_flags_nothing(tmp_path, profile_run, capsys):
    base, new = profile_pair(tmp_path, profile_run)
    status, out, _ = run_cli(capsys, base, new, "--json", tmp_path / "c.json")
    document = json.loads((tmp_path / "c.json").read_text())
    assert status == 0
    assert document["counts"] == {**dict.fromkeys(VERDICTS, 0), "unchanged": compared_points(profile_run[1])}
    assert all(abs(p["ratio"] - 1) < 0.02 for p in document["points"])
    assert "~" in out and "0 regressed, 0 improved" in out


def test_a_planted_speedup_is_improved_even_with_five_repetitions(tmp_path, profile_run, capsys):
    base, new = profile_pair(tmp_path, profile_run, lambda r: scaled(r, 0.7) if is_point(r, SPED_UP) else r)
    status, _, _ = run_cli(capsys, base, new, "--json", tmp_path / "c.json")
    document = json.loads((tmp_path / "c.json").read_text())
    changed = [p for p in document["points"] if p["verdict"] != "unchanged"]
    assert status == 0
    assert [(p["kernel"], p["seq_len"], p["verdict"], p["base_n"]) for p in changed] == [
        ("sdpa-cudnn", 65536, "improved", 5)]
    assert changed[0]["ratio"] == pytest.approx(0.7, abs=0.02) and changed[0]["ci"][1] < 1
    assert changed[0]["p_value"] == pytest.approx(2 / 252)   # exact test, 5 against 5, fully separated


def test_every_matched_point_carries_a_p_value_and_an_interval(tmp_path, profile_run):
    base, new = profile_pair(tmp_path, profile_run)
    points = compare(base, new).points
    assert len(points) == compared_points(profile_run[1])
    for point in points:
        low, high = point["ci"]
        assert 0 < point["p_value"] <= 1
        assert low <= point["ratio"] <= high and high - low < 0.5
        assert point["base_run_id"] == point["new_run_id"] == PROFILE_RUN


# --- the rule ----------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio, ci, noise, expected", [
    (1.10, (1.02, 1.20), 1.0, "regressed"),
    (1 / 1.10, (1 / 1.20, 1 / 1.02), 1.0, "improved"),      # symmetric: the same change, the other way
    (1.10, (0.98, 1.20), 1.0, "noisy"),                     # the interval reaches below 1
    (1.04, (1.02, 1.06), 1.0, "unchanged"),                 # told apart, smaller than the threshold
    (0.96, (0.94, 0.98), 1.0, "unchanged"),                 # 1 / 0.96 = 1.042: inside a symmetric 5%
    (0.951, (0.94, 0.96), 1.0, "improved"),                 # 1 / 0.951 = 1.052: beyond it, though 0.951 > 0.95
    (1.20, (1.10, 1.30), 1.25, "noisy"),                    # beyond the threshold, within the point's own noise
    (1.30, (1.10, 1.50), 1.25, "regressed"),                # beyond both
    (1 / 1.30, (1 / 1.50, 1 / 1.10), 1.25, "improved"),
])
def test_the_verdict_needs_the_threshold_the_noise_and_the_interval(ratio, ci, noise, expected):
    assert verdict(ratio, ci, 0.05, noise) == expected


@pytest.mark.parametrize("text, expected", [("5%", 0.05), ("0.05", 0.05), ("12.5%", 0.125), ("0", 0.0),
                                            ("150%", 1.5), ("0.05%", 0.0005), ("500%", 5.0), (5.0, 5.0)])
def test_thresholds_read_as_percentages_or_fractions(text, expected):
    assert parse_threshold(text) == pytest.approx(expected)
    assert parse_threshold(parse_threshold(text)) == parse_threshold(text)   # a parsed one passes as it is


@pytest.mark.parametrize("text", ["5", "-1%", "x", "nan", "", -0.5, float("inf")])
def test_a_threshold_that_is_neither_is_refused_by_name_quoting_what_was_given(text):
    with pytest.raises(ValueError, match=rf"^threshold: expected .*, got {re.escape(repr(text))}$"):
        parse_threshold(text)


@pytest.mark.parametrize("given", ["0.05%", "500%", "12.5%"])
def test_the_threshold_is_shown_as_given(given, synthetic, tmp_path, capsys):
    md = tmp_path / "compare.md"
    status, out, _ = run_cli(capsys, *synthetic, f"--threshold={given}", "--md", md)
    assert status in (0, 1)
    assert out.rstrip().splitlines()[-1].endswith(f"(threshold {given}, alpha 0.05; '~': the interval holds 1; "
                                                  f"noise: how far the point reaches by itself)")
    assert f"Threshold {given}, alpha 0.05" in md.read_text()


def test_a_bare_number_from_1_is_refused_quoting_it_with_the_range(synthetic, capsys):
    status, _, err = run_cli(capsys, *synthetic, "--threshold", "5")
    (line,) = [line for line in err.splitlines() if "error:" in line]     # after argparse's usage
    assert status == 2 and line.startswith("attnlab compare: error: argument --threshold: ")
    assert "--threshold" in err and "a percentage of 0% or more" in err and "below 1" in err and "got '5'" in err


def test_each_verdict_on_synthetic_runs(synthetic, capsys, tmp_path):
    status, out, _ = run_cli(capsys, *synthetic, "--json", tmp_path / "c.json")
    points = by_kernel(json.loads((tmp_path / "c.json").read_text()))
    assert status == 1
    assert {k: p["verdict"] for k, p in points.items()} == {
        "same": "unchanged", "slower": "regressed", "faster": "improved", "gone": "only-base", "added": "only-new",
        "ooms": "only-base"}
    assert points["ooms"]["note"] == "new measured the point oom: CUDA out of memory"
    assert points["gone"]["note"] == "new did not measure the point"
    assert "matmul-bf16" not in points   # calibration measures the GPU, not the code under test
    assert re.search(r"same\s.*~ [01]\.\d{3} \[", out) and not re.search(r"slower\s.*~", out)


def test_swapping_the_sides_swaps_regressed_and_improved(synthetic):
    forward, backward = compare(*synthetic), compare(*synthetic[::-1])
    assert forward.counts["regressed"] == backward.counts["improved"] == 1
    assert forward.counts["improved"] == backward.counts["regressed"] == 1
    assert forward.counts["only-base"] == backward.counts["only-new"] == 2


def test_reruns_drawn_from_one_distribution_flag_nothing_though_some_tests_are_significant(tmp_path):
    kernels = [f"k{i}" for i in range(40)]
    base = [env_line("a")] + [record(k, times_near(1.0, 20, seed=i, sd=0.03), "a") for i, k in enumerate(kernels)]
    new = [env_line("b")] + [record(k, times_near(1.0, 20, seed=100 + i, sd=0.03), "b") for i, k in enumerate(kernels)]
    comparison = compare(write_jsonl(tmp_path / "base.jsonl", base), write_jsonl(tmp_path / "new.jsonl", new))
    assert comparison.counts["unchanged"] == len(kernels)
    assert sum(p["p_value"] < 0.05 for p in comparison.points) >= 1   # the threshold is what keeps these out


def test_a_significant_change_below_the_threshold_is_unchanged_until_the_threshold_is_lowered(tmp_path, capsys):
    base = write_jsonl(tmp_path / "base.jsonl", [env_line("a"), record("k", times_near(1.0, 200, 1, 0.002), "a")])
    new = write_jsonl(tmp_path / "new.jsonl", [env_line("b"), record("k", times_near(1.02, 200, 2, 0.002), "b")])
    point = compare(base, new).points[0]
    assert point["p_value"] < 1e-10 and point["ratio"] == pytest.approx(1.02, abs=0.002)
    assert point["verdict"] == "unchanged"
    assert run_cli(capsys, base, new)[0] == 0
    assert run_cli(capsys, base, new, "--threshold", "1%")[0] == 1
    assert compare(base, new, threshold=0.01).points[0]["verdict"] == "regressed"


def test_one_round_a_side_is_judged_against_its_dispersion_and_says_so(tmp_path):
    base = write_jsonl(tmp_path / "base.jsonl", [env_line("a"), record("k", [1.0, 1.01, 0.99], "a")])
    new = write_jsonl(tmp_path / "new.jsonl", [env_line("b"), record("k", [1.3, 1.31, 1.29], "b")])
    point = compare(base, new).points[0]
    assert point["ratio"] == pytest.approx(1.3) and point["decided_by"] == "within-run dispersion"
    assert point["noise"] == pytest.approx(1.0 * 1.306 / 1.288, rel=0.01)
    assert point["verdict"] == "regressed"
    assert point["note"].startswith("base and new measured one round: run-to-run noise cannot be told")
    wide = write_jsonl(tmp_path / "wide.jsonl", [env_line("c"), record("k", [1.2, 1.9, 0.8, 1.5, 1.0], "c")])
    assert compare(base, wide).points[0]["verdict"] == "noisy"


def test_intervals_are_reproducible_and_each_point_has_its_own(synthetic, tmp_path):
    first, again = compare(*synthetic), compare(*synthetic)
    assert first.document() == again.document()
    lines = [json.loads(line) for line in synthetic[1].read_text().splitlines()]
    alone = write_jsonl(tmp_path / "slower-only.jsonl", [o for o in lines if o.get("kernel") in (None, "slower")])
    slower = next(p for p in first.points if p["kernel"] == "slower")
    assert by_kernel(compare(synthetic[0], alone).document())["slower"]["ci"] == slower["ci"]


# --- the environments, first -------------------------------------------------------------------------

def test_a_changed_driver_is_listed_before_the_points(tmp_path, capsys):
    base = write_jsonl(tmp_path / "base.jsonl", [env_line("a"), record("k", times_near(1.0), "a")])
    new = write_jsonl(tmp_path / "new.jsonl", [env_line("b", driver="560.35.03", time="2026-11-28T10:00:00+00:00"),
                                               record("k", times_near(1.0, seed=5), "b")])
    status, out, _ = run_cli(capsys, base, new, "--json", tmp_path / "c.json", "--md", tmp_path / "c.md",
                             "--html", tmp_path / "c.html")
    document = json.loads((tmp_path / "c.json").read_text())
    assert status == 0
    assert document["environment_diff"] == [{"field": "driver", "base": "550.90.07", "new": "560.35.03"}]
    assert 0 <= out.index("560.35.03") < out.index("ratio [95% CI]")
    markdown, page = (tmp_path / "c.md").read_text(), (tmp_path / "c.html").read_text()
    assert markdown.index("560.35.03") < markdown.index("## Points: prefill")
    assert page.index("560.35.03") < page.index("Points: prefill") < page.index("<svg")


def test_the_same_environment_says_so(synthetic, capsys):
    _, out, _ = run_cli(capsys, *synthetic)
    assert out.splitlines()[3].startswith("The environments agree in every field compared")


# --- bad input: exit 2, one line naming the argument -------------------------------------------------

def _bad_inputs(tmp_path, synthetic):
    base, new = synthetic
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{ not json", encoding="utf-8")
    broken = tmp_path / "broken.jsonl"
    lines = base.read_text().splitlines()
    broken.write_text("\n".join([lines[0], "{ not json", *lines[1:]]) + "\n", encoding="utf-8")
    empty = write_jsonl(tmp_path / "empty.jsonl", [env_line("run-c")])
    other = write_jsonl(tmp_path / "other.jsonl", [env_line("run-d"), record("elsewhere", times_near(1.0), "run-d")])
    return {
        "missing path": ([tmp_path / "nope.jsonl", new], "BASE: ", "neither a file nor a folder"),
        "empty run": ([base, empty], "NEW: ", "holds no ok"),
        "malformed JSON": ([garbage, new], "BASE: ", "not valid JSON"),
        "malformed JSONL line": ([broken, new], "BASE: ", "malformed"),
        "no shared point": ([base, other], "NEW: ", "shares no point with base"),
        "run id not present": ([base, new, "--run-id-base", "run-z"], "--run-id-base: ", "run-a"),
        "output over an input": ([base, new, "--json", base], "--json: ", "input"),
    }


@pytest.mark.parametrize("case", ["missing path", "empty run", "malformed JSON", "malformed JSONL line",
                                  "no shared point", "run id not present", "output over an input"])
def test_bad_input_exits_2_with_one_line_naming_the_argument(case, tmp_path, synthetic, capsys):
    argv, name, detail = _bad_inputs(tmp_path, synthetic)[case]
    status, out, err = run_cli(capsys, *argv)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"attnlab compare: error: {name}")
    assert detail in err


@pytest.mark.parametrize("flag, value", [("--threshold", "5"), ("--alpha", "1.5"), ("--alpha", "0")])
def test_bad_flags_exit_2_naming_the_flag(flag, value, synthetic, capsys):
    status, _, err = run_cli(capsys, *synthetic, flag, value)
    assert status == 2 and f"argument {flag}" in err


# --- inputs and outputs ------------------------------------------------------------------------------

def test_pytest_benchmark_json_is_read_and_compared(tmp_path, capsys):
    document = json.loads(SAMPLE_BENCHMARK.read_text())
    slowed = copy.deepcopy(document)
    bench = next(b for b in slowed["benchmarks"] if b["name"] == "test_prefill[sdpa-flash-4096]")
    assert "times_ms" not in bench["extra_info"]   # its repetitions are pytest-benchmark's own, in seconds
    bench["stats"]["data"] = [t * 1.3 for t in bench["stats"]["data"]]
    new = tmp_path / "new.json"
    new.write_text(json.dumps(slowed), encoding="utf-8")
    comparison = compare(SAMPLE_BENCHMARK, new)
    assert comparison.base.run_ids == ["sample-h100-20261127-pytest-benchmark"]
    assert [(p["kernel"], p["seq_len"]) for p in comparison.points if p["verdict"] == "regressed"] == [
        ("sdpa-flash", 4096)]
    assert comparison.counts["unchanged"] == len(document["benchmarks"]) - 1
    assert run_cli(capsys, SAMPLE_BENCHMARK, new)[0] == 1


def test_a_sweep_against_pytest_benchmark_shows_what_one_side_did_not_record(tmp_path):
    comparison = compare(SAMPLE_BENCHMARK.with_name("results.jsonl"), SAMPLE_BENCHMARK)
    fields = {entry["field"]: entry for entry in comparison.environment_diff}
    assert fields["driver"] == {"field": "driver", "base": "550.90.07", "new": None}
    assert sum(p["ratio"] is not None for p in comparison.points) == 6


def test_a_named_run_is_compared_instead_of_the_standing_records(tmp_path):
    base = write_jsonl(tmp_path / "base.jsonl", [env_line("a"), record("k", times_near(1.0), "a")])
    runs = tmp_path / "runs"
    runs.mkdir()
    write_jsonl(runs / "early.jsonl", [env_line("early", time="2026-11-27T11:00:00+00:00"),
                                       record("k", times_near(1.4, seed=3), "early")])
    write_jsonl(runs / "late.jsonl", [env_line("late", time="2026-11-27T12:00:00+00:00"),
                                      record("k", times_near(1.0, seed=4), "late")])
    standing, named = compare(base, runs), compare(base, runs, run_id_new="early")
    assert (standing.new.run_ids, standing.points[0]["verdict"]) == (["late"], "unchanged")
    assert (named.new.run_ids, named.points[0]["verdict"]) == (["early"], "regressed")


def test_the_json_document_keeps_its_contract(synthetic, tmp_path, capsys):
    run_cli(capsys, *synthetic, "--json", tmp_path / "c.json")
    document = json.loads((tmp_path / "c.json").read_text())
    assert {"schema", "base", "new", "threshold", "alpha", "environment_diff", "points", "counts"} <= set(document)
    assert document["schema"] == COMPARE_SCHEMA == "attnlab.compare/1"
    assert document["base"] == {"paths": [str(synthetic[0])], "run_ids": ["run-a"]}
    assert (document["threshold"], document["alpha"], document["interval"]["draws"]) == (0.05, 0.05, 2000)
    assert list(document["counts"]) == list(VERDICTS) and sum(document["counts"].values()) == 6
    assert all(POINT_KEYS <= set(p) for p in document["points"])
    gone = by_kernel(document)["gone"]
    assert [gone[k] for k in ("new_ms", "new_run_id", "ratio", "ci", "p_value")] == [None] * 5
    assert gone["base_ms"] > 0 and gone["base_run_id"] == "run-a"


def test_html_and_markdown_reports_are_written(synthetic, tmp_path, capsys):
    html_path, md_path = tmp_path / "out" / "compare.html", tmp_path / "out" / "compare.md"
    status, _, _ = run_cli(capsys, *synthetic, "--html", html_path, "--md", md_path, "--json", tmp_path / "c.json")
    points = [p for p in json.loads((tmp_path / "c.json").read_text())["points"] if p["ratio"] is not None]
    page, markdown = html_path.read_text(), md_path.read_text()
    assert status == 1
    assert "<svg" in page and "<img" not in page and "<link" not in page   # self-contained
    assert markdown.index("## Environment differences") < markdown.index("## Points: prefill")
    assert "| kernel | length | base ms | new ms |" in markdown
    with open(html_path.with_name("compare_ratio.csv"), newline="") as f:
        drawn = list(csv.DictReader(f))
    assert sorted(row["kernel"] for row in drawn) == sorted(p["kernel"] for p in points)
    assert {row["kernel"]: float(row["y"]) for row in drawn} == pytest.approx({p["kernel"]: p["ratio"] for p in points})
    assert {"ci_lo", "ci_hi", "p_value", "verdict", "seq_len"} <= set(drawn[0])
    assert run_cli(capsys, *synthetic, "--html", html_path)[0] == 1   # attnlab wrote it: a rerun may replace it
