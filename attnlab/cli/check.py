"""`attnlab check`: every implementation that runs here, against float64, on awkward shapes;
gradients too for those with a backward."""
from __future__ import annotations

import sys

from attnlab.cli._args import device_or_default, parse_names, present_device
from attnlab.text import table

HELP = "check every available implementation against a float64 reference on this machine"
READS_KERNELS = True


def add_arguments(parser) -> None:
    parser.add_argument("--device", default=None, type=present_device,
                        help="cpu, cuda or cuda:N, one this machine has (default: cuda if present)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--kernels", type=parse_names, default=None,
                        help="comma list of implementations to check (default: every one that runs here)")
    parser.add_argument("--modes", type=parse_names, default=None,
                        help="comma list of the check's modes to run: prefill, decode, varlen (packed), backward "
                             "and varlen-backward (gradients; default: all)")


def run(args) -> int:
    import torch

    from attnlab.kernels import get
    from attnlab.kernels.selfcheck import CASE_MODES, check, why_not

    device, dtype = device_or_default(args.device), getattr(torch, args.dtype)
    try:
        for name in args.kernels or ():
            get(name)
    except ValueError as exc:
        print(f"attnlab check: error: --kernels: {str(exc).partition(': ')[2]}", file=sys.stderr)
        return 2
    unknown = [m for m in args.modes or () if m not in CASE_MODES]
    if unknown:
        print(f"attnlab check: error: --modes: expected some of {', '.join(CASE_MODES)}, got "
              f"{', '.join(unknown)}", file=sys.stderr)
        return 2
    results = check(device, dtype, kernels=args.kernels, modes=args.modes)
    checked = {r.impl for r in results}
    not_run = {name: why_not(name, device, dtype, args.modes) for name in args.kernels or () if name not in checked}
    if args.kernels and not checked:
        _print_plugin_failures(args.plugin_failures)
        reasons = "; ".join(f"{name} ({reason})" for name, reason in not_run.items())
        print(f"attnlab check: error: --kernels: none of the named kernels runs here ({device}, {args.dtype}): "
              f"{reasons}", file=sys.stderr)
        return 2
    print(table(("result", "kernel", "mode", "error", "bound", "case", "why it failed"), [_row(r) for r in results],
                align="numbers"))
    failed = sorted({r.impl for r in results if not r.ok})
    print(f"{sum(r.ok for r in results)} passed, {len(results) - sum(r.ok for r in results)} failed "
          f"({device}, {args.dtype})" + (f": {', '.join(failed)} wrong" if failed else ""))
    for name, reason in not_run.items():
        print(f"not run: {name}: {reason}")
    _print_plugin_failures(args.plugin_failures)
    return 1 if failed or args.plugin_failures or not results else 0


def _row(result) -> tuple:
    """One result as a table row; a failure's last cell says why (the verdict's reason or what was
    raised, on one line)."""
    return ("ok" if result.ok else "FAIL", result.impl, result.mode, f"{result.max_error:.2e}",
            f"{result.bound:.2e}", result.case, "" if result.ok else result.why)


def _print_plugin_failures(failures) -> None:
    for failure in failures:
        print(f"FAIL {failure}")
