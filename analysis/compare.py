"""Is NEW faster than BASE, or is it noise? Two runs compared point by point, from their raw
repetitions, with the difference between their environments stated first.

What is compared: the `ok` records that hold raw repetitions (`times_ms`) of the kernel modes
(prefill, decode) and of the end-to-end modes (e2e-decode, e2e-prefill-decode), one per point.
Calibration records are left out: they measure the GPU (its matmul and copy rates), not the
code under test, and a GPU that changed shows in the environment difference. Where a side
holds several runs, the record that stands for each point (see `select`) is used, or the
records of the run named by `run_id_base` / `run_id_new`. Points match on the point key of
`select` (device, kernel, mode, workload, dtype, shape, seq_len, q_len and the options a record
was measured with: window, softcap, docs, l2_flush, ...; `attnlab.schema.POINT_FIELDS`); a point
one side lacks is `only-base` or `only-new`.

For each matched point:
- base_ms, new_ms: the medians of the raw repetitions; ratio = new_ms / base_ms (above 1: slower);
- ci: a 95% bootstrap interval of that ratio over the repetitions of one run on each side (it
  says nothing of the spread between runs), from BOOTSTRAP_DRAWS resampled medians per side,
  seeded from the point itself, so a point's interval is the same whatever else is compared;
- p_value: a two-sided Mann-Whitney U test of the raw times (no assumption of normal times,
  which GPU timings rarely are);
- verdict, by RULE: a symmetric practical threshold t, and evidence that agrees.

Why this rule. Significance alone flags a 0.3% change measured with a thousand repetitions;
the threshold alone flags noise measured with three. The threshold is symmetric in log space
(slower than 1 + t, or faster than 1 / (1 + t)), so swapping BASE and NEW swaps `regressed`
and `improved` exactly. The interval must lie on the same side of 1 as the ratio, so that the
rank test and the bootstrap of the medians agree on the direction (with few repetitions or
many tied times they can disagree). It need not clear the threshold itself: that would ask
whether the change is certainly larger than t, and a likely 8% regression with an interval
of [1.03, 1.13] would then pass as unchanged; the interval is shown beside every verdict so
the reader can see how far it reaches.
"""
from __future__ import annotations

import html
import json
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from attnlab import text as fmt
from attnlab.analysis import _deps
from attnlab.analysis.conditions import clocks_text
from attnlab.analysis.fits import resampled_medians
from attnlab.analysis.select import POINT_KEY, exclusion_kind, joined_key
from attnlab.schema import COMPARE_SCHEMA, E2E_MODES, KERNEL_MODES, OK

COMPARED_MODES = (*KERNEL_MODES, *E2E_MODES)
REGRESSED, IMPROVED, UNCHANGED, ONLY_BASE, ONLY_NEW = "regressed", "improved", "unchanged", "only-base", "only-new"
VERDICTS = (REGRESSED, IMPROVED, UNCHANGED, ONLY_BASE, ONLY_NEW)
DEFAULT_THRESHOLD, DEFAULT_ALPHA = 0.05, 0.05
BOOTSTRAP_DRAWS, SEED, LEVEL = 2000, 0, 0.95
TEST = "two-sided Mann-Whitney U on the raw repetitions"
INTERVAL = "bootstrap of the ratio of medians, the repetitions of each side resampled"
RULE = ("regressed: p < alpha, ratio above 1 + threshold and its 95% interval above 1; improved: p < alpha, ratio "
        "below 1 / (1 + threshold) and its interval below 1; else unchanged; only-base / only-new: one side "
        "lacks the point (as an ok record with raw times)")
# Environment fields compared, in the order a reader checks them: the GPU, its state, the software, the code.
ENVIRONMENT_FIELDS = (
    "gpu_name", "gpu_uuid", "compute_capability", "driver", "cuda", "cuda_driver", "clocks", "power_limit_w",
    "persistence_mode", "throttle_reasons", "torch", "triton", "flash_attn", "cudnn", "attnlab", "python",
    "git_commit", "git_dirty", "host", "cpu", "synthetic",
)
# Numeric fields in the order points are listed: by shape, then length (e2e batches follow the length),
# then the options.
ORDER_FIELDS = ("heads", "kv_heads", "head_dim", "seq_len", "batch", "q_len", "window", "softcap", "docs",
                "decode_tokens")
