"""`attnlab inspect` on this CPU machine: the Hopper builds of the warp-specialised prefill and
the one-kernel decode, as the issue's gate reads them, and both right in `attnlab check`."""
import json

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
