"""Where implementations come from: the in-tree `impls/` package, then plugins.

A plugin is a Python file or importable module that calls `register_kernel(...)` when
imported. Three ways in, read in this order: the entry-point group `attnlab.kernels`
(installed packages; an entry point naming a function, `pkg.mod:func`, has it called), the
ATTNLAB_KERNEL_MODULES variable (paths or module names separated by os.pathsep) and
`--kernel-module` on the command line. Each file loads once per process, whichever way and
spelling names it.

A plugin cannot end or freeze the command that loads it: one that raises (SystemExit
included), runs past the time limit (ATTNLAB_PLUGIN_TIMEOUT seconds, default 60) or registers
no implementation is returned as a `PluginFailure` naming it, whatever it registered is
removed, and the rest still load. What a plugin writes to standard output while it loads goes
to standard error, so that a command's data on stdout stays clean.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import math
import os
import pkgutil
import signal
import sys
import threading
import types
from dataclasses import dataclass
from pathlib import Path

from attnlab.kernels import registry

ENV_VAR = "ATTNLAB_KERNEL_MODULES"
ENTRY_POINT_GROUP = "attnlab.kernels"
TIMEOUT_VAR = "ATTNLAB_PLUGIN_TIMEOUT"
DEFAULT_TIMEOUT_S = 60.0
RETRY_S = 1.0             # after the limit, the alarm is raised again this often, for a plugin that swallows it

_loaded: set = set()      # plugins already imported in this process, by resolved file (else by name)


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that did not load: `name` as given, `error` as one line."""

    name: str
    error: str

    def __str__(self) -> str:
        return f"kernel module {self.name}: {self.error}"


class PluginTimeout(BaseException):
    """Raised inside a plugin's import once it runs past its time limit: a BaseException, so that
    the plugin's own `except Exception` does not swallow it."""


def load_builtin() -> None:
    """Import every module of attnlab.kernels.impls, in name order: each registers itself, and
    the names it registers are reserved for it."""
    from attnlab.kernels import impls

    with registry.in_tree_registrations():
        for module in sorted(m.name for m in pkgutil.iter_modules(impls.__path__)):
            importlib.import_module(f"{impls.__name__}.{module}")


def load_plugins(names=(), *, environ=None, entry_points: bool = True, timeout_s=None) -> list[PluginFailure]:
    """Load the plugins of the entry-point group, of ATTNLAB_KERNEL_MODULES and `names` (paths
    or module names), each once per process; returns those that failed. `timeout_s`: how long
    each may take to import (default: ATTNLAB_PLUGIN_TIMEOUT, else 60 s); ValueError naming the
    argument or variable where it is not a number of seconds above 0."""
    environ = os.environ if environ is None else environ
    timeout_s = plugin_timeout(environ) if timeout_s is None else _seconds("timeout_s", timeout_s)
    with stdout_to_stderr():
        failures = [_load_entry_point(ep, timeout_s) for ep in _entry_points()] if entry_points else []
        from_env = [part for part in environ.get(ENV_VAR, "").split(os.pathsep) if part.strip()]
        failures += [_load_named(name, timeout_s) for name in (*from_env, *names)]
    return [f for f in failures if f is not None]


def plugin_timeout(environ=None) -> float:
    """Seconds a plugin may take to import: ATTNLAB_PLUGIN_TIMEOUT where set, else 60."""
    text = (os.environ if environ is None else environ).get(TIMEOUT_VAR, "").strip()
    return _seconds(TIMEOUT_VAR, text) if text else DEFAULT_TIMEOUT_S


def _seconds(argument: str, given) -> float:
    try:
        value = float(given)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{argument}: expected a finite number of seconds above 0, got {given!r}")
    return value


