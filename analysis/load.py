"""Read what runs measured: sweep JSON Lines and pytest-benchmark JSON, in any mix of files
and folders, into one DataFrame of result records and one of run environments, with every
record marked as standing for its point or left out, and why (see `select`).

Retractions (RETRACTION_SCHEMA lines, by convention in a `retractions.jsonl` beside the
data) and kernels' roles (ROLES_SCHEMA lines, in a `roles.jsonl`, for records written before
records carried them: see `roles`) are read from named folders and from the folder of every
named file.

Nothing here raises on odd content: unknown schemas, lines that are not JSON and files that
are neither format become entries in `Loaded.warnings`; records whose values cannot be a
measurement are kept, marked invalid with their file and line; an unfinished last line (a run
killed mid-write) is ignored, with a warning that names it. Missing files, empty input and a
file written by a newer attnlab (a newer schema of the lines it reads) are errors that name
the argument or the file and line.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from attnlab import text as fmt
from attnlab.analysis import _deps
from attnlab.analysis import roles as kernel_roles
from attnlab.analysis import select
from attnlab.analysis.rounds import merge_rounds
from attnlab.analysis.select import standing_ok
from attnlab.schema import (COMPARE_SCHEMA, ENVIRONMENT_SCHEMA, FIELDS, NUMBER, POINT_FIELDS, RESULT_SCHEMA,
                            RETRACTION_SCHEMA, ROLE_FIELDS, ROLES_SCHEMA, TUNING_SCHEMA, WHOLE, fields_of,
                            newer_schema, parse_json, parse_json_lines, point_defaults, version)

RETRACTIONS_FILE = "retractions.jsonl"
BESIDE_THE_DATA = (RETRACTIONS_FILE, kernel_roles.ROLES_FILE)    # read from the folder of each file named

NUMERIC_FIELDS = fields_of(WHOLE, NUMBER)      # the columns read as numbers (NaN where a record has none)
ENVIRONMENT_FIELDS = (
    "run_id", "gpu_name", "gpu_uuid", "driver", "cuda", "torch", "triton", "flash_attn", "power_limit_w",
    "clocks", "git_commit", "host", "time", "argv",
)
# Missing key values would drop rows from pandas group-bys; these placeholders keep them visible.
KEY_DEFAULTS = {"kernel": "unknown", "mode": "unknown", "workload": "custom", "dtype": "unknown",
                "device": "unknown device", "run_id": "unknown run"}


class Malformed(str):
    """A warning that content could not be parsed (a file, or lines before the last): what a
    comparison refuses rather than miss points."""


@dataclass
class Loaded:
    """What `load` read. `results`: one row per result record (all statuses; columns are the
    record's fields plus `source` and `source_line`, where it came from, `source_format`, and
    `excluded` and `valid`, see `select`, and the kernel's roles, see `roles`); `environments`:
    one row per run; `retractions` and `roles`: the lines as read; `warnings`: what was skipped
    and why; `files`: files read."""

    results: object
    environments: object
    warnings: list = field(default_factory=list)
    files: list = field(default_factory=list)
    retractions: list = field(default_factory=list)
    roles: list = field(default_factory=list)

    @property
    def standing(self):
        """The one record that stands for each point (any status)."""
        return self.results[self.results["excluded"] == ""]

    @property
    def ok(self):
        """Standing records with status ok: the ones fits, rates and the claim use."""
        return standing_ok(self.results)


def load(paths) -> Loaded:
    """Load every sweep JSONL and pytest-benchmark JSON under `paths` (files or folders)."""
    pd = _deps.pandas("loading records")
    files = expand_paths(paths)
    records, environments, retractions, roles, warnings = [], [], [], [], []
    for path in files + _files_beside(paths, files):
        got_records, got_envs, got_warnings = read_file(path)
        records += [r for r in got_records if r.get("schema") not in (RETRACTION_SCHEMA, ROLES_SCHEMA)]
        retractions += [r for r in got_records if r.get("schema") == RETRACTION_SCHEMA]
        roles += [r for r in got_records if r.get("schema") == ROLES_SCHEMA]
        environments += got_envs
        warnings += got_warnings
    merged = merge_rounds([(_hashable_point(r), select.invalid_reason(r)) for r in records])
    records, invalid = [r for r, _ in merged], [why for _, why in merged]
    environments = [_plain_environment(e) for e in environments]
    warnings += _environment_conflicts(environments)
    results = _results_frame(pd, records, environments)
    warnings += kernel_roles.fill(results, roles)
    started = {e["run_id"]: e.get("time") for e in environments if e.get("run_id")}
    warnings += select.mark(results, invalid, retractions, started)
    envs = _environments_frame(pd, environments)
    return Loaded(results=results, environments=envs, warnings=warnings, files=[str(p) for p in files],
                  retractions=retractions, roles=roles)


def _hashable_point(record: dict) -> dict:
    """The record with the point fields it lacks at their defaults (`point_defaults`), its text
    fields as text and its point fields as single values whatever the file held (a list for a
    run_id), so that grouping by them works; `invalid_reason` has already named the record."""
    odd = {k: _as_text(record[k]) for k in select.TEXT_FIELDS
           if record.get(k) is not None and not isinstance(record[k], str)}
    odd.update({k: _as_text(record[k]) for k in POINT_FIELDS if isinstance(record.get(k), (list, dict))})
    return {**record, **odd, **point_defaults(record)}


def _as_text(value) -> str:
    return json.dumps(value, default=str)[:200]


def _plain_environment(env: dict) -> dict:
    """An environment whose run_id is text and whose start time is text or None, whatever the
    file held, so that runs can be looked up and ordered."""
    run_id, time = env.get("run_id"), env.get("time")
    return {**env, "run_id": run_id if isinstance(run_id, str) or run_id is None else json.dumps(run_id),
            "time": time if isinstance(time, str) else None}


def _environment_conflicts(environments: list) -> list:
    """One warning per run whose environment records disagree (two files, one run_id)."""
    seen, warnings = {}, []
    for env in environments:
        facts = {k: v for k, v in env.items() if k not in ("source", "source_format")}
        first = seen.setdefault(env.get("run_id"), (facts, env.get("source")))
        if first[0] != facts and env.get("source") != first[1]:
            differ = sorted(k for k in set(facts) | set(first[0]) if facts.get(k) != first[0].get(k))
            warnings.append(f"run {env.get('run_id')!r}: the environments in {first[1]} and {env.get('source')} "
                            f"differ ({', '.join(differ[:5])}); two runs may share this run_id")
    return warnings


def _files_beside(paths, files: list) -> list:
    """The retractions and roles files in the folder of each file named directly, unless already read."""
    named = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    read = {f.resolve() for f in files}
    beside = {(p.parent / name).resolve() for p in named if p.is_file() for name in BESIDE_THE_DATA}
    return sorted(p for p in beside if p.is_file() and p not in read)


THIS_MACHINE = "this machine"


def label_this_machine(loaded: Loaded, files) -> None:
    """Name the device of the runs read from `files` as this machine's ("Intel Xeon, 2 cores
    (this machine)"), in the records and their environments, so a report sets a run made here
    apart from the committed profiles beside it."""
    mine = {Path(f).resolve() for f in files}
    from_here = loaded.results["source"].map(lambda source: Path(str(source)).resolve() in mine)
    runs = set(loaded.results.loc[from_here, "run_id"])
    envs = loaded.environments
    names = {}
    for index, env in envs[envs["run_id"].isin(runs)].iterrows():
        names[env["run_id"]] = _machine_name(env)
        envs.at[index, "gpu_name" if not fmt.missing(env.get("gpu_name")) else "cpu"] = names[env["run_id"]]
    loaded.results.loc[from_here, "device"] = [names.get(run, f"{device} ({THIS_MACHINE})") for run, device in
                                               zip(loaded.results.loc[from_here, "run_id"],
                                                   loaded.results.loc[from_here, "device"])]


def _machine_name(env) -> str:
    if not fmt.missing(env.get("gpu_name")):
        return f"{env['gpu_name']} ({THIS_MACHINE})"
    cores = env.get("cpu_count")
    cores = "" if fmt.missing(cores) else f", {int(cores)} cores"
    return f"{env.get('cpu') or 'CPU'}{cores} ({THIS_MACHINE})"


def expand_paths(paths) -> list[Path]:
    """Files named directly, plus every *.jsonl and *.json below named folders, each once."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise ValueError("paths: expected at least one results file or folder, got none")
    found, seen = [], set()
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            candidates = sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".json") and p.is_file())
        elif path.is_file():
            candidates = [path]
        else:
            raise FileNotFoundError(f"paths: {str(raw)!r} is neither a file nor a folder")
        for candidate in candidates:
            key = candidate.resolve()
            if key not in seen:
                seen.add(key)
                found.append(candidate)
    return found


