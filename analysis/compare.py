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

For each matched point, each side's times are taken round by round (analysis/rounds.py: a
sweep measures each point in interleaved rounds; a record without rounds is one round):
- base_ms, new_ms: the median of the round medians; ratio = new_ms / base_ms (above 1: slower);
- ci: a 1 - alpha bootstrap interval of that ratio, resampling each side's rounds and then the
  repetitions within them, from BOOTSTRAP_DRAWS draws seeded from the point itself (so a point's
  interval is the same whatever else is compared);
- noise: how far the point's own times reach, as a ratio: the larger side's spread between
  rounds (slowest round median over fastest); with a single round, p90 over p10 of its
  repetitions; an A/A pair's reach (`noise`, a saved compare of two runs of the same code)
  where given and larger; `decided_by` says which;
- p_value: a two-sided Mann-Whitney U test of the round medians (of the raw times with one
  round), shown beside the verdict;
- verdict, by RULE.

Why this rule. Repetitions within one run share clocks, power state, co-tenants and memory
placement: a test on them mistakes a run's own shift for a change, and two identical runs
"regress" against each other (Kalibera and Jones, ISMM 2013). So the unit is the round, and a
change must clear both the practical threshold t and the point's own noise, with an interval
off 1 in the same direction. A change beyond t that does not clear the noise is `noisy`: too
close to what the point does by itself to say. The threshold is symmetric in log space (slower
than 1 + t, or faster than 1 / (1 + t)), so swapping BASE and NEW swaps `regressed` and
`improved` exactly. The interval need not clear the threshold itself: that would ask whether
the change is certainly larger than t, and a likely 8% regression with an interval of [1.03,
1.13] would then pass as unchanged.
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
from attnlab.analysis.rounds import as_rounds, center, resampled_centers, round_medians, rounds_of, spread
from attnlab.analysis.select import POINT_KEY, exclusion_kind, joined_key
from attnlab.schema import (BACKWARD, COMPARE_SCHEMA, DECODE, E2E_DECODE, E2E_MODES, E2E_PREFILL_DECODE, FWD_BWD,
                            KERNEL_MODES, OK, PREFILL)

COMPARED_MODES = (*KERNEL_MODES, *E2E_MODES)
REGRESSED, IMPROVED, NOISY, UNCHANGED = "regressed", "improved", "noisy", "unchanged"
ONLY_BASE, ONLY_NEW = "only-base", "only-new"
VERDICTS = (REGRESSED, IMPROVED, NOISY, UNCHANGED, ONLY_BASE, ONLY_NEW)
DEFAULT_THRESHOLD, DEFAULT_ALPHA = 0.05, 0.05
BOOTSTRAP_DRAWS, SEED = 2000, 0
TEST = ("two-sided Mann-Whitney U on the round medians where both sides measured two rounds or more, else on "
        "the raw repetitions (shown, not part of the rule)")
INTERVAL = ("bootstrap of the ratio of the medians of round medians: each side's rounds resampled, then the "
            "repetitions within them; level 1 - alpha")
RULE = ("noise: the larger side's spread (slowest round median over fastest; with one round, p90 over p10 of its "
        "repetitions), or an A/A pair's reach where given and larger; floor: the larger of 1 + threshold and the "
        "noise; shift: the geometric median of the other kernels' ratios (in the point's mode where there are some; "
        "1 without other kernels). regressed: ratio above 1 + threshold, ratio / shift above the floor and the "
        "interval / shift above 1; improved: the mirror image; noisy: beyond the threshold but not so; else "
        "unchanged; only-base / only-new: one side lacks the point (as an ok record with raw times)")
