"""Interleaved rounds: a sweep measures every point once per round, each round in its own order
from a recorded seed; a point that fails is not run again; a resume measures the rounds missing."""
from collections import Counter

import pytest
import torch

from attnlab.bench import records as rec
from attnlab.bench import sweep as sw
from attnlab.bench.workloads import Workload, point_key
from attnlab.kernels import registry
from attnlab.kernels.impls import naive

TINY = Workload("tiny", batch=1, heads=2, kv_heads=1, head_dim=16, dtype="float32", causal=True,
                seq_lens=(64, 128, 192, 256))


def _sweep(tmp_path, kernels=("naive", "sdpa-math"), **kw):
    config = sw.SweepConfig(workload=TINY, device="cpu", out=tmp_path / "run.jsonl", kernels=list(kernels),
                            point_budget_s=0.003, **kw)
    return sw.run_sweep(config)


def _order(records, round_index):
    return [(r["kernel"], r["mode"], r["seq_len"]) for r in records if r.get("round") == round_index]


def test_every_point_once_a_round_each_round_in_its_own_order(tmp_path):
    result = _sweep(tmp_path, rounds=3, order_seed=11)
    records = rec.read_records(tmp_path / "run.jsonl")
    assert Counter(point_key(r) for r in records) == Counter({key: 3 for key in {point_key(r) for r in records}})
    orders = [_order(records, i) for i in range(3)]
    assert all(sorted(o) == sorted(orders[0]) for o in orders) and len({tuple(o) for o in orders}) == 3
    assert all(r["rounds"] == 3 and r["order_seed"] == 11 for r in records)
    environment = rec.read_lines(tmp_path / "run.jsonl")[0]
    assert environment["rounds"] == 3 and environment["order_seed"] == 11
    assert result.planned == 48 and result.counts == Counter({"ok": 48})
    (tmp_path / "again").mkdir()
    again = _sweep(tmp_path / "again", rounds=3, order_seed=11)
    assert [_order(again.records, i) for i in range(3)] == orders        # the seed gives the order back


def test_one_round_keeps_the_plans_order(tmp_path):
    result = _sweep(tmp_path, rounds=1)
    lengths = [r["seq_len"] for r in result.records if r["kernel"] == "naive" and r["mode"] == "prefill"]
    assert lengths == [64, 128, 192, 256] and all(r["order_seed"] is None for r in result.records)


def test_a_point_that_fails_is_not_run_again(tmp_path):
    calls = Counter()

    def fails_past_128(q, k, v, causal, scale):
        calls[q.shape[1]] += 1
        if q.shape[1] > 128:
            raise RuntimeError("not past 128")
        return naive.prefill(q, k, v, causal, scale)

    registry.register_kernel("test-fails-past-128", prefill=fails_past_128, description="test only",
                             dtypes=(torch.float32,), devices=("cpu",))
    try:
        result = _sweep(tmp_path, kernels=["test-fails-past-128"], modes=("prefill",), rounds=3)
    finally:
        registry.unregister("test-fails-past-128")
    statuses = Counter((r["seq_len"], r["status"]) for r in result.records)
    assert statuses == Counter({(64, "ok"): 3, (128, "ok"): 3, (192, "error"): 1, (256, "error"): 1})
    assert calls[192] == calls[256] == 1


def test_a_resume_measures_only_the_rounds_missing(tmp_path):
    first = _sweep(tmp_path, rounds=2, order_seed=5)
    lines = (tmp_path / "run.jsonl").read_text().splitlines()      # as if stopped in round 1 after length 64
    kept = [line for line in lines if '"round":1,' not in line or '"seq_len":64,' in line]
    assert len(kept) < len(lines)
    (tmp_path / "run.jsonl").write_text("\n".join(kept) + "\n")
    resumed = _sweep(tmp_path, rounds=2, order_seed=5, resume=True)
    missing = {(r["kernel"], r["mode"], r["seq_len"]) for r in first.records if r["round"] == 1 and r["seq_len"] != 64}
    assert {(r["kernel"], r["mode"], r["seq_len"]) for r in resumed.records} == missing
    assert all(r["round"] == 1 for r in resumed.records) and resumed.already_done == 32 - len(missing)


def test_rounds_are_checked_by_name():
    for bad in (0, -1, 101, 2.5, True):
        with pytest.raises(ValueError, match="^rounds: "):
            sw.check_rounds(bad)
