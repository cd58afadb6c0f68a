"""One page that says what runs measured: report.html (self-contained, charts embedded as
base64 PNG) and report.md (charts linked from charts/), built from the same sections.

Sections: run conditions, records, head to head, fits, charts, roofline, the claim, failed
and out-of-memory points. The files `analyze` writes (fits, roofline, claim, charts) sit
beside the page. Every run the page names is followed by its card (the first 8 hex digits of
its GPU UUID), since runs of one GPU model may come from different cards.
"""
from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from attnlab import text as fmt
from attnlab.analysis import summary
from attnlab.analysis.analyze import analyze
from attnlab.analysis.charts import pick_baseline, render_all
from attnlab.analysis.claim import CLAIM, validation_text
from attnlab.analysis.conditions import card_namer, conditions_blocks, run_cards, with_cards
from attnlab.analysis.fits import (MIN_LENGTHS, MIN_R2_TO_EXTRAPOLATE, MIN_STABLE_POINTS, SELECTION, extrapolated_text,
                                   fit_labels, worst_miss)
from attnlab.analysis.load import THIS_MACHINE
from attnlab.analysis.roofline import roofline_summary
from attnlab.analysis.rounds import unstable_reason
from attnlab.analysis.select import SAME_POINT, exclusion_kind, joined_key, point_labels
from attnlab.models import DEFAULT_MODEL
from attnlab.schema import KERNEL_MODES, OK, QUADRATIC_MODES, WRONG


SELECTION_NOTE = (f"Selection: {SELECTION}. Records measured with a known fault are retracted in a retractions.jsonl "
                  f"beside the data, with the reason.")
CHART_ORDER = ("latency", "tflops", "gbps", "speedup", "memory", "power", "claim")


@dataclass
class Report:
    """What `build_report` wrote, and what it had to leave out (`warnings`)."""

    html_path: Path
    md_path: Path
    files: list = field(default_factory=list)
    charts: list = field(default_factory=list)
    warnings: list = field(default_factory=list)


def build_report(paths, out_dir, *, baseline=None, model=DEFAULT_MODEL, gpu=None, formats=("png", "svg"),
                 n_boot: int = 2000, all_runs: bool = False, this_machine=()) -> Report:
    """Analyse `paths` (run folders or files) as `analyze` does and write report.html and
    report.md beside its files in `out_dir`."""
    if "png" not in formats:
        formats = ("png", *formats)  # the HTML page embeds PNG
    analysis = analyze(paths, out_dir, baseline=baseline, model=model, gpu=gpu, formats=formats, n_boot=n_boot,
                       charts=False, all_runs=all_runs, this_machine=this_machine)
    out = Path(out_dir)
    envs = analysis.loaded.environments
    analysis.loaded.results = with_cards(analysis.results, envs)     # so that charts and tables name each card
    _draw_charts(analysis, out / "charts", baseline=baseline, formats=formats, all_runs=all_runs)
    sections = _sections(analysis, _ordered(analysis.charts), baseline)
    sections = scrubbed(carded(sections, run_cards(envs)), machine_paths(paths))
    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text(render_html(sections), encoding="utf-8")
    md_path.write_text(render_markdown(sections, out), encoding="utf-8")
    return Report(html_path, md_path, analysis.files + [html_path, md_path], analysis.charts, analysis.warnings)


def _draw_charts(analysis, out: Path, **options) -> None:
    """`analyze`'s charts, drawn from records that know their card."""
    drawn, not_drawn = render_all(analysis.results, out, fits=analysis.fits, roof=analysis.roof,
                                  claim=analysis.claim, **options)
    analysis.charts = drawn
    analysis.files += [path for chart in drawn for path in chart.files.values()]
    analysis.warnings += [f"chart not drawn: {reason}" for reason in not_drawn]


def machine_paths(paths) -> list:
    """(absolute prefix, name to show) for each input: the report names files by where they are
    under what the user named, never by a path of this machine."""
    pairs = []
    for raw in [paths] if isinstance(paths, (str, Path)) else paths:
        path = Path(raw)
        shown = str(raw) if not path.is_absolute() else (path.name if path.is_dir() else "")
        for absolute in {str(path.resolve()), str(path.absolute())}:
            folder = absolute if path.is_dir() else str(Path(absolute).parent)
            pairs.append((folder, shown if path.is_dir() else ""))
    return sorted(pairs, key=lambda pair: -len(pair[0]))    # the longest prefix first


