"""Where implementations come from: the in-tree `impls/` package, then plugins.

A plugin is a Python file or importable module that calls `register_kernel(...)` when
imported. Three ways in, read in this order: the entry-point group `attnlab.kernels`
(installed packages), the ATTNLAB_KERNEL_MODULES variable (paths or module names separated
by os.pathsep) and `--kernel-module` on the command line. A plugin that fails to import is
returned as a `PluginFailure` naming it, and the rest still load.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "ATTNLAB_KERNEL_MODULES"
ENTRY_POINT_GROUP = "attnlab.kernels"

_loaded: set = set()      # plugins already imported in this process, by resolved path or module name


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that did not load: `name` as given, `error` as one line."""

    name: str
    error: str

    def __str__(self) -> str:
        return f"kernel module {self.name}: {self.error}"


def load_builtin() -> None:
    """Import every module of attnlab.kernels.impls, in name order: each registers itself."""
    from attnlab.kernels import impls

    for module in sorted(m.name for m in pkgutil.iter_modules(impls.__path__)):
        importlib.import_module(f"{impls.__name__}.{module}")


def load_plugins(names=(), *, environ=None, entry_points: bool = True) -> list[PluginFailure]:
    """Load the plugins of the entry-point group, of ATTNLAB_KERNEL_MODULES and `names` (paths
    or module names), each once per process; returns those that failed."""
    environ = os.environ if environ is None else environ
    failures = [_load_entry_point(ep) for ep in _entry_points()] if entry_points else []
    from_env = [part for part in environ.get(ENV_VAR, "").split(os.pathsep) if part.strip()]
    failures += [_load_named(name) for name in (*from_env, *names)]
    return [f for f in failures if f is not None]


def _entry_points() -> list:
    return sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def _load_entry_point(ep) -> PluginFailure | None:
    key = f"entry point {ep.name} = {ep.value}"
    return _once(key, key, ep.load)


def _load_named(name: str) -> PluginFailure | None:
    name = name.strip()
    path = Path(name).expanduser()
    if name.endswith(".py") or os.sep in name or path.exists():
        if not path.is_file():
            return PluginFailure(name, "no such file")
        return _once(str(path.resolve()), name, lambda: _import_file(path.resolve()))
    return _once(name, name, lambda: importlib.import_module(name))


def _once(key: str, name: str, load) -> PluginFailure | None:
    if key in _loaded:
        return None
    _loaded.add(key)
    try:
        load()
    except BaseException as exc:  # a plugin's SystemExit or error must not end the command
        if isinstance(exc, KeyboardInterrupt):
            raise
        return PluginFailure(name, f"{type(exc).__name__}: {' '.join(str(exc).split())}")
    return None


def _import_file(path: Path):
    # A file gets a module name of its own, so two plugins both called kernel.py do not clash.
    module_name = f"attnlab_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module
