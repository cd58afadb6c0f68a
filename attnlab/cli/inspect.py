"""`attnlab inspect`: what the compiler makes of each Triton implementation, without a GPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from attnlab.cli._args import error_line, output_file, parse_names

HELP = "compile each Triton implementation for a GPU architecture, without one, and report what it built"
READS_KERNELS = True
COLUMNS = ("implementation", "kernel", "arch", "case", "config", "warps", "regs", "spills", "smem KB", "wgmma", "tma",
           "cp.async", "warp spec.", "setmaxnreg", "pdl", "kernels/call", "HGMMA", "MUFU.EX2")


def add_arguments(parser) -> None:
    parser.add_argument("--arch", action="append", choices=("80", "90", "100"), default=None,
                        help="compute capability to build for: 80 (A100), 90 (H100, H200), 100 (B200); repeatable "
                             "(default 90)")
    parser.add_argument("--kernels", type=parse_names, default=None,
                        help="comma list of implementations (default: every one that declares its builds)")
    parser.add_argument("--json", type=output_file, default=None,
                        help="write the rows as JSON here ('-': stdout, instead of the table)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing file at --json whoever wrote it (never a kernel module)")


def run(args) -> int:
    try:
        _check_output(args)
        rows = _inspect(args)
        _write(args, rows)
    except (OSError, ValueError) as exc:
        print(error_line("inspect", exc, args), file=sys.stderr)
        return 2
    if args.json == "-":
        json.dump(rows, sys.stdout, indent=1)
        return 0
    from attnlab.text import table
    print(table(COLUMNS, [_row(r) for r in rows], align="numbers"))
    return 0 if rows else 1


def _check_output(args) -> None:
    """Before any work: refuse a --json file attnlab did not write, or a kernel module, unless forced."""
    if args.json in (None, "-"):
        return
    from attnlab.analysis.outputs import check_output_file

    modules = [m for m in args.kernel_module if Path(m).expanduser().is_file()]
    check_output_file(args.json, flag="--json", inputs=modules, force=args.force)


def _write(args, rows: list) -> None:
    if args.json in (None, "-"):
        return
    from attnlab.analysis.outputs import record_files

    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
    record_files([Path(args.json)], "inspect")


def _inspect(args) -> list:
    """The rows, from a process of their own without TRITON_INTERPRET: Triton chooses between
    compiler and interpreter when a kernel module is imported."""
    with tempfile.TemporaryDirectory(prefix="attnlab-inspect-") as folder:
        rows_file = os.path.join(folder, "rows.json")
        done = subprocess.run(_command(args, rows_file), env=_environment(), capture_output=True, text=True)
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "?"
        if done.returncode:
            raise ValueError(f"kernels: the build failed: {last}")
        try:
            with open(rows_file, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            raise ValueError(f"kernels: the build ended without writing its rows: {last}") from None


def _command(args, rows_file: str) -> list:
    """The build process's command line: it writes its rows to `rows_file`, which nothing a
    plugin prints can reach."""
    command = [sys.executable, "-m", "attnlab.kernels.inspect", *(f"--arch={a}" for a in args.arch or ["90"])]
    command += [f"--kernel-module={m}" for m in args.kernel_module]
    command += [f"--out={rows_file}"]
    if args.plugin_timeout is not None:
        command.append(f"--plugin-timeout={args.plugin_timeout}")
    if args.kernels:
        from attnlab.kernels import get
        for name in args.kernels:
            try:
                get(name)
            except ValueError as exc:
                raise ValueError(f"kernels: {str(exc).partition(': ')[2]}") from None
        command.append(f"--kernels={','.join(args.kernels)}")
    return command


def _environment() -> dict:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _row(r: dict) -> tuple:
    sass = r.get("sass") or {}
    return (r["implementation"], r["kernel"], r["arch"], _case(r), r.get("config", "-"), r["warps"], r["registers"],
            r["spill_bytes"], f"{r['shared_bytes'] / 1024:.0f}", _yes(r["wgmma"]), r["tma_copies"], r["cp_async"],
            _yes(r["warp_specialized"]), "/".join(map(str, r["setmaxnreg"])) or "-", _yes(r["griddepcontrol"]),
            r["kernels_per_call"], sass.get("hgmma", "-"), sass.get("exp2", "-"))


def _case(r: dict) -> str:
    """The build's case in a few words: dtype, head_dim, and the path and options it was built with."""
    words = [r.get("dtype", ""), f"d{r['head_dim']}" if r.get("head_dim") else ""]
    words += [name for name in ("causal", "tma", "window", "softcap", "varlen", "pdl") if r.get(name)]
    return " ".join(w for w in words if w) or "-"


def _yes(value) -> str:
    return "yes" if value else "-"
