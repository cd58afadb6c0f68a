"""The Triton kernels compile for real GPUs, checked without one.

The interpreter runs kernels as Python and never meets the compiler, so a kernel that passes
on the CPU could still fail to build for a GPU. Triton compiles for a named target without a
device (compile_kernels.py), specialised as its JIT would for the llama3-8b shapes. These
tests hold the properties the kernels' speed rests on: wgmma on Hopper, loads pipelined
(TMA or cp.async), no register spills, and tiles that fit shared memory.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow     # offline compiles for two GPU targets

HOPPER_SHARED_BYTES = 227 * 1024


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("compile_kernels.py")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def hopper_16bit_prefill(compiled):
    return [r for r in compiled if r["kernel"] == "prefill" and r["capability"] == 90 and r["dtype"] != "*fp32"]


def test_prefill_uses_wgmma_on_hopper_and_mma_on_ampere(compiled):
    assert all(r["wgmma"] for r in hopper_16bit_prefill(compiled))
    ampere = [r for r in compiled if r["kernel"] == "prefill" and r["capability"] == 80]
    assert ampere and all(r["mma_sync"] and not r["wgmma"] for r in ampere)


def test_every_tuned_tile_fits_shared_memory(compiled):
    assert len([r for r in compiled if r["kernel"] == "prefill" and r["head_dim"] == 128]) >= 3
    for r in compiled:
        assert 0 < r["shared_bytes"] <= HOPPER_SHARED_BYTES, r


def test_aligned_loads_are_pipelined(compiled):
    # Loads the compiler cannot prove aligned neither vectorise nor overlap the math.
    aligned = [r for r in hopper_16bit_prefill(compiled) if r["head_dim"] % 8 == 0]
    assert {True, False} <= {r["tma"] for r in aligned}
    for r in aligned:
        assert (r["tma_copies"] > 0 and r["cp_async"] == 0) if r["tma"] else r["cp_async"] > 0, r
    split = next(r for r in compiled if r["kernel"] == "decode_split")
    assert split["cp_async"] > 0


def test_hopper_tiles_do_not_spill_registers(compiled):
    tma_tiles = [r for r in hopper_16bit_prefill(compiled) if r["tma"]]
    assert {64, 128, 256} <= {r["head_dim"] for r in tma_tiles}
    for r in tma_tiles + [r for r in compiled if r["kernel"].startswith("decode")]:
        assert r["spill_bytes"] == 0, r


def test_decode_merge_waits_on_the_split_grid(compiled):
    # Programmatic dependent launch: the split lets the merge launch early, and the merge
    # waits for the split's results before it reads them.
    split = next(r for r in compiled if r["kernel"] == "decode_split")
    merge = next(r for r in compiled if r["kernel"] == "decode_merge")
    assert split["griddepcontrol"] and merge["griddepcontrol"] and merge["launch_pdl"]
