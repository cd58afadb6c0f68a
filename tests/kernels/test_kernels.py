"""Correctness of every implementation that runs here against a float64 reference.

On a CPU the Triton kernels run in Triton's interpreter, so shapes stay small; the same
checks run at GPU sizes in test_kernels_gpu.py.
"""
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab.kernels as K
from attnlab.kernels import triton_decode, triton_prefill
from reference import (assert_close_as_naive, contract_impls, decode_mask, max_error, random_qkv, reference,
                       skip_unless_supported, usable, visible_keys)

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# The seqlen pairs of FlashAttention's own tests, batch and heads sized for the interpreter.
SEQLEN_PAIRS = [(1, 1), (64, 128), (113, 203), (128, 217), (239, 1), (799, 3), (512, 256),
                (1023, 1024), (1024, 1023)]
HEAD_DIMS = [16, 40, 59, 64, 80, 96, 111, 128, 256]
HEAD_LAYOUTS = [(4, 4), (4, 2), (4, 1)]  # MHA, GQA, MQA


def check_prefill(impl, batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, dtype, causal, seed=0, **kw):
    skip_unless_supported(impl, "prefill", dtype, head_dim)
    q, k, v = random_qkv(batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, dtype, seed=seed)
    ref = reference(q, k, v, visible_keys(seqlen_q, seqlen_k, causal)[None])
    if kw:
        out = triton_prefill.attention(q, k, v, causal, head_dim ** -0.5, **kw)
    else:
        out = K.attention(q, k, v, causal=causal, impl=impl)
    assert out.shape == q.shape and out.dtype == dtype
    naive = K.attention(q, k, v, causal=causal, impl="naive")
    assert_close_as_naive(out, naive, ref, f"{impl} {tuple(q.shape)} k {tuple(k.shape)} causal={causal}")


def check_decode(impl, cache_seqlens, max_seqlen, q_len, heads, kv_heads, head_dim, dtype, seed=0, **kw):
    skip_unless_supported(impl, "decode", dtype, head_dim)
    batch = len(cache_seqlens)
    q, k, v = random_qkv(batch, q_len, max_seqlen, heads, kv_heads, head_dim, dtype, seed=seed)
    lens = torch.tensor(cache_seqlens, dtype=torch.int32)
    ref = reference(q, k, v, decode_mask(lens, q_len, max_seqlen))
    if kw:
        out = triton_decode.decode(q, k, v, lens, head_dim ** -0.5, **kw)
    else:
        out = K.decode_attention(q, k, v, lens, impl=impl)
    naive = K.decode_attention(q, k, v, lens, impl="naive")
    assert_close_as_naive(out, naive, ref, f"{impl} lens {cache_seqlens} q_len {q_len}")


# --- the yardstick itself: naive must be right, or "twice naive's error" proves nothing ---

