"""The ring attention model against hand-computed cases, brute force over its own step times,
the causal pairs counted one by one, and the CSV its chart writes."""
import csv
import math
import subprocess
import sys

import pytest

from attnlab.analysis import ring
from attnlab.models import preset

LLAMA = preset("llama3-8b")      # heads 32, kv_heads 8, head_dim 128


def test_step_times_by_hand():
    # 1024 tokens per device: 4 x 32 x 1024^2 x 128 FLOPs at 700 TFLOP/s; 2 x 1024 x 8 x 128 x 2 bytes at 450 GB/s.
    (compute_s, transfer_s), *_, last = ring.step_times("llama3-8b", 8192, 8, 700, 450)
    assert compute_s == pytest.approx(17_179_869_184 / 700e12)
    assert transfer_s == pytest.approx(4_194_304 / 450e9)
    assert last == (pytest.approx(compute_s), 0.0)       # the last step sends nothing
    assert ring.block_bytes(LLAMA, 1024) == 4 * 2**20


def test_hiding_threshold_closed_form():
    # K = kv_heads x bytes x rate / (2 x heads x bandwidth) = 8 x 2 x 400e12 / (2 x 32 x 1000e9) = 100 exactly.
    assert ring.hiding_constant(LLAMA, 400, 1000) == pytest.approx(100)
    assert ring.min_tokens_per_device(LLAMA, 400, 1000) == 100
    assert ring.min_tokens_per_device(LLAMA, 400, 1000, causal=True) == 199               # 2K - 1: the diagonal
    assert ring.min_tokens_per_device(LLAMA, 400, 1000, causal=True, layout="zigzag") == 200   # 2K: half blocks
    assert ring.min_tokens_per_device(LLAMA, 400, 1000, world=1) == 0
    # llama3-8b at 700 TFLOP/s: K = 11200 / 28.8 = 388.9 on NVLink (450 GB/s), 2734.4 on PCIe Gen5 (64 GB/s).
    assert ring.hiding_constant(LLAMA, 700, 450) == pytest.approx(11200 / 28.8)
    assert ring.min_tokens_per_device(LLAMA, 700, 450) == 389
    assert ring.min_tokens_per_device(LLAMA, 700, 64, causal=True, layout="zigzag") == 5470   # ceil(5468.75), even


def _brute_force_min_tokens(model, tflops, gbps, world, causal, layout):
    step = 2 if layout == "zigzag" else 1
    for n in range(step, 100_000, step):
        times = ring.step_times(model, n * world, world, tflops, gbps, causal=causal, layout=layout)
        if all(c >= t * (1 - 1e-12) for c, t in times):
            return n
    raise AssertionError("no threshold below 100k tokens")


@pytest.mark.parametrize("causal, layout", [(False, "contiguous"), (True, "contiguous"), (True, "zigzag")])
@pytest.mark.parametrize("world", [2, 3, 8])
@pytest.mark.parametrize("tflops, gbps", [(700, 450), (700, 64), (400, 1000), (50, 900)])
def test_min_tokens_is_the_first_length_whose_steps_hide(tflops, gbps, world, causal, layout):
    expected = _brute_force_min_tokens(LLAMA, tflops, gbps, world, causal, layout)
    assert ring.min_tokens_per_device(LLAMA, tflops, gbps, world=world, causal=causal, layout=layout) == expected


def _positions(rank, world, n, layout):
    """Global positions of a rank's n tokens, written out from the layouts' definitions."""
    if layout == "contiguous":
        return list(range(rank * n, (rank + 1) * n))
    chunk = n // 2
    return [c * chunk + i for c in (rank, 2 * world - 1 - rank) for i in range(chunk)]


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world, n", [(2, 6), (3, 4), (4, 10)])
def test_step_pairs_count_the_busiest_device(layout, world, n):
    per_step = []
    total = 0
    for step in range(world):
        counts = []
        for rank in range(world):
            queries, keys = _positions(rank, world, n, layout), _positions((rank - step) % world, world, n, layout)
            counts.append(sum(k <= q for q in queries for k in keys))
        per_step.append(max(counts))
        total += sum(counts)
    assert ring.step_pairs(n, world, causal=True, layout=layout) == per_step
    assert total == world * n * (world * n + 1) // 2
    assert ring.step_pairs(n, world, layout=layout) == [n * n] * world


@pytest.mark.parametrize("call, message", [
    (lambda: ring.step_pairs(7, 4, True, "zigzag"), "^tokens_per_device: the zigzag layout holds two"),
    (lambda: ring.step_pairs(8, 4, True, "striped"), "^layout: expected one of contiguous, zigzag, got 'striped'"),
    (lambda: ring.step_times(LLAMA, 100, 8, 700, 450), r"^seq_len: expected a multiple of world \(8\), got 100"),
    (lambda: ring.min_tokens_per_device(LLAMA, 0, 450), "^tflops: expected a finite number > 0, got 0"),
    (lambda: ring.hiding_constant(LLAMA, 700, -1), "^gbps: expected a finite number > 0, got -1"),
    (lambda: ring.hiding_constant("llama-9", 700, 450), "^preset: unknown model preset 'llama-9'"),
])
def test_errors_name_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_model_is_torch_free():
    code = "import sys, attnlab.analysis.ring; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0


def test_chart_csv_holds_what_it_draws(tmp_path):
    pytest.importorskip("seaborn")
    from attnlab.analysis import charts
    files = charts.save(ring.ring_chart(ring.step_table()), tmp_path / "ring", ("png",))
    assert files["png"].stat().st_size > 10_000
    rows = list(csv.DictReader(files["csv"].open()))
    assert len(rows) == 9 * 4 and {r["chart"] for r in rows} == {"ring"}
    at_1m = {r["series"]: r for r in rows if r["seq_len"] == str(2**20)}
    nvlink, pcie = at_1m["transfer: NVLink H100"], at_1m["transfer: PCIe Gen5 x16"]
    assert float(nvlink["y"]) == pytest.approx(ring.block_bytes(LLAMA, 2**17) / 450e9 * 1e3)   # ms
    assert float(pcie["y"]) / float(nvlink["y"]) == pytest.approx(450 / 64)
    full, half = float(at_1m["compute: full block"]["y"]), float(at_1m["compute: half block (causal zigzag)"]["y"])
    assert full == pytest.approx(4 * 32 * 2**34 * 128 / 700e12 * 1e3) and half == pytest.approx(full / 2)
    assert (int(nvlink["hides_full_from"]), int(pcie["hides_zigzag_from"])) == (8 * 389, 8 * 5470)
    assert int(nvlink["tokens_per_device"]) == 2**17 and not math.isnan(float(nvlink["gbps"]))
