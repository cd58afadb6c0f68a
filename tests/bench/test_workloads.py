"""Shapes, FLOPs, bytes and predicted memory of sweep points, checked against first principles."""
import pytest
import torch

from attnlab.bench import workloads as wl
from attnlab.kernels.masks import visible
from attnlab.models import AttentionMemory


def _point(mode="prefill", kernel="sdpa-flash", seq_len=1024, **shape):
    base = dict(batch=2, heads=8, kv_heads=2, head_dim=64, dtype="bfloat16", causal=True)
    base.update(shape)
    return wl.Workload("t", **base).point(kernel, mode, seq_len)


def test_causal_square_prefill_is_half_the_full_square():
    causal, full = _point(causal=True), _point(causal=False)
    assert wl.flops(full) == 4 * 2 * 8 * 1024 * 1024 * 64
    assert wl.flops(causal) == wl.flops(full) / 2


def test_flops_count_query_heads_under_gqa():
    # same query heads, fewer kv heads: attention does the same work per query head
    assert wl.flops(_point(kv_heads=1)) == wl.flops(_point(kv_heads=8))
    assert wl.flops(_point(heads=16, kv_heads=2)) == 2 * wl.flops(_point(heads=8, kv_heads=2))


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(1, 1), (1, 113), (7, 203), (203, 7), (113, 113),
                                               (239, 799), (16, 1023), (50, 0)])
def test_visible_pairs_match_the_mask(seqlen_q, seqlen_k):
    expected = int(visible(seqlen_q, seqlen_k, True).sum())
    assert wl.visible_pairs(seqlen_q, seqlen_k, True) == expected
    assert wl.visible_pairs(seqlen_q, seqlen_k, False) == seqlen_q * seqlen_k


def test_decode_reads_the_cache_once_and_sees_every_key():
    p = _point(mode="decode", seq_len=4096)
    assert p.q_len == 1 and p.seq_len == 4096
    assert wl.flops(p) == 4 * 2 * 8 * 4096 * 64
    kv = 2 * 2 * 4096 * 2 * 64 * 2          # k and v: batch x len x kv_heads x head_dim x bf16
    q_and_out = 2 * 2 * 1 * 8 * 64 * 2
    assert wl.bytes_moved(p) == kv + q_and_out
    assert p.tokens_per_call == 2


def test_prefill_bytes_are_q_k_v_read_and_output_written():
    p = _point(seq_len=512, dtype="float32")
    assert wl.bytes_moved(p) == (2 * 2 * 512 * 8 * 64 + 2 * 2 * 512 * 2 * 64) * 4
    assert p.tokens_per_call == 2 * 512


def _predicted(point, device_type="cuda"):
    """The sweep's prediction, with the memory point.kernel declares in the registry."""
    from attnlab import kernels

    return wl.predicted_peak_bytes(point, kernels.get(point.kernel).attention_memory(device_type))


def test_predicted_memory_charges_the_score_matrix_in_fp32():
    fused, naive = _point(kernel="triton"), _point(kernel="naive")
    scores = 2 * 8 * 1024 * 1024 * 4        # one fp32 (B, H, Sq, Sk) matrix
    assert _predicted(naive) - _predicted(fused) >= 3 * scores
    assert _predicted(fused) < wl.input_bytes(fused) + scores / 8
    # the math backend upcasts half inputs, so it needs more than naive in bf16
    assert _predicted(_point(kernel="sdpa-math")) > _predicted(naive)
    # quadratic in length for naive, linear for fused
    ratio_naive = _predicted(_point(kernel="naive", seq_len=2048)) / _predicted(naive)
    ratio_fused = _predicted(_point(kernel="triton", seq_len=2048)) / _predicted(fused)
    assert ratio_naive > 3.5 and ratio_fused < 2.1


def test_predicted_memory_charges_kv_copies_only_where_declared():
    point = _point(mode="decode", seq_len=4096)
    per_head_kv = 2 * 2 * 4096 * 8 * 64 * 2          # K and V, batch x len x query heads x head_dim, bf16
    streamed = wl.predicted_peak_bytes(point, AttentionMemory())
    expanded = wl.predicted_peak_bytes(point, AttentionMemory(expands_kv=True))
    assert expanded - streamed == per_head_kv
    assert streamed - wl.input_bytes(point) == 2 * 8 * 4         # one log-sum-exp per query row


def test_llama_preset_shapes_and_128k_cache():
    llama = wl.preset("llama3-8b")
    p = llama.point("naive", "decode", 128 * 1024)
    assert (p.batch, p.heads, p.kv_heads, p.head_dim, p.dtype, p.causal) == (1, 32, 8, 128, "bfloat16", True)
    # one layer's KV cache at 128k: 2 x 8 heads x 128 x 2 bytes per token
    assert wl.bytes_moved(p) - 2 * 32 * 128 * 2 == 128 * 1024 * 2 * 8 * 128 * 2
    assert llama.seq_lens == tuple(1024 * 2 ** i for i in range(8))


