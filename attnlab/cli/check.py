"""`attnlab check`: every implementation that runs here, against float64, on awkward shapes."""
from __future__ import annotations

from attnlab.cli._args import device_or_default, present_device

HELP = "check every available implementation against a float64 reference on this machine"


def add_arguments(parser) -> None:
    parser.add_argument("--device", default=None, type=present_device,
                        help="cpu, cuda or cuda:N, one this machine has (default: cuda if present)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])


def run(args) -> int:
    import torch

    from attnlab.kernels.selfcheck import check

    device = device_or_default(args.device)
    results = check(device, getattr(torch, args.dtype))
    for r in results:
        print(f"{'ok  ' if r.ok else 'FAIL'} {r.impl:15} {r.mode:8} err {r.max_error:.2e} "
              f"(bound {r.bound:.2e})  {r.case}")
    failed = sum(not r.ok for r in results)
    print(f"{len(results) - failed} passed, {failed} failed ({device}, {args.dtype})")
    return 1 if failed or not results else 0
