"""argparse types and defaults the subcommands share."""
from __future__ import annotations

import argparse


def checked(parse):
    """An argparse type from a parser whose ValueError already names the value's meaning."""
    def convert(text):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return convert


def parse_seq_lens(text: str) -> list:
    """'1k,2k,4096' -> [1024, 2048, 4096], as the sweep reads them (k means 1024)."""
    from attnlab.bench.workloads import parse_seq_lens as parse

    return checked(parse)(text)


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