def scrubbed(sections: list, prefixes: list) -> list:
    """`sections` with every input's absolute prefix replaced by the name the user gave it."""
    def text(value):
        value = str(value)
        for prefix, shown in prefixes:
            value = value.replace(prefix + "/", f"{shown}/" if shown else "").replace(prefix, shown or ".")
        return value
    return _text_mapped(sections, text)


def carded(sections: list, cards: dict) -> list:
    """`sections` with every run named by its id followed by its card, '(card d3d8bafb)', where
    the card is known and not already said: two runs of one GPU model may come from two cards."""
    return _text_mapped(sections, card_namer(cards)) if cards else sections


def _text_mapped(sections: list, text) -> list:
    """`sections` with `text` applied to every text a block holds (charts keep their own)."""
    def block(b):
        if b[0] == "p":
            return ("p", text(b[1]))
        if b[0] == "list":
            return ("list", [text(item) for item in b[1]])
        if b[0] == "table":
            return ("table", [text(h) for h in b[1]], [[text(c) for c in row] for row in b[2]])
        return b
    return [(title, [block(b) for b in blocks]) for title, blocks in sections]


def _ordered(drawn: list) -> list:
    rank = {kind: i for i, kind in enumerate(CHART_ORDER)}
    return sorted(drawn, key=lambda c: (rank.get(c.name.split("_")[0], len(rank)), c.name))


# --- sections: (title, [blocks]); a block is ("p", text), ("list", items),
# ("table", headers, rows) or ("chart", Chart) ----------------------------------------------------

def _sections(analysis, drawn, baseline=None) -> list:
    """The answer first (summary), then the evidence, then what was left out and the
    conditions and provenance of every run."""
    loaded, claim = analysis.loaded, analysis.claim
    results, envs = loaded.results, loaded.environments
    title = []
    if "synthetic" in envs and envs["synthetic"].eq(True).any():
        title.append(("p", "Warning: some runs are marked synthetic: their numbers are sample data, "
                           "not measurements."))
    wrong = _wrong_blocks(results)
    return [
        ("attnlab report", title),
        *([("Wrong answers", wrong)] if wrong else []),
        ("Summary", _summary_blocks(analysis, drawn)),
        ("Charts", [("chart", c) for c in drawn if c.name != "claim"] or [("p", "No charts could be drawn.")]),
        ("Head to head", _head_to_head_blocks(results, baseline)),
        ("Fits: decode a + b n, prefill a + b n + c n^2", _fit_blocks(analysis.fits, run_cards(envs))),
        ("Roofline", _roofline_blocks(analysis.roof)),
        ("The claim: 10,000 tokens/s at 1k, 130 at 120k", _claim_blocks(claim, _claim_chart_shown(analysis))),
        ("Failed and out-of-memory points", _failure_blocks(results)),
        ("Unstable points", _unstable_blocks(results)),
        ("What was skipped", [("list", analysis.warnings)] if analysis.warnings else [("p", "Nothing.")]),
        ("Left out", _left_out_blocks(analysis.excluded)),
        ("Run conditions", conditions_blocks(results, envs)),
        ("Records", _record_blocks(loaded)),
    ]


def _summary_blocks(analysis, drawn) -> list:
    claim = analysis.claim
    blocks = _headline_blocks(analysis.results)
    if _claim_chart_shown(analysis):
        blocks += [("p", _claim_chart_label(analysis))] + [("chart", c) for c in drawn if c.name == "claim"]
        blocks.append(("p", _ratios_text(claim)))
    said = summary.sentences(analysis.results, analysis.roof, claim, analysis.excluded)
    return blocks + ([("list", said)] if said else [])


def _this_machine(results):
    """Which records are of a run made on this machine (`--this-machine`, as `attnlab lab` labels it)."""
    return results["device"].astype(str).str.endswith(f"({THIS_MACHINE})")