@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5),
                                       (torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("causal", [False, True])
def test_naive_matches_float64(dtype, tol, causal):
    q, k, v = random_qkv(2, 77, 131, 4, 2, 40, dtype)
    ref = reference(q, k, v, visible_keys(77, 131, causal)[None])
    assert max_error(K.attention(q, k, v, causal=causal, impl="naive"), ref) < tol


def test_rows_that_see_no_key_are_zero():
    q, k, v = random_qkv(1, 9, 4, 2, 2, 16, torch.float32)
    for impl in usable("prefill", "cpu", torch.float32, 16):
        out = K.attention(q, k, v, causal=True, impl=impl)
        assert torch.equal(out[:, :5], torch.zeros_like(out[:, :5])), impl
        assert out[:, 5:].abs().sum() > 0, impl


# --- prefill ---

# The largest pairs take seconds each in the interpreter: `slow`, so `-m "not slow"` stays quick.
CASES = [pytest.param(sq, sk, causal, HEAD_DIMS[i % len(HEAD_DIMS)], DTYPES[i % len(DTYPES)],
                      marks=[pytest.mark.slow] if sq * sk > 200_000 else [])
         for i, ((sq, sk), causal) in enumerate(itertools.product(SEQLEN_PAIRS, [False, True]))]


@pytest.mark.parametrize("seqlen_q,seqlen_k,causal,head_dim,dtype", CASES)
def test_triton_seqlen_pairs(seqlen_q, seqlen_k, causal, head_dim, dtype):
    heads = 1 if seqlen_q * seqlen_k > 200_000 else 2
    check_prefill("triton", 1, seqlen_q, seqlen_k, heads, 1, head_dim, dtype, causal)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_triton_head_dims(head_dim):
    check_prefill("triton", 2, 70, 97, 2, 1, head_dim, torch.float16, True)


# The tensor-descriptor (TMA) path Hopper takes by default: batch and kv head are copy
# coordinates, and the copy engine zero-fills keys past the end and a head_dim under BLOCK_D.
@pytest.mark.parametrize("seqlen_q,seqlen_k,heads,kv_heads,head_dim,dtype,causal", [
    (113, 203, 4, 2, 64, torch.float16, True), (203, 113, 4, 1, 96, torch.bfloat16, True),
    (64, 128, 2, 2, 40, torch.float32, False), (1, 97, 4, 1, 128, torch.float16, True),
    (130, 130, 2, 1, 256, torch.bfloat16, False)])
def test_triton_tma_path(seqlen_q, seqlen_k, heads, kv_heads, head_dim, dtype, causal):
    check_prefill("triton", 2, seqlen_q, seqlen_k, heads, kv_heads, head_dim, dtype, causal, tma=True)


@pytest.mark.parametrize("scale", [-0.3, 0.0])
def test_triton_takes_any_finite_scale(scale):
    # The kernels fuse the scale into one multiply-add, which needs it >= 0: a negative one
    # moves into q. Zero averages the visible values. Scores spread wide enough that a wrong
    # running maximum would overflow exp2.
    q, k, v = random_qkv(2, 70, 97, 4, 2, 32, torch.float32)
    q *= 40
    ref = reference(q, k, v, visible_keys(70, 97, True)[None], scale=scale)
    naive = K.attention(q, k, v, causal=True, scale=scale, impl="naive")
    out = K.attention(q, k, v, causal=True, scale=scale, impl="triton")
    assert_close_as_naive(out, naive, ref, f"prefill scale {scale}")
    lens = torch.tensor([97, 40], dtype=torch.int32)
    ref = reference(q[:, :3], k, v, decode_mask(lens, 3, 97), scale=scale)
    naive = K.decode_attention(q[:, :3], k, v, lens, scale=scale, impl="naive")
    out = K.decode_attention(q[:, :3], k, v, lens, scale=scale, impl="triton-decode")
    assert_close_as_naive(out, naive, ref, f"decode scale {scale}")


def test_autotuning_glue_runs_in_the_interpreter_with_a_stand_in_clock(monkeypatch):
    # The GPU path, driven on a CPU: Triton's autotuner times each tile with a stand-in clock
    # that runs the tile in the interpreter, so each tile's pre-hook must size the tensor
    # descriptors right; autotune() must report every tile and keep the fastest.
    tuned = triton_prefill._attention_fwd_tuned
    fake_ms = itertools.cycle([3.0, 1.0, 2.0, 4.0])
    monkeypatch.setitem(vars(tuned), "do_bench", lambda call, **kw: call() or [next(fake_ms)] * 3)
    monkeypatch.setattr(triton_prefill, "triton_interpreting", lambda: False)
    q, k, v = random_qkv(1, 70, 70, 2, 1, 64, torch.float16)
    seen = triton_prefill.autotune(q, k, v, True, 0.125)
    assert [t["median_ms"] for t in seen["tiles"]] == [3.0, 1.0, 2.0, 4.0]
    assert seen["chosen"] == {k: v for k, v in seen["tiles"][1].items() if k != "median_ms"}
    ref = reference(q, k, v, visible_keys(70, 70, True)[None], scale=0.125)
    naive = K.attention(q, k, v, causal=True, scale=0.125, impl="naive")
    assert_close_as_naive(triton_prefill.attention(q, k, v, True, 0.125), naive, ref, "tuned TMA path")
    tuned.cache.clear()


def test_triton_ptr_is_the_pointer_path_by_name():
    check_prefill("triton-ptr", 2, 97, 131, 4, 2, 64, torch.bfloat16, causal=True)


def test_triton_tma_refuses_unaligned_strides():
    q, k, v = random_qkv(1, 8, 8, 2, 1, 59, torch.float16)  # 59 halves: a 118-byte head stride
    with pytest.raises(ValueError, match="tma=True.*16-byte"):
        triton_prefill.attention(q, k, v, False, 1.0, tma=True)
    assert triton_prefill.tma_unfit_reason(*random_qkv(1, 8, 8, 2, 1, 64, torch.float16)[1:]) is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads", HEAD_LAYOUTS)
# --- the contract every registered implementation keeps, plugins included ---

@pytest.mark.parametrize("impl", contract_impls("prefill"))
def test_prefill_dtypes_and_head_layouts(impl, heads, kv_heads, dtype):
    check_prefill(impl, 2, 97, 131, heads, kv_heads, 64, dtype, causal=True)
    check_prefill(impl, 2, 131, 97, heads, kv_heads, 64, dtype, causal=True)


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(1, 1), (113, 203), (239, 1), (203, 113)])
@pytest.mark.parametrize("impl", contract_impls("prefill"))
def test_bottom_right_causal(impl, seqlen_q, seqlen_k):
    check_prefill(impl, 1, seqlen_q, seqlen_k, 2, 1, 32, torch.float32, causal=True)


