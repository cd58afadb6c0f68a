"""`attnlab inspect` on this CPU machine: the Hopper builds of the warp-specialised prefill and
the one-kernel decode, and both right in `attnlab check`; stdout that carries JSON alone, and a
--json file that replaces only what attnlab wrote."""
import json
import os
import subprocess
import sys

import pytest

from attnlab.cli import main

pytestmark = pytest.mark.slow     # compiles for sm_90a in a process of its own


def test_hopper_builds_show_a_partitioned_prefill_and_a_one_kernel_decode(tmp_path, capsys):
    out = tmp_path / "inspect.json"
    assert main(["inspect", "--arch", "90", "--kernels", "triton-ws,triton-decode-fused", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    ws = [r for r in rows if r["implementation"] == "triton-ws"]
    assert ws and all(r["warp_specialized"] and r["wgmma"] and r["spill_bytes"] == 0 for r in ws)
    assert all(r["warps"] == 12 and 40 in r["setmaxnreg"] and r["shared_bytes"] <= 227 * 1024 for r in ws)
    fused = [r for r in rows if r["implementation"] == "triton-decode-fused"]
    assert fused and all(r["kernels_per_call"] == 1 and r["spill_bytes"] == 0 for r in fused)
    assert "prefill_ws" in capsys.readouterr().out
    assert main(["check", "--device", "cpu", "--kernels", "triton-ws,triton-decode-fused"]) == 0


def test_an_unknown_kernel_is_named(capsys):
    assert main(["inspect", "--kernels", "nope"]) == 2
    assert "--kernels" in capsys.readouterr().err


CHATTY = '''
import os
from attnlab.kernels import register_kernel
from attnlab.kernels.impls import naive
print("a plugin's greeting")
os.write(1, b"a plugin's greeting below Python\\n")
def builds(capability):
    print("building")
    return []
register_kernel("chatty", prefill=naive.prefill, devices="cpu", dtypes="float32", builds=builds)
'''


def attnlab(*args, cwd):
    environ = {k: v for k, v in os.environ.items() if k not in ("ATTNLAB_KERNEL_MODULES", "ATTNLAB_PLUGIN_TIMEOUT")}
    return subprocess.run([sys.executable, "-m", "attnlab", *args], capture_output=True, text=True, timeout=300,
                          env=dict(environ, OMP_NUM_THREADS="1"), cwd=cwd)


def test_a_plugin_that_prints_leaves_the_json_on_stdout_alone(tmp_path):
    (tmp_path / "chatty.py").write_text(CHATTY)
    done = attnlab("inspect", "--kernel-module", str(tmp_path / "chatty.py"), "--kernels", "chatty", "--json", "-",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [] and "greeting" in done.stderr


def test_json_replaces_only_a_file_attnlab_wrote_unless_forced(tmp_path, capsys):
    measured = tmp_path / "run.jsonl"
    measured.write_text('{"kernel": "triton", "median_ms": 1.0}\n')
    assert main(["inspect", "--kernels", "naive", "--json", str(measured)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("attnlab inspect: error: --json: ")
    assert "attnlab did not write it" in err and "--force" in err
    assert measured.read_text() == '{"kernel": "triton", "median_ms": 1.0}\n'
    assert main(["inspect", "--kernels", "naive", "--json", str(measured), "--force"]) == 1   # naive builds nothing
    assert json.loads(measured.read_text()) == []
    assert main(["inspect", "--kernels", "naive", "--json", str(measured)]) == 1               # attnlab's own now