def _headline_blocks(results) -> list:
    """The headline tables, this machine's first where a run of it is read beside others: the
    report of `attnlab lab` leads with the run it just made."""
    mine = _this_machine(results)
    if not mine.any() or mine.all():
        return summary.headline_blocks(results)
    return [("p", "This machine, the run measured here:"), *summary.headline_blocks(results[mine]),
            ("p", "The other runs read beside it, for comparison:"), *summary.headline_blocks(results[~mine])]


def _claim_runs(claim: dict) -> set:
    """The runs whose records calibrate the serving model or are set beside it."""
    provenance = claim["assumptions"]["calibration"].get("provenance") or []
    items = [part for item in provenance for part in (item, item.get("compute_efficiency_at_most")) if part]
    return ({point["run_id"] for item in items for point in item["points"] if point.get("run_id")}
            | {m["run_id"] for m in claim.get("measured") or [] if m.get("run_id")})


def _claim_chart_shown(analysis) -> bool:
    """The serving model's chart belongs in the summary only where records read feed it."""
    return bool(analysis.claim and _claim_runs(analysis.claim))


def _claim_chart_label(analysis) -> str:
    claim, results = analysis.claim, analysis.results
    runs, mine = _claim_runs(claim), set(results.loc[_this_machine(results), "run_id"])
    whose = ("this machine's run" if runs <= mine else "this machine's run and others read beside it" if runs & mine
             else "the other runs read, not this machine's" if mine else "the runs read")
    return (f"The serving model behind the claim, {claim['model']} on {claim['gpu']}, calibrated on or set beside "
            f"{whose} ({', '.join(sorted(runs))}):")


def _record_blocks(loaded) -> list:
    results = loaded.results
    standing = results["excluded"] == ""
    return [("p", f"Read {len(loaded.files)} file(s): {', '.join(loaded.files)}. {len(results)} result records: "
                  f"{int(standing.sum())} stand for their points "
                  f"({int((standing & (results['status'] == OK)).sum())} of them ok), "
                  f"{int((~standing).sum())} are left out (see 'Left out')."),
            ("p", SELECTION_NOTE), ("table", *_record_counts(results))]


def _record_counts(results):
    fate = results["excluded"].map(lambda reason: exclusion_kind(reason) if reason else "stands")
    counts = results.assign(fate=fate).groupby(["mode", "kernel", "status", "fate"]).size().reset_index(name="records")
    return ["mode", "kernel", "status", "record", "records"], counts.values.tolist()


def _head_to_head_blocks(results, baseline=None) -> list:
    """Per run and workload, every kernel's median time at each length, its rate, and how many
    times faster it is than the baseline (`pick_baseline`'s, unless asked otherwise) at the same point.
    Only kernels measured in the same run are set side by side: same card, same state, same
    code. A column is a kernel and the options that tell its records apart (q len 4, ...)."""
    ok = results[results["valid"] & (results["status"] == OK) & results["mode"].isin(KERNEL_MODES)]
    blocks = []
    group = ["run_id", "mode", "workload", "device", "dtype"]
    mine_first = sorted(ok.groupby(group), key=lambda item: not str(item[0][3]).endswith(f"({THIS_MACHINE})"))
    for (run_id, mode, workload, device, dtype), rows in mine_first:
        kernels = sorted(set(rows["kernel"]))
        if len(kernels) < 2:
            continue
        chosen = baseline if baseline in kernels else pick_baseline(rows)[0]
        rate, unit = ("tflops", "TFLOP/s") if mode in QUADRATIC_MODES else ("gbps", "GB/s")
        rows = rows.assign(label=point_labels(rows, rows["kernel"], within=group)[0],
                           _point=joined_key(rows, SAME_POINT))
        base_ms = rows[rows["kernel"] == chosen].groupby("_point")["median_ms"].last()
        # One record each; of a point the run recorded twice, the later.
        cells = rows.drop_duplicates(["seq_len", "label"], keep="last").set_index(["seq_len", "label"])
        columns = sorted(set(rows["label"]))
        table = [[fmt.k(seq_len)] + [_versus(cells, seq_len, label, base_ms, rate, unit, chosen) for label in columns]
                 for seq_len in sorted(set(rows["seq_len"]))]
        blocks.append(("p", f"{mode}, {workload}, {dtype}, {device}, run {run_id}: median ms per call, rate, and "
                            f"in brackets {chosen}'s time over the kernel's at the same point (above 1: faster than "
                            f"{chosen})."))
        blocks.append(("table", ["context", *columns], table))
    return blocks or [("p", "No run has ok records of two kernels for one workload.")]


