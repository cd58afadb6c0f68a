"""The sampled-row check behind every point timed: right outputs pass, and each way of being
wrong (past some length, NaN from past the cache, an ignored option, not a tensor, the wrong
dtype, shape or device) fails with the reason. The rows' reference is held to the full float64
reference written pair by pair (reference.py)."""
import pytest
import torch

import attnlab.kernels as K
from attnlab.kernels import rowcheck
from attnlab.kernels.rowcheck import check_decode, check_prefill, check_varlen, sample_rows
from reference import contract_impls, decode_mask, random_qkv, reference, visible_keys


def test_rows_sampled_are_the_ends_tile_edges_and_random_ones():
    rows = sample_rows(1000, seed=3)
    assert rows == sorted(set(rows)) and rows[0] == 0 and rows[-1] == 999
    assert {63, 64, 127, 128} <= set(rows)
    assert len(sample_rows(131072)) <= 2 + 2 * rowcheck.EDGES + rowcheck.RANDOM_ROWS
    assert sample_rows(1000, seed=3) == rows and sample_rows(1000, seed=4) != rows
    assert sample_rows(1) == [0] and sample_rows(0) == [] and sample_rows(rowcheck.ALL_ROWS) == list(range(256))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("causal,window,softcap", [(True, (-1, -1), 0.0), (False, (40, 7), 0.0), (True, (-1, -1), 3.0)])
def test_a_right_output_passes(dtype, causal, window, softcap):
    q, k, v = random_qkv(2, 300, 333, 4, 2, 32, dtype)
    out = K.attention(q, k, v, causal=causal, window=window, softcap=softcap, impl="naive")
    verdict = check_prefill(out, q, k, v, causal=causal, scale=32 ** -0.5, window=window, softcap=softcap)
    assert verdict.ok, verdict.describe()
    assert verdict.rows > 2 * 10


def test_the_rows_error_is_the_full_references_on_those_rows():
    q, k, v = random_qkv(1, 200, 200, 2, 1, 16, torch.float16)
    out = K.attention(q, k, v, causal=True, impl="naive")
    ref = reference(q, k, v, visible_keys(200, 200, True)[None])
    rows = sample_rows(200)
    expected = (out[:, rows].double() - ref[:, rows]).abs().max().item()
    assert check_prefill(out, q, k, v, causal=True, scale=0.25).error == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_a_bug_past_a_length_fails():
    # Causal off by one key for queries past 256: right on every short shape, wrong at 600.
    q, k, v = random_qkv(1, 600, 600, 2, 2, 32, torch.float32)
    out = K.attention(q, k, v, causal=True, impl="naive")
    shifted = K.attention(q[:, 256:], k[:, :-1], v[:, :-1], causal=True, impl="naive")
    out[:, 257:] = shifted[:, 1:]
    verdict = check_prefill(out, q, k, v, causal=True, scale=32 ** -0.5)
    assert not verdict.ok and verdict.error > 100 * verdict.bound


def test_an_ignored_option_fails():
    q, k, v = random_qkv(1, 100, 100, 2, 2, 32, torch.float32)
    out = K.attention(q, k, v, causal=True, impl="naive")        # the window (8, -1) left out
    assert not check_prefill(out, q, k, v, causal=True, scale=32 ** -0.5, window=(8, -1)).ok
    capped_out = K.attention(q * 4, k, v, causal=True, impl="naive")  # the cap left out
    assert not check_prefill(capped_out, q * 4, k, v, causal=True, scale=32 ** -0.5, softcap=1.0).ok


@pytest.mark.parametrize("out,reason", [
    (None, "returned NoneType, not a tensor"),
    (torch.zeros(1, 50, 2, 16, dtype=torch.float64), "returned dtype torch.float64, expected torch.float32"),
    (torch.zeros(1, 50, 2, 8), "returned shape (1, 50, 2, 8), expected (1, 50, 2, 16)"),
    (torch.zeros(1, 50, 2, 16, device="meta"), "returned device meta, expected cpu"),
])
def test_what_is_not_an_answer_says_why(out, reason):
    q, k, v = random_qkv(1, 50, 50, 2, 2, 16, torch.float32)
    verdict = check_prefill(out, q, k, v, causal=False, scale=0.25)
    assert not verdict.ok and verdict.describe() == reason


