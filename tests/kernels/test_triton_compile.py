"""The Triton kernels compile for real GPUs, checked without one.

The interpreter runs kernels as Python and never meets the compiler, so a kernel that passes
on the CPU could still fail to build for a GPU. Triton compiles for a named target without a
device (kernels/inspect.py, what `attnlab inspect` runs), specialised as its JIT would for the
llama3-8b shapes, from the builds each implementation declares. These
tests hold the properties the kernels' speed rests on: wgmma on Hopper, loads pipelined
(TMA or cp.async), no register spills, and tiles that fit shared memory.
"""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow     # offline compiles for two GPU targets

HOPPER_SHARED_BYTES = 227 * 1024


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "attnlab.kernels.inspect", "--arch=90", "--arch=80",
               "--kernels=triton,triton-decode"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return [dict(r, capability=r["arch"], dtype="*" + r.get("dtype", "bf16")) for r in json.loads(done.stdout)]


def hopper_16bit_prefill(compiled):
    return [r for r in compiled if r["kernel"] == "prefill" and r["capability"] == 90 and r["dtype"] != "*fp32"]


def test_prefill_uses_wgmma_on_hopper_and_mma_on_ampere(compiled):
    assert all(r["wgmma"] for r in hopper_16bit_prefill(compiled))
    ampere = [r for r in compiled if r["kernel"] == "prefill" and r["capability"] == 80 and r["dtype"] != "*fp32"]
    assert ampere and all(r["mma_sync"] and not r["wgmma"] for r in ampere)   # fp32 stays on FMA units: true fp32


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
    splits = [r for r in compiled if r["kernel"].startswith("decode_split")]
    assert {(0, "bfloat16"), (16, "bfloat16"), (64, "bfloat16"), (64, "float8_e4m3fn"), (64, "float8_e5m2")} <= {
        (r["page_size"], r["kv_dtype"]) for r in splits}       # e5m2 on Ampere, which cannot convert e4m3
    for r in splits:      # paged and FP8 caches too: a tile's loads overlap the math on the tile before
        assert r["cp_async"] > 0, r


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