def _versus(cells, seq_len, label, base_ms, rate, unit, chosen) -> str:
    if (seq_len, label) not in cells.index:
        return "-"
    cell = cells.loc[(seq_len, label)]
    ms, value, base = cell["median_ms"], cell[rate], base_ms.get(cell["_point"])
    text = f"{fmt.num(ms)} ms" + ("" if fmt.missing(value) else f", {fmt.num(value)} {unit}")
    if cell["kernel"] != chosen and not fmt.missing(base):
        text += f" ({base / ms:.2f}x)"
    return text


def _fit_blocks(fits, cards: dict) -> list:
    if not fits:
        return [("p", f"No curve had ok records at {MIN_LENGTHS} or more context lengths.")]
    headers = ["kernel", "mode", "workload", "device", "dtype", "model", "a (ms)", "b (ms/token)", "c (ms/token^2)",
               "exponent [95% CI]", "R^2 (log)", "worst miss", "lengths (runs)", "cards of its points",
               "c n^2 > b n beyond", "256k (ms) [95%]", "1M (ms) [95%]"]
    rows, labels = [], fit_labels(fits)[0]
    for f, label in zip(fits, labels):
        lo, hi = f.exponent_ci
        rows.append([label, f.mode, f.workload, f.device, f.dtype, f.model, fmt.num(f.a_ms),
                     fmt.num(f.b_ms_per_token), fmt.num(f.c_ms_per_token2), f"{f.exponent:.2f} [{lo:.2f}, {hi:.2f}]",
                     f"{f.r2:.4f}", fmt.pct(100 * worst_miss(f)), _lengths(f.points), _point_cards(f.points, cards),
                     "never" if f.crossover_seq_len is None else f"{f.crossover_seq_len:,} tokens",
                     *[extrapolated_text(p) for p in f.extrapolation]])
    note = ("Each curve is fitted to the one record that stands for each of its points. Decode reads the KV cache "
            "once per call, so its model is linear; prefill, backward and fwd_bwd are quadratic. Coefficients are "
            "non-negative and fitted "
            "on relative error; 'worst miss' is the largest relative gap between the curve and a point. The "
            "exponent is the log-log slope over the longer half of the lengths. Intervals come from a bootstrap: "
            "over each record's repetitions, and, where several valid runs measured a length (the count in "
            "brackets), over those runs too, so they cover the spread between runs; the extrapolations assume the "
            "model holds beyond the data, and state no latency where the kernel does not fit in memory. A curve "
            "whose points come from more than one card ('cards of its points'), or whose intervals take in runs "
            "of another card, spans the difference between those cards too. A curve below R^2 "
            f"{MIN_R2_TO_EXTRAPOLATE} is not drawn in the latency charts; its points are.")
    reasons = [f"{label} {f.mode} ({f.workload}): {f.model_reason}; intervals: {f.ci_method}."
               for f, label in zip(fits, labels)]
    return [("p", note), ("table", headers, rows), ("list", reasons)]


def _point_cards(points, cards: dict) -> str:
    """The cards the fitted points were measured on, '-' where unknown."""
    return ", ".join(sorted({cards[p["run_id"]] for p in points if p["run_id"] in cards})) or "-"


def _lengths(points) -> str:
    return ", ".join(fmt.k(p["seq_len"]) + (f" ({p['runs']})" if p["runs"] > 1 else "") for p in points)


def _roofline_blocks(roof) -> list:
    if roof.empty:
        return [("p", "No ok prefill, decode, backward or fwd_bwd records.")]
    summary = roofline_summary(roof)
    headers = ["kernel", "mode", "workload", "device", "% of peak at longest", "best % (at)", "peak", "peak source"]
    rows = [[r["label"], r["mode"], r["workload"], r["device"],
             f"{fmt.pct(r['pct_at_longest'])} at {fmt.k(r['longest_seq_len'])}",
             f"{fmt.pct(r['best_pct'])} ({fmt.k(r['best_seq_len'])})", f"{fmt.num(r['peak'])} {r['peak_unit']}",
             r["peak_source"]] for _, r in summary.iterrows()]
    note = ("Prefill, backward and fwd_bwd are judged against the compute peak (TFLOP/s), decode against memory "
            "bandwidth (GB/s): decode reads the whole KV cache for one query. Measured peaks come from the run's "
            "calibration "
            "(a bf16 matmul, a device copy); without them, from the GPU's spec sheet.")
    return [("p", note), ("table", headers, rows)]


