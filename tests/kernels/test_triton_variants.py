"""attnlab's Triton kernels with windows, softcap and packed sequences, against a float64
reference, held to FlashAttention's criterion: at most twice naive's error in the same dtype.

On a CPU the kernels run in Triton's interpreter (tiles of 32), so shapes stay small but cross
several tiles; bf16 runs there with fp32 dot operands (triton_tiles.upcast_dot). The band
tests count the K/V tiles each program's loop covers, with no kernel run at all.
"""
import itertools

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import example, given, settings
from hypothesis import strategies as st

import attnlab.kernels as K
from attnlab.kernels import triton_decode, triton_prefill, triton_tiles
from reference import (assert_close_as_naive, decode_mask, random_qkv, reference, reference_varlen,
                       visible_keys)

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
TRITON_IMPLS = ("triton", "triton-ptr", "triton-decode", "triton-decode-nopdl")


def spread_out(q, spread):
    """q scaled so that scores spread `spread` times wider (a softcap then bites)."""
    return q if spread == 1 else (q.float() * spread).to(q.dtype)


def check_prefill(seqlen_q, seqlen_k, causal, window, softcap=0.0, dtype=FP16, heads=2, kv_heads=1, head_dim=32,
                  tma=None, spread=1, seed=0):
    """tma None: through the public API as "triton"; True or False: the kernel's launcher on that load path."""
    q, k, v = random_qkv(1, seqlen_q, seqlen_k, heads, kv_heads, head_dim, dtype, seed=seed)
    q = spread_out(q, spread)
    options = dict(window=window, softcap=softcap)
    if tma is None:
        out = K.attention(q, k, v, causal=causal, impl="triton", **options)
    else:
        out = triton_prefill.attention(q, k, v, causal, head_dim ** -0.5, tma=tma, **options)
    naive = K.attention(q, k, v, causal=causal, impl="naive", **options)
    mask = visible_keys(seqlen_q, seqlen_k, causal, window)
    ref = reference(q, k, v, mask[None], head_dim ** -0.5, softcap)
    what = f"prefill {seqlen_q}x{seqlen_k} causal={causal} window={window} softcap={softcap} {dtype} tma={tma}"
    assert_close_as_naive(out, naive, ref, what)
    blind = ~mask.any(-1)
    assert torch.equal(out[:, blind], torch.zeros_like(out[:, blind])), f"{what}: a row that sees no key is not 0"
    return out


def check_decode(lengths, max_seqlen, q_len, window, softcap=0.0, dtype=FP16, heads=4, kv_heads=2, head_dim=32,
                 num_splits=None, impl="triton-decode", spread=1):
    """num_splits None: through the public API as `impl`; a number: the kernel's launcher with that many splits."""
    q, k, v = random_qkv(len(lengths), q_len, max_seqlen, heads, kv_heads, head_dim, dtype)
    q = spread_out(q, spread)
    lens = torch.tensor(lengths, dtype=torch.int32)
    options = dict(window=window, softcap=softcap)
    if num_splits is None:
        out = K.decode_attention(q, k, v, lens, impl=impl, **options)
    else:
        out = triton_decode.decode(q, k, v, lens, head_dim ** -0.5, num_splits=num_splits, **options)
    naive = K.decode_attention(q, k, v, lens, impl="naive", **options)
    mask = decode_mask(lens, q_len, max_seqlen, window)
    ref = reference(q, k, v, mask, head_dim ** -0.5, softcap)
    what = f"decode lens {lengths} q_len {q_len} window={window} softcap={softcap} splits={num_splits} {dtype}"
    assert_close_as_naive(out, naive, ref, what)
    blind = ~mask.any(-1)
    assert torch.equal(out[blind], torch.zeros_like(out[blind])), f"{what}: a row that sees no key is not 0"


def packed(lengths_q, lengths_k, heads, kv_heads, head_dim, dtype, seed=0):
    """Packed q (total_q, heads, head_dim), k and v (total_k, kv_heads, head_dim), and their cu_seqlens."""
    g = torch.Generator().manual_seed(seed)
    make = lambda total, h: torch.randn(total, h, head_dim, generator=g).to(dtype)
    cu = lambda lengths: torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    return (make(sum(lengths_q), heads), make(sum(lengths_k), kv_heads), make(sum(lengths_k), kv_heads),
            cu(lengths_q), cu(lengths_k))