CHART_NAME = "ratio"
MODE_LINES = {"prefill": "-", "decode": "--", "e2e-decode": ":", "e2e-prefill-decode": "-."}
RATIO_TICKS = (0.25, 0.33, 0.5, 0.67, 0.8, 0.9, 0.95, 1, 1.05, 1.1, 1.25, 1.5, 2, 3, 4)


@dataclass
class Side:
    """One side of a comparison: `records`, one ok record with raw times per point (with its
    point key in `_key`); `considered`, every record of the side (or of its chosen run) with
    what became of it, to say why a point of the other side has no match here."""

    name: str
    paths: list
    run_ids: list
    records: object
    considered: object
    environments: list = field(default_factory=list)
    warnings: list = field(default_factory=list)


@dataclass
class Comparison:
    """Two sides, point by point: `points` as in the JSON document (see `document`)."""

    base: Side
    new: Side
    threshold: float
    alpha: float
    draws: int
    seed: int
    environment_diff: list
    points: list

    @property
    def counts(self) -> dict:
        return {verdict: sum(p["verdict"] == verdict for p in self.points) for verdict in VERDICTS}

    @property
    def regressed(self) -> bool:
        return self.counts[REGRESSED] > 0

    @property
    def warnings(self) -> list:
        return self.base.warnings + self.new.warnings

    def document(self) -> dict:
        """The attnlab.compare/1 document: plain JSON values, null for what a point lacks."""
        return {"schema": COMPARE_SCHEMA, "base": _side_summary(self.base), "new": _side_summary(self.new),
                "threshold": self.threshold, "alpha": self.alpha, "test": TEST,
                "interval": {"method": INTERVAL, "level": LEVEL, "draws": self.draws, "seed": self.seed},
                "rule": RULE, "environment_diff": self.environment_diff, "points": self.points,
                "counts": self.counts, "warnings": self.warnings}


def _side_summary(side: Side) -> dict:
    return {"paths": side.paths, "run_ids": side.run_ids}


# --- arguments -------------------------------------------------------------------------------

def parse_threshold(text) -> float:
    """A practical threshold as a fraction, from a percentage of any size ('5%', '0.05%',
    '500%') or a bare fraction below 1 ('0.05'); a bare 5 could mean 5% or 500%, so it is
    refused. A number (not text) is taken as the fraction itself."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if math.isfinite(text) and text >= 0:
            return float(text)
        raise ValueError(f"threshold: expected a fraction of 0 or more such as 0.05, got {text!r}")
    raw = str(text).strip()
    percent = raw.endswith("%")
    try:
        value = float(raw[:-1] if percent else raw) / (100 if percent else 1)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0 and (percent or value < 1)):
        raise ValueError(f"threshold: expected a percentage of 0% or more such as 5% or 0.5%, or a fraction from 0 "
                         f"to below 1 such as 0.05, got {text!r}")
    return value


def parse_alpha(text) -> float:
    """A significance level in (0, 1)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not 0 < value < 1:
        raise ValueError(f"alpha: expected a significance level between 0 and 1 such as 0.05, got {text!r}")
    return value


# --- the comparison --------------------------------------------------------------------------

def compare(base, new, *, threshold: float = DEFAULT_THRESHOLD, alpha: float = DEFAULT_ALPHA, run_id_base=None,
            run_id_new=None, draws: int = BOOTSTRAP_DRAWS, seed: int = SEED) -> Comparison:
    """Compare the runs in `base` and `new` (files or folders, JSONL or pytest-benchmark JSON).
    ValueError naming the argument for a missing path, a malformed file, a run id not present,
    a side with nothing to compare, or sides that share no point."""
    threshold, alpha = parse_threshold(threshold), parse_alpha(alpha)
    base_side = read_side("base", base, run_id_base)
    new_side = read_side("new", new, run_id_new)
    if not set(base_side.records["_key"]) & set(new_side.records["_key"]):
        raise ValueError(f"new: shares no point with base ({_measured(new_side)} against {_measured(base_side)}); "
                         f"points match on {', '.join(POINT_KEY)}")
    keys = _ordered_keys(base_side, new_side)
    points = [_point(key, base_side, new_side, threshold, alpha, draws, seed) for key in keys]
    return Comparison(base_side, new_side, threshold, alpha, draws, seed,
                      environment_diff(base_side.environments, new_side.environments), points)