def _ratios_text(claim: dict) -> str:
    claimed = CLAIM["short_tok_s"] / CLAIM["long_tok_s"]
    return (f"The claim's drop and the model's three ratios, {fmt.k(CLAIM['short_ctx'])} over "
            f"{fmt.k(CLAIM['long_ctx'])}: at the largest batch {fmt.ratio(claim['ratio_max_batch'])}, at batch 1 "
            f"{fmt.ratio(claim['ratio_batch1'])}, with prefill {fmt.ratio(claim['ratio_with_prefill'])}; the claim: "
            f"{claimed:.0f}x ({claim['claim_source']}).")


def _claim_blocks(claim: dict, chart_in_summary: bool) -> list:
    headers = ["context", "largest batch", "tok/s at largest batch", "tok/s at batch 1", "tok/s with prefill"]
    rows = [[fmt.k(p["seq_len"]), p["max_batch"], fmt.num(p["tok_s_max_batch"]), fmt.num(p["tok_s_batch1"]),
             fmt.num(p["tok_s_with_prefill"])] for p in claim["points"]]
    blocks = [("p", claim["explanation"]), ("p", _ratios_text(claim)), ("table", headers, rows)]
    sources = claim["assumptions"]["calibration"]["sources"]
    if sources:
        blocks.append(("p", "Calibration: " + "; ".join(sources) + "."))
    blocks += _provenance_blocks(claim["assumptions"]["calibration"].get("provenance") or [])
    blocks.append(("table", ["ratio", "kernel", "run", "lengths", "drop", "how"],
                   [[r["what"], r.get("kernel", "-"), r.get("run_id") or "-",
                     f"{fmt.k(r['short_ctx'])} to {fmt.k(r['long_ctx'])}", fmt.ratio(r["ratio"]), r["how"]]
                    for r in claim["ratios_side_by_side"]]))
    if claim["measured"]:
        blocks.append(("table", ["measured", "kernel", "context", "batch", "tok/s", "model tok/s", "measured / model",
                                 "run"],
                       [[m["mode"], m["kernel"], fmt.k(m["seq_len"]), m["batch"], fmt.num(m["tok_s"]),
                         fmt.num(m["model_tok_s"]), _signed_pct(m["model_error"]), m["run_id"]]
                        for m in claim["measured"]]))
    blocks += _validation_blocks(claim.get("validation"))
    return blocks + ([("p", "The chart of this model and the measured points is in the summary.")]
                     if chart_in_summary else [])


def _provenance_blocks(provenance: list) -> list:
    """Which records set each calibrated parameter, by length and run, and on which cards."""
    if not provenance:
        return []
    items = [part for item in provenance for part in (item, item.get("compute_efficiency_at_most")) if part]
    cards = sorted({card for item in items for card in item["cards"]})
    note = "Which records set each parameter: one run's record per point, the card of each run in brackets."
    if len(cards) > 1:
        note += (f" The model is calibrated on records of {len(cards)} cards ({', '.join(cards)}) of one GPU model: "
                 f"its rates mix what separates those cards.")
    return [("p", note), ("table", ["parameter", "value", "set by", "points (lengths of each run)", "cards"],
                          [_provenance_row(item) for item in items])]


def _provenance_row(item: dict) -> list:
    values = "; ".join(_value_text(value) for value in item["parameters"].values())
    by = item["fitted_to"]
    binds = item.get("compute_efficiency_binds_at")
    if binds is not None:
        by += (f"; the compute efficiency binds only at {', '.join(fmt.k(n) for n in binds) or 'none of them'} "
               f"(a GEMM compute-bound at that point's batch)")
    runs = {}
    for point in item["points"]:
        runs.setdefault(point["run_id"], []).append(point["seq_len"])
    where = "; ".join(f"{', '.join(fmt.k(n) for n in lengths if n is not None) or 'calibration'} of run {run}"
                      for run, lengths in runs.items())
    return [" and ".join(item["parameters"]), values, by, where or "-", ", ".join(item["cards"]) or "-"]


