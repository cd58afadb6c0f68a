"""The roles file: each registered kernel's roles (`attnlab.kernels.registry.roles`) as
ROLES_SCHEMA lines, for records written before records carried them. Committed beside such
data, where the analysis reads it as it reads retractions (`attnlab.analysis.roles`).

    python -m attnlab.bench.roles profiles/h100-80gb-hbm3/2026-11-27/roles.jsonl [--kernel-module M]

writes (or replaces) the file with a line per kernel the registry holds, in-tree and plugins.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from attnlab.schema import ROLE_FIELDS, ROLES_SCHEMA


def roles_lines() -> list[dict]:
    """One ROLES_SCHEMA line per registered kernel, by name."""
    from attnlab.kernels import implementations, registry

    return [{"schema": ROLES_SCHEMA, "kernel": name, **registry.roles(name)}
            for name in sorted(impl.name for impl in implementations())]


def write_roles(path) -> Path:
    """Write `roles_lines()` to `path` as JSON Lines, replacing what it held; returns the path."""
    path = Path(path)
    text = "".join(json.dumps({k: line[k] for k in ("schema", "kernel", *ROLE_FIELDS)}) + "\n"
                   for line in roles_lines())
    path.write_text(text, encoding="utf-8")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnlab.bench.roles", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="roles files to write")
    parser.add_argument("--kernel-module", action="append", default=[],
                        help="a plugin module or file to load first (repeatable)")
    args = parser.parse_args(argv)
    from attnlab.kernels import load_plugins

    failures = load_plugins(args.kernel_module)
    if failures:        # a roles file without a plugin's kernels would say they have no roles
        parser.exit(1, "".join(f"{failure}\n" for failure in failures))
    for path in args.paths:
        write_roles(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
