"""Kernels from outside attnlab: one file that calls register_kernel, brought in by
--kernel-module, ATTNLAB_KERNEL_MODULES or an installed package's entry point, and held to
the same checks as the in-tree kernels. Each command runs in its own process, as a user's
would: loading a plugin registers it for the life of the process."""
import json
import os
import subprocess
import sys

import pytest
import torch

from attnlab.kernels import registry
from attnlab.kernels.plugins import ENV_VAR, load_plugins
from attnlab.models import AttentionMemory
from paths import ROOT

pytestmark = pytest.mark.slow     # each command in a process of its own

EXAMPLE = ROOT / "examples" / "chunked_attention.py"

WRONG = '''
from attnlab.kernels import register_kernel
register_kernel("off-by-a-bit", prefill=lambda q, k, v, causal, scale: q * 1.01,
                devices=("cpu",), dtypes=("float16", "float32"))
'''
BROKEN = 'raise RuntimeError("this plugin cannot load")\n'


def attnlab(*args, env=None, cwd=None):
    environ = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    environ.pop(ENV_VAR, None) if not env or ENV_VAR not in env else None
    return subprocess.run([sys.executable, "-m", "attnlab", *args], capture_output=True, text=True,
                          timeout=300, env=environ, cwd=cwd)


@pytest.fixture
def outside(tmp_path):
    """A folder outside the repository holding the example plugin, a wrong one and a broken one."""
    (tmp_path / "mine.py").write_text(EXAMPLE.read_text())
    (tmp_path / "wrong.py").write_text(WRONG)
    (tmp_path / "broken.py").write_text(BROKEN)
    return tmp_path


def listed(output: str) -> dict:
    """name -> the rest of its row in `attnlab kernels`."""
    return {line.split()[0]: line for line in output.splitlines()[2:] if line.strip() and not line.startswith("not ")}


def test_a_plugin_is_listed_by_flag_and_by_environment(outside):
    by_flag = attnlab("kernels", "--device", "cpu", "--kernel-module", str(outside / "mine.py"), cwd=outside)
    by_env = attnlab("kernels", "--device", "cpu", env={ENV_VAR: str(outside / "mine.py")}, cwd=outside)
    for done in (by_flag, by_env):
        assert done.returncode == 0, done.stderr
        row = listed(done.stdout)["torch-chunked"]
        assert str(outside / "mine.py") in row and row.rstrip().endswith("available")
        assert "naive" in listed(done.stdout)
    assert "torch-chunked" not in listed(attnlab("kernels", "--device", "cpu", cwd=outside).stdout)


def test_check_passes_a_right_plugin_and_fails_a_wrong_one_by_name(outside):
    right = attnlab("check", "--device", "cpu", "--kernel-module", str(outside / "mine.py"),
                    "--kernels", "torch-chunked", cwd=outside)
    assert right.returncode == 0, right.stdout + right.stderr
    rows = [line for line in right.stdout.splitlines() if "torch-chunked" in line]
    assert len(rows) == 8 and "0 failed" in right.stdout      # 5 forward cases, 3 gradient cases
    assert sum("backward" in row for row in rows) == 3
    wrong = attnlab("check", "--device", "cpu", "--dtype", "float32", "--kernel-module", str(outside / "wrong.py"),
                    "--kernels", "off-by-a-bit,sdpa-math", cwd=outside)
    assert wrong.returncode == 1
    assert "off-by-a-bit wrong" in wrong.stdout.splitlines()[-1]
    rows = [line.split() for line in wrong.stdout.splitlines()[2:-1]]
    assert {row[0] for row in rows if row[1] == "off-by-a-bit"} == {"FAIL"}
    assert {row[0] for row in rows if row[1] == "sdpa-math"} == {"ok"}


def test_a_plugin_that_fails_to_import_is_named_and_the_rest_still_run(outside):
    modules = ["--kernel-module", str(outside / "broken.py"), "--kernel-module", str(outside / "mine.py")]
    listing = attnlab("kernels", "--device", "cpu", *modules, cwd=outside)
    assert listing.returncode == 0 and "torch-chunked" in listed(listing.stdout)
    assert f"kernel module {outside / 'broken.py'}: RuntimeError: this plugin cannot load" in listing.stderr
    checked = attnlab("check", "--device", "cpu", "--kernels", "torch-chunked", *modules, cwd=outside)
    assert checked.returncode == 1 and "FAIL kernel module" in checked.stdout and "0 failed" in checked.stdout


