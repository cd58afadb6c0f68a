"""`attnlab inspect`: what the compiler makes of each Triton implementation, without a GPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from attnlab.cli._args import error_line, output_file, parse_names

HELP = "compile each Triton implementation for a GPU architecture, without one, and report what it built"
READS_KERNELS = True
COLUMNS = ("implementation", "kernel", "arch", "case", "config", "warps", "regs", "spills", "smem KB", "wgmma", "tma", "cp.async",
           "warp spec.", "setmaxnreg", "pdl", "kernels/call", "HGMMA", "MUFU.EX2")


def add_arguments(parser) -> None:
    parser.add_argument("--arch", action="append", choices=("80", "90", "100"), default=None,
                        help="compute capability to build for: 80 (A100), 90 (H100, H200), 100 (B200); repeatable "
                             "(default 90)")
    parser.add_argument("--kernels", type=parse_names, default=None,
                        help="comma list of implementations (default: every one that declares its builds)")
    parser.add_argument("--json", type=output_file, default=None, help="write the rows as JSON here ('-': stdout)")


def run(args) -> int:
    try:
        rows = _inspect(args)
    except ValueError as exc:
        print(error_line("inspect", exc, args), file=sys.stderr)
        return 2
    if args.json == "-":
        json.dump(rows, sys.stdout, indent=1)
        return 0
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    from attnlab.text import table
    print(table(COLUMNS, [_row(r) for r in rows], align="numbers"))
    return 0 if rows else 1


def _inspect(args) -> list:
    """The rows, from a process of their own without TRITON_INTERPRET: Triton chooses between
    compiler and interpreter when a kernel module is imported."""
    command = [sys.executable, "-m", "attnlab.kernels.inspect", *(f"--arch={a}" for a in args.arch or ["90"])]
    command += [f"--kernel-module={m}" for m in args.kernel_module]
    if args.kernels:
        from attnlab.kernels import get
        for name in args.kernels:
            try:
                get(name)
            except ValueError as exc:
                raise ValueError(f"kernels: {str(exc).partition(': ')[2]}") from None
        command.append(f"--kernels={','.join(args.kernels)}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise ValueError(f"kernels: the build failed: {done.stderr.strip().splitlines()[-1] if done.stderr else '?'}")
    return json.loads(done.stdout)


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
