"""Every input is read as given: lengths and offsets taken as strided or expanded views, q, k and v
as views of other layouts, and numbers at the edge of what the API accepts (a window wider than
any context, a softcap past float32). Each implementation answers as float64 does, by
FlashAttention's criterion, or refuses by naming the argument; none reads memory it was not given.
The Triton kernels run in the interpreter, so shapes stay small."""
import pytest
import torch

import attnlab.kernels as K
from attnlab.kernels.masks import MAX_SOFTCAP
from reference import (assert_close_as_naive, contract_impls, decode_mask, random_qkv, reference, reference_varlen,
                       visible_keys)

LENGTHS = [10, 40, 0, 63]
PACKED = [(13, 13), (0, 5), (30, 41), (1, 20)]      # (seqlen_q, seqlen_k) per packed sequence


def strided_lengths(lengths):
    """The lengths as the first column of a 2-D tensor: stride 2, the other column junk a
    kernel reading as if contiguous would take for lengths."""
    table = torch.tensor([[n, 10_000 + i] for i, n in enumerate(lengths)], dtype=torch.int32)
    return table[:, 0]


def expanded_lengths(length, batch):
    """One length for every sequence, as `.expand` makes it: stride 0, one element in memory."""
    return torch.tensor([length], dtype=torch.int32).expand(batch)


def strided_offsets(lengths):
    """cu_seqlens, every second element of a tensor interleaved with junk."""
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return torch.stack([offsets, torch.full_like(offsets, 7_777)], dim=1).flatten()[::2]


def assert_decode_right(impl, q, k, v, lens):
    ref = reference(q, k, v, decode_mask(lens.contiguous(), q.shape[1], k.shape[1]))
    naive = K.decode_attention(q, k, v, lens.contiguous(), impl="naive")
    assert_close_as_naive(K.decode_attention(q, k, v, lens, impl=impl), naive, ref,
                          f"{impl} lengths with strides {lens.stride()}")


@pytest.mark.parametrize("impl", contract_impls("decode", with_yardstick=True))
def test_decode_reads_strided_and_expanded_lengths_as_given(impl):
    q, k, v = random_qkv(4, 1, 64, 4, 2, 32, torch.float32)
    lens = strided_lengths(LENGTHS)
    assert lens.stride() == (2,)
    assert_decode_right(impl, q, k, v, lens)
    assert_decode_right(impl, q, k, v, expanded_lengths(33, 4))


@pytest.mark.parametrize("impl", [i for i in contract_impls("decode", with_yardstick=True)
                                  if not K.get(i.values[0]).decode_reads_lengths_on_host])
def test_a_prepared_decode_sees_strided_lengths_updated_in_place(impl):
    # Servers grow their lengths in place between calls; a prepared call reads them as they are then.
    q, k, v = random_qkv(4, 1, 64, 4, 2, 32, torch.float32)
    table = torch.tensor([[n, -1] for n in LENGTHS], dtype=torch.int32)
    call = K.prepare_decode(q, k, v, table[:, 0], impl=impl)
    call()
    table[:, 0] += 1
    grown = torch.tensor([n + 1 for n in LENGTHS], dtype=torch.int32)
    ref = reference(q, k, v, decode_mask(grown, 1, 64))
    assert_close_as_naive(call(), K.decode_attention(q, k, v, grown, impl="naive"), ref, f"{impl} after growing")


@pytest.mark.parametrize("impl", [i for i in contract_impls("prefill", with_yardstick=True)
                                  if K.get(i.values[0]).varlen is not None])
def test_varlen_reads_strided_offsets_as_given(impl):
    gen = torch.Generator().manual_seed(0)
    total_q, total_k = (sum(n[i] for n in PACKED) for i in (0, 1))
    q, k, v = (torch.randn(n, h, 32, generator=gen) for n, h in ((total_q, 4), (total_k, 2), (total_k, 2)))
    cu_q, cu_k = strided_offsets([n[0] for n in PACKED]), strided_offsets([n[1] for n in PACKED])
    assert cu_q.stride() == (2,)
    longest_q, longest_k = (max(n[i] for n in PACKED) for i in (0, 1))
    ref = reference_varlen(q, k, v, cu_q.contiguous(), cu_k.contiguous(), True)
    naive = K.attention_varlen(q, k, v, cu_q.contiguous(), cu_k.contiguous(), longest_q, longest_k, causal=True,
                               impl="naive")
    out = K.attention_varlen(q, k, v, cu_q, cu_k, longest_q, longest_k, causal=True, impl=impl)
    assert_close_as_naive(out, naive, ref, f"{impl} varlen, offsets with strides {cu_q.stride()}")