def _measured(side: Side) -> str:
    records = side.records
    return (f"{side.name} holds {len(records)} point(s) of {', '.join(sorted(set(records['kernel'])))} "
            f"({', '.join(sorted(set(records['mode'])))}) on {', '.join(sorted(set(records['device'])))}")


def read_side(name: str, paths, run_id=None) -> Side:
    """The records one side compares: ok, with raw times, in a compared mode, one per point."""
    from attnlab.analysis.load import Malformed, load

    try:
        loaded = load(paths)
    except (FileNotFoundError, ValueError) as exc:
        raise ValueError(f"{name}: {_without_name(str(exc))}") from None
    malformed = [w for w in loaded.warnings if isinstance(w, Malformed)]
    if malformed:
        raise ValueError(f"{name}: a malformed file: {malformed[0]}")
    results = loaded.results.assign(_key=joined_key(loaded.results, POINT_KEY) if len(loaded.results) else [])
    rows = _run_rows(name, paths, results, run_id) if run_id is not None else results[results["excluded"] == ""]
    compared = rows[rows["mode"].isin(COMPARED_MODES) & (rows["status"] == OK)]
    timed = compared[compared["times_ms"].map(len) > 0].drop_duplicates("_key", keep="last")
    if timed.empty:
        which = f"run {run_id!r} of {_shown_paths(paths)}" if run_id is not None else _shown_paths(paths)
        raise ValueError(f"{name}: {which} holds no ok {'/'.join(COMPARED_MODES)} record with raw times (times_ms) "
                         f"to compare")
    run_ids = sorted(set(timed["run_id"]))
    warnings = [f"{name}: {w}" for w in loaded.warnings] + _left_out(name, results, compared, run_id)
    environments = [e for e in loaded.environments.to_dict("records") if e.get("run_id") in run_ids]
    considered = results if run_id is None else results[results["run_id"] == run_id]
    return Side(name, [str(p) for p in _as_list(paths)], run_ids, timed, considered, environments, warnings)


def _without_name(message: str) -> str:
    """The loader's message without the name of its own argument ('paths: ...')."""
    return message.split(": ", 1)[1] if message.startswith("paths: ") else message


def _as_list(paths) -> list:
    return [paths] if isinstance(paths, (str, Path)) else list(paths)


def _shown_paths(paths) -> str:
    return ", ".join(repr(str(p)) for p in _as_list(paths))


def _run_rows(name: str, paths, results, run_id: str):
    """The valid records of one run; ValueError naming the flag where the side does not hold it."""
    runs = sorted(set(results["run_id"]))
    if run_id not in runs:
        raise ValueError(f"run_id_{name}: run {run_id!r} is not in {name} ({_shown_paths(paths)}); its runs: "
                         f"{', '.join(runs) or 'none'}")
    return results[(results["run_id"] == run_id) & results["valid"]]


def _left_out(name: str, results, compared, run_id) -> list:
    """What this side read but does not compare, and why, as warnings."""
    warnings = []
    untimed = int((compared["times_ms"].map(len) == 0).sum())
    if untimed:
        warnings.append(f"{name}: left out {untimed} ok record(s) without raw times (times_ms): no test without them")
    mine = results if run_id is None else results[results["run_id"] == run_id]
    kinds = mine.loc[mine["excluded"] != "", "excluded"].map(exclusion_kind)
    kinds = kinds[kinds != "superseded"]   # another run's record of the point stands: nothing is lost
    if len(kinds):
        counted = ", ".join(f"{count} {kind}" for kind, count in kinds.value_counts().items())
        warnings.append(f"{name}: left out {len(kinds)} record(s) that cannot stand for their point ({counted})")
    return warnings


def _ordered_keys(base: Side, new: Side) -> list:
    """Every point key of either side, ordered by mode, workload, kernel, shape and length."""
    rows = {}
    for side in (new, base):
        rows.update({row["_key"]: row for row in side.records.to_dict("records")})
    mode_rank = {mode: i for i, mode in enumerate(COMPARED_MODES)}

    def order(key):
        row = rows[key]
        return (mode_rank.get(row["mode"], len(mode_rank)), row["workload"], row["kernel"], row["device"],
                row["dtype"], str(row["causal"]), *(_number_or_zero(row[f]) for f in ORDER_FIELDS),
                str(row["l2_flush"]), str(row["prefill_kernel"]))
    return sorted(rows, key=order)


