"""Which record stands for each point, and why every other one is left out.

A point is one thing to measure: (device, workload, kernel, mode, dtype, shape, seq_len, and
the options it was measured with: q_len, window, softcap, ...; `attnlab.schema.POINT_FIELDS`).
Runs may measure it more than once; exactly one record stands for it, and charts, fits and
the claim use that record alone, never a mean across runs. Every record keeps its row, with
two columns that say what became of it:

- `excluded`: "" for the standing record; else why it is left out:
  - "invalid: ..." its values cannot be a measurement (no status, a non-positive time, ...);
  - "retracted: ..." a retraction beside the data names its run (and range) and the fault;
  - "superseded by run ...": another valid record of the point stands. An ok record beats a
    failure, a failure beats a skipped point, and among equals the later run wins.
- `valid`: False for invalid and retracted records. Superseded records are valid: they are
  the spread between runs behind the intervals, and what `--all-runs` overlays.

Calibration records (a run's matmul and copy) are that run's own reference: each stands.
"""
from __future__ import annotations

import math

from attnlab import text as fmt
from attnlab.schema import (CALIBRATION, MODES, NUMBER, OK, POINT_FIELDS, STATUS_RANK, STATUSES, TEXT, WHOLE,
                            fields_of)

POINT_KEY = POINT_FIELDS
# Two kernels measured the same point where they agree on all of it but the kernel.
SAME_POINT = tuple(f for f in POINT_KEY if f != "kernel")
# What a record must hold as text to be read: its run, its status and the text fields of its point.
TEXT_FIELDS = ("run_id", "status", *fields_of(TEXT, among=POINT_KEY))
# What may tell apart records of one kernel at one length, in the order a label names them.
LABEL_FIELDS = (*(f for f in POINT_KEY if f not in ("kernel", "seq_len")), "run_id")
# Point fields that hold a number where they are given; seq_len, a length, has a check of its own.
_OTHER_THAN_SEQ_LEN = tuple(f for f in POINT_KEY if f != "seq_len")
WHOLE_NUMBER_FIELDS = fields_of(WHOLE, among=_OTHER_THAN_SEQ_LEN)
NUMBER_FIELDS = fields_of(WHOLE, NUMBER, among=_OTHER_THAN_SEQ_LEN)
MAX_MEDIAN_MS = 86_400_000.0        # a day: no sweep or benchmark times a single call for longer
MAX_SEQ_LEN = 2**31 - 1             # lengths are int32 in every kernel
# What a retraction may narrow its run down to; lengths are inclusive bounds.
RETRACTION_FILTERS = ("kernel", "mode", "workload", "status", "source_format")
RETRACTION_BOUNDS = ("min_seq_len", "max_seq_len")


def mark(frame, invalid: list, retractions: list, started: dict) -> list:
    """Fill `excluded` and `valid` in `frame` (the loader's results) in place. `invalid`: for
    each row, `invalid_reason` of its record as read; `started`: each run's start time.
    Returns warnings about the retractions themselves (a run no file holds, a range matching
    nothing)."""
    frame["excluded"] = list(invalid)
    warnings = _retract(frame, retractions)
    frame["valid"] = frame["excluded"] == ""
    return warnings + _supersede(frame, started)


def exclusion_kind(reason: str) -> str:
    """The kind of a reason a record was left out, for counts: 'retracted', 'superseded',
    'status oom', ..., without the details that follow it."""
    return reason.split(":")[0].split(" by ")[0].split(",")[0]


def recorded_memory(environments, run_ids) -> float | None:
    """Bytes of device memory the environments of `run_ids` recorded (the least, where they
    differ), or None where none did."""
    if environments is None or not len(environments) or "gpu_memory_bytes" not in environments:
        return None
    recorded = environments.loc[environments["run_id"].isin(set(run_ids)), "gpu_memory_bytes"]
    recorded = __import__("pandas").to_numeric(recorded, errors="coerce").dropna()
    return float(recorded.min()) if len(recorded) else None


def with_selection(results):
    """`results` with `excluded` and `valid`; a frame built by hand (a test, a notebook) has
    neither, and then every record stands and is valid."""
    if "excluded" in results and "valid" in results:
        return results
    return results.assign(excluded="", valid=True)


def standing_ok(results):
    """Rows of `results` that stand for their point with status ok."""
    results = with_selection(results)
    return results[(results["excluded"] == "") & (results["status"] == OK)]


# --- invalid --------------------------------------------------------------------------------

