"""Plain text shared by bench, analysis and the command line: numbers, context lengths, tables,
and text from records made fit for a page.

Standard library only, so that torch-free code (analysis, the CLI's argument parsing) can use it.
"""
from __future__ import annotations

import math
import re

KIB_TOKENS = 1024
MIB_TOKENS = 1024 * 1024
_SEQ_LEN_SCALE = {"": 1, "k": KIB_TOKENS, "m": MIB_TOKENS}
_SEQ_LEN_PATTERN = re.compile(r"\s*(\d+)\s*([km]?)\s*", re.IGNORECASE)
_NUMBER_PATTERN = re.compile(r"[-+]?[\d,]*\.?\d+(e[-+]?\d+)?\s*(%|x|k|m)?", re.IGNORECASE)
_MISSING_CELLS = {"", "-", "n/a"}


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


def percent(fraction) -> str:
    """A fraction as a percentage with the digits it holds (six at most): 0.0005 -> 0.05%,
    0.125 -> 12.5%, 5 -> 500%; '-' when missing."""
    return "-" if missing(fraction) else f"{100 * fraction:.6g}%"


def ratio(value) -> str:
    return "n/a" if missing(value) else f"{value:.1f}x"


def k(n) -> str:
    """A context length as people say it, also used in test ids: 1024 -> 1k, 1048576 -> 1m, 1000 -> 1000."""
    if missing(n):
        return "-"
    n = int(n)
    if n >= MIB_TOKENS and n % MIB_TOKENS == 0:
        return f"{n // MIB_TOKENS}m"
    return f"{n // KIB_TOKENS}k" if n >= KIB_TOKENS and n % KIB_TOKENS == 0 else str(n)


def parse_seq_len(text, name: str = "seq_len") -> int:
    """Tokens from '4096', '4k' (4 x 1024) or '1m' (1024 x 1024); ValueError naming `name` otherwise."""
    match = _SEQ_LEN_PATTERN.fullmatch(str(text))
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"{name}: {text!r} is not a context length; expected a positive token count, "
                         f"optionally with k (x1024) or m (x1048576), e.g. 4096, 4k or 1m")
    return int(match.group(1)) * _SEQ_LEN_SCALE[match.group(2).lower()]


def parse_seq_lens(text, name: str = "seq_lens") -> list[int]:
    """A comma list of lengths ('1k,2k,4096') in the order given, duplicates dropped."""
    lengths = [parse_seq_len(part, name) for part in str(text).split(",") if part.strip()]
    if not lengths:
        raise ValueError(f"{name}: expected a comma list of context lengths such as 1k,2k,128k, got {text!r}")
    return list(dict.fromkeys(lengths))


def _is_numeric(cell: str) -> bool:
    return _NUMBER_PATTERN.fullmatch(cell.strip()) is not None


def _numeric_columns(cells: list[list[str]], width: int) -> list[bool]:
    """Columns whose cells are all numbers (a '-' or empty cell counts as one) and at least one is."""
    columns = []
    for i in range(width):
        values = [row[i].strip() for row in cells if row[i].strip() not in _MISSING_CELLS]
        columns.append(bool(values) and all(_is_numeric(v) for v in values))
    return columns


def _alignment(align, cells: list[list[str]], width: int) -> list[bool]:
    """True for each right-aligned column. `align`: None (all left), 'numbers', or one 'l'/'r' per column."""
    if align is None:
        return [False] * width
    if align == "numbers":
        return _numeric_columns(cells, width)
    if len(align) != width or any(a not in "lr" for a in align):
        raise ValueError(f"align: expected None, 'numbers' or one 'l'/'r' per column ({width}), got {align!r}")
    return [a == "r" for a in align]


def table(headers, rows, align=None) -> str:
    """A text table with a dashed rule under the headers; align='numbers' right-aligns numeric columns."""
    headers = [str(h) for h in headers]
    body = [[str(c) for c in row] for row in rows]
    right = _alignment(align, body, len(headers))
    cells = [headers] + body
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row):
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)).rstrip()

    lines = [line(r) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# Characters XML 1.0 forbids (C0 controls but tab, newline and return; surrogates; U+FFFE and
# U+FFFF) and the controls HTML reports as errors (DEL, C1): what no page or SVG may hold.
_NOT_XML = re.compile("[^\t\n\r\x20-\x7e\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
REPLACEMENT = "\ufffd"


def xml_safe(text) -> str:
    """`text` as an SVG, HTML or XML page may hold it: each character those forbid replaced by
    U+FFFD, so that a NUL in a record's kernel name shows as a mark, not as an invalid page."""
    return _NOT_XML.sub(REPLACEMENT, str(text))


def encodable(text: str) -> str:
    """`text` with its lone surrogates (a JSON string may hold '\\ud800') replaced by U+FFFD, so
    that it can be written as UTF-8 at all."""
    return _SURROGATE.sub(REPLACEMENT, text)
