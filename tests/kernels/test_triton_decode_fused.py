"""triton-decode-fused, the split-KV decode whose last split of each group merges it, against a
float64 reference with FlashAttention's criterion: at most twice naive's error in the same dtype.

On a CPU the kernel runs in Triton's interpreter (tiles of 32), one program after another, so
the last program to arrive is the last split launched; the shapes stay small but cross several
tiles and splits. The offline Hopper build is checked in a subprocess without the interpreter.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import attnlab.kernels as K
from attnlab.kernels import triton_decode_fused as fused
from reference import assert_close_as_naive, decode_mask, random_qkv, reference

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
LENGTHS = [0, 3, 40, 97, 130]      # empty, under a tile, several tiles, ragged, the whole cache


def check(lengths, max_seqlen, q_len, heads=4, kv_heads=2, head_dim=32, dtype=FP16, num_splits=None,
          window=(-1, -1), softcap=0.0, spread=1, api=False):
    """api: through the public API as triton-decode-fused; else the launcher with `num_splits`."""
    q, k, v = random_qkv(len(lengths), q_len, max_seqlen, heads, kv_heads, head_dim, dtype)
    q = q if spread == 1 else (q.float() * spread).to(dtype)
    lens = torch.tensor(lengths, dtype=torch.int32)
    options = dict(window=window, softcap=softcap)
    if api:
        out = K.decode_attention(q, k, v, lens, impl="triton-decode-fused", **options)
    else:
        out = fused.decode(q, k, v, lens, head_dim ** -0.5, num_splits=num_splits, **options)
    naive = K.decode_attention(q, k, v, lens, impl="naive", **options)
    mask = decode_mask(lens, q_len, max_seqlen, window)
    ref = reference(q, k, v, mask, head_dim ** -0.5, softcap)
    what = f"fused decode lens {lengths} q_len {q_len} {heads}/{kv_heads} heads window={window} " \
           f"softcap={softcap} splits={num_splits} {dtype}"
    assert_close_as_naive(out, naive, ref, what)
    blind = ~mask.any(-1)
    assert torch.equal(out[blind], torch.zeros_like(out[blind])), f"{what}: a row that sees no key is not 0"


@pytest.mark.parametrize("num_splits", [1, 3, 7, None])
@pytest.mark.parametrize("q_len", [1, 3, 16])
def test_ragged_lengths_over_split_counts(q_len, num_splits):
    # 7 splits of 130 keys leave the last splits empty for short sequences: lse -inf, weight 0.
    check(LENGTHS, 130, q_len, num_splits=num_splits)


@pytest.mark.parametrize("heads,kv_heads,head_dim,dtype", [
    (8, 2, 64, FP32),       # GQA, 4 query heads per kv head
    (8, 1, 32, FP16),       # MQA: one group of 8 x q_len rows
    (2, 2, 48, FP16),       # MHA, a head_dim padded to 64
    (4, 2, 32, BF16),       # bf16 (fp32 dot operands in the interpreter)
])
def test_heads_and_dtypes(heads, kv_heads, head_dim, dtype):
    check([130, 0, 57], 130, 3, heads, kv_heads, head_dim, dtype, num_splits=3)


def test_sixteen_queries_of_mqa_fill_two_row_blocks():
    # 8 heads x 16 positions = 128 rows: two 64-row blocks, each with its own counter.
    check([64, 17, 0], 64, 16, heads=8, kv_heads=1, dtype=FP32, num_splits=3)


@pytest.mark.parametrize("window,softcap,num_splits,dtype", [
    ((31, -1), 0.0, 1, FP16),
    ((31, 0), 0.0, 3, FP32),
    ((0, -1), 0.0, 7, FP16),            # each row its own key alone
    ((200, -1), 0.0, None, FP32),       # larger than the cache: plain decode
    ((-1, -1), 5.0, 3, FP32),
    ((45, -1), 2.0, 7, FP16),
    ((45, -1), 30.0, None, FP16),
])
def test_windows_and_softcap(window, softcap, num_splits, dtype):
    check(LENGTHS, 130, 2, dtype=dtype, num_splits=num_splits, window=window, softcap=softcap, spread=8)


@pytest.mark.parametrize("window,softcap", [((-1, -1), 0.0), ((20, -1), 3.0)])
def test_through_the_public_api(window, softcap):
    check([0, 77, 130], 130, 3, window=window, softcap=softcap, api=True)


def test_a_call_repeated_on_the_same_counters_gives_the_same_answer_and_leaves_them_at_zero():
    q, k, v = random_qkv(3, 2, 130, 8, 2, 32, FP16)
    lens = torch.tensor([130, 0, 61], dtype=torch.int32)
    counters = torch.zeros(3 * 2, dtype=torch.int32)
    first = fused.decode(q, k, v, lens, 32 ** -0.5, num_splits=5, counters=counters)
    assert torch.equal(counters, torch.zeros_like(counters))
    second = fused.decode(q, k, v, lens, 32 ** -0.5, num_splits=5, counters=counters)
    assert torch.equal(first, second)
    assert torch.equal(first, fused.decode(q, k, v, lens, 32 ** -0.5, num_splits=5))


def test_counters_that_cannot_serve_the_call_are_refused():
    q, k, v = random_qkv(2, 1, 64, 4, 2, 32, FP32)
    lens = torch.tensor([64, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="counters"):
        fused.decode(q, k, v, lens, 1.0, counters=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="counters"):
        fused.decode(q, k, v, lens, 1.0, counters=torch.zeros(4, dtype=torch.int64))


@pytest.mark.parametrize("window", [(-1, -1), (20, -1)])
def test_nan_in_the_cache_past_each_length_does_not_leak(window):
    q, k, v = random_qkv(3, 3, 160, 4, 2, 32, FP32)
    lens = torch.tensor([150, 0, 100], dtype=torch.int32)
    run = lambda k, v: fused.decode(q, k, v, lens, 32 ** -0.5, num_splits=3, window=window)
    clean = run(k, v)
    k, v = k.clone(), v.clone()
    for b, n in enumerate(lens.tolist()):
        for t in (k, v):
            t[b, n:] = float("nan")
    out = run(k, v)
    assert not torch.isnan(out).any()
    assert torch.equal(out, clean)


def test_the_split_count_trades_filling_the_gpu_against_the_merge(monkeypatch):
    monkeypatch.setattr(fused, "triton_interpreting", lambda: False)
    monkeypatch.setattr(fused, "sm_count", lambda index: 132)
    h100 = torch.device("cuda", 0)
    # llama3-8b, batch 1, 32k cache: 8 groups, 264 programs for two waves of 132 SMs.
    assert fused.choose_splits(8, 32768, 64, h100) == 33
    assert fused.choose_splits(512, 32768, 64, h100) == 1          # batch 64 fills the GPU alone
    assert fused.choose_splits(8, 512, 64, h100) == 2              # each split reads 4 tiles at least
    assert fused.choose_splits(1, 1 << 20, 64, h100) == fused.MAX_SPLITS
    assert fused.choose_splits(8, 32768, 64, torch.device("cpu")) == 1
    assert fused.choose_splits(1, 32768, 64, torch.device("cpu")) == 4


@pytest.mark.slow
def test_hopper_builds_are_one_kernel_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "attnlab.kernels.inspect", "--arch=90", "--kernels=triton-decode-fused"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout)
    assert [(r["page_size"], r["kv_dtype"]) for r in rows] == [(0, "bfloat16"), (64, "float8_e4m3fn")]
    for row in rows:
        assert row["implementation"] == "triton-decode-fused" and row["kernels_per_call"] == 1
        assert row["spill_bytes"] == 0 and row["cp_async"] > 0, row
        assert 0 < row["shared_bytes"] <= 227 * 1024, row