def invalid_reason(record: dict) -> str:
    """Why a record, as read from its file, cannot be a measurement; "" when it can."""
    status, mode, seq_len = record.get("status"), record.get("mode"), record.get("seq_len")
    odd = next((k for k in TEXT_FIELDS if record.get(k) is not None and not isinstance(record[k], str)), None)
    if odd:
        return f"invalid: {odd} {str(record[odd])[:40]} is not text"
    if record.get("causal") is not None and not isinstance(record["causal"], bool):
        return f"invalid: causal {str(record['causal'])[:40]} is not true or false"
    odd = next((k for k in NUMBER_FIELDS if record.get(k) is not None and not _number(record[k])), None)
    if odd:
        return f"invalid: {odd} {str(record[odd])[:40]} is not a number"
    if status is None:
        return "invalid: the record has no status"
    if status not in STATUSES:
        return f"invalid: status {status!r} is not one of {', '.join(STATUSES)}"
    if mode not in MODES:
        return f"invalid: mode {mode!r} is not one of {', '.join(MODES)}"
    if mode != CALIBRATION and not _whole(seq_len, 1, MAX_SEQ_LEN):
        return f"invalid: seq_len {seq_len!r} is not a whole number of tokens from 1 to {MAX_SEQ_LEN}"
    if status != OK:
        return ""
    if mode == CALIBRATION:
        rates = [record.get(k) for k in ("tflops", "gbps") if record.get(k) is not None]
        return "" if rates and all(_number(r) and r > 0 for r in rates) else (
            "invalid: an ok calibration record needs a positive tflops or gbps")
    if not _time(record.get("median_ms")):
        return f"invalid: an ok record needs median_ms above 0 and below a day, got {record.get('median_ms')!r}"
    times = record.get("times_ms")
    if times is not None and not isinstance(times, list):
        return f"invalid: times_ms is {type(times).__name__}, not a list of times"
    bad = [t for t in times or [] if not _time(t)]
    if bad:
        return f"invalid: times_ms holds {bad[0]!r}; every repetition must be a time above 0 and below a day"
    return ""


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _time(value) -> bool:
    return _number(value) and 0 < value < MAX_MEDIAN_MS


def _whole(value, low, high) -> bool:
    return _number(value) and float(value).is_integer() and low <= value <= high


# --- retracted ------------------------------------------------------------------------------

def _retract(frame, retractions: list) -> list:
    warnings = []
    runs = set(frame["run_id"])
    for retraction in retractions:
        where = retraction["where"]
        if retraction["run_id"] not in runs:
            warnings.append(f"{where}: the retraction names run {retraction['run_id']!r}, which none of the "
                            f"loaded files holds")
            continue
        hit = _matches(frame, retraction) & (frame["excluded"] == "")
        if not hit.any():
            warnings.append(f"{where}: the retraction of run {retraction['run_id']!r} matches none of its records")
        frame.loc[hit, "excluded"] = f"retracted: {retraction['reason']} ({where})"
    return warnings


def _matches(frame, retraction: dict):
    hit = frame["run_id"] == retraction["run_id"]
    for column in RETRACTION_FILTERS:
        if retraction.get(column) is not None:
            hit &= frame[column] == retraction[column]
    if retraction.get("min_seq_len") is not None:
        hit &= frame["seq_len"] >= retraction["min_seq_len"]
    if retraction.get("max_seq_len") is not None:
        hit &= frame["seq_len"] <= retraction["max_seq_len"]
    return hit


def parse_retraction(obj: dict, where: str) -> tuple[dict | None, str | None]:
    """(retraction, None) from one line of a retractions file, or (None, why it was skipped)."""
    unknown = set(obj) - {"schema", "run_id", "reason", *RETRACTION_FILTERS, *RETRACTION_BOUNDS}
    if unknown:
        return None, f"{where}: skipped a retraction with unknown field(s) {', '.join(sorted(unknown))}"
    for name in ("run_id", "reason"):
        if not isinstance(obj.get(name), str) or not obj[name].strip():
            return None, f"{where}: skipped a retraction without a {name}"
    for name in RETRACTION_BOUNDS:
        if obj.get(name) is not None and not (isinstance(obj[name], int) and obj[name] >= 0):
            return None, f"{where}: skipped a retraction whose {name} is {obj[name]!r}, not a token count"
    return {**obj, "where": where}, None


# --- superseded -----------------------------------------------------------------------------