def test_decode_past_the_cache_may_hold_nan_and_leaking_it_fails():
    q, k, v = random_qkv(3, 2, 80, 4, 2, 16, torch.float32)
    lens = torch.tensor([80, 33, 2], dtype=torch.int32)
    for t in (k, v):
        for b, n in enumerate(lens.tolist()):
            t[b, n:] = float("nan")
    out = K.decode_attention(q, k, v, lens, impl="naive")
    assert check_decode(out, q, k, v, lens, scale=0.25).ok
    ref = reference(q, k.nan_to_num(0.0), v.nan_to_num(0.0), decode_mask(lens, 2, 80), scale=0.25)
    assert check_decode(out, q, k, v, lens, scale=0.25).error == pytest.approx((out.double() - ref).abs().max().item(),
                                                                                abs=1e-12)
    leaked = out.clone()
    leaked[1, 0, 0, 0] = float("nan")
    assert check_decode(leaked, q, k, v, lens, scale=0.25).error == float("inf")


def test_decode_with_a_window_and_softcap():
    q, k, v = random_qkv(2, 3, 64, 4, 1, 16, torch.float32)
    lens = torch.tensor([64, 20], dtype=torch.int32)
    out = K.decode_attention(q, k, v, lens, window=(5, -1), softcap=2.0, impl="naive")
    assert check_decode(out, q, k, v, lens, scale=0.25, window=(5, -1), softcap=2.0).ok
    assert not check_decode(out, q, k, v, lens, scale=0.25, softcap=2.0).ok


def test_varlen_rows_of_each_packed_sequence():
    gen = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 70, 70, 200], dtype=torch.int32)
    q, k, v = (torch.randn(200, h, 16, generator=gen) for h in (4, 2, 2))
    out = K.attention_varlen(q, k, v, cu, cu, 130, 130, causal=True, impl="naive")
    assert check_varlen(out, q, k, v, cu, cu, causal=True, scale=0.25).ok
    crossed = K.attention(q[None], k[None], v[None], causal=True, impl="naive")[0]   # one sequence, not three
    assert not check_varlen(crossed, q, k, v, cu, cu, causal=True, scale=0.25).ok


def test_a_long_batch_is_checked_a_few_heads_at_a_time(monkeypatch):
    monkeypatch.setattr(rowcheck, "SCORES_BUDGET", 4096)
    q, k, v = random_qkv(3, 128, 512, 8, 2, 16, torch.float32)
    out = K.attention(q, k, v, causal=True, impl="naive")
    assert check_prefill(out, q, k, v, causal=True, scale=0.25).ok
    out[2, 127, 7] += 1.0       # the last row of the last sequence's last head
    assert check_prefill(out, q, k, v, causal=True, scale=0.25).error == pytest.approx(1.0, rel=1e-3)


@pytest.mark.parametrize("impl", contract_impls("prefill"))
def test_every_prefill_passes_at_several_tiles(impl):
    q, k, v = random_qkv(1, 300, 333, 4, 2, 32, torch.float16)
    out = K.attention(q, k, v, causal=True, impl=impl)
    verdict = check_prefill(out, q, k, v, causal=True, scale=32 ** -0.5)
    assert verdict.ok, f"{impl}: {verdict.describe()}"


@pytest.mark.parametrize("impl", contract_impls("decode"))
def test_every_decode_passes_over_garbage_past_the_cache(impl):
    q, k, v = random_qkv(3, 2, 300, 4, 2, 32, torch.float16)
    lens = torch.tensor([300, 131, 0], dtype=torch.int32)
    for t in (k, v):
        for b, n in enumerate(lens.tolist()):
            t[b, n:] = float("nan")
    verdict = check_decode(K.decode_attention(q, k, v, lens, impl=impl), q, k, v, lens, scale=32 ** -0.5)
    assert verdict.ok, f"{impl}: {verdict.describe()}"
