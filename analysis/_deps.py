"""Optional packages of the `analysis` extra, imported only when a function needs them."""
from __future__ import annotations

import importlib
import sys

INSTALL_HINT = "pip install 'attnlab[analysis]'"


class MissingExtra(ImportError):
    """A package of the `analysis` extra is not installed; the message says which and how to add it."""


def require(module: str, purpose: str):
    """Import `module` or raise MissingExtra naming what needed it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(f"{purpose} needs the '{module.split('.')[0]}' package, which is not installed; "
                           f"install the analysis extra: {INSTALL_HINT}") from exc


def pandas(purpose: str = "loading records"):
    return require("pandas", purpose)


def pyplot_free_matplotlib(purpose: str = "drawing charts"):
    """matplotlib on the headless Agg backend, unless pyplot is already in use (then its
    backend was chosen by whoever imported it, and is left alone)."""
    matplotlib = require("matplotlib", purpose)
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    return matplotlib