def read_file(path) -> tuple[list, list, list]:
    """(result records, environment records, warnings) of one file, by its content; ValueError
    naming the file and line where it was written by a newer attnlab."""
    path = Path(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".json":
        document, error = parse_json(text)
        if error:
            return [], [], [Malformed(f"{path}: skipped, not valid JSON ({error})")]
        if isinstance(document, dict) and isinstance(document.get("benchmarks"), list):
            return read_pytest_benchmark(document, path)
        if isinstance(document, dict) and ("fits" in document or "claim" in document):
            return [], [], []   # fits.json or claim.json: this package's own output, not a measurement
        if isinstance(document, dict) and document.get("schema") in (TUNING_SCHEMA, COMPARE_SCHEMA):
            return [], [], []   # attnlab tune's per-tile times or compare's verdicts: not measurements to fit
        return [], [], [f"{path}: skipped, a JSON file without a 'benchmarks' list is not pytest-benchmark output"]
    return read_jsonl(text, path)


def read_jsonl(text: str, path="<text>") -> tuple[list, list, list]:
    """Parse sweep JSON Lines; see the module docstring for what is skipped."""
    found = parse_json_lines(text, path)
    records, environments, warnings, unknown = [], [], [], Counter()
    for number, obj in found.values:
        _refuse_newer(obj, f"{path}:{number}")
        schema = obj.get("schema") if isinstance(obj, dict) else None
        if version(schema, of=RESULT_SCHEMA) is not None:
            records.append(_with_source(obj, path, "sweep", number))
        elif schema == RETRACTION_SCHEMA:
            retraction, why = select.parse_retraction(obj, f"{path}:{number}")
            records += [retraction] if retraction else []
            warnings += [why] if why else []
        elif schema == ROLES_SCHEMA:
            line, why = kernel_roles.parse_line(obj, f"{path}:{number}")
            records += [{**line, "schema": ROLES_SCHEMA}] if line else []
            warnings += [why] if why else []
        elif schema == ENVIRONMENT_SCHEMA:
            environments.append(_with_source(obj, path, "sweep"))
        else:
            unknown[repr(schema)[:60]] += 1
    if found.bad:
        verb = "is" if len(found.bad) == 1 else "are"
        warnings.append(Malformed(f"{path}:{found.bad[0][0]}: skipped {_some_lines(found.bad)} that {verb} not "
                                  f"JSON ({found.bad[0][1]})"))
    warnings += [found.partial_warning] if found.partial_warning else []
    for schema, count in unknown.items():
        warnings.append(f"{path}: skipped {count} line(s) with schema {schema}; this reader knows "
                        f"{RESULT_SCHEMA!r} and {ENVIRONMENT_SCHEMA!r}")
    return records, environments, warnings


def _refuse_newer(obj, where: str) -> None:
    why = newer_schema(obj, where)
    if why:
        raise ValueError(why)


def _some_lines(found: list, shown: int = 5) -> str:
    """'a line' or 'N lines (3, 5, 9 and 12 more)': repeated faults in one warning."""
    if len(found) == 1:
        return "a line"
    numbers = ", ".join(str(n) for n, _ in found[:shown])
    more = f" and {len(found) - shown} more" if len(found) > shown else ""
    return f"{len(found)} lines ({numbers}{more})"


def read_pytest_benchmark(document: dict, path="<json>") -> tuple[list, list, list]:
    """Result records from a pytest-benchmark --benchmark-json document: each benchmark's
    extra_info is an attnlab result record; times come from stats (seconds) when it has none."""
    records, skipped = [], Counter()
    for bench in document["benchmarks"]:
        bench = _mapping(bench)
        extra, name = _mapping(bench.get("extra_info")), str(bench.get("name", "?"))
        _refuse_newer(extra, f"{path}: benchmark {name}")
        if version(extra.get("schema"), of=RESULT_SCHEMA) is None:
            skipped[repr(extra.get("schema"))[:60]] += 1
            continue
        record = _with_source(dict(extra), path, "pytest-benchmark", f"benchmark {name}")
        _fill_times_from_stats(record, _mapping(bench.get("stats")))
        record.setdefault("run_id", f"pytest-benchmark:{Path(str(path)).stem}:{document.get('datetime', '')}")
        record["benchmark_name"] = name
        record["benchmark_group"] = bench.get("group")
        records.append(record)
    warnings = [f"{path}: skipped {count} benchmark(s) whose extra_info has schema {schema}, expected "
                f"{RESULT_SCHEMA!r}" for schema, count in skipped.items()]
    run_ids = sorted({str(r["run_id"]) for r in records}) or [f"pytest-benchmark:{Path(str(path)).stem}"]
    environments = [_benchmark_environment(document, run_id, path) for run_id in run_ids]
    return records, environments, warnings


def _mapping(value) -> dict:
    """`value` where it is a JSON object, else an empty one: odd shapes read as missing."""
    return value if isinstance(value, dict) else {}


def _fill_times_from_stats(record: dict, stats: dict) -> None:
    data = stats.get("data")
    if not record.get("times_ms") and isinstance(data, list) and all(_is_number(t) for t in data) and data:
        record["times_ms"] = [t * 1e3 for t in data]
    times = record.get("times_ms")
    times = times if isinstance(times, list) and all(_is_number(t) for t in times) else []
    if record.get("median_ms") is None:
        record["median_ms"] = _percentile(times, 50) if times else _scaled(stats.get("median"))
    if record.get("p10_ms") is None and times:
        record["p10_ms"] = _percentile(times, 10)
    if record.get("p90_ms") is None and times:
        record["p90_ms"] = _percentile(times, 90)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _benchmark_environment(document: dict, run_id: str, path) -> dict:
    machine, commit = _mapping(document.get("machine_info")), _mapping(document.get("commit_info"))
    env = {"schema": ENVIRONMENT_SCHEMA, "run_id": run_id, "host": machine.get("node"),
           "cpu": _mapping(machine.get("cpu")).get("brand_raw"), "python": machine.get("python_version"),
           "git_commit": commit.get("id"), "time": document.get("datetime"),
           "pytest_benchmark": document.get("version")}
    # A conftest may add attnlab's environment fields to machine_info, and those that change from
    # run to run to commit_info (benchmarks/conftest.py); take them where present.
    nested = {**_mapping(commit.get("attnlab")), **_mapping(machine.get("attnlab"))}
    for key in ENVIRONMENT_FIELDS:
        value = nested.get(key, machine.get(key))
        if value is not None and key != "run_id":
            env[key] = value
    return _with_source(env, path, "pytest-benchmark")


def _with_source(obj: dict, path, source_format: str, line=None) -> dict:
    obj = dict(obj)
    obj["source"] = str(path)
    obj["source_format"] = source_format
    if line is not None:
        obj["source_line"] = line
    return obj


def _percentile(values, q: float) -> float:
    ordered = sorted(float(v) for v in values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _scaled(seconds):
    return seconds * 1e3 if _is_number(seconds) else None


def _results_frame(pd, records: list, environments: list):
    frame = pd.DataFrame.from_records(records) if records else pd.DataFrame()
    for column in (*FIELDS, *POINT_FIELDS, *ROLE_FIELDS, "source", "source_line", "source_format"):
        if column not in frame.columns:
            frame[column] = None
    for column in NUMERIC_FIELDS:
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    frame["status"] = frame["status"].fillna("unknown").astype(str).str.lower()
    frame["device"] = frame["device"].fillna(frame["run_id"].map(_gpu_names(environments)))
    for column, default in KEY_DEFAULTS.items():
        frame[column] = frame[column].fillna(default).astype(str)
    frame["times_ms"] = frame["times_ms"].map(lambda t: list(t) if isinstance(t, (list, tuple)) else [])
    return frame.reset_index(drop=True)


def _gpu_names(environments: list) -> dict:
    return {e.get("run_id"): e.get("gpu_name") or e.get("cpu") for e in environments if e.get("run_id")}


def _environments_frame(pd, environments: list):
    frame = pd.DataFrame.from_records(environments) if environments else pd.DataFrame()
    for column in (*ENVIRONMENT_FIELDS, "source", "source_format"):
        if column not in frame.columns:
            frame[column] = None
    return frame.reset_index(drop=True)