def _number_or_zero(value) -> float:
    return 0.0 if fmt.missing(value) or not isinstance(value, (int, float)) else float(value)


# --- one point -------------------------------------------------------------------------------

def _point(key: str, base: Side, new: Side, threshold: float, alpha: float, draws: int, seed: int) -> dict:
    base_row, new_row = _row(base, key), _row(new, key)
    point = _point_fields(base_row if base_row is not None else new_row)
    base_times = np.asarray(base_row["times_ms"], dtype=float) if base_row is not None else None
    new_times = np.asarray(new_row["times_ms"], dtype=float) if new_row is not None else None
    point.update(base_ms=_median(base_times), new_ms=_median(new_times),
                 base_n=None if base_times is None else len(base_times),
                 new_n=None if new_times is None else len(new_times),
                 base_run_id=None if base_row is None else base_row["run_id"],
                 new_run_id=None if new_row is None else new_row["run_id"])
    if base_row is None or new_row is None:
        missing = base if base_row is None else new
        return {**point, "ratio": None, "ci": None, "p_value": None,
                "verdict": ONLY_NEW if base_row is None else ONLY_BASE, "note": _why_missing(missing, key)}
    # Seeded from the point itself: its interval does not depend on what else is compared.
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    return {**point, **_judged(base_times, new_times, threshold, alpha, draws, rng)}


def _judged(base_times, new_times, threshold: float, alpha: float, draws: int, rng) -> dict:
    """ratio, ci, p_value, verdict and note of a point both sides measured."""
    ratio = float(np.median(new_times) / np.median(base_times))
    ci = ratio_interval(base_times, new_times, draws, rng)
    p = mann_whitney_p(base_times, new_times)
    return {"ratio": ratio, "ci": list(ci), "p_value": p, "verdict": verdict(ratio, ci, p, threshold, alpha),
            "note": _power_note(len(base_times), len(new_times), alpha)}


def _row(side: Side, key: str):
    found = side.records[side.records["_key"] == key]
    return None if found.empty else found.iloc[-1]


def _point_fields(row) -> dict:
    """The point key of a record as plain JSON values: whole numbers as integers, missing as None."""
    fields = {}
    for name in POINT_KEY:
        value = row[name]
        if fmt.missing(value):
            value = None
        elif name == "causal" and str(value) in ("True", "False"):
            value = str(value) == "True"
        elif isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_)):
            value = int(value) if float(value).is_integer() else float(value)
        fields[name] = value
    return fields


def _median(times):
    return None if times is None else float(np.median(times))


def _why_missing(side: Side, key: str) -> str:
    """Why `side` has no record to compare at the point `key`: its record of the point (the
    standing one, else the last left out) says."""
    found = side.considered[side.considered["_key"] == key]
    if found.empty:
        return f"{side.name} did not measure the point"
    preferred = next(rows for rows in (found[found["excluded"] == ""], found[found["valid"]], found) if len(rows))
    row = preferred.iloc[-1]
    if row["excluded"] and not row["valid"]:
        return f"{side.name}'s record of the point is left out, {row['excluded'][:120]}"
    if row["status"] != OK:
        reason = "" if fmt.missing(row.get("reason")) else f": {str(row['reason'])[:80]}"
        return f"{side.name} measured the point {row['status']}{reason}"
    if row["mode"] not in COMPARED_MODES:
        return f"{side.name} records the point in mode {row['mode']}, which is not compared"
    return f"{side.name} holds no raw times (times_ms) for the point"


def _power_note(n_base: int, n_new: int, alpha: float) -> str:
    """A note where no outcome of the test could reach p < alpha: too few repetitions to tell."""
    smallest = 2 / math.comb(n_base + n_new, n_base)
    if smallest < alpha:
        return ""
    return (f"too few repetitions ({n_base} and {n_new}) for p < {alpha:g}: the smallest p the test can give "
            f"is {smallest:.2g}")


def ratio_interval(base_times, new_times, draws: int, rng, level: float = LEVEL) -> tuple:
    """The `level` bootstrap interval of median(new) / median(base): the repetitions of each
    side resampled on their own, `draws` times."""
    ratios = resampled_medians(new_times, draws, rng) / resampled_medians(base_times, draws, rng)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return float(low), float(high)


