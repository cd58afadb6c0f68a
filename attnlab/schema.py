"""The words bench and analysis share: the schema names of the lines attnlab writes, the
result record's fields and the kind of value each holds, its statuses and modes, what tells
one measured point from another, a kernel's roles, and the reader of record files.

Standard library only: analysis and the command line read records without importing torch.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Optional

from attnlab.text import encodable

RESULT_SCHEMA = "attnlab.result/1"            # one measured point (FIELDS)
ENVIRONMENT_SCHEMA = "attnlab.environment/1"  # the conditions of a run, once per run
RETRACTION_SCHEMA = "attnlab.retraction/1"    # records measured with a known fault, and why
TUNING_SCHEMA = "attnlab.tuning/1"            # attnlab tune's document: per-tile times
COMPARE_SCHEMA = "attnlab.compare/1"          # attnlab compare's document: two runs, point by point
ROLES_SCHEMA = "attnlab.roles/1"              # a kernel's roles (ROLE_FIELDS), for records written without them
# The lines record files hold: a newer version of one of these is a file this reader cannot read.
READ_SCHEMAS = (RESULT_SCHEMA, ENVIRONMENT_SCHEMA, RETRACTION_SCHEMA, ROLES_SCHEMA)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")     # how JSON text spells a surrogate

# The kinds of value a record's fields hold. Each field's kind is said once, below; the column
# lists of the loader and the selection derive from it (`fields_of`).
TEXT, WHOLE, NUMBER, FLAG, TIMES = "text", "whole number", "number", "true or false", "list of times"
# The contract: every result record has these keys, in this order; more may follow.
CONTRACT_KINDS = {
    "schema": TEXT, "run_id": TEXT, "kernel": TEXT, "mode": TEXT, "workload": TEXT, "batch": WHOLE,
    "heads": WHOLE, "kv_heads": WHOLE, "head_dim": WHOLE, "dtype": TEXT, "causal": FLAG, "seq_len": WHOLE,
    "q_len": WHOLE, "status": TEXT, "reason": TEXT, "times_ms": TIMES, "median_ms": NUMBER, "p10_ms": NUMBER,
    "p90_ms": NUMBER, "flops": NUMBER, "bytes": NUMBER, "tflops": NUMBER, "gbps": NUMBER, "tokens_per_s": NUMBER,
    "peak_mem_bytes": NUMBER, "predicted_mem_bytes": NUMBER, "power_w_mean": NUMBER, "power_w_max": NUMBER,
    "energy_j": NUMBER, "joules_per_token": NUMBER, "device": TEXT,
}
FIELDS = tuple(CONTRACT_KINDS)
# The options a point was measured with, beyond the contract (each a point field, POINT_FIELDS).
OPTION_KINDS = {
    "window": WHOLE, "softcap": NUMBER, "docs": WHOLE, "l2_flush": TEXT, "decode_tokens": WHOLE,
    "prefill_kernel": TEXT, "page_size": WHOLE, "kv_dtype": TEXT, "lengths": TEXT, "lengths_seed": WHOLE,
}
# A kernel's roles, as the registry derives them (`registry.roles`): its family (the kernel its
# ablation_of and prefill_partner chain leads to; itself where it declares neither), the kernel it
# is an ablation of ("" if none), and whether it is a baseline. Records carry them; records written
# before they existed take them from a roles file beside the data (ROLES_SCHEMA lines).
ROLE_KINDS = {"family": TEXT, "ablation_of": TEXT, "baseline": FLAG}
ROLE_FIELDS = tuple(ROLE_KINDS)
FIELD_KINDS = {**CONTRACT_KINDS, **OPTION_KINDS, **ROLE_KINDS}


def fields_of(*kinds, among=tuple(FIELD_KINDS)) -> tuple:
    """The fields of `among` (default: every field with a kind), in its order, whose kind is one of `kinds`."""
    return tuple(name for name in among if FIELD_KINDS.get(name) in kinds)


OK, SKIPPED = "ok", "skipped"
WRONG = "wrong"       # the output failed its check against float64: never timed, never a speed
OOM, ERROR = "oom", "error"
UNSUPPORTED = "unsupported"     # the implementation refused the point's inputs before launching
FAILURES = (WRONG, OOM, ERROR, UNSUPPORTED)
STATUSES = (OK, *FAILURES, SKIPPED)
# Statuses that settle a point: a resumed run does not measure it again.
FINAL_STATUSES = (OK, *FAILURES)
# Which record of a point stands: an ok one, else a failure, else a skipped point.
STATUS_RANK = {OK: 2, **dict.fromkeys(FAILURES, 1), SKIPPED: 0}

PREFILL, DECODE = "prefill", "decode"
BACKWARD, FWD_BWD = "backward", "fwd_bwd"
KERNEL_MODES = (PREFILL, DECODE, BACKWARD, FWD_BWD)
# Prefill-shaped modes: q_len is the length, the work quadratic in it, the rate in TFLOP/s.
QUADRATIC_MODES = (PREFILL, BACKWARD, FWD_BWD)
CALIBRATION = "calibration"                   # a run's own matmul and copy: its reference rates
E2E_DECODE, E2E_PREFILL_DECODE = "e2e-decode", "e2e-prefill-decode"
E2E_MODES = (E2E_DECODE, E2E_PREFILL_DECODE)
RING = "ring"                                 # ring attention across ranks, one record per length (attnlab ring)
MODES = (*KERNEL_MODES, CALIBRATION, *E2E_MODES, RING)

# What tells one measurement from another: two records measured the same point only where they
# agree on every one of these (a record lacking one takes its default, `point_defaults`). Left
# out: how a record was taken (harness, reps) and what happened (cuda_graph says whether a
# capture worked, so two runs of one setting may differ in it).
POINT_FIELDS = (
    "device", "kernel", "mode", "workload", "dtype", "batch", "heads", "kv_heads", "head_dim", "causal",
    "seq_len", "q_len", "window", "softcap", "docs", "l2_flush", "decode_tokens", "prefill_kernel",
    "page_size", "kv_dtype", "lengths", "lengths_seed",
)
# Sweep options older records lack, at the value every run measured before the option existed.
VARIANT_DEFAULTS = {"window": 0, "softcap": 0.0, "docs": 1}
# The decode cache's options (a point field each), at what every run measured before they existed:
# a contiguous cache (page_size 0) in the record's own dtype, every sequence the same length.
EQUAL_LENGTHS = "equal"
CACHE_DEFAULTS = {"page_size": 0, "lengths": EQUAL_LENGTHS, "lengths_seed": 0}
CPU = "cpu"     # the device a record names when it ran on the host; its timer flushes no cache


def point_defaults(record) -> dict:
    """The point fields `record` (a mapping) lacks or holds as null, at the values records of its
    mode measured before the field existed: no window, no softcap, one document, the L2 flushed
    by writing on a GPU ("none" on a CPU), a contiguous cache of the record's dtype holding
    equal lengths (page_size 0, kv_dtype = dtype, lengths "equal", lengths_seed 0), and q_len the
    length for prefill, backward, fwd_bwd and ring, 1 for decode and end-to-end. Fields without
    such a value stay missing."""
    mode = record.get("mode")
    defaults = {}
    if mode in KERNEL_MODES:
        on_cpu = CPU in (record.get("device"), record.get("device_type"))
        defaults.update(VARIANT_DEFAULTS, l2_flush="none" if on_cpu else "write")
    if mode in (*KERNEL_MODES, *E2E_MODES):
        defaults.update(CACHE_DEFAULTS, kv_dtype=record.get("dtype"))
    if mode in (*QUADRATIC_MODES, RING):
        defaults["q_len"] = record.get("seq_len")
    elif mode in (DECODE, *E2E_MODES):
        defaults["q_len"] = 1
    return {name: value for name, value in defaults.items() if _absent(record.get(name))}


def _absent(value) -> bool:
    return value is None or value != value      # null, or NaN where a table holds the record


def family(schema: str) -> str:
    """What every version of a schema's name starts with: 'attnlab.result/' for RESULT_SCHEMA."""
    return schema.rsplit("/", 1)[0] + "/"


