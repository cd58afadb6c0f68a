"""What happened to a point, as its record says it: a status and a reason.

A point whose call raised gets the status `classify` gives (`oom`, `unsupported` or `error`)
and the reason `describe` writes; a point whose output failed its check against float64 is
`wrong`, with the check's figures (`check_fields`), and is never timed.
"""
from __future__ import annotations

import torch

from attnlab.schema import ERROR, OOM, UNSUPPORTED, WRONG


def classify(exc: BaseException) -> str:
    """The record status for an exception a kernel raised."""
    if isinstance(exc, torch.OutOfMemoryError):
        return OOM
    text = str(exc)
    if isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text):
        return OOM
    if isinstance(exc, ValueError) and text.startswith("impl:"):
        return UNSUPPORTED     # the implementation refused these inputs before launching
    return ERROR


def describe(exc: BaseException) -> str:
    """A failure's `reason`: the exception's type and message (a SystemExit's code), cut to 2000
    characters."""
    message = f"exit status {exc.code!r}" if isinstance(exc, SystemExit) else str(exc)
    return f"{type(exc).__name__}: {message}"[:2000]


def status_and_reason(exc: BaseException) -> tuple[str, str]:
    """(status, reason) of a point whose call raised `exc`."""
    return classify(exc), describe(exc)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, cut to 300 characters; its type's name where
    the message is empty (an out-of-memory error's message runs to many lines)."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def check_fields(verdict) -> dict:
    """What a record keeps of its output's check: the error against float64 on the rows
    compared, the bound it was held to, and how many rows."""
    return {"check_error": verdict.error, "check_bound": verdict.bound, "check_rows": verdict.rows}


def wrong_fields(verdict) -> dict:
    """The status, reason and check figures of a point whose output failed its check."""
    return dict(status=WRONG, reason=f"wrong output: {verdict.describe()}", **check_fields(verdict))