def test_a_plugin_is_swept_like_any_kernel(outside):
    out = outside / "run.jsonl"
    done = attnlab("sweep", "--kernel-module", str(outside / "mine.py"), "--kernels", "torch-chunked",
                   "--workload", "cpu-small", "--device", "cpu", "--seq-lens", "256", "--out", str(out), cwd=outside)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    swept = [r for r in records if r.get("kernel") == "torch-chunked"]
    assert {(r["mode"], r["status"]) for r in swept} == {("prefill", "ok"), ("decode", "ok")}
    # its declared memory reaches the sweep's prediction: an fp32 score matrix on top of the inputs
    prefill = next(r for r in swept if r["mode"] == "prefill")
    assert prefill["predicted_mem_bytes"] >= 8 * 256 * 256 * 4


def test_an_installed_package_is_found_by_its_entry_point(tmp_path):
    package = tmp_path / "site"
    (package / "my_kernels").mkdir(parents=True)
    (package / "my_kernels" / "__init__.py").write_text(EXAMPLE.read_text())
    info = package / "my_kernels-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-kernels\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[attnlab.kernels]\nchunked = my_kernels\n")
    done = attnlab("kernels", "--device", "cpu", env={"PYTHONPATH": f"{package}{os.pathsep}{ROOT}"}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "torch-chunked" in listed(done.stdout)


def test_a_plugin_named_twice_loads_once(outside, monkeypatch):
    name = str(outside / "twice.py")
    (outside / "twice.py").write_text(EXAMPLE.read_text().replace('"torch-chunked"', '"torch-chunked-twice"'))
    try:
        failures = load_plugins([name, name], environ={ENV_VAR: name}, entry_points=False)
        assert failures == [] and registry.get("torch-chunked-twice").origin == str(outside / "twice.py")
    finally:
        registry.unregister("torch-chunked-twice")


@pytest.mark.parametrize("argument,fields,message", [
    ("name", dict(name="a,b"), "without commas"),
    ("prefill", dict(prefill=None), "neither prefill nor decode"),
    ("prefill", dict(prefill="attention"), "expected a callable"),
    ("devices", dict(devices=()), "device types"),
    ("dtypes", dict(dtypes=("float17",)), "torch dtypes or their names"),
    ("head_dims", dict(head_dims="64"), "a range, sizes"),
    ("speed_rank", dict(speed_rank="fast"), "a number"),
    ("memory", dict(memory=3), "AttentionMemory"),
    ("name", dict(name="naive"), "in-tree kernel"),
    ("name", dict(name="auto"), "reserved"),
])
def test_register_kernel_names_the_bad_argument(argument, fields, message):
    call = dict(name="test-bad", prefill=lambda *args: args[0], devices=("cpu",), dtypes=(torch.float32,))
    call.update(fields)
    try:
        with pytest.raises(ValueError, match=rf"^{argument}: .*{message}"):
            registry.register_kernel(call.pop("name"), **call)
    finally:
        registry.unregister("test-bad")


def test_register_kernel_fills_what_the_lab_reads_from_its_declarations():
    try:
        impl = registry.register_kernel("test-declared", decode=lambda *args: args[0], devices="cpu",
                                        dtypes="float32", head_dims=range(16, 129, 16), speed_rank=7,
                                        memory=AttentionMemory(expands_kv=True), baseline=True)
        assert impl.modes == ("decode",) and impl.speed_rank == {"cpu": 7} and impl.baseline
        assert impl.head_dims(64) and not impl.head_dims(72) and impl.head_dims_text == "16 to 128 in steps of 16"
        assert impl.attention_memory("cpu").expands_kv and impl.origin == __file__
        assert impl.available("cpu") and not impl.available("cuda")
    finally:
        registry.unregister("test-declared")