def check_varlen(lengths_q, lengths_k, causal, window, softcap=0.0, dtype=FP16, heads=2, kv_heads=1, head_dim=32,
                 impl="triton", tma=None):
    """tma None: through the public API as `impl`; True or False: the kernel's launcher on that load path."""
    q, k, v, cu_q, cu_k = packed(lengths_q, lengths_k, heads, kv_heads, head_dim, dtype)
    lengths = (cu_q, cu_k, max(lengths_q), max(lengths_k))
    options = dict(window=window, softcap=softcap)
    if tma is None:
        out = K.attention_varlen(q, k, v, *lengths, causal=causal, impl=impl, **options)
    else:
        out = triton_prefill.attention_varlen(q, k, v, *lengths, causal, head_dim ** -0.5, tma=tma, **options)
    naive = K.attention_varlen(q, k, v, *lengths, causal=causal, impl="naive", **options)
    ref = reference_varlen(q, k, v, cu_q, cu_k, causal, head_dim ** -0.5, window, softcap)
    what = f"varlen q {lengths_q} k {lengths_k} causal={causal} window={window} softcap={softcap} {dtype} {impl}"
    assert_close_as_naive(out, naive, ref, what)


# --- which tiles a program reads: the band, without running a kernel ---

def tiles(ranges, block_n=64):
    return sum(triton.cdiv(hi - lo, block_n) for lo, hi in ranges)


