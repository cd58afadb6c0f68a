"""What autotuning sees in the Triton prefill, per GPU: every tile tried, its time, the one chosen.

One case per context length and K/V load path (TMA descriptors where the GPU has them, and
pointers). The JSON document is written anew after each case, so an interrupted run keeps
what it measured; a case that fails is recorded with its error and the rest go on.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from attnlab.bench.output_file import OutputError, OutputLock, WriteFailed, check_output_path
from attnlab.bench.records import environment, jsonable
from attnlab.bench.sweep import check_device, classify, describe, random_inputs
from attnlab.bench.workloads import PREFILL, Workload

TUNING_SCHEMA = "attnlab.tuning/1"
_SCHEMA_FAMILY = TUNING_SCHEMA.split("/")[0] + "/"


def tune(workload: Workload, seq_lens, device, out, argv=None) -> dict:
    """Autotune the workload's prefill at each length, on each load path the inputs allow;
    returns the document written to `out`, which is held for the run (`output_file.OutputLock`)
    and must be new or an earlier tuning document. A document that cannot be written (a full
    disk) stops the run with `output_file.WriteFailed`; the one before it stays."""
    device = check_device(device)
    out = check_output_path(out)
    with OutputLock(out):
        check_replaceable(out)
        document = {"schema": TUNING_SCHEMA, "environment": jsonable(environment(argv, device=device)),
                    "cases": []}
        for seq_len in seq_lens:
            _tune_length(workload, seq_len, device, out, document)
    return document


def _tune_length(workload: Workload, seq_len: int, device, out: Path, document: dict) -> None:
    from attnlab.kernels import triton_prefill

    point = workload.point("triton", PREFILL, seq_len)
    case = {k: v for k, v in point.fields().items() if k not in ("kernel", "mode")}
    try:
        q, k, v = random_inputs(point, device)
    except Exception as exc:
        document["cases"].append(dict(case, status=classify(exc), reason=describe(exc)))
        _write(out, document)
        return
    for tma in (True, False) if triton_prefill.tma_unfit_reason(k, v) is None else (False,):
        try:
            seen = dict(status="ok", **triton_prefill.autotune(q, k, v, point.causal, point.head_dim ** -0.5, tma))
        except Exception as exc:
            seen = dict(status=classify(exc), reason=describe(exc))
        document["cases"].append(dict(case, tma=tma, **seen))
        _write(out, document)


def check_replaceable(path: Path) -> None:
    """Refuse to replace a file that is not a tuning document (an empty one is new)."""
    if not path.exists() or not path.read_bytes().strip():
        return
    try:
        document = json.loads(path.read_bytes())
    except ValueError:
        document = None
    if not (isinstance(document, dict) and str(document.get("schema", "")).startswith(_SCHEMA_FAMILY)):
        raise OutputError(f"out: {path} is not an attnlab tuning document; attnlab replaces only its own: "
                          f"choose another file")


def _write(path: Path, document: dict) -> None:
    # Written beside and renamed over, so an interrupted write leaves the last document whole;
    # the name is fresh, so no file of the user's is written over on the way.
    target = Path(os.path.realpath(path))
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    try:
        os.fchmod(fd, 0o644)     # as a file written in place would be, not mkstemp's 0600
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(jsonable(document), indent=1) + "\n")
        os.replace(partial, target)
    except OSError as exc:
        Path(partial).unlink(missing_ok=True)
        raise WriteFailed(path, len(document["cases"]) - 1, exc, what="cases") from None
