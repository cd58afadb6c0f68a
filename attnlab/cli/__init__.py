"""The `attnlab` command. Each module in this package is one subcommand: it defines
`HELP`, `add_arguments(parser)` and `run(args) -> int`, and stays a thin wrapper over the
library packages. A subcommand that reads the kernel registry sets `READS_KERNELS = True`:
it gets `--kernel-module` and `--plugin-timeout`, and plugins are loaded before it runs.
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


def _load_plugins(names, timeout_s) -> list:
    """Load kernel plugins after the Triton mode is chosen (a plugin may define Triton kernels);
    each that fails is named on stderr, and the command goes on without it."""
    from attnlab.kernels import load_plugins

    failures = load_plugins(names, timeout_s=timeout_s)
    for failure in failures:
        print(f"attnlab: warning: {failure}", file=sys.stderr)
    return failures


def build_parser() -> argparse.ArgumentParser:
    from attnlab.cli._args import finite_positive

    parser = argparse.ArgumentParser(prog="attnlab", description="Attention performance lab.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    for name in commands:
        module = importlib.import_module(f"{__name__}.{name}")
        sub = subparsers.add_parser(name.replace("_", "-"), help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        if getattr(module, "READS_KERNELS", False):
            sub.add_argument("--kernel-module", action="append", default=[], metavar="PATH_OR_MODULE",
                             help="a Python file or module that registers kernels with register_kernel "
                                  "(repeatable; ATTNLAB_KERNEL_MODULES and the attnlab.kernels entry points "
                                  "are read too)")
            sub.add_argument("--plugin-timeout", type=finite_positive, default=None, metavar="SECONDS",
                             help="how long each kernel plugin may take to import; one that takes longer is named "
                                  "and skipped (default: ATTNLAB_PLUGIN_TIMEOUT, else 60)")
        sub.set_defaults(run=module.run)
    return parser


def main(argv=None) -> int:
    # Building the parser and reading the flags import torch (seconds): Ctrl-C there is as
    # welcome as during the command itself.
    try:
        args = build_parser().parse_args(argv)
        _use_interpreter_without_gpu()
        if hasattr(args, "kernel_module"):
            try:
                args.plugin_failures = _load_plugins(args.kernel_module, args.plugin_timeout)
            except ValueError as exc:     # ATTNLAB_PLUGIN_TIMEOUT that is not a number of seconds
                print(f"attnlab {args.command}: error: {exc}", file=sys.stderr)
                return 2
        return args.run(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