def mann_whitney_p(base_times, new_times) -> float:
    """Two-sided Mann-Whitney U p-value of the raw times; 1 where every time is the same."""
    stats = _deps.require("scipy.stats", "comparing runs")
    p = float(stats.mannwhitneyu(new_times, base_times, alternative="two-sided").pvalue)
    return 1.0 if math.isnan(p) else p


def verdict(ratio: float, ci, p_value: float, threshold: float, alpha: float) -> str:
    """The verdict of a matched point by RULE (see the module docstring for why)."""
    if p_value >= alpha:
        return UNCHANGED
    low, high = ci
    if ratio > 1 + threshold and low > 1:
        return REGRESSED
    if ratio < 1 / (1 + threshold) and high < 1:
        return IMPROVED
    return UNCHANGED


# --- the environments ------------------------------------------------------------------------

def environment_diff(base_envs: list, new_envs: list) -> list:
    """[{field, base, new}] for each ENVIRONMENT_FIELDS value the sides do not share; a side
    whose runs disagree shows the list of its values, one that did not record it null."""
    diff = []
    for name in ENVIRONMENT_FIELDS:
        base, new = _side_value(base_envs, name), _side_value(new_envs, name)
        if base != new:
            diff.append({"field": name, "base": base, "new": new})
    return diff


def _side_value(environments: list, name: str):
    values = sorted({json.dumps(_plain_value(name, env.get(name))) for env in environments} or {"null"})
    plain = [json.loads(v) for v in values]
    return plain[0] if len(plain) == 1 else plain


def _plain_value(name: str, value):
    """An environment value as JSON shows it: clocks as a person reads them, numbers whole where
    they are, a value the run did not record as None."""
    if name == "clocks":
        return None if not isinstance(value, dict) else clocks_text(value)
    if isinstance(value, (list, tuple)):   # as text, so that a list in the diff always means several runs
        return ", ".join(map(str, value)) or "none"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    if fmt.missing(value):
        return None
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    return value


# --- text for tables -------------------------------------------------------------------------

POINT_HEADERS = ("kernel", "mode", "length")
# Fields given a column only where the points differ in them, so the common case stays compact.
VARYING_FIELDS = tuple(f for f in POINT_KEY if f not in ("kernel", "mode", "seq_len"))


def environment_rows(comparison: Comparison) -> tuple:
    """(headers, rows) of the environment difference."""
    rows = [[entry["field"], _env_text(entry["base"]), _env_text(entry["new"])]
            for entry in comparison.environment_diff]
    return ["field", "BASE", "NEW"], rows


def _env_text(value) -> str:
    """A side's value; several runs' values joined by ' | '."""
    if isinstance(value, list):
        return " | ".join(_env_text(v) for v in value)
    return "not recorded" if value is None else str(value)


def environment_summary(comparison: Comparison) -> str:
    """One line on the environments: what differs, or that nothing compared does."""
    if comparison.environment_diff:
        names = ", ".join(entry["field"] for entry in comparison.environment_diff)
        return f"The environments differ in {names}: a difference below may come from these as well as from the code."
    return f"The environments agree in every field compared ({', '.join(ENVIRONMENT_FIELDS)})."


def point_rows(comparison: Comparison, points=None, *, with_mode: bool = True) -> tuple:
    """(headers, rows) of `points` (default: all), benchstat-like: a ratio whose test is not
    significant at alpha is marked with '~'."""
    points = comparison.points if points is None else points
    shown = shown_fields(comparison.points)
    fixed = [h for h in POINT_HEADERS if with_mode or h != "mode"]
    headers = [*fixed, *shown, "base ms", "new ms", f"ratio [{LEVEL:.0%} CI]", "p", "verdict"]
    rows = [[p["kernel"], *([p["mode"]] if with_mode else []), fmt.k(p["seq_len"]), *(_field_text(p[f]) for f in shown),
             fmt.num(p["base_ms"]), fmt.num(p["new_ms"]), ratio_text(p, comparison.alpha), p_text(p["p_value"]),
             p["verdict"]] for p in points]
    return headers, rows


def shown_fields(points: list) -> list:
    """The fields of VARYING_FIELDS the points differ in; q_len only where it tells two points
    apart that the others do not (a prefill's grows with its length, a decode's is 1)."""
    varying = [f for f in VARYING_FIELDS if len({str(p[f]) for p in points}) > 1]
    if "q_len" not in varying:
        return varying
    without = [f for f in varying if f != "q_len"]
    shown = {tuple(str(p[f]) for f in ("kernel", "mode", "seq_len", *without)) for p in points}
    return without if len(shown) == len(points) else varying