# Which part of the rule set a point's noise, in each point's `decided_by`.
BY_ROUNDS, BY_DISPERSION, BY_AA = "rounds", "within-run dispersion", "A/A noise"
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
MODE_LINES = {PREFILL: "-", DECODE: "--", BACKWARD: (0, (5, 1, 1, 1)), FWD_BWD: (0, (3, 1, 1, 1, 1, 1)),
              E2E_DECODE: ":", E2E_PREFILL_DECODE: "-."}
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
                "interval": {"method": INTERVAL, "level": 1 - self.alpha, "draws": self.draws, "seed": self.seed},
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
            run_id_new=None, draws: int = BOOTSTRAP_DRAWS, seed: int = SEED, noise=None) -> Comparison:
    """Compare the runs in `base` and `new` (files or folders, JSONL or pytest-benchmark JSON).
    `noise`: a compare document (--json) of an A/A pair, two runs of the same code: each of its
    points' reach is that point's noise floor here (`aa_reach`). ValueError naming the argument
    for a missing path, a malformed file, a run id not present, a side with nothing to compare,
    or sides that share no point."""
    threshold, alpha = parse_threshold(threshold), parse_alpha(alpha)
    aa = aa_reach(noise) if noise is not None else {}
    base_side = read_side("base", base, run_id_base)
    new_side = read_side("new", new, run_id_new)
    if not set(base_side.records["_key"]) & set(new_side.records["_key"]):
        raise ValueError(f"new: shares no point with base ({_measured(new_side)} against {_measured(base_side)}); "
                         f"points match on {', '.join(POINT_KEY)}")
    keys = _ordered_keys(base_side, new_side)
    points = [_point(key, base_side, new_side, alpha, draws, seed, aa) for key in keys]
    for point in points:
        _judge(point, points, threshold)
    return Comparison(base_side, new_side, threshold, alpha, draws, seed,
                      environment_diff(base_side.environments, new_side.environments), points)


def aa_reach(path) -> dict:
    """point key -> how far an A/A pair's ratio reached, either way (a ratio >= 1: the larger of
    the ratio, its inverse and the far ends of its interval), from a saved compare document."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
        points = [p for p in document["points"] if p.get("ratio")]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"noise: expected the --json document of `attnlab compare A1 A2` (two runs of the same "
                         f"code), could not read {str(path)!r}: {exc}") from None
    return {_plain_key(p): max(p["ratio"], 1 / p["ratio"], p["ci"][1], 1 / p["ci"][0]) for p in points}


def _plain_key(point: dict) -> str:
    """A point's key from its fields as the JSON document writes them (`_point_fields`)."""
    return json.dumps([point.get(name) for name in POINT_KEY])


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

def _point(key: str, base: Side, new: Side, alpha: float, draws: int, seed: int, aa_noise=None) -> dict:
    base_row, new_row = _row(base, key), _row(new, key)
    point = _point_fields(base_row if base_row is not None else new_row)
    base_rounds = rounds_of(base_row) if base_row is not None else None
    new_rounds = rounds_of(new_row) if new_row is not None else None
    for name, row, rounds in (("base", base_row, base_rounds), ("new", new_row, new_rounds)):
        point.update({f"{name}_ms": None if rounds is None else center(rounds),
                      f"{name}_n": None if rounds is None else sum(len(r) for r in rounds),
                      f"{name}_rounds": None if rounds is None else len(rounds),
                      f"{name}_run_id": None if row is None else row["run_id"]})
    if base_row is None or new_row is None:
        missing = base if base_row is None else new
        return {**point, "ratio": None, "ci": None, "p_value": None, "noise": None, "decided_by": None,
                "shift": None, "shift_points": 0, "verdict": ONLY_NEW if base_row is None else ONLY_BASE,
                "note": _why_missing(missing, key)}
    # Seeded from the point itself: its interval does not depend on what else is compared.
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    aa = (aa_noise or {}).get(_plain_key(point))
    return {**point, **_measured_change(base_rounds, new_rounds, alpha, draws, rng, aa)}


def _measured_change(base_rounds, new_rounds, alpha: float, draws: int, rng, aa=None) -> dict:
    """ratio, ci, p_value, noise, decided_by and note of a point both sides measured, each
    side's times round by round; `_judge` gives the verdict."""
    ratio = center(new_rounds) / center(base_rounds)
    ci = ratio_interval(base_rounds, new_rounds, draws, rng, 1 - alpha)
    noise, decided_by = noise_floor(base_rounds, new_rounds, aa)
    by_rounds = min(len(base_rounds), len(new_rounds)) > 1
    p = mann_whitney_p(*((round_medians(base_rounds), round_medians(new_rounds)) if by_rounds else
                         (np.concatenate(base_rounds), np.concatenate(new_rounds))))
    return {"ratio": ratio, "ci": list(ci), "p_value": p, "noise": noise, "decided_by": decided_by,
            "note": _note(base_rounds, new_rounds)}