def version(name, of: Optional[str] = None) -> Optional[int]:
    """The version number in a schema name ('attnlab.result/2' -> 2); None where it has none
    or, given `of`, where it is not a version of that schema."""
    prefix = re.escape(family(of)) if of is not None else r"[^/]+/"
    match = re.match(prefix + r"(\d+)$", str(name))
    return int(match.group(1)) if match else None


@dataclass
class JsonLines:
    """What a JSON Lines file holds. `values`: (line number, value) of each line that parses;
    `bad`: (line number, why) of each other line but a partial last one; `partial`: the number
    of a last line that does not parse and has no newline after it, as a writer killed
    mid-line leaves it (the next writer cuts it), else None."""

    path: str
    values: list = field(default_factory=list)
    bad: list = field(default_factory=list)
    partial: Optional[int] = None

    @property
    def partial_warning(self) -> Optional[str]:
        """One line that names the partial last line, or None."""
        if self.partial is None:
            return None
        return (f"{self.path}:{self.partial}: ignored an unfinished last line (no newline ends it: a writer killed "
                f"mid-record leaves one, and the next writer cuts it)")


def parse_json(text: str):
    """(value, None), or (None, why) for text that is not JSON, however it fails (numbers too
    long, arrays nested too deep). Lone surrogates in its strings ('\\ud800') are replaced, as
    no file could be written with them."""
    try:
        value = json.loads(text)
        return (_encodable(value) if _SURROGATE_ESCAPE.search(text) else value), None
    except json.JSONDecodeError as exc:
        return None, exc.msg + (f" at line {exc.lineno}" if exc.lineno > 1 else "")
    except (ValueError, RecursionError) as exc:
        return None, f"{type(exc).__name__}: {str(exc)[:80]}"


