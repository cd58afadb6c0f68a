"""Plain-text formatting shared by the report and the command line: numbers, lengths, tables."""
from __future__ import annotations

import math


def missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def num(value) -> str:
    """Three significant figures, thousands separated from 100 up; '-' when missing."""
    if missing(value):
        return "-"
    value = float(value)
    if value == 0:
        return "0"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def pct(value) -> str:
    return "-" if missing(value) else f"{value:.0f}%"


def ratio(value) -> str:
    return "n/a" if missing(value) else f"{value:.1f}x"


def k(n) -> str:
    """A context length as people say it: 1024 -> 1k, 1048576 -> 1M."""
    if missing(n):
        return "-"
    n = int(n)
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def parse_seq_len(text: str) -> int:
    """'4096', '4k' (4096) or '1m' (1048576); ValueError naming the text otherwise."""
    raw = str(text).strip().lower()
    factor = {"k": 1024, "m": 1 << 20}.get(raw[-1:], 1)
    digits = raw[:-1] if factor > 1 else raw
    if not digits.isdigit() or int(digits) < 1:
        raise ValueError(f"seq_lens: {text!r} is not a context length; expected a positive integer, "
                         f"optionally with k (x1024) or m (x1048576), e.g. 1k,2k,128k")
    return int(digits) * factor


def table(headers, rows) -> str:
    """A left-aligned text table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