def _judge(point: dict, points: list, threshold: float) -> None:
    """Set a matched point's `shift` (`run_shift`) and `verdict` (RULE)."""
    if point["ratio"] is None:
        return
    point["shift"], point["shift_points"] = run_shift(point, points)
    point["verdict"] = verdict(point["ratio"], point["ci"], threshold, point["noise"], point["shift"])


def run_shift(point: dict, points: list) -> tuple:
    """(shift, how many points set it): how far the run as a whole moved, as the geometric median
    of the ratios of the other kernels' matched points, in the point's mode where there are some.
    Those kernels are the controls a lab runs beside the kernel under test: a machine that ran
    slower in one run moves them all alike, which rounds within one run cannot see. Without
    other kernels, 1 (no control: the note says so)."""
    others = [p for p in points if p["ratio"] is not None and p["kernel"] != point["kernel"]]
    same_mode = [p for p in others if p["mode"] == point["mode"]]
    controls = same_mode or others
    if not controls:
        return 1.0, 0
    return float(np.exp(np.median([math.log(p["ratio"]) for p in controls]))), len(controls)


def noise_floor(base_rounds, new_rounds, aa=None) -> tuple:
    """(noise, what set it): how far apart the point's own times reach, as a ratio >= 1 (see
    RULE). With rounds on both sides, their spread; with one round on a side, the spread of its
    repetitions, which cannot see a run's own shift: an A/A pair's reach (`aa`), where given and
    larger, stands for that."""
    noise = max(spread(base_rounds), spread(new_rounds))
    by = BY_ROUNDS if min(len(base_rounds), len(new_rounds)) > 1 else BY_DISPERSION
    if aa is not None and aa > noise:
        return float(aa), BY_AA
    return noise, by


def _note(base_rounds, new_rounds) -> str:
    """What the sides could not show: a single round cannot separate a run's own noise."""
    single = [name for name, rounds in (("base", base_rounds), ("new", new_rounds)) if len(rounds) == 1]
    if not single:
        return ""
    return (f"{' and '.join(single)} measured one round: run-to-run noise cannot be told from a change, so the "
            f"noise is the repetitions' spread (measure more rounds, or give an A/A pair's noise)")


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


def ratio_interval(base_rounds, new_rounds, draws: int, rng, level: float = 1 - DEFAULT_ALPHA) -> tuple:
    """The `level` bootstrap interval of center(new) / center(base) (analysis/rounds.py): each
    side's rounds and repetitions resampled on their own, `draws` times. Flat times are one round."""
    new, base = (resampled_centers(as_rounds(t), draws, rng) for t in (new_rounds, base_rounds))
    ratios = new / base
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return float(low), float(high)


def mann_whitney_p(base_times, new_times) -> float:
    """Two-sided Mann-Whitney U p-value; 1 where every time is the same."""
    stats = _deps.require("scipy.stats", "comparing runs")
    p = float(stats.mannwhitneyu(new_times, base_times, alternative="two-sided").pvalue)
    return 1.0 if math.isnan(p) else p


def verdict(ratio: float, ci, threshold: float, noise: float = 1.0, shift: float = 1.0) -> str:
    """The verdict of a matched point by RULE (see the module docstring for why): the change is
    the ratio beyond the run's shift; it must clear the floor, its interval (over the shift)
    must lie off 1 the same way, and the ratio itself must be beyond the threshold."""
    floor = max(1 + threshold, noise)
    change, low, high = ratio / shift, ci[0] / shift, ci[1] / shift
    if ratio > 1 + threshold and change > floor and low > 1:
        return REGRESSED
    if ratio < 1 / (1 + threshold) and change < 1 / floor and high < 1:
        return IMPROVED
    if ratio > 1 + threshold or ratio < 1 / (1 + threshold):
        return NOISY
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
    interval holds 1 is marked with '~'."""
    points = comparison.points if points is None else points
    shown = shown_fields(comparison.points)
    fixed = [h for h in POINT_HEADERS if with_mode or h != "mode"]
    headers = [*fixed, *shown, "base ms", "new ms", f"ratio [{1 - comparison.alpha:.0%} CI]", "noise", "shift",
               "p", "verdict"]
    rows = [[p["kernel"], *([p["mode"]] if with_mode else []), fmt.k(p["seq_len"]), *(_field_text(p[f]) for f in shown),
             fmt.num(p["base_ms"]), fmt.num(p["new_ms"]), ratio_text(p), noise_text(p), shift_text(p),
             p_text(p["p_value"]), p["verdict"]] for p in points]
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


def ratio_text(point: dict) -> str:
    """'1.251 [1.243, 1.260]', with a leading '~' where the interval holds 1; '-' for an unmatched point."""
    if point["ratio"] is None:
        return "-"
    low, high = point["ci"]
    mark = "" if separated(point) else "~ "
    return f"{mark}{point['ratio']:.3f} [{low:.3f}, {high:.3f}]"


def separated(point: dict) -> bool:
    """Whether the point's interval lies off 1 (the sides told apart)."""
    low, high = point["ci"]
    return low > 1 or high < 1


