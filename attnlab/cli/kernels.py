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
                     impl.head_dims_text, _options(impl), _backward(impl, device), _cache(impl),
                     ",".join(impl.devices), _origin(impl.origin),
                     "available" if status else f"unavailable: {one_line(status.reason)}"))
    print(table(("name", "modes", "dtypes", "head_dim", "options", "backward", "decode cache", "devices", "from",
                 f"on {device}"), rows))
    for failure in args.plugin_failures:
        print(f"not loaded: {failure}")
    return 0


def _options(impl) -> str:
    """What it takes beyond plain attention: window, softcap, varlen (packed sequences)."""
    return ",".join((*impl.options, *(("varlen",) if impl.varlen else ()))) or "-"


def _backward(impl, device: str) -> str:
    """Whether gradients flow through it ("-": no backward), with the options its backward takes,
    or that its backward does not run on this device type."""
    if impl.backward is None:
        return "-"
    import torch

    device_type = torch.device(device).type
    refused = impl.backward_limits(device_type, impl.dtypes[0], 64) if impl.backward_limits else None
    if refused is not None and not refused and device_type in impl.devices:
        return f"not on {device_type}"
    options = ",".join((*impl.backward_options, *(("varlen",) if impl.varlen_backward else ())))
    return f"yes: {options}" if options else "yes"


def _cache(impl) -> str:
    """The decode caches it takes beyond contiguous ones in q's dtype: page sizes, cache dtypes."""
    pages = () if impl.paged is None else (f"pages {impl.paged_text}",)
    stored = tuple(str(d).removeprefix("torch.").replace("float8_", "fp8_") for d in impl.kv_dtypes)
    return "; ".join((*pages, *((",".join(stored),) if stored else ()))) or "-"


def _origin(origin: str) -> str:
    """"attnlab" for the in-tree kernels, else the plugin's file or module."""
    import attnlab.kernels.impls as impls

    return "attnlab" if origin.startswith(impls.__path__[0]) else origin