def _value_text(value) -> str:
    return ", ".join(fmt.num(v) for v in value) if isinstance(value, list) else fmt.num(value)


def _validation_blocks(validation) -> list:
    """The model's error on the points it was fitted to (in sample) beside its error on points it
    did not see (out of sample), point by point."""
    if not validation:
        return []
    rows = [[fmt.k(p["seq_len"]), p["batch"], fmt.num(p["tok_s"]), _signed_pct(p["in_sample_error"]),
             _signed_pct(p["leave_one_out_error"]), _signed_pct(p["uncalibrated_error"]), p["run_id"]]
            for p in validation["points"]]
    headers = ["context", "batch", "measured tok/s", "in sample (fitted to every point)",
               "out of sample: leave-one-out (refitted without this point)",
               "out of sample: uncalibrated (no e2e point)", "run"]
    return [("p", validation_text(validation)), ("table", headers, rows)]


def _signed_pct(error) -> str:
    return "-" if fmt.missing(error) else f"{100 * error:+.1f}%"


def _wrong_blocks(results) -> list:
    """The points whose output failed its check against float64: first in the report, since no
    time of theirs is a speed. One row per kernel, mode, run and error."""
    wrong = results[(results["status"] == WRONG) & (results["excluded"] == "")]
    if wrong.empty:
        return []
    rows = []
    for (kernel, mode, run_id), group in wrong.groupby(["kernel", "mode", "run_id"], sort=True):
        lengths = sorted(int(n) for n in group["seq_len"].dropna())
        reasons = sorted({_cell(r) for r in group["reason"]})
        rows.append([kernel, mode, ", ".join(fmt.k(n) for n in lengths) or "-", "; ".join(reasons), run_id])
    return [("p", f"{len(wrong)} point(s) gave a wrong output: checked against float64 before timing, they were "
                  f"never timed, and no chart, fit, comparison or claim uses them."),
            ("table", ["kernel", "mode", "contexts", "why", "run"], rows)]


def _unstable_blocks(results) -> list:
    """The points whose time mixes states (`rounds.unstable_reason`): one row per kernel, mode,
    run and reason; the fits leave them out where a curve keeps enough points without them."""
    ok = results[(results["status"] == OK) & (results["excluded"] == "")]
    reasons = ok.apply(unstable_reason, axis=1) if len(ok) else ok.index.to_series(dtype=object)
    unstable = ok.assign(why=reasons)[reasons != ""]
    if unstable.empty:
        return [("p", "No point's rounds lie apart, drifted or saw the card's clocks change.")]
    rows = [[kernel, mode, ", ".join(fmt.k(int(n)) for n in sorted(group["seq_len"].dropna())), why, run_id]
            for (kernel, mode, why, run_id), group in unstable.groupby(["kernel", "mode", "why", "run_id"], sort=True)]
    return [("p", f"{len(unstable)} point(s) whose time mixes states; each fit leaves them out where it keeps "
                  f"{MIN_STABLE_POINTS} points or more without them, and fits.json names them under 'unstable'."),
            ("table", ["kernel", "mode", "contexts", "why", "run"], rows)]


def _failure_blocks(results) -> list:
    failed = results[~results["status"].isin((OK, WRONG)) & (results["excluded"] == "")]
    if failed.empty:
        return [("p", "Every point ran.")]
    headers = ["status", "kernel", "mode", "workload", "contexts", "reason", "run"]
    keys = ["status", "kernel", "mode", "workload", "reason", "run_id"]
    rows = []
    # One row per kernel and reason, so a kernel that cannot run at all takes one line, not eight.
    for key, group in failed.assign(reason=failed["reason"].map(_cell)).groupby(keys, sort=True):
        status, kernel, mode, workload, reason, run_id = key
        lengths = sorted(int(n) for n in group["seq_len"].dropna())
        rows.append([status, kernel, mode, workload, ", ".join(fmt.k(n) for n in lengths) or "-", reason, run_id])
    return [("p", "Kept out of the fits; out-of-memory points appear in the memory charts."), ("table", headers, rows)]