def views_of_other_layouts(batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim):
    """q from a (batch, heads, seqlen, head_dim) tensor, k and v one head expanded to kv_heads
    (stride 0): views whose strides a kernel must follow, not assume."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(batch, heads, seqlen_q, head_dim, generator=gen).transpose(1, 2)
    k, v = (torch.randn(batch, seqlen_k, 1, head_dim, generator=gen).expand(-1, -1, kv_heads, -1) for _ in "kv")
    return q, k, v


@pytest.mark.parametrize("impl", contract_impls("prefill"))
def test_prefill_follows_the_strides_of_views(impl):
    q, k, v = views_of_other_layouts(2, 37, 45, 4, 2, 32)
    assert not q.is_contiguous() and k.stride(2) == 0
    ref = reference(q, k, v, visible_keys(37, 45, True)[None])
    naive = K.attention(q, k, v, causal=True, impl="naive")
    try:
        out = K.attention(q, k, v, causal=True, impl=impl)
    except ValueError as refusal:      # an implementation may refuse a layout, naming the argument
        assert str(refusal).split(":")[0] in ("q", "k", "v"), refusal
        return
    assert_close_as_naive(out, naive, ref, f"{impl} on views")


@pytest.mark.parametrize("impl", contract_impls("decode"))
def test_decode_follows_the_strides_of_cache_views(impl):
    q, k, v = views_of_other_layouts(4, 1, 64, 4, 2, 32)
    assert_decode_right(impl, q, k, v, torch.tensor(LENGTHS, dtype=torch.int32))


def window_takers(mode):
    return [p for p in contract_impls(mode, with_yardstick=True) if "window" in K.get(p.values[0]).options]


@pytest.mark.parametrize("window", [(10**30, -1), (-1, 10**30), (2**63, 2**63)])
@pytest.mark.parametrize("impl", window_takers("prefill"))
def test_a_window_wider_than_any_context_is_no_window(impl, window):
    q, k, v = random_qkv(1, 21, 30, 2, 2, 32, torch.float32)
    ref = reference(q, k, v, visible_keys(21, 30, True)[None])
    naive = K.attention(q, k, v, causal=True, impl="naive")
    assert_close_as_naive(K.attention(q, k, v, causal=True, window=window, impl=impl), naive, ref, f"{impl} {window}")


@pytest.mark.parametrize("impl", window_takers("decode"))
def test_a_decode_window_wider_than_the_cache_is_no_window(impl):
    q, k, v = random_qkv(4, 1, 64, 4, 2, 32, torch.float32)
    lens = torch.tensor(LENGTHS, dtype=torch.int32)
    naive = K.decode_attention(q, k, v, lens, impl="naive")
    ref = reference(q, k, v, decode_mask(lens, 1, 64))
    assert_close_as_naive(K.decode_attention(q, k, v, lens, window=(10**30, -1), impl=impl), naive, ref, impl)


def test_a_window_side_within_the_context_is_kept():
    q, k, v = random_qkv(1, 21, 30, 2, 2, 32, torch.float64)
    near = K.attention(q, k, v, causal=True, window=(3, -1), impl="naive")
    assert (near - K.attention(q, k, v, causal=True, impl="naive")).abs().max() > 1e-3


@pytest.mark.parametrize("softcap", [MAX_SOFTCAP * 1.01, 3.4e38, 1e38])
def test_a_softcap_past_float32_is_refused_by_name(softcap):
    q, k, v = random_qkv(1, 8, 8, 2, 2, 32, torch.float32)
    for impl in ("auto", "naive"):
        with pytest.raises(ValueError, match=r"^softcap: .* beyond float32"):
            K.attention(q, k, v, softcap=softcap, impl=impl)
    with pytest.raises(ValueError, match=r"^softcap: "):
        K.decode_attention(q[:, :1], k, v, torch.tensor([8], dtype=torch.int32), softcap=softcap)


def test_a_tiny_scale_under_a_large_cap_is_refused_not_flushed_to_zero():
    q, k, v = random_qkv(1, 8, 8, 2, 2, 32, torch.float32)
    with pytest.raises(ValueError, match=r"^softcap: .*scale / softcap"):
        K.attention(q, k, v, scale=1e-20, softcap=1e20)


@pytest.mark.parametrize("impl", [p for p in contract_impls("prefill", with_yardstick=True)
                                  if "softcap" in K.get(p.values[0]).options])
def test_the_largest_softcap_accepted_is_answered_right(impl):
    # 1e30 bends no score: the answer is plain attention's.
    q, k, v = random_qkv(1, 21, 30, 2, 2, 32, torch.float32)
    ref = reference(q, k, v, visible_keys(21, 30, True)[None])
    naive = K.attention(q, k, v, causal=True, impl="naive")
    assert_close_as_naive(K.attention(q, k, v, causal=True, softcap=1e30, impl=impl), naive, ref, impl)
