"""`attnlab kernels`: the registry as a table, with why each unavailable one cannot run."""
from __future__ import annotations

from attnlab.cli._args import device_or_default, parse_device

HELP = "list attention implementations and whether they run here"


def add_arguments(parser) -> None:
    parser.add_argument("--device", default=None, type=parse_device,
                        help="cpu, cuda or cuda:N: where to check each implementation, whether or not this machine "
                             "has it (default: cuda if present, else cpu)")


def run(args) -> int:
    from attnlab.kernels import implementations

    device = device_or_default(args.device)
    rows = [("name", "modes", "dtypes", "head_dim", "devices", f"on {device}")]
    for impl in implementations():
        status = impl.available(device)
        rows.append((impl.name, ",".join(impl.modes),
                     ",".join(str(d).removeprefix("torch.").replace("float", "fp").replace("bfp", "bf")
                              for d in impl.dtypes),
                     impl.head_dims_text, ",".join(impl.devices),
                     "available" if status else f"unavailable: {status.reason}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    return 0