def noise_text(point: dict) -> str:
    """The point's noise as a ratio, and what set it: 'x1.12 rounds'."""
    if point.get("noise") is None:
        return "-"
    return f"x{point['noise']:.2f} {point['decided_by']}"


def shift_text(point: dict) -> str:
    """The run's shift the point is judged against: 'x1.034 (12)', the other kernels' points counted."""
    if not point.get("shift_points"):
        return "-"
    return f"x{point['shift']:.3f} ({point['shift_points']})"


def p_text(p) -> str:
    if p is None:
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def counts_text(comparison: Comparison) -> str:
    counts = comparison.counts
    return ", ".join(f"{counts[v]} {v}" for v in VERDICTS)


def method_text(comparison: Comparison) -> str:
    return (f"Threshold {fmt.percent(comparison.threshold)}, alpha {comparison.alpha:g}; interval: "
            f"{1 - comparison.alpha:.0%} {INTERVAL}, {comparison.draws} draws, seed {comparison.seed}; test: {TEST}. "
            f"Rule: {RULE}.")


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
    bootstrap intervals, a grey band the threshold; a hollow marker's interval holds 1.
    The Figure's `drawn` holds one row per point drawn (matched points with a length)."""
    from attnlab.analysis import charts

    drawn = drawn_rows(comparison)
    band = (1 / (1 + comparison.threshold), 1 + comparison.threshold)
    extra = (f"bars: {1 - comparison.alpha:.0%} bootstrap intervals ({comparison.draws} draws); band: threshold "
             f"{fmt.percent(comparison.threshold)}; hollow: the interval holds 1")
    fig, axes = charts._figure("Time of NEW over BASE against context (above 1: slower)",
                               charts.caption_for(drawn, extra))
    ax = axes[0]
    ax.axhspan(*band, color="#dddddd", alpha=0.6, lw=0,
               label=f"threshold {fmt.percent(comparison.threshold)}, either way")
    ax.axhline(1.0, color=charts.GREY, lw=1)
    sides = charts._pd().concat([comparison.base.records, comparison.new.records])     # their role columns
    palette, markers = charts.palette_for(sides), charts.kernel_markers(sides)
    for label, series in drawn.sort_values("seq_len").groupby("series", sort=True):
        _plot_ratio_series(ax, series, label, palette, markers)
    charts._context_axis(ax, drawn["seq_len"], log_y=True)
    _ratio_ticks(ax)
    ax.set_ylabel("new / base median time")
    charts._legend_outside(ax)
    fig.drawn = drawn
    return fig


def _plot_ratio_series(ax, series, label, palette, markers) -> None:
    """One series: colour and marker by kernel, line style by mode, bars the intervals."""
    kernel, mode = series["kernel"].iloc[0], series["mode"].iloc[0]
    color, marker = palette.get(kernel, "#555555"), markers.get(kernel, "o")
    errors = [series["y"] - series["ci_lo"], series["ci_hi"] - series["y"]]
    ax.errorbar(series["seq_len"], series["y"], yerr=errors, color=color, lw=1.2, capsize=3, label=label,
                ls=MODE_LINES.get(mode, "-"))
    significant = (series["ci_lo"] > 1) | (series["ci_hi"] < 1)
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

