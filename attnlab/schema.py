"""The words bench and analysis share: the schema names of the lines attnlab writes, the
result record's fields, its statuses and modes, and the reader of record files.

Standard library only: analysis and the command line read records without importing torch.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

RESULT_SCHEMA = "attnlab.result/1"            # one measured point (FIELDS)
ENVIRONMENT_SCHEMA = "attnlab.environment/1"  # the conditions of a run, once per run
RETRACTION_SCHEMA = "attnlab.retraction/1"    # records measured with a known fault, and why
TUNING_SCHEMA = "attnlab.tuning/1"            # attnlab tune's document: per-tile times
COMPARE_SCHEMA = "attnlab.compare/1"          # attnlab compare's document: two runs, point by point

# The contract: every result record has these keys, in this order; more may follow.
FIELDS = (
    "schema", "run_id", "kernel", "mode", "workload", "batch", "heads", "kv_heads", "head_dim",
    "dtype", "causal", "seq_len", "q_len", "status", "reason", "times_ms", "median_ms", "p10_ms",
    "p90_ms", "flops", "bytes", "tflops", "gbps", "tokens_per_s", "peak_mem_bytes",
    "predicted_mem_bytes", "power_w_mean", "power_w_max", "energy_j", "joules_per_token", "device",
)

OK, SKIPPED = "ok", "skipped"
FAILURES = ("oom", "error", "unsupported")
STATUSES = (OK, *FAILURES, SKIPPED)
# Statuses that settle a point: a resumed run does not measure it again.
FINAL_STATUSES = (OK, *FAILURES)
# Which record of a point stands: an ok one, else a failure, else a skipped point.
STATUS_RANK = {OK: 2, **dict.fromkeys(FAILURES, 1), SKIPPED: 0}

PREFILL, DECODE = "prefill", "decode"
KERNEL_MODES = (PREFILL, DECODE)
CALIBRATION = "calibration"                   # a run's own matmul and copy: its reference rates
E2E_DECODE, E2E_PREFILL_DECODE = "e2e-decode", "e2e-prefill-decode"
E2E_MODES = (E2E_DECODE, E2E_PREFILL_DECODE)
RING = "ring"                                 # ring attention across ranks, one record per length (attnlab ring)
MODES = (*KERNEL_MODES, CALIBRATION, *E2E_MODES, RING)


def family(schema: str) -> str:
    """What every version of a schema's name starts with: 'attnlab.result/' for RESULT_SCHEMA."""
    return schema.rsplit("/", 1)[0] + "/"


def version(name, of: Optional[str] = None) -> Optional[int]:
    """The version number in a schema name ('attnlab.result/2' -> 2); None where it has none
    or, given `of`, where it is not a version of that schema."""
    prefix = re.escape(family(of)) if of is not None else r"[^/]+/"
    match = re.match(prefix + r"(\d+)$", str(name))
    return int(match.group(1)) if match else None


def read_lines(path) -> list[dict]:
    """Every JSON object in a JSONL file, of any schema.

    A last line that does not parse (a run killed mid-write) is ignored; a bad line
    anywhere else is an error that names the file and line.
    """
    path = Path(path)
    with open(path, encoding="utf-8", errors="replace") as f:   # a cut may split a character
        lines = f.read().split("\n")
    objects = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):   # no newline after it: the line in flight when killed
                break
            raise ValueError(f"{path}:{number}: not a JSON object ({exc.msg})") from None
        if isinstance(obj, dict):
            objects.append(obj)
    return objects


def read_records(path) -> list[dict]:
    """The result records of a JSONL file, in file order; other schemas are skipped.

    Records of an older result schema are returned as they are; a newer one is an error
    saying which version this reader knows.
    """
    records = []
    known = version(RESULT_SCHEMA)
    for obj in read_lines(path):
        found = version(obj.get("schema", ""), of=RESULT_SCHEMA)
        if found is None:
            continue
        if found > known:
            raise ValueError(f"{path}: record schema {obj['schema']} is newer than this reader's "
                             f"{RESULT_SCHEMA}; upgrade attnlab to read it")
        records.append(obj)
    return records


def read_environments(path) -> list[dict]:
    """The environment lines of a JSONL file, one per run."""
    return [obj for obj in read_lines(path) if obj.get("schema") == ENVIRONMENT_SCHEMA]
