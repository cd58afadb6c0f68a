"""What autotuning sees, per GPU: every candidate tried, its time, the one chosen.

For each implementation that declares a `tune` hook (`register_kernel(tune=...)`), at each
context length: the hook's cases, one per variant it tunes. The JSON document is written anew
after each case, so an interrupted run keeps what it measured; a case that fails is recorded
with its error and the rest go on.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from attnlab.bench.device import check_device
from attnlab.bench.outcomes import classify, describe
from attnlab.bench.output_file import OutputError, OutputLock, WriteFailed, check_output_path
from attnlab.bench.records import environment, jsonable
from attnlab.bench.point_call import random_inputs
from attnlab.bench.workloads import DTYPES, PREFILL, Workload
from attnlab.kernels import get, implementations
from attnlab.schema import OK, TUNING_SCHEMA, family

_SCHEMA_FAMILY = family(TUNING_SCHEMA)


def tunable(device, dtype, head_dim: int) -> list[str]:
    """The implementations with a tune hook whose prefill runs here for these shapes."""
    device_type = torch.device(device).type
    return [i.name for i in implementations() if i.tune is not None and i.available(device_type)
            and i.supports(PREFILL, dtype, head_dim, device_type)]


def tune(workload: Workload, seq_lens, device, out, argv=None, kernels=None) -> dict:
    """Autotune the workload's prefill at each length with each of `kernels` (default: every
    tunable one here); returns the document written to `out`, which is held for the run
    (`output_file.OutputLock`) and must be new or an earlier tuning document. A document that
    cannot be written (a full disk) stops the run with `output_file.WriteFailed`; the one
    before it stays."""
    device = check_device(device)
    out = check_output_path(out)
    kernels = _checked_kernels(kernels, workload, device)
    with OutputLock(out):
        check_replaceable(out)
        document = {"schema": TUNING_SCHEMA, "environment": jsonable(environment(argv, device=device)),
                    "cases": []}
        for seq_len in seq_lens:
            for name in kernels:
                _tune_point(workload.point(name, PREFILL, seq_len), device, out, document)
    return document


def _checked_kernels(kernels, workload: Workload, device) -> list[str]:
    here = tunable(device, DTYPES[workload.dtype], workload.head_dim)
    if kernels is None:
        return here
    refused = [name for name in kernels if name not in here]
    if refused:
        raise ValueError(f"kernels: {', '.join(refused)} cannot be tuned here (tunable here: "
                         f"{', '.join(here) or 'none'}); a kernel is tunable where it declares a tune hook")
    return list(kernels)


def _tune_point(point, device, out: Path, document: dict) -> None:
    case = {k: v for k, v in point.fields().items() if k != "mode"}
    try:
        q, k, v = random_inputs(point, device)
        seen = [dict(status=OK, **variant) for variant in
                get(point.kernel).tune(q, k, v, point.causal, point.head_dim ** -0.5)]
    except Exception as exc:
        seen = [dict(status=classify(exc), reason=describe(exc))]
    for variant in seen:
        document["cases"].append(dict(case, **variant))
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