@contextlib.contextmanager
def stdout_to_stderr():
    """Send what is written to standard output, from Python or below it (file descriptor 1), to
    standard error for the duration."""
    _flush(sys.stdout)
    saved = _redirect_fd(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _flush(sys.stderr)
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def _redirect_fd(source: int, target: int):
    """Point `target` at `source`; returns a copy of what `target` was, or None where either is closed."""
    try:
        saved = os.dup(target)
    except OSError:
        return None
    try:
        os.dup2(source, target)
    except OSError:
        os.close(saved)
        return None
    return saved


def _flush(stream) -> None:
    with contextlib.suppress(Exception):
        stream.flush()


def _entry_points() -> list:
    return sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def _load_entry_point(ep, timeout_s: float) -> PluginFailure | None:
    def key() -> tuple:
        key, file = _module_key(ep.module)
        return key + (f":{ep.attr}" if ep.attr else ""), file

    def load() -> None:
        # `pkg.mod:func` names a function that registers: load() only fetches it.
        loaded = ep.load()
        if callable(loaded) and not isinstance(loaded, types.ModuleType):
            loaded()
    imported = (lambda: False) if ep.attr else (lambda: ep.module in sys.modules)
    return _load_once(f"entry point {ep.name} = {ep.value}", key, load, timeout_s, imported)


def _load_named(name: str, timeout_s: float) -> PluginFailure | None:
    name = name.strip()
    path = Path(name).expanduser()
    if name.endswith(".py") or os.sep in name or path.exists():
        if not path.is_file():
            return PluginFailure(name, "no such file")
        file = str(path.resolve())
        return _load_once(name, lambda: (file, file), lambda: _import_file(path.resolve()), timeout_s)
    return _load_once(name, lambda: _module_key(name), lambda: importlib.import_module(name), timeout_s,
                      lambda: name in sys.modules)


def _module_key(name: str) -> tuple:
    """(key, file) of a module name: the resolved file it refers to, so that a module named also
    by its path loads once; by name where it has no file. Finding the file imports the parent
    packages: plugin code, run under the plugin's time limit."""
    spec = importlib.util.find_spec(name)
    origin = spec.origin if spec else None
    if origin and os.path.isfile(origin):
        return str(Path(origin).resolve()), str(Path(origin).resolve())
    return f"module {name}", None


def _load_once(name: str, key, load, timeout_s: float, imported=lambda: False) -> PluginFailure | None:
    """Load a plugin unless its key was loaded before, or `imported()` says its module was (by
    another plugin: what it registers is registered); on failure remove what it registered.
    `key()` -> (key, the plugin's file or None)."""
    before = set(_registered())
    found = {}

    def attempt() -> None:
        found["key"], found["file"] = key()
        if found["key"] in _loaded or imported():
            found["again"] = True
            return
        _loaded.add(found["key"])
        load()
    try:
        _call_within(attempt, timeout_s, found.get)
    except BaseException as exc:  # a plugin's SystemExit, error or hang must not end the command
        _forget(before)
        if isinstance(exc, KeyboardInterrupt):
            raise
        return PluginFailure(name, _failure_text(exc, timeout_s))
    if found.get("again"):
        return None
    if not set(_registered()) - before:
        return PluginFailure(name, "imported, but it registered no implementation (a plugin calls register_kernel "
                                   "when imported)")
    return None


def _failure_text(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, PluginTimeout):
        return _timeout_text(timeout_s)
    return registry.one_line(exc)


def _timeout_text(timeout_s: float) -> str:
    return f"did not finish importing within {timeout_s:g} s (set by --plugin-timeout or {TIMEOUT_VAR})"


def _registered() -> list:
    return [impl.name for impl in registry.implementations()]


def _forget(before: set) -> None:
    """Remove what a plugin that failed registered: nothing of it may count."""
    for name in set(_registered()) - before:
        registry.unregister(name)


def _call_within(attempt, timeout_s: float, found) -> None:
    """Run `attempt`, raising PluginTimeout once it runs past `timeout_s`: by SIGALRM in the main
    thread (which interrupts sleeps and Python loops inside the import), else in a thread of its
    own that is left behind. Either way what the plugin's file registers later is refused.
    `found("file")`: the plugin's file, once known."""
    try:
        if _alarm_usable():
            _call_with_alarm(attempt, timeout_s)
        else:
            _call_in_thread(attempt, timeout_s)
    except PluginTimeout:
        if found("file"):
            registry.refuse_file(found("file"), _timeout_text(timeout_s))
        raise


def _alarm_usable() -> bool:
    """SIGALRM is ours to use: a POSIX main thread, with no handler or timer of someone else's."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        return False
    return signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, signal.SIG_IGN) and \
        signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def _call_with_alarm(attempt, timeout_s: float) -> None:
    done = False
    fired = False

    def on_alarm(signum, frame):
        nonlocal fired
        if not done:
            fired = True
            raise PluginTimeout()
    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout_s, RETRY_S)
        attempt()
    finally:
        done = True          # first, so that a late alarm is harmless from here on
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if fired:                # the plugin caught the alarm and finished anyway: still too late
        raise PluginTimeout()


def _call_in_thread(attempt, timeout_s: float) -> None:
    gate = registry.RegistrationGate()
    outcome = {}

    def target() -> None:
        gate.enter()
        try:
            attempt()
        except BaseException as exc:
            outcome["error"] = exc
    thread = threading.Thread(target=target, name="attnlab-plugin-import", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        gate.close(_timeout_text(timeout_s))
        raise PluginTimeout()
    if "error" in outcome:
        raise outcome["error"]


def _import_file(path: Path):
    # A file gets a module name of its own, so two plugins both called kernel.py do not clash.
    module_name = f"attnlab_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module
