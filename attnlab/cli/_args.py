"""argparse types and defaults the subcommands share."""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from attnlab.text import parse_seq_lens as _parse_seq_lens


def checked(parse):
    """An argparse type from a parser whose ValueError already names the value's meaning."""
    def convert(text):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return convert


def parse_seq_lens(text: str) -> list:
    """'1k,2k,4096' -> [1024, 2048, 4096] (k means 1024, m 1024 x 1024), in the order given, each once."""
    return checked(_parse_seq_lens)(text)


def parse_names(text: str) -> list:
    """A comma list of names, in the order given, duplicates dropped."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma list, got {text!r}")
    return list(dict.fromkeys(names))


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def rounds(text: str) -> int:
    """How many interleaved rounds measure each point (bench/sweep.py)."""
    from attnlab.bench.sweep import MAX_ROUNDS

    value = positive_int(text)
    if value > MAX_ROUNDS:
        raise argparse.ArgumentTypeError(f"expected a whole number of rounds from 1 to {MAX_ROUNDS}, got {text!r}")
    return value


def rounds_help() -> str:
    from attnlab.bench.sweep import DEFAULT_ROUNDS

    return (f"measure each point in this many interleaved rounds, each in its own shuffled order (default "
            f"{DEFAULT_ROUNDS}): the spread between rounds is what `attnlab compare` tests against")


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def device_or_default(device) -> str:
    """`device` as given, else cuda where torch sees a GPU, else cpu."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_device(text: str) -> str:
    """cpu, cuda or cuda:N, as given; whether this machine has it is checked when the command runs."""
    from attnlab.bench.records import parse_device as parse

    return checked(parse)(text)


def parse_kv_dtype(text: str) -> str:
    """A KV cache's dtype: fp8_e4m3, fp8_e5m2, or a float dtype's name (bench/workloads.py)."""
    from attnlab.bench.workloads import kv_dtype_name

    return checked(kv_dtype_name)(text)


def parse_page_size(text: str) -> int:
    """Tokens per page of a paged KV cache; 0: one contiguous cache per sequence."""
    return 0 if text.strip() == "0" else positive_int(text)


# The presets are listed by bench/workloads.py alone: an unknown name is refused with the list.
WORKLOAD_HELP = ("a workload preset (default: the model's attention on CUDA, cpu-small on a CPU; an unknown "
                 "name lists them)")


def parse_workload(text: str) -> str:
    """The name of a sweep workload preset (bench/workloads.py PRESETS); an unknown one is refused
    with the list."""
    from attnlab.bench.workloads import preset

    return checked(lambda name: preset(name).name)(text)


def error_line(command: str, exc: BaseException, args) -> str:
    """`attnlab COMMAND: error: MESSAGE` on one line, where a MESSAGE that starts with an
    argument's name (`out: ...`, as the library names it) names the flag (`--out: ...`)."""
    message = " ".join(str(exc).split())
    name, colon, rest = message.partition(": ")
    if colon and name in vars(args):
        message = f"--{name.replace('_', '-')}: {rest}"
    return f"attnlab {command}: error: {message}"


# --- checks that turn a bad flag into argparse's one-line error, naming the flag ---------------

CHART_FORMATS = ("png", "svg", "pdf")
MIN_BOOTSTRAP, MAX_BOOTSTRAP = 50, 100_000   # fewer draws leave a 95% interval's tails to a draw or two


def bounded_number(expected: str, low: float, high: float = math.inf, *, above_low: bool = False):
    """An argparse type for a finite number in [low, high] (or (low, high] with `above_low`):
    inf and nan never pass, whatever the bounds."""
    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        above = value > low if above_low else value >= low
        if not (math.isfinite(value) and above and value <= high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return convert


fraction = bounded_number("a fraction in (0, 1]", 0.0, 1.0, above_low=True)
finite_seconds = bounded_number("a finite number of seconds >= 0", 0.0)
finite_ms = bounded_number("a finite number of milliseconds >= 0", 0.0)
finite_positive = bounded_number("a finite number above 0", 0.0, above_low=True)


def bootstrap_draws(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not MIN_BOOTSTRAP <= value <= MAX_BOOTSTRAP:
        raise argparse.ArgumentTypeError(f"expected an integer from {MIN_BOOTSTRAP} to {MAX_BOOTSTRAP:,}, "
                                         f"got {text!r}")
    return value


def chart_formats(text: str) -> tuple:
    """'png,SVG' -> ('png', 'svg'): formats every chart is written in, each once."""
    found = tuple(dict.fromkeys(part.strip().lower() for part in text.split(",") if part.strip()))
    unknown = [f for f in found if f not in CHART_FORMATS]
    if unknown or not found:
        raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(CHART_FORMATS)}, got {text!r}")
    return found


def output_folder(text: str) -> str:
    """A folder to write into: an existing folder, or one that can be made where the nearest
    existing parent is a writable folder."""
    path = Path(text)
    if not text.strip() or (path.exists() and not path.is_dir()):
        raise argparse.ArgumentTypeError(f"expected a folder, got {text!r}, which is not one")
    _writable_parent(path, text)
    return text


def output_file(text: str) -> str:
    """A file to write: not a folder; missing parent folders are created where the nearest
    existing one is a writable folder. '-' (standard output) passes as it is."""
    if text == "-":
        return text
    if not text.strip() or Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"expected a file path, got {text!r}, which is not one")
    _writable_parent(Path(text).parent, text)
    return text


def _writable_parent(path: Path, text: str) -> None:
    existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} cannot be made: {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text!r} cannot be written: the folder {str(existing)!r} is not "
                                         f"writable")


def present_device(text: str) -> str:
    """A `parse_device` name this machine has: cuda only where torch sees that GPU."""
    import torch

    name = parse_device(text)
    if name != "cpu":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.partition(":")[2] or 0)
        if index >= count:
            here = f" or cuda:0 to cuda:{count - 1}" if count else ""
            raise argparse.ArgumentTypeError(f"{text!r} is not here: torch sees {count} CUDA device(s); "
                                             f"expected cpu{here}")
    return name