def _left_out_blocks(excluded) -> list:
    """Every record the analysis did not use, one row per reason, run and kernel."""
    if not excluded:
        return [("p", "Every record was used.")]
    groups = {}
    for e in excluded:
        key = (e["reason"], e["run_id"], e["kernel"], e["mode"], e["file"])
        groups.setdefault(key, []).append(e["seq_len"])
    rows = [[reason, run_id, kernel, mode, ", ".join(fmt.k(n) for n in sorted(n for n in lengths if n is not None))
             or "-", file] for (reason, run_id, kernel, mode, file), lengths in sorted(groups.items())]
    return [("p", f"{len(excluded)} record(s) left out of the fits, charts and claim; fits.json lists each under "
                  f"'excluded' with its file and line."),
            ("table", ["reason", "run", "kernel", "mode", "contexts", "file"], rows)]


# --- formatting ---------------------------------------------------------------------------------

def _cell(value) -> str:
    if isinstance(value, list):
        return " ".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # pandas turns integer columns with gaps into floats
    return "-" if fmt.missing(value) else str(value)


# --- rendering ----------------------------------------------------------------------------------

CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:0.85em;margin:0.8em 0}th,td{border:1px solid #ccc;padding:3px 6px;
text-align:left;vertical-align:top}th{background:#f2f2f2}figure{margin:1.5em 0}img{max-width:100%;
border:1px solid #ddd}figcaption{font-size:0.85em;color:#444}h2{border-bottom:1px solid #ddd;margin-top:2em}"""


def render_html(sections) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html.escape(sections[0][0])}</title><style>{CSS}</style></head><body>"]
    for i, (title, blocks) in enumerate(sections):
        parts.append(f"<h{1 if i == 0 else 2}>{html.escape(title)}</h{1 if i == 0 else 2}>")
        parts += [_html_block(block) for block in blocks]
    parts.append("</body></html>")
    return fmt.xml_safe("\n".join(parts) + "\n")     # records' text may hold characters no page may


def _html_block(block) -> str:
    kind = block[0]
    if kind == "p":
        return f"<p>{html.escape(block[1])}</p>"
    if kind == "list":
        return "<ul>" + "".join(f"<li>{html.escape(str(item))}</li>" for item in block[1]) + "</ul>"
    if kind == "table":
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in block[1])
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in block[2])
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    chart = block[1]
    data = base64.b64encode(Path(chart.files["png"]).read_bytes()).decode("ascii")
    # The caption is drawn in the image, under its axes: said once, and kept in the alt text.
    alt = html.escape(f"{chart.title}. {chart.caption}")
    return f'<figure><img alt="{alt}" src="data:image/png;base64,{data}"></figure>'


def render_markdown(sections, out_dir) -> str:
    lines = []
    for i, (title, blocks) in enumerate(sections):
        lines += [f"{'#' if i == 0 else '##'} {title}", ""]
        for block in blocks:
            lines += _md_block(block, Path(out_dir)) + [""]
    return fmt.xml_safe("\n".join(lines))      # Markdown becomes HTML: the same characters are out


def _md_block(block, out_dir: Path) -> list:
    kind = block[0]
    if kind == "p":
        return [md_text(block[1])]
    if kind == "list":
        return [f"- {md_text(item)}" for item in block[1]]
    if kind == "table":
        def row(cells):
            return "| " + " | ".join(md_text(c) for c in cells) + " |"
        return [row(block[1]), "| " + " | ".join(["---"] * len(block[1])) + " |"] + [row(r) for r in block[2]]
    chart = block[1]
    link = Path(chart.files["png"]).relative_to(out_dir).as_posix()
    return [f"![{md_text(chart.title)}]({link})"]       # its caption is drawn in the image


MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|~#])")


def md_text(value) -> str:
    """Text from records as Markdown shows it literally: its markup characters escaped and on
    one line, as report.html escapes HTML (a kernel named <script> stays text)."""
    return MD_SPECIAL.sub(r"\\\1", str(value)).replace("\n", " ")