def _field_text(value) -> str:
    return "-" if value is None else str(value)


def ratio_text(point: dict, alpha: float) -> str:
    """'1.251 [1.243, 1.260]', with a leading '~' where p >= alpha; '-' for an unmatched point."""
    if point["ratio"] is None:
        return "-"
    low, high = point["ci"]
    mark = "~ " if point["p_value"] >= alpha else ""
    return f"{mark}{point['ratio']:.3f} [{low:.3f}, {high:.3f}]"


def p_text(p) -> str:
    if p is None:
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def counts_text(comparison: Comparison) -> str:
    counts = comparison.counts
    return ", ".join(f"{counts[v]} {v}" for v in VERDICTS)


def method_text(comparison: Comparison) -> str:
    return (f"Threshold {fmt.percent(comparison.threshold)}, alpha {comparison.alpha:g}; test: {TEST}; interval: "
            f"{LEVEL:.0%} {INTERVAL}, {comparison.draws} draws, seed {comparison.seed}. Rule: {RULE}.")


def side_text(side: Side) -> str:
    runs = ", ".join(side.run_ids)
    return f"{side.name.upper()}: {', '.join(side.paths)} (run{'s' if len(side.run_ids) > 1 else ''} {runs})"


# --- reports ---------------------------------------------------------------------------------

def sections(comparison: Comparison) -> list:
    """The report's sections, environment first: [(title, blocks)] as analysis.report renders them."""
    head = [("p", side_text(comparison.base)), ("p", side_text(comparison.new)), ("p", method_text(comparison))]
    environment = [("p", environment_summary(comparison))]
    if comparison.environment_diff:
        environment.append(("table", *environment_rows(comparison)))
    found = [("attnlab compare: NEW against BASE", head), ("Environment differences", environment)]
    for mode in dict.fromkeys(p["mode"] for p in comparison.points):
        mine = [p for p in comparison.points if p["mode"] == mode]
        found.append((f"Points: {mode}", [("table", *point_rows(comparison, mine, with_mode=False))]))
    counts = [("p", counts_text(comparison))]
    if comparison.warnings:
        counts.append(("list", comparison.warnings))
    return found + [("Counts", counts)]


def markdown(comparison: Comparison) -> str:
    from attnlab.analysis.report import render_markdown

    return render_markdown(sections(comparison), Path("."))


def chart_csv_path(html_path) -> Path:
    """Where the CSV of what the HTML page's chart draws goes: beside the page."""
    path = Path(html_path)
    return path.with_name(f"{path.stem}_{CHART_NAME}.csv")


def html_page(comparison: Comparison) -> tuple:
    """(page, drawn): a self-contained HTML page (the chart as inline SVG) and the chart's rows."""
    from attnlab.analysis.report import render_html

    fig = ratio_chart(comparison)
    svg = _inline_svg(fig)
    caption = html.escape(_caption_text(fig))
    figure = f"<h2>Ratio against context</h2>\n<figure>{svg}<figcaption>{caption}</figcaption></figure>\n"
    page, end, rest = render_html(sections(comparison)).rpartition("</body></html>")
    return fmt.xml_safe(page + figure + end + rest), fig.drawn


def _inline_svg(fig) -> str:
    """The figure as an <svg> element: no XML prolog, no timestamp, so one comparison gives one page."""
    from attnlab.analysis.charts import svg_text

    text = svg_text(fig, metadata={"Date": None})
    return text[text.index("<svg"):].replace("<svg ", '<svg style="max-width:100%;height:auto" ', 1)


def _caption_text(fig) -> str:
    from attnlab.analysis.charts import caption_of

    return caption_of(fig)


def write_reports(comparison: Comparison, *, json_path=None, md_path=None, html_path=None) -> list:
    """Write the reports asked for; returns the paths written (the chart's CSV beside the HTML)."""
    written = []
    if json_path:
        Path(json_path).write_text(json.dumps(comparison.document(), indent=2) + "\n", encoding="utf-8")
        written.append(Path(json_path))
    if md_path:
        Path(md_path).write_text(markdown(comparison), encoding="utf-8")
        written.append(Path(md_path))
    if html_path:
        page, drawn = html_page(comparison)
        Path(html_path).write_text(page, encoding="utf-8")
        written.append(Path(html_path))
        csv = chart_csv_path(html_path)
        _write_drawn(drawn, csv)
        written.append(csv)
    return written


