"""`attnlab kernels`: the registry as a table, with why each unavailable one cannot run."""
from __future__ import annotations

from attnlab.cli._args import device_or_default, parse_device
from attnlab.text import table

HELP = "list attention implementations and whether they run here"
READS_KERNELS = True


def add_arguments(parser) -> None:
    parser.add_argument("--device", default=None, type=parse_device,
                        help="cpu, cuda or cuda:N: where to check each implementation, whether or not this machine "
                             "has it (default: cuda if present, else cpu)")


def run(args) -> int:
    from attnlab.kernels import implementations
    from attnlab.kernels.registry import one_line

    device = device_or_default(args.device)
    rows = []
    for impl in implementations():
        status = impl.available(device)
        rows.append((impl.name, ",".join(impl.modes),
                     ",".join(str(d).removeprefix("torch.").replace("float", "fp").replace("bfp", "bf")
                              for d in impl.dtypes),
                     impl.head_dims_text, _options(impl), ",".join(impl.devices), _origin(impl.origin),
                     "available" if status else f"unavailable: {one_line(status.reason)}"))
    print(table(("name", "modes", "dtypes", "head_dim", "options", "devices", "from", f"on {device}"), rows))
    for failure in args.plugin_failures:
        print(f"not loaded: {failure}")
    return 0


def _options(impl) -> str:
    """What it takes beyond plain attention: window, softcap, varlen (packed sequences)."""
    return ",".join((*impl.options, *(("varlen",) if impl.varlen else ()))) or "-"


def _origin(origin: str) -> str:
    """"attnlab" for the in-tree kernels, else the plugin's file or module."""
    import attnlab.kernels.impls as impls

    return "attnlab" if origin.startswith(impls.__path__[0]) else origin
