"""The `attnlab` command. Each module in this package is one subcommand: it defines
`HELP`, `add_arguments(parser)` and `run(args) -> int`, and stays a thin wrapper over the
library packages.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys


def _use_interpreter_without_gpu() -> None:
    # Triton kernels run on a CPU only in Triton's interpreter, which must be chosen before
    # Triton compiles anything; a command on a machine without a GPU opts in for the user.
    if "TRITON_INTERPRET" in os.environ:
        return
    import torch
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnlab", description="Attention performance lab.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    for name in commands:
        module = importlib.import_module(f"{__name__}.{name}")
        sub = subparsers.add_parser(name.replace("_", "-"), help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv=None) -> int:
    # Building the parser and reading the flags import torch (seconds): Ctrl-C there is as
    # welcome as during the command itself.
    try:
        args = build_parser().parse_args(argv)
        _use_interpreter_without_gpu()
        return args.run(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