def _encodable(value):
    if isinstance(value, str):
        return encodable(value)
    if isinstance(value, list):
        return [_encodable(v) for v in value]
    if isinstance(value, dict):
        return {encodable(k): _encodable(v) for k, v in value.items()}
    return value


def parse_json_lines(text: str, path="<text>") -> JsonLines:
    """Each line of JSON Lines `text` parsed; see JsonLines for what becomes of the rest."""
    lines = text.split("\n")
    found = JsonLines(str(path))
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        value, why = parse_json(line)
        if why is None:
            found.values.append((number, value))
        elif number == len(lines):    # no newline after it: the line in flight when a writer was killed
            found.partial = number
        else:
            found.bad.append((number, why))
    return found


def read_json_lines(path) -> JsonLines:
    """`parse_json_lines` of a file; undecodable bytes are replaced, as a cut may split a character."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return parse_json_lines(f.read(), path)


def newer_schema(obj, where) -> Optional[str]:
    """Why `obj` cannot be read here where it is a line of a newer version of a schema this
    reader knows (`where`: its file and line); None otherwise."""
    name = obj.get("schema") if isinstance(obj, dict) else None
    for known in READ_SCHEMAS:
        found = version(name, of=known)
        if found is not None and found > version(known):
            return (f"{where}: written by a newer attnlab (schema {name} is newer than this reader's {known}); "
                    f"upgrade attnlab to read it")
    return None


def read_lines(path) -> list[dict]:
    """Every JSON object in a JSONL file, of any schema.

    A partial last line (a run killed mid-write) is ignored; a bad line anywhere else is an
    error that names the file and line.
    """
    return [obj for _, obj in _numbered_objects(path)]


def read_records(path) -> list[dict]:
    """The result records of a JSONL file, in file order; other schemas are skipped.

    Records of an older result schema are returned as they are; a line of a newer schema this
    reader knows is an error naming the file and line and the version this reader reads.
    """
    records = []
    for number, obj in _numbered_objects(path):
        why = newer_schema(obj, f"{path}:{number}")
        if why:
            raise ValueError(why)
        if version(obj.get("schema", ""), of=RESULT_SCHEMA) is not None:
            records.append(obj)
    return records


def read_environments(path) -> list[dict]:
    """The environment lines of a JSONL file, one per run."""
    return [obj for obj in read_lines(path) if obj.get("schema") == ENVIRONMENT_SCHEMA]


def _numbered_objects(path) -> list:
    found = read_json_lines(path)
    if found.bad:
        number, why = found.bad[0]
        raise ValueError(f"{path}:{number}: not a JSON object ({why})")
    return [(number, value) for number, value in found.values if isinstance(value, dict)]
