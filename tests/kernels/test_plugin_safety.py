"""A kernel plugin cannot end, freeze or impersonate the lab: its SystemExit is its own failure,
its import has a time limit, the reserved names stay the lab's, and what a plugin that failed
registered does not count. Plugins are files in tmp_path, loaded in this process (each once)."""
import importlib.metadata
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from attnlab.cli import main
from attnlab.kernels import plugins, registry, selfcheck
from attnlab.kernels.impls import naive
from attnlab.kernels.plugins import ENTRY_POINT_GROUP, TIMEOUT_VAR, load_plugins, plugin_timeout

REGISTER = '''
from attnlab.kernels import register_kernel
from attnlab.kernels.impls import naive
def register(name):
    register_kernel(name, prefill=naive.prefill, devices=("cpu",), dtypes=("float16", "float32"))
'''


@pytest.fixture
def plugin(tmp_path):
    """write(name, body) -> the path of a plugin file whose body may call register(kernel_name)."""
    def write(name: str, body: str) -> str:
        path = tmp_path / f"{name}.py"
        path.write_text(REGISTER + body)
        return str(path)
    return write


@pytest.fixture
def names():
    """Kernel names a test may register; each is removed afterwards."""
    made = []
    yield made
    for name in made:
        registry.unregister(name)


def registered(name: str) -> bool:
    return name in {impl.name for impl in registry.implementations()}


def load(*paths, timeout_s=10.0):
    return load_plugins(paths, environ={}, entry_points=False, timeout_s=timeout_s)


# --- SystemExit is the plugin's failure, never the end of the command ---------------------------

def test_a_probe_that_exits_is_unavailable_with_its_reason_and_ctrl_c_still_stops(names):
    names += ["test-probe-exits", "test-probe-interrupted"]
    registry.register_kernel("test-probe-exits", prefill=naive.prefill, devices="cpu", dtypes="float32",
                             probe=lambda device_type: __import__("sys").exit(7))
    status = registry.get("test-probe-exits").available("cpu")
    assert not status and status.broken and status.reason == "probe failed: SystemExit: 7"

    def interrupted(device_type):
        raise KeyboardInterrupt
    registry.register_kernel("test-probe-interrupted", prefill=naive.prefill, devices="cpu", dtypes="float32",
                             probe=interrupted)
    with pytest.raises(KeyboardInterrupt):
        registry.get("test-probe-interrupted").available("cpu")


def test_check_fails_a_kernel_that_exits_and_checks_the_rest(names):
    names += ["test-exits"]

    def exits(q, k, v, causal, scale):
        raise SystemExit(0)
    registry.register_kernel("test-exits", prefill=exits, devices="cpu", dtypes="float16")
    results = selfcheck.check("cpu", torch.float16, kernels=["test-exits", "sdpa-math"])
    mine = [r for r in results if r.impl == "test-exits"]
    assert mine and all(not r.ok and r.error == "SystemExit: 0" for r in mine)
    assert all(r.ok for r in results if r.impl == "sdpa-math") and any(r.impl == "sdpa-math" for r in results)


def test_check_fails_a_kernel_whose_probe_or_limits_raise(names):
    names += ["test-probe-raises", "test-limits-raise"]
    registry.register_kernel("test-probe-raises", prefill=naive.prefill, devices="cpu", dtypes="float16",
                             probe=lambda device_type: __import__("sys").exit(3))

    def limits(device_type, dtype, head_dim):
        raise SystemExit("no")
    registry.register_kernel("test-limits-raise", prefill=naive.prefill, devices="cpu", dtypes="float16",
                             limits=limits)
    results = selfcheck.check("cpu", torch.float16, kernels=["test-probe-raises", "test-limits-raise"])
    probe = [r for r in results if r.impl == "test-probe-raises"]
    assert len(probe) == 1 and not probe[0].ok and probe[0].error == "probe failed: SystemExit: 3"
    limited = [r for r in results if r.impl == "test-limits-raise"]
    assert limited and all(not r.ok and "SystemExit: no" in r.error for r in limited)


def test_ctrl_c_in_a_kernel_stops_the_check(names):
    names += ["test-interrupted"]

    def interrupted(q, k, v, causal, scale):
        raise KeyboardInterrupt
    registry.register_kernel("test-interrupted", prefill=interrupted, devices="cpu", dtypes="float16")
    with pytest.raises(KeyboardInterrupt):
        selfcheck.check("cpu", torch.float16, kernels=["test-interrupted"])