def test_fa_paper_keeps_batch_times_length_at_16k():
    fa = wl.preset("fa-paper")
    assert [fa.batch_for(n) for n in (512, 2048, 16384, 32768)] == [32, 8, 1, 1]
    assert not fa.causal and fa.heads == 16


def test_overrides_rename_the_workload_and_keep_the_rest():
    llama = wl.preset("llama3-8b")
    assert llama.override(batch=1, dtype="bf16") is llama
    four = llama.override(batch=4, dtype="fp16")
    assert four.name == "llama3-8b[batch=4,dtype=float16]"
    assert (four.batch, four.dtype, four.heads) == (4, "float16", 32)
    fixed = wl.preset("fa-paper").override(batch=3)
    assert fixed.batch_for(512) == 3 and fixed.tokens_per_batch is None


def test_bad_shapes_name_the_argument():
    with pytest.raises(ValueError, match="kv_heads"):
        wl.preset("llama3-8b").override(kv_heads=5)
    with pytest.raises(ValueError, match="dtype"):
        wl.dtype_name("int8")
    with pytest.raises(ValueError, match="workload"):
        wl.preset("gpt-5")
    with pytest.raises(ValueError, match="mode"):
        wl.preset("cpu-small").point("naive", "train", 128)


def test_seq_len_parsing_and_labels_are_the_text_modules():
    from attnlab import text

    # One parser and one label (tested in test_text.py): the names bench imports from here are those.
    assert wl.parse_seq_lens is text.parse_seq_lens and wl.seq_len_label is text.k
    assert [wl.seq_len_label(n) for n in (128, 1024, 131072, 1000)] == ["128", "1k", "128k", "1000"]


def test_point_dtype_and_key():
    p = _point(dtype="float16")
    assert p.torch_dtype is torch.float16 and p.element_bytes == 2
    assert wl.point_key(p.fields()) == p.key()


# --- variants: windows, softcap, packed documents ---

@pytest.mark.parametrize("seqlen_q,seqlen_k", [(9, 9), (5, 12), (12, 5), (1, 30)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(-1, -1), (3, -1), (-1, 2), (4, 4), (0, 0), (50, 50)])
def test_visible_pairs_counts_the_rule_exactly(seqlen_q, seqlen_k, causal, window):
    from attnlab.kernels.masks import visible

    assert wl.visible_pairs(seqlen_q, seqlen_k, causal, window) == int(visible(seqlen_q, seqlen_k, causal,
                                                                               window=window).sum())


def test_a_window_makes_prefill_work_linear_and_decode_work_constant():
    windowed = wl.preset("mistral-7b")
    assert windowed.window == 4096 and windowed.heads == 32 and windowed.kv_heads == 8
    prefill = [wl.flops(windowed.point("naive", "prefill", n)) for n in (32768, 65536, 131072)]
    assert prefill[2] - prefill[1] == pytest.approx(2 * (prefill[1] - prefill[0]))      # linear past the window
    decode = [wl.bytes_moved(windowed.point("naive", "decode", n)) for n in (8192, 131072)]
    assert decode[0] == decode[1]                                                       # the window's keys only
    plain = wl.preset("llama3-8b")
    assert wl.flops(plain.point("naive", "prefill", 131072)) > 15 * prefill[2]


def test_a_variant_changes_the_workload_name_and_reaches_the_point():
    packed = wl.preset("cpu-small").override(docs=4, softcap=30.0)
    assert packed.name == "cpu-small[docs=4,softcap=30.0]"
    point = packed.point("naive", "prefill", 1000)
    assert (point.docs, point.softcap, point.variant.softcap) == (4, 30.0, 30.0)
    assert packed.point("naive", "decode", 1000).docs == 1       # decode has one sequence per cache
    assert wl.doc_lengths(1000, 3) == [334, 333, 333]
    # four causal documents of 250 do a quarter of the work of one of 1000
    assert wl.flops(point) == pytest.approx(wl.flops(wl.preset("cpu-small").point("naive", "prefill", 1000)) / 4)
    windowed = wl.preset("cpu-small").override(window=64).point("naive", "prefill", 256)
    assert windowed.variant.window == (63, -1)


@pytest.mark.parametrize("field,value", [("window", -3), ("softcap", -1.0), ("docs", 0)])
def test_bad_variants_are_named(field, value):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        wl.preset("cpu-small").override(**{field: value})