def _supersede(frame, started: dict) -> list:
    """Among the valid records of each point, keep the one of best status, then latest run.
    Returns a warning per run that recorded one point more than once (a conflict)."""
    pd = __import__("pandas")
    candidates = frame[frame["valid"] & (frame["mode"] != CALIBRATION)]
    if candidates.empty:
        return []
    order = candidates.assign(
        _rank=candidates["status"].map(STATUS_RANK).fillna(0),
        _when=pd.to_datetime(candidates["run_id"].map(lambda r: started.get(r) or _time_in_run_id(r)),
                             utc=True, errors="coerce", format="ISO8601").fillna(pd.Timestamp(0, tz="UTC")),
        _read=range(len(candidates)))
    key = joined_key(order, POINT_KEY)
    order = order.assign(_key=key).sort_values(["_key", "_rank", "_when", "_read"])
    winner = order.groupby("_key").tail(1).set_index("_key")
    conflicts = {}      # run_id -> (points recorded again, files)
    for index, row in order.iterrows():
        best = winner.loc[row["_key"]]
        if best["_read"] != row["_read"]:
            frame.at[index, "excluded"] = _superseded_reason(row, best)
            if best["run_id"] == row["run_id"]:
                count, sources = conflicts.get(row["run_id"], (0, set()))
                conflicts[row["run_id"]] = (count + 1, sources | {row["source"], best["source"]})
    return [f"run {run_id!r} recorded {count} point(s) more than once ({', '.join(sorted(sources))}); "
            f"the record read last stands" for run_id, (count, sources) in conflicts.items()]


def joined_key(rows, columns):
    """One string per row of its values in `columns`, missing values and columns included (as
    "None" or "nan": a table built by hand may lack the newer point fields)."""
    return rows.reindex(columns=list(columns)).apply(lambda column: column.map(str)).agg("\x1f".join, axis=1)


def _superseded_reason(row, best) -> str:
    if best["_rank"] > row["_rank"]:
        return f"superseded by run {best['run_id']}, which measured the point {best['status']}"
    if best["run_id"] == row["run_id"]:
        return f"superseded by a later record of the same run ({best['source']})"
    return f"superseded by run {best['run_id']}, which measured the point later"


def _time_in_run_id(run_id) -> str | None:
    """Sweep run ids start with their UTC start time (20261127T235130Z-...)."""
    text = str(run_id)
    if len(text) >= 16 and text[8] == "T" and text[15] == "Z" and text[:8].isdigit():
        return f"{text[:4]}-{text[4:6]}-{text[6:8]}T{text[9:11]}:{text[11:13]}:{text[13:15]}+00:00"
    return None


# --- labels ---------------------------------------------------------------------------------

def point_labels(records, base, by_run: bool = False, within=()) -> tuple:
    """(labels, fields): `base` (a Series beside `records`, e.g. the kernel) followed by each
    field of LABEL_FIELDS that tells apart records which share a base, a length, the columns
    `within` (told apart elsewhere, so never named) and the fields named before it, and the run
    where `by_run`. Two records then share a label and a length only if they are the same point
    of the same run; a field is named only where it is needed (a prefill's q_len, its length,
    is not)."""
    groups = [base.rename("_base"), records["seq_len"], *(records[c].map(str) for c in within)]
    fields = []
    for name in LABEL_FIELDS:
        if name not in records or name in within:
            continue
        if (by_run and name == "run_id") or _varies(records, groups, name):
            fields.append(name)
            groups.append(records[name].map(str))
    labels = base.astype(str)
    for name in fields:
        labels = labels + ", " + records[name].map(lambda value, name=name: describe(name, value))
    return labels, fields


def _varies(records, groups: list, name: str) -> bool:
    values = records[name].map(str)     # as text: a file may hold values pandas cannot compare
    return bool((values.groupby(groups, dropna=False).nunique() > 1).any())


def describe(name: str, value) -> str:
    """A point field's value as a label names it: 'q len 4', 'non-causal', 'run r2'."""
    if fmt.missing(value):
        return f"{name.replace('_', ' ')} ?"
    if name == "run_id":
        return f"run {value}"
    if name == "causal":
        return "causal" if str(value) == "True" else "non-causal"    # bool or numpy bool
    if name in WHOLE_NUMBER_FIELDS and isinstance(value, (int, float)) and float(value).is_integer():
        return f"{name.replace('_', ' ')} {int(value)}"
    if name in ("workload", "mode", "device", "dtype"):
        return str(value)
    return f"{name.replace('_', ' ')} {value}"