def test_an_error_of_many_lines_is_one_line_in_the_table(names, capsys):
    names += ["test-many-lines"]

    def many_lines(q, k, v, causal, scale):
        raise ValueError("first line\n  second line")
    registry.register_kernel("test-many-lines", prefill=many_lines, devices="cpu", dtypes="float16")
    assert main(["check", "--device", "cpu", "--kernels", "test-many-lines"]) == 1
    rows = [line for line in capsys.readouterr().out.splitlines() if "test-many-lines" in line]
    assert rows and all("ValueError: first line second line" in line for line in rows[:-1])
    assert "test-many-lines wrong" in rows[-1]


# --- a kernel that cannot run here is named with its reason -------------------------------------

def test_check_says_why_a_named_kernel_cannot_run_and_exits_2_when_none_can(capsys):
    assert main(["check", "--device", "cpu", "--kernels", "sdpa-cudnn"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("attnlab check: error: --kernels: ") and "sdpa-cudnn (runs on cuda, not cpu)" in err


def test_the_reference_is_not_checked_against_itself(capsys):
    assert main(["check", "--device", "cpu", "--kernels", "naive"]) == 2
    assert "naive (it is the reference the others are checked against)" in capsys.readouterr().err


def test_kernels_lists_a_reason_of_many_lines_on_one(names, capsys):
    names += ["test-reason-lines"]
    registry.register_kernel("test-reason-lines", prefill=naive.prefill, devices="cpu", dtypes="float32",
                             probe=lambda device_type: registry.no("first line\n  second line"))
    assert main(["kernels", "--device", "cpu"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("test-reason-lines"))
    assert row.endswith("unavailable: first line second line")


def test_check_names_the_kernels_that_cannot_run_and_follows_the_rest(names, capsys):
    names += ["test-fp32-only"]
    registry.register_kernel("test-fp32-only", prefill=naive.prefill, devices="cpu", dtypes="float32")
    assert main(["check", "--device", "cpu", "--kernels", "sdpa-cudnn,test-fp32-only,sdpa-math"]) == 0
    out = capsys.readouterr().out
    assert "not run: sdpa-cudnn: runs on cuda, not cpu" in out
    assert "not run: test-fp32-only: dtypes float32, not float16" in out
    assert " failed (cpu, float16)" in out and "sdpa-math" in out


# --- reserved names -------------------------------------------------------------------------------

def test_an_in_tree_name_is_refused_even_where_the_in_tree_kernel_is_not_registered(monkeypatch):
    monkeypatch.delitem(registry._REGISTRY, "naive")
    with pytest.raises(ValueError, match=r"^name: 'naive' is the name of an in-tree kernel"):
        registry.register_kernel("naive", prefill=naive.prefill, devices="cpu", dtypes="float32")
    assert "naive" not in registry._REGISTRY


def test_an_in_tree_kernel_takes_its_name_back_from_a_plugin_loaded_before_it(monkeypatch, names):
    names += ["test-in-tree-later"]
    monkeypatch.setattr(registry, "_IN_TREE", set(registry._IN_TREE))
    registry.register_kernel("test-in-tree-later", prefill=lambda *args: args[0] * 7, devices="cpu",
                             dtypes="float32")
    with registry.in_tree_registrations():
        mine = registry.register_kernel("test-in-tree-later", prefill=naive.prefill, devices="cpu",
                                        dtypes="float32")
    assert registry.get("test-in-tree-later") is mine
    with pytest.raises(ValueError, match=r"^name: .* in-tree kernel"):
        registry.register_kernel("test-in-tree-later", prefill=naive.prefill, devices="cpu", dtypes="float32")


def test_a_plugin_cannot_register_auto(plugin):
    failures = load(plugin("takes_auto", 'register("auto")\n'))
    assert len(failures) == 1 and failures[0].error.startswith("ValueError: name: 'auto' is reserved")
    assert not registered("auto")


# --- what a plugin that failed registered does not count ------------------------------------------

def test_a_plugin_that_exits_after_registering_leaves_nothing(plugin, names):
    names += ["test-then-exit"]
    path = plugin("then_exit", 'register("test-then-exit")\nimport sys\nsys.exit(3)\n')
    assert [f.error for f in load(path)] == ["SystemExit: 3"]
    assert not registered("test-then-exit")


def test_a_plugin_that_registers_nothing_is_named(plugin):
    path = plugin("registers_nothing", "VALUE = 1\n")
    failures = load(path)
    assert [f.name for f in failures] == [path] and "registered no implementation" in failures[0].error


# --- the time limit -------------------------------------------------------------------------------

@pytest.mark.parametrize("body", [
    "import time\ntime.sleep(60)\n",                                                       # a sleep
    "while True:\n    pass\n",                                                              # a Python loop
    "import time\ntry:\n    time.sleep(60)\nexcept BaseException:\n    register('test-late-b')\n",  # swallows it
])
def test_a_plugin_past_its_time_limit_is_named_and_leaves_nothing(plugin, names, body, tmp_path):
    names += ["test-late-a", "test-late-b"]
    path = plugin(f"slow_{len(list(tmp_path.iterdir()))}", "register('test-late-a')\n" + body)
    start = time.monotonic()
    failures = load(path, timeout_s=0.5)
    assert time.monotonic() - start < 5
    assert [f.error.split(" (")[0] for f in failures] == ["did not finish importing within 0.5 s"]
    assert not registered("test-late-a") and not registered("test-late-b")


def test_a_thread_of_a_plugin_past_its_limit_registers_nothing_later(plugin, names):
    names += ["test-from-thread"]
    path = plugin("starts_a_thread", "import threading, time\nREFUSED = []\n"
                                     "def later():\n    time.sleep(1.0)\n    try:\n"
                                     "        register('test-from-thread')\n"
                                     "    except ValueError as exc:\n        REFUSED.append(exc)\n"
                                     "threading.Thread(target=later, daemon=True).start()\ntime.sleep(60)\n")
    assert len(load(path, timeout_s=0.3)) == 1
    time.sleep(1.5)
    assert not registered("test-from-thread")


def test_off_the_main_thread_the_limit_holds_and_late_registrations_are_refused(plugin, names):
    names += ["test-thread-early", "test-thread-late"]
    path = plugin("slow_in_thread", "import time\nregister('test-thread-early')\ntime.sleep(1.0)\n"
                                    "register('test-thread-late')\n")
    found = {}
    worker = threading.Thread(target=lambda: found.update(failures=load(path, timeout_s=0.3)))
    start = time.monotonic()
    worker.start()
    worker.join(10)
    assert time.monotonic() - start < 0.9
    assert [f.error.split(" (")[0] for f in found["failures"]] == ["did not finish importing within 0.3 s"]
    assert not registered("test-thread-early")
    time.sleep(1.2)
    assert not registered("test-thread-late")


def test_the_time_limit_comes_from_the_environment_and_is_checked():
    assert plugin_timeout({}) == 60 and plugin_timeout({TIMEOUT_VAR: "2.5"}) == 2.5
    for bad in ("soon", "0", "-1", "inf"):
        with pytest.raises(ValueError, match=rf"^{TIMEOUT_VAR}: expected .* seconds above 0, got '{bad}'"):
            plugin_timeout({TIMEOUT_VAR: bad})
    with pytest.raises(ValueError, match=r"^timeout_s: expected .* above 0, got 0"):
        load_plugins([], environ={}, entry_points=False, timeout_s=0)


# --- the three ways in ----------------------------------------------------------------------------

@pytest.fixture
def package(tmp_path, monkeypatch):
    """make(package) -> the folder of an importable package `package` holding kern.py, which
    registers `<package>-kernel` when imported and defines register_later() to register
    `<package>-later`, and nothing() to register nothing."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def make(name: str):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "__init__.py").write_text("")
        (folder / "kern.py").write_text(REGISTER + f'register("{name}-kernel")\n'
                                        f'def register_later():\n    register("{name}-later")\n'
                                        f'def nothing():\n    pass\n')
        return folder
    return make


def test_a_file_named_as_a_module_and_as_a_path_loads_once(package, names):
    names += ["pkg_once_a-kernel", "pkg_once_b-kernel"]
    first = package("pkg_once_a")
    assert load("pkg_once_a.kern", str(first / "kern.py")) == []
    second = package("pkg_once_b")
    assert load_plugins([str(second / "kern.py")], environ={plugins.ENV_VAR: "pkg_once_b.kern"},
                        entry_points=False, timeout_s=10) == []
    assert registered("pkg_once_a-kernel") and registered("pkg_once_b-kernel")


def test_an_entry_point_naming_a_function_has_it_called(package, names, monkeypatch):
    names += ["pkg_entry-kernel", "pkg_entry-later"]
    package("pkg_entry")
    points = [importlib.metadata.EntryPoint("later", "pkg_entry.kern:register_later", ENTRY_POINT_GROUP),
              importlib.metadata.EntryPoint("module", "pkg_entry.kern", ENTRY_POINT_GROUP),
              importlib.metadata.EntryPoint("empty", "pkg_entry.kern:nothing", ENTRY_POINT_GROUP)]
    monkeypatch.setattr(plugins, "_entry_points", lambda: points)
    failures = load_plugins(["pkg_entry.kern"], environ={}, timeout_s=10)
    assert registered("pkg_entry-later") and registered("pkg_entry-kernel")
    assert [f.name for f in failures] == ["entry point empty = pkg_entry.kern:nothing"]
    assert "registered no implementation" in failures[0].error


def test_what_a_plugin_prints_while_it_loads_goes_to_stderr(plugin, names, capfd):
    names += ["test-chatty"]
    path = plugin("chatty", 'import os\nprint("hello from print")\nos.write(1, b"hello from fd 1\\n")\n'
                            'register("test-chatty")\n')
    assert load(path) == []
    out, err = capfd.readouterr()
    assert "hello" not in out and "hello from print" in err and "hello from fd 1" in err


# --- whole commands, each in a process of its own -------------------------------------------------

EXITS = REGISTER + '''
import sys
from attnlab.kernels import register_kernel
register_kernel("exits-in-probe", prefill=naive.prefill, devices="cpu", dtypes="float16",
                probe=lambda device_type: sys.exit(0))
def exits(q, k, v, causal, scale):
    sys.exit(7)
register_kernel("exits-in-call", prefill=exits, devices="cpu", dtypes="float16")
'''


def attnlab(*args, env=None, cwd=None):
    environ = {k: v for k, v in os.environ.items() if k not in (plugins.ENV_VAR, TIMEOUT_VAR)}
    environ.update(OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "attnlab", *args], capture_output=True, text=True, timeout=300,
                          env=environ, cwd=cwd)


@pytest.mark.slow
def test_a_plugin_that_exits_ends_neither_kernels_nor_check(tmp_path):
    (tmp_path / "exits.py").write_text(EXITS)
    (tmp_path / "exits_at_import.py").write_text("import sys\nsys.exit(0)\n")
    modules = ["--kernel-module", str(tmp_path / "exits_at_import.py"), "--kernel-module", str(tmp_path / "exits.py")]
    listing = attnlab("kernels", "--device", "cpu", *modules, cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert "unavailable: probe failed: SystemExit: 0" in listing.stdout and "sdpa-math" in listing.stdout
    assert f"kernel module {tmp_path / 'exits_at_import.py'}: SystemExit: 0" in listing.stderr
    checked = attnlab("check", "--device", "cpu", "--kernels", "exits-in-probe,exits-in-call,sdpa-math", *modules,
                      cwd=tmp_path)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    rows = [line.split() for line in checked.stdout.splitlines()]
    assert ["FAIL", "exits-in-probe", "-", "inf"] == rows[2][:4] and "SystemExit: 0" in checked.stdout
    assert {row[0] for row in rows if row[1:2] == ["exits-in-call"]} == {"FAIL"} and "SystemExit: 7" in checked.stdout
    assert {row[0] for row in rows if row[1:2] == ["sdpa-math"]} == {"ok"}
    assert "exits-in-call, exits-in-probe wrong" in checked.stdout and "FAIL kernel module" in checked.stdout


@pytest.mark.slow
def test_a_plugin_that_hangs_is_skipped_after_the_limit_by_flag_or_environment(tmp_path):
    (tmp_path / "hangs.py").write_text(REGISTER + 'register("hangs")\nimport time\ntime.sleep(600)\n')
    (tmp_path / "mine.py").write_text(REGISTER + 'register("mine")\n')
    modules = ["--kernel-module", str(tmp_path / "hangs.py"), "--kernel-module", str(tmp_path / "mine.py")]
    for done in (attnlab("kernels", "--device", "cpu", "--plugin-timeout", "2", *modules, cwd=tmp_path),
                 attnlab("kernels", "--device", "cpu", *modules, env={TIMEOUT_VAR: "2"}, cwd=tmp_path)):
        assert done.returncode == 0, done.stderr
        assert f"kernel module {tmp_path / 'hangs.py'}: did not finish importing within 2 s" in done.stderr
        names = {line.split()[0] for line in done.stdout.splitlines()[2:] if line.strip()}
        assert "mine" in names and "hangs" not in names
    bad_flag = attnlab("kernels", "--plugin-timeout", "soon", cwd=tmp_path)
    assert bad_flag.returncode == 2 and "--plugin-timeout" in bad_flag.stderr
    bad_env = attnlab("kernels", env={TIMEOUT_VAR: "soon"}, cwd=tmp_path)
    assert bad_env.returncode == 2 and bad_env.stderr.strip().splitlines() == [
        f"attnlab kernels: error: {TIMEOUT_VAR}: expected a finite number of seconds above 0, got 'soon'"]


@pytest.mark.slow
def test_a_plugin_that_registers_auto_is_refused_and_auto_is_not_checked(tmp_path):
    (tmp_path / "auto.py").write_text(REGISTER.replace("naive.prefill", "lambda q, k, v, causal, scale: q * 0 + 7")
                                      + 'register("auto")\n')
    done = attnlab("check", "--device", "cpu", "--kernels", "auto", "--kernel-module", str(tmp_path / "auto.py"),
                   cwd=tmp_path)
    assert done.returncode == 2 and "passed" not in done.stdout
    assert "ValueError: name: 'auto' is reserved" in done.stderr
    assert "attnlab check: error: --kernels: unknown implementation 'auto'" in done.stderr