@settings(max_examples=12, deadline=None)
@given(seqlen_q=st.integers(1, 150), seqlen_k=st.integers(1, 150), groups=st.sampled_from([1, 2, 4]),
       kv_heads=st.integers(1, 2), head_dim=st.integers(16, 130), causal=st.booleans(),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_triton_random_shapes(seqlen_q, seqlen_k, groups, kv_heads, head_dim, causal, dtype, seed):
    check_prefill("triton", 1, seqlen_q, seqlen_k, groups * kv_heads, kv_heads, head_dim, dtype, causal, seed)


# --- decode ---

# q_len 16 takes the interpreter seconds per Triton decode: `slow`, so `-m "not slow"` stays quick.
@pytest.mark.parametrize("q_len", [1, 3, pytest.param(16, marks=pytest.mark.slow)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", contract_impls("decode"))
def test_decode_ragged(impl, dtype, q_len):
    # 0 and max_seqlen included, and a length shorter than q_len (rows that see nothing).
    check_decode(impl, [0, 2, 77, 150, 203], 203, q_len, 8, 2, 64, dtype)


@pytest.mark.parametrize("heads,kv_heads", HEAD_LAYOUTS + [(16, 1)])
@pytest.mark.parametrize("head_dim", [16, 59, 128, 256])
def test_triton_decode_heads(heads, kv_heads, head_dim):
    check_decode("triton-decode", [150, 33], 150, 2, heads, kv_heads, head_dim, torch.float16)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
def test_triton_decode_split_counts(num_splits):
    # Splits that end inside a sequence, past its end, and on an empty one.
    check_decode("triton-decode", [300, 0, 45, 257], 300, 4, 4, 2, 64, torch.bfloat16, num_splits=num_splits)


def test_triton_decode_merges_more_splits_than_one_step_reads():
    # 69 splits, and the merge reads 64 per step. The last keys match the query best, so the
    # second step raises the running maximum and must rescale what the first step summed.
    q, k, v = random_qkv(2, 1, 2200, 2, 1, 32, torch.float16)
    k[:, 2100:] = q[:, :, :1] * 1.5
    lens = torch.tensor([2200, 5], dtype=torch.int32)
    ref = reference(q, k, v, decode_mask(lens, 1, 2200))
    out = triton_decode.decode(q, k, v, lens, 32 ** -0.5, num_splits=69)
    naive = K.decode_attention(q, k, v, lens, impl="naive")
    assert_close_as_naive(out, naive, ref, "69 splits, the best keys last")


def test_triton_decode_refuses_pdl_where_it_cannot_launch_so():
    q, k, v = random_qkv(1, 1, 64, 2, 1, 32, torch.float16)
    with pytest.raises(ValueError, match="pdl=True"):
        triton_decode.decode(q, k, v, torch.tensor([64], dtype=torch.int32), 1.0, pdl=True)


def test_triton_decode_q_len_16_mqa():
    check_decode("triton-decode", [64, 17], 64, 16, 8, 1, 32, torch.float32)


@pytest.mark.parametrize("impl", contract_impls("decode", with_yardstick=True))
def test_decode_ignores_garbage_past_each_length(impl):
    # A cache is preallocated: slots past cache_seqlens may hold anything, NaN included.
    q, k, v = random_qkv(2, 1, 96, 4, 2, 32, torch.float32)
    lens = torch.tensor([40, 0], dtype=torch.int32)
    clean = K.decode_attention(q, k, v, lens, impl=impl)
    k[:, 40:], v[:, 40:] = float("nan"), float("nan")
    assert torch.equal(K.decode_attention(q, k, v, lens, impl=impl), clean)