def test_a_window_makes_prefill_work_linear_in_context():
    # Equal steps in context: the windowed tile count rises by equal steps (linear), the full
    # causal count by growing ones (quadratic).
    lengths = [4096, 8192, 12288, 16384]
    windowed = [tiles(triton_prefill.key_ranges(n, n, True, (1024, 0))) for n in lengths]
    full = [tiles(triton_prefill.key_ranges(n, n, True)) for n in lengths]
    steps = [b - a for a, b in zip(windowed, windowed[1:])]
    assert steps == [18 * 4096 // 128] * 3
    full_steps = [b - a for a, b in zip(full, full[1:])]
    assert full_steps[0] < full_steps[1] < full_steps[2]
    assert full_steps[2] - full_steps[1] == full_steps[1] - full_steps[0] > 0
    # Past the first 1024 keys each block reads its band alone: (left + BLOCK_M) / BLOCK_N tiles.
    ranges = triton_prefill.key_ranges(16384, 16384, True, (1024, 0))
    assert {triton.cdiv(hi - lo, 64) for lo, hi in ranges[1024 // 128:]} == {18}
    assert windowed[-1] * 7 < full[-1]


def test_a_window_makes_decode_work_independent_of_the_cache_length():
    for max_seqlen in (4096, 131072):
        assert triton_decode.split_span(max_seqlen, 4, triton_decode.window_left((1000, -1), max_seqlen), 64) == 1067
    assert triton_decode.split_span(131072, 4, triton_decode.window_left((-1, -1), 131072), 64) == 131072
    assert triton_decode.window_left((5000, 0), 4096) == -1   # reaches past every key: no window


@pytest.mark.parametrize("seqlen_q,seqlen_k,causal,window", [
    (100, 100, True, (17, -1)), (70, 97, False, (-1, 9)), (97, 70, False, (12, 30)), (64, 64, False, (0, 0)),
    (90, 40, True, (5, -1)), (90, 40, False, (3, 2)), (33, 200, False, (40, 40)), (1, 150, True, (31, -1))])
@pytest.mark.parametrize("block_m,block_n", [(32, 32), (128, 64), (64, 32)])
def test_window_band_covers_what_rows_see_and_skips_masks_only_where_all_see(seqlen_q, seqlen_k, causal, window,
                                                                             block_m, block_n):
    mask = visible_keys(seqlen_q, seqlen_k, causal, window)
    causal_, bounds = triton_tiles.kernel_band(causal, window, seqlen_q, seqlen_k)
    assert bounds is not None
    offset = seqlen_k - seqlen_q
    for start_m in range(0, seqlen_q, block_m):
        rows = mask[start_m:start_m + block_m]
        last_p = min(start_m + block_m, seqlen_q) - 1 + offset
        lo, unmasked_lo, unmasked_hi, hi = triton_tiles.host_window_band(start_m + offset, last_p, seqlen_k, *bounds,
                                                                      block_n)
        assert lo % block_n == 0 and lo <= unmasked_lo <= unmasked_hi <= hi <= seqlen_k
        assert not rows[:, :lo].any() and not rows[:, hi:].any(), "a visible key outside the loop"
        assert rows[:, unmasked_lo:unmasked_hi].all(), "an unmasked tile holds a key some row cannot see"
        assert unmasked_lo == unmasked_hi or (unmasked_lo % block_n == 0 and unmasked_hi % block_n == 0)


@triton.jit
def _band_probe(Args, Out, N: tl.constexpr, BLOCK_N: tl.constexpr):
    # The kernels' own window_band, on a vector of cases: (first_p, last_p, seqlen_k, left, right).
    i = tl.arange(0, N)
    first_p, last_p = tl.load(Args + i * 5), tl.load(Args + i * 5 + 1)
    seqlen_k, left, right = tl.load(Args + i * 5 + 2), tl.load(Args + i * 5 + 3), tl.load(Args + i * 5 + 4)
    lo, unmasked_lo, unmasked_hi, hi = triton_tiles.window_band(first_p, last_p, seqlen_k, left, right, BLOCK_N)
    tl.store(Out + i * 4, lo)
    tl.store(Out + i * 4 + 1, unmasked_lo)
    tl.store(Out + i * 4 + 2, unmasked_hi)
    tl.store(Out + i * 4 + 3, hi)


def test_key_ranges_is_the_kernels_band_arithmetic():
    # Positions run negative where seqlen_q > seqlen_k: Triton divides towards 0, Python down.
    g = torch.Generator().manual_seed(0)
    n = 256
    first_p = torch.randint(-150, 300, (n,), generator=g)
    seqlen_k = torch.randint(1, 300, (n,), generator=g)
    args = torch.stack([first_p, first_p + torch.randint(0, 64, (n,), generator=g), seqlen_k,
                        torch.randint(0, 200, (n,), generator=g), torch.randint(0, 200, (n,), generator=g)], 1)
    args = args.to(torch.int32).contiguous()
    out = torch.empty(n, 4, dtype=torch.int32)
    _band_probe[(1,)](args, out, N=n, BLOCK_N=32)
    expected = [triton_tiles.host_window_band(*row, 32) for row in args.tolist()]
    assert out.tolist() == [list(e) for e in expected]


def test_kernel_band_folds_causal_and_drops_windows_that_reach_everything():
    band = triton_tiles.kernel_band
    assert band(True, (-1, -1), 50, 80) == (True, None)
    assert band(False, (-1, 0), 50, 80) == (True, None)          # right = 0 is causal
    assert band(True, (-1, 7), 50, 80) == (True, None)           # causal hides what right would add
    assert band(False, (79, 49), 50, 80) == (False, None)        # each side reaches the last key
    assert band(False, (10 ** 12, 10 ** 12), 50, 80) == (False, None)
    assert band(False, (78, 48), 50, 80) == (False, (78, 48))
    assert band(True, (5, 3), 50, 80) == (True, (5, 0))
    assert band(False, (-1, 3), 50, 80) == (False, (130, 3))     # unbounded: a bound past every key


# --- prefill ---

@pytest.mark.parametrize("seqlen_q,seqlen_k,causal,window,dtype,heads,kv_heads,tma", [
    (100, 100, True, (17, -1), FP16, 2, 1, False),    # left only, causal: a sliding window
    (70, 97, False, (-1, 9), FP32, 4, 2, True),       # right only, GQA
    (97, 70, False, (12, 30), BF16, 4, 1, False),     # both sides, MQA
    (97, 70, True, (12, 30), FP16, 2, 2, True),       # both, causal cutting the right side
    (64, 70, False, (0, 0), FP32, 2, 1, False),       # one key per row
    (64, 64, True, (0, -1), FP16, 2, 1, True),        # the diagonal alone
    (50, 80, False, (78, 48), FP16, 2, 1, False),     # just inside the sequence on both sides
    (50, 80, False, (500, 1000), FP16, 2, 1, True),   # larger than the sequence: plain attention
    (90, 40, True, (5, -1), FP16, 4, 2, True),        # seqlen_q > seqlen_k: 50 rows see nothing
    (90, 40, False, (3, 2), BF16, 2, 1, False),       # and rows the window leaves before the first key
])
def test_prefill_windows(seqlen_q, seqlen_k, causal, window, dtype, heads, kv_heads, tma):
    check_prefill(seqlen_q, seqlen_k, causal, window, dtype=dtype, heads=heads, kv_heads=kv_heads, tma=tma)


@pytest.mark.parametrize("causal,window,softcap,dtype,tma", [
    (True, (-1, -1), 5.0, FP32, False), (False, (-1, -1), 2.0, FP16, True), (True, (20, -1), 5.0, BF16, True),
    (False, (9, 14), 30.0, FP16, False)])
def test_prefill_softcap_on_scores_spread_wide(causal, window, softcap, dtype, tma):
    # Scores of spread 6 x softcap and more: tanh saturates, and a cap applied in log2 units or
    # before the scale would be far off.
    check_prefill(70, 97, causal, window, softcap=softcap, dtype=dtype, heads=4, kv_heads=2, tma=tma, spread=8)


def test_prefill_through_the_api_by_name():
    check_prefill(70, 97, True, (20, 3), softcap=4.0, dtype=FP16, heads=4, kv_heads=2, spread=4)
    q, k, v = random_qkv(1, 40, 40, 2, 1, 32, FP16)
    out = K.attention(q, k, v, causal=True, window=(6, -1), softcap=3.0, impl="triton-ptr")
    assert torch.equal(out, triton_prefill.attention(q, k, v, True, 32 ** -0.5, tma=False, window=(6, -1),
                                                     softcap=3.0))


def test_prefill_hidden_nan_keys_change_nothing():
    # A key outside a row's window is replaced by -inf with a select, so a NaN there never
    # reaches the row; rows that see it turn NaN.
    q, k, v = random_qkv(1, 70, 70, 2, 1, 32, FP32)
    clean = triton_prefill.attention(q, k, v, False, 32 ** -0.5, window=(10, 4))
    k[:, 40] = float("nan")
    out = triton_prefill.attention(q, k, v, False, 32 ** -0.5, window=(10, 4))
    sees = visible_keys(70, 70, False, (10, 4))[:, 40]
    assert torch.isnan(out[:, sees]).all()
    assert torch.equal(out[:, ~sees], clean[:, ~sees])


@settings(max_examples=10, deadline=None)
@given(seqlen_q=st.integers(1, 80), seqlen_k=st.integers(1, 80), causal=st.booleans(),
       left=st.integers(-1, 90), right=st.integers(-1, 90), softcap=st.sampled_from([0.0, 0.0, 3.0]),
       dtype=st.sampled_from([FP16, BF16, FP32]), tma=st.booleans(), seed=st.integers(0, 2 ** 16))
# Two keys in bf16: rounding the output is nearly all of the error, so it must round to nearest
# as a GPU does, not towards zero as the interpreter's own conversion does (output_buffer).
@example(seqlen_q=14, seqlen_k=2, causal=False, left=0, right=7, softcap=3.0, dtype=BF16, tma=False, seed=256)
def test_prefill_random_windows(seqlen_q, seqlen_k, causal, left, right, softcap, dtype, tma, seed):
    check_prefill(seqlen_q, seqlen_k, causal, (left, right), softcap=softcap, dtype=dtype, tma=tma, seed=seed,
                  spread=4 if softcap else 1)


@pytest.mark.slow
@pytest.mark.parametrize("tma", [False, True])
def test_prefill_long_window_many_tiles(tma):
    check_prefill(513, 700, True, (100, -1), softcap=10.0, dtype=FP16, heads=2, kv_heads=1, head_dim=128, tma=tma,
                  spread=4)


# --- decode ---

@pytest.mark.parametrize("lengths,q_len,window,num_splits,dtype", [
    ([0, 3, 40, 97, 130], 1, (31, -1), 1, FP16),      # 0, shorter than the window, longer, full
    ([0, 3, 40, 97, 130], 4, (31, 0), 3, BF16),
    ([0, 3, 40, 97, 130], 4, (0, -1), 7, FP32),       # each row its own key alone
    ([130, 2, 64], 3, (70, 5), None, FP16),           # right is hidden by causality anyway
    ([130, 2, 64], 16, (200, -1), None, FP32),        # larger than the cache: plain decode
])
def test_decode_windows(lengths, q_len, window, num_splits, dtype):
    check_decode(lengths, 130, q_len, window, dtype=dtype, num_splits=num_splits)


@pytest.mark.parametrize("window,softcap,num_splits,dtype,impl", [
    ((-1, -1), 5.0, 3, FP32, "triton-decode"), ((45, -1), 2.0, 7, BF16, "triton-decode"),
    ((45, -1), 30.0, None, FP16, "triton-decode-nopdl")])
def test_decode_softcap(window, softcap, num_splits, dtype, impl):
    check_decode([0, 5, 77, 130], 130, 2, window, softcap=softcap, dtype=dtype, heads=4, kv_heads=1,
                 num_splits=num_splits, impl=impl, spread=8)


def test_decode_window_ignores_garbage_before_the_window_and_past_each_length():
    # With a window, splits start at the window's first tile: keys before that tile are never
    # read, so even NaN values there change nothing; NaN past each length changes nothing.
    q, k, v = random_qkv(3, 2, 160, 4, 2, 32, FP32)
    lens = torch.tensor([150, 0, 100], dtype=torch.int32)
    run = lambda k, v: triton_decode.decode(q, k, v, lens, 32 ** -0.5, num_splits=3, window=(20, -1))
    clean = run(k, v)
    k, v = k.clone(), v.clone()
    for b, n in enumerate(lens.tolist()):
        before = max(0, n - 2 - 20) // 32 * 32
        for t in (k, v):
            t[b, :before] = float("nan")
            t[b, n:] = float("nan")
    assert torch.equal(run(k, v), clean)


@pytest.mark.slow
def test_decode_window_over_many_splits():
    check_decode([2200, 900, 1], 2200, 4, (300, -1), softcap=8.0, dtype=FP16, num_splits=9, spread=4)


# --- packed sequences (varlen) ---

LENGTHS_Q = [5, 0, 70, 33, 1, 40]     # an empty sequence; a query with no key
LENGTHS_K = [9, 4, 50, 0, 40, 40]


@pytest.mark.parametrize("causal,window,softcap,dtype,heads,kv_heads,tma", [
    (True, (-1, -1), 0.0, FP16, 2, 1, False), (False, (-1, -1), 0.0, FP32, 4, 2, True),
    (True, (7, -1), 0.0, BF16, 4, 1, True), (False, (10, 3), 4.0, FP16, 2, 2, False),
    (True, (-1, -1), 3.0, FP32, 2, 1, True)])
def test_varlen(causal, window, softcap, dtype, heads, kv_heads, tma):
    check_varlen(LENGTHS_Q, LENGTHS_K, causal, window, softcap=softcap, dtype=dtype, heads=heads, kv_heads=kv_heads,
                 tma=tma)


@settings(max_examples=10, deadline=None)
@given(lengths=st.lists(st.tuples(st.integers(0, 70), st.integers(0, 70)), min_size=1, max_size=4),
       causal=st.booleans(), left=st.integers(-1, 80), right=st.integers(-1, 80), tma=st.booleans())
def test_varlen_random_windows_and_lengths(lengths, causal, left, right, tma):
    lengths_q, lengths_k = zip(*lengths)
    if sum(lengths_q) and sum(lengths_k):
        check_varlen(list(lengths_q), list(lengths_k), causal, (left, right), dtype=FP32, tma=tma)


@pytest.mark.parametrize("impl", ["triton", "triton-ptr"])
def test_varlen_through_the_api_by_name(impl):
    check_varlen([33, 64, 1], [70, 20, 1], True, (12, -1), softcap=2.0, impl=impl)


@pytest.mark.parametrize("tma", [False, True])
def test_varlen_sequences_do_not_see_each_other(tma):
    # NaN in the last sequence's keys and values: the tiles of the sequence before it run past its
    # end into them, and must neither score those keys nor weigh those values.
    q, k, v, cu_q, cu_k = packed([20, 45], [45, 30], 2, 1, 32, FP32)
    run = lambda k, v: triton_prefill.attention_varlen(q, k, v, cu_q, cu_k, 45, 45, False, 0.2, tma=tma)
    clean = run(k, v)
    k, v = k.clone(), v.clone()
    k[45:], v[45:] = float("nan"), float("nan")
    out = run(k, v)
    assert torch.equal(out[:20], clean[:20]) and torch.isnan(out[20:]).all()


def test_triton_kernels_declare_their_options():
    for name in TRITON_IMPLS:
        assert set(K.get(name).options) == {"window", "softcap"}, name
    assert K.get("triton").varlen is not None and K.get("triton-ptr").varlen is not None
