"""A kernel's roles as the analysis reads them: its family, the kernel it is an ablation of, and
whether it is a baseline (`attnlab.schema.ROLE_FIELDS`), so that nothing here is keyed on a
kernel's name.

The registry derives them (`attnlab.kernels.registry.roles`) and every record the lab writes
carries them. Records written before they existed take them from a roles file beside the data
(ROLES_SCHEMA lines, by convention in a `roles.jsonl`, written by `python -m
attnlab.bench.roles`), read as retractions are; a record's own fields win over the file. With
neither, a kernel is its own family, an ablation of nothing, and no baseline.
"""
from __future__ import annotations

from dataclasses import dataclass

from attnlab import text as fmt
from attnlab.schema import ROLE_FIELDS

ROLES_FILE = "roles.jsonl"


@dataclass(frozen=True)
class Roles:
    family: str
    ablation_of: str = ""
    baseline: bool = False


def alone(kernel) -> Roles:
    """The roles of a kernel nothing says anything of: its own family, no ablation, no baseline."""
    return Roles(str(kernel))


def parse_line(obj: dict, where: str) -> tuple[dict | None, str | None]:
    """({kernel, roles...}, None) from one line of a roles file, or (None, why it was skipped)."""
    unknown = set(obj) - {"schema", "kernel", *ROLE_FIELDS}
    if unknown:
        return None, f"{where}: skipped a roles line with unknown field(s) {', '.join(sorted(unknown))}"
    for name in ("kernel", "family"):
        if not isinstance(obj.get(name), str) or not obj[name].strip():
            return None, f"{where}: skipped a roles line without a {name}"
    if not isinstance(obj.get("ablation_of", ""), str) or not isinstance(obj.get("baseline", False), bool):
        return None, (f"{where}: skipped the roles of {obj['kernel']!r}: ablation_of must be text and baseline "
                      f"true or false")
    return {"kernel": obj["kernel"], "family": obj["family"], "ablation_of": obj.get("ablation_of", ""),
            "baseline": obj.get("baseline", False), "where": where}, None


def fill(frame, lines: list) -> list:
    """Fill the role columns of `frame` (the loader's results) in place: a record's own value
    where it holds one of the right kind, else its kernel's line in a roles file, else the
    kernel's roles alone. Returns a warning per kernel two roles lines disagree on (the line
    read first stands)."""
    by_kernel, warnings = {}, []
    for line in lines:
        first = by_kernel.setdefault(line["kernel"], line)
        if _roles_of_line(first) != _roles_of_line(line):
            warnings.append(f"{line['where']}: the roles of {line['kernel']!r} differ from those in "
                            f"{first['where']}, which stand")
    kernels = frame["kernel"] if "kernel" in frame else []
    filed = [by_kernel.get(kernel, {}) for kernel in kernels]
    fallback = {"family": list(map(str, kernels)), "ablation_of": [""] * len(frame),
                "baseline": [False] * len(frame)}
    for name in ROLE_FIELDS:
        own = frame[name].tolist() if name in frame else [None] * len(frame)
        frame[name] = [value if _well_formed(name, value) else line.get(name, default)
                       for value, line, default in zip(own, filed, fallback[name])]
    return warnings


def _roles_of_line(line: dict) -> tuple:
    return tuple(line[name] for name in ROLE_FIELDS)


def _well_formed(name: str, value) -> bool:
    if name == "baseline":
        return isinstance(value, bool)      # a column's values as Python objects (`tolist`)
    return isinstance(value, str) and (name != "family" or bool(value.strip()))


def of_kernels(records) -> dict:
    """{kernel: Roles} of the kernels in `records` (a DataFrame of result records, or kernel
    names): from their role columns where present, else each kernel alone. Where a kernel's
    records disagree (runs of two versions), the value most of them hold, ties by its text."""
    if not hasattr(records, "columns"):
        return {str(kernel): alone(kernel) for kernel in set(records)}
    if "kernel" not in records:
        return {}
    found = {}
    for kernel, rows in records.groupby("kernel", sort=False):
        values = {name: _most_common(rows[name]) for name in ROLE_FIELDS if name in rows}
        found[str(kernel)] = Roles(family=str(values.get("family") or kernel),
                                   ablation_of=str(values.get("ablation_of") or ""),
                                   baseline=bool(values.get("baseline") or False))
    return found


def _most_common(column):
    values = [v for v in column if not fmt.missing(v)]
    if not values:
        return None
    counts = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return max(sorted(counts, key=str), key=lambda value: counts[value])
