"""What autotuning sees in the Triton prefill, per GPU: every tile tried, its time, the one chosen.

One case per context length and K/V load path (TMA descriptors where the GPU has them, and
pointers). The JSON document is written anew after each case, so an interrupted run keeps
what it measured; a case that fails is recorded with its error and the rest go on.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from attnlab.bench.records import environment, jsonable
from attnlab.bench.sweep import check_device, classify, describe, random_inputs
from attnlab.bench.workloads import PREFILL, Workload

TUNING_SCHEMA = "attnlab.tuning/1"


def tune(workload: Workload, seq_lens, device, out, argv=None) -> dict:
    """Autotune the workload's prefill at each length, on each load path the inputs allow;
    returns the document written to `out`."""
    from attnlab.kernels import triton_prefill

    device = check_device(device)
    document = {"schema": TUNING_SCHEMA, "environment": jsonable(environment(argv, device=device)), "cases": []}
    for seq_len in seq_lens:
        point = workload.point("triton", PREFILL, seq_len)
        case = {k: v for k, v in point.fields().items() if k not in ("kernel", "mode")}
        try:
            q, k, v = random_inputs(point, device)
        except Exception as exc:
            document["cases"].append(dict(case, status=classify(exc), reason=describe(exc)))
            _write(out, document)
            continue
        for tma in (True, False) if triton_prefill.tma_unfit_reason(k, v) is None else (False,):
            try:
                seen = dict(status="ok", **triton_prefill.autotune(q, k, v, point.causal, point.head_dim ** -0.5, tma))
            except Exception as exc:
                seen = dict(status=classify(exc), reason=describe(exc))
            document["cases"].append(dict(case, tma=tma, **seen))
            _write(out, document)
        del q, k, v
    return document


def _write(path, document) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(jsonable(document), indent=1) + "\n", encoding="utf-8")
    os.replace(partial, path)