# --- the chart -------------------------------------------------------------------------------

def ratio_chart(comparison: Comparison):
    """NEW / BASE time ratio per kernel against context length (log2 x, log y), bars the 95%
    bootstrap intervals, a grey band the threshold; a hollow marker is not significant at alpha.
    The Figure's `drawn` holds one row per point drawn (matched points with a length)."""
    from attnlab.analysis import charts

    drawn = drawn_rows(comparison)
    band = (1 / (1 + comparison.threshold), 1 + comparison.threshold)
    extra = (f"bars: {LEVEL:.0%} bootstrap intervals ({comparison.draws} draws); band: threshold "
             f"{fmt.percent(comparison.threshold)}; hollow: p >= {comparison.alpha:g} ({TEST})")
    fig, axes = charts._figure("Time of NEW over BASE against context (above 1: slower)",
                               charts.caption_for(drawn, extra))
    ax = axes[0]
    ax.axhspan(*band, color="#dddddd", alpha=0.6, lw=0,
               label=f"threshold {fmt.percent(comparison.threshold)}, either way")
    ax.axhline(1.0, color=charts.GREY, lw=1)
    palette, markers = charts.palette_for(drawn["kernel"]), charts.kernel_markers(drawn["kernel"])
    for label, series in drawn.sort_values("seq_len").groupby("series", sort=True):
        _plot_ratio_series(ax, series, label, palette, markers, comparison.alpha)
    charts._context_axis(ax, drawn["seq_len"], log_y=True)
    _ratio_ticks(ax)
    ax.set_ylabel("new / base median time")
    charts._legend_outside(ax)
    fig.drawn = drawn
    return fig


def _plot_ratio_series(ax, series, label, palette, markers, alpha: float) -> None:
    """One series: colour and marker by kernel, line style by mode, bars the intervals."""
    kernel, mode = series["kernel"].iloc[0], series["mode"].iloc[0]
    color, marker = palette.get(kernel, "#555555"), markers.get(kernel, "o")
    errors = [series["y"] - series["ci_lo"], series["ci_hi"] - series["y"]]
    ax.errorbar(series["seq_len"], series["y"], yerr=errors, color=color, lw=1.2, capsize=3, label=label,
                ls=MODE_LINES.get(mode, "-"))
    significant = series["p_value"] < alpha
    for chosen, face in ((significant, color), (~significant, "white")):
        ax.plot(series.loc[chosen, "seq_len"], series.loc[chosen, "y"], ls="none", marker=marker, ms=6, color=color,
                mfc=face, label="_nolegend_")


def _ratio_ticks(ax) -> None:
    """Ratio ticks a person reads (0.9, 1, 1.1) on the log axis, whatever its span."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    low, high = ax.get_ylim()
    ax.yaxis.set_major_locator(FixedLocator([t for t in RATIO_TICKS if low <= t <= high]))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_locator(NullLocator())


def drawn_rows(comparison: Comparison):
    """One row per matched point with a length, in the columns of analysis.charts' CSVs, then
    the interval, the test and the verdict."""
    from attnlab.analysis import charts

    pd = _deps.pandas("drawing charts")
    matched = [p for p in comparison.points if p["ratio"] is not None and p["seq_len"] is not None]
    frame = pd.DataFrame.from_records(matched, columns=list(comparison.points[0]) if comparison.points else None)
    frame = frame.assign(run_id=frame["base_run_id"].astype(str) + " vs " + frame["new_run_id"].astype(str))
    labels, _ = charts.series_labels(frame, frame["kernel"])
    ci = frame["ci"].tolist()
    return frame.assign(series=labels, y=frame["ratio"], y_unit="ratio", y_from="new_ms / base_ms",
                        ci_lo=[c[0] for c in ci], ci_hi=[c[1] for c in ci]).reindex(
        columns=[*charts.CSV_COLUMNS[1:], "ci_lo", "ci_hi", "p_value", "verdict", "base_ms", "new_ms", "base_run_id",
                 "new_run_id"])


def _write_drawn(drawn, path: Path) -> None:
    from attnlab.analysis import charts

    rows = charts._whole_numbers(drawn.assign(chart=path.stem))
    rows.reindex(columns=["chart", *drawn.columns]).to_csv(path, index=False)

