"""The correctness matrix at GPU sizes, for every implementation that runs on this GPU."""
import json

import pytest
import torch

import attnlab.kernels as K
import nan_rules
from attnlab.kernels import triton_decode, triton_prefill
from reference import assert_close_as_naive, decode_mask, random_qkv, reference, usable, visible_keys

pytestmark = pytest.mark.gpu
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def cuda_impls(mode, dtype, head_dim):
    return [n for n in usable(mode, "cuda", dtype, head_dim) if n != "naive"] if torch.cuda.is_available() else []


def checked_or_refused(impl, run, argument=None):
    """The output, or None where the input is refused by a clear ValueError, never a wrong
    answer: torch's own backend refusing the shape (cuDNN takes no seqlen_k of 1, for one),
    or, where `argument` is named, an implementation's input rule on that argument."""
    try:
        return run()
    except ValueError as exc:
        if argument and str(exc).startswith(f"{argument}:"):
            return None
        assert impl.startswith("sdpa-") and str(exc).startswith("impl:") and "refused" in str(exc), exc
        return None


def prefill_case(seqlen_q, seqlen_k, causal, head_dim, dtype, heads=8, kv_heads=2, batch=2):
    q, k, v = random_qkv(batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, dtype, device="cuda")
    ref = reference(q, k, v, visible_keys(seqlen_q, seqlen_k, causal)[None])
    naive = K.attention(q, k, v, causal=causal, impl="naive")
    impls = cuda_impls("prefill", dtype, head_dim)
    assert "triton" in impls, "the Triton kernel must run on this GPU"
    for impl in impls:
        out = checked_or_refused(impl, lambda: K.attention(q, k, v, causal=causal, impl=impl))
        if out is not None:
            assert_close_as_naive(out, naive, ref, f"{impl} {seqlen_q}x{seqlen_k} d{head_dim} {dtype} causal={causal}")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(1, 1), (113, 203), (239, 1), (799, 3), (1023, 1024),
                                               (1024, 1023), (2048, 2048), (4097, 4095), (3000, 6001)])
def test_prefill_matrix(seqlen_q, seqlen_k, causal):
    prefill_case(seqlen_q, seqlen_k, causal, 128, BF16)


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(113, 203), (4097, 4095)])
def test_prefill_fp16(seqlen_q, seqlen_k):
    prefill_case(seqlen_q, seqlen_k, True, 128, FP16)


@pytest.mark.parametrize("head_dim", [16, 40, 59, 96, 111, 256])
def test_prefill_head_dims(head_dim):
    prefill_case(1000, 2001, True, head_dim, BF16)


@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (8, 2), (8, 1)])
def test_prefill_fp32_and_head_layouts(heads, kv_heads):
    prefill_case(777, 1025, True, 64, FP32, heads=heads, kv_heads=kv_heads)


@pytest.mark.parametrize("tma", [True, False])
@pytest.mark.parametrize("seqlen_q,seqlen_k,head_dim", [(4097, 4095, 128), (1000, 2001, 96), (2048, 2048, 256)])
def test_triton_both_load_paths(seqlen_q, seqlen_k, head_dim, tma):
    # "auto" takes tensor descriptors on Hopper; the pointer path serves other GPUs and layouts.
    if tma and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need compute capability 9.0")
    q, k, v = random_qkv(2, seqlen_q, seqlen_k, 8, 2, head_dim, BF16, device="cuda")
    ref = reference(q, k, v, visible_keys(seqlen_q, seqlen_k, True)[None])
    out = triton_prefill.attention(q, k, v, True, head_dim ** -0.5, tma=tma)
    naive = K.attention(q, k, v, causal=True, impl="naive")
    assert_close_as_naive(out, naive, ref, f"triton tma={tma} {seqlen_q}x{seqlen_k} d{head_dim}")


@pytest.mark.parametrize("q_len,dtype", [(1, BF16), (4, BF16), (16, BF16), (1, FP16)])
def test_decode_matrix(q_len, dtype):
    max_seqlen, lens = 32768, [0, 3, 1000, 17001, 32768]
    q, k, v = random_qkv(len(lens), q_len, max_seqlen, 32, 8, 128, dtype, device="cuda")
    cache_seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    ref = reference(q, k, v, decode_mask(cache_seqlens.cpu(), q_len, max_seqlen))
    naive = K.decode_attention(q, k, v, cache_seqlens, impl="naive")
    impls = cuda_impls("decode", dtype, 128)
    assert "triton-decode" in impls
    for impl in impls:
        out = checked_or_refused(impl, lambda: K.decode_attention(q, k, v, cache_seqlens, impl=impl))
        if out is not None:
            assert_close_as_naive(out, naive, ref, f"{impl} decode q_len {q_len} {dtype}")


@pytest.mark.parametrize("pdl", [True, False])
def test_triton_decode_with_and_without_programmatic_launch(pdl):
    if pdl and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    lens = [5, 4097, 32768]
    q, k, v = random_qkv(len(lens), 1, 32768, 32, 8, 128, BF16, device="cuda")
    cache_seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    ref = reference(q, k, v, decode_mask(cache_seqlens.cpu(), 1, 32768))
    naive = K.decode_attention(q, k, v, cache_seqlens, impl="naive")
    out = triton_decode.decode(q, k, v, cache_seqlens, 128 ** -0.5, pdl=pdl)
    assert_close_as_naive(out, naive, ref, f"triton-decode pdl={pdl}")


def test_triton_decode_is_capturable_in_a_cuda_graph():
    q, k, v = random_qkv(2, 1, 4096, 32, 8, 128, BF16, device="cuda")
    lens = torch.tensor([4096, 1234], dtype=torch.int32, device="cuda")
    eager = K.decode_attention(q, k, v, lens, impl="triton-decode")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = K.decode_attention(q, k, v, lens, impl="triton-decode")
    lens.copy_(torch.tensor([100, 4000], dtype=torch.int32))
    graph.replay()
    assert torch.equal(K.decode_attention(q, k, v, lens, impl="triton-decode"), captured)
    assert not torch.equal(eager, captured)


def test_autotuning_times_every_tile_and_keeps_the_fastest(tmp_path):
    from attnlab.bench.tuning import tune
    from attnlab.bench.workloads import preset

    document = tune(preset("llama3-8b"), [4096], "cuda", tmp_path / "tuning.json")
    assert json.loads((tmp_path / "tuning.json").read_text())["cases"] == document["cases"]
    hopper = torch.cuda.get_device_capability()[0] >= 9
    assert [c["tma"] for c in document["cases"]] == ([True, False] if hopper else [False])
    for case in document["cases"]:
        assert case["status"] == "ok" and len(case["tiles"]) >= 2, case
        fastest = min(case["tiles"], key=lambda tile: tile["median_ms"])
        assert {k: fastest[k] for k in case["chosen"]} == case["chosen"]


@pytest.mark.parametrize("scale", [0.0, -1.0])
@pytest.mark.parametrize("causal", [False, True])
def test_prefill_is_right_or_refuses_a_scale_of_zero_or_below(causal, scale):
    # torch's CPU flash kernel is wrong here (kernels/impls/sdpa.py): every GPU kernel is right or says so.
    q, k, v = random_qkv(2, 1024, 1024, 8, 2, 128, BF16, device="cuda")  # square: torch's own causal mask
    ref = reference(q, k, v, visible_keys(1024, 1024, causal)[None], scale=scale)
    naive = K.attention(q, k, v, causal=causal, scale=scale, impl="naive")
    for impl in cuda_impls("prefill", BF16, 128):
        out = checked_or_refused(impl, lambda: K.attention(q, k, v, causal=causal, scale=scale, impl=impl), "scale")
        if out is not None:
            assert_close_as_naive(out, naive, ref, f"{impl} causal={causal} scale={scale}")


@pytest.mark.parametrize("scale", [0.0, -1.0])
def test_decode_is_right_or_refuses_a_scale_of_zero_or_below(scale):
    lens = torch.tensor([3, 2, 2000, 4096], dtype=torch.int32, device="cuda")
    q, k, v = random_qkv(4, 3, 4096, 32, 8, 128, BF16, device="cuda")
    ref = reference(q, k, v, decode_mask(lens.cpu(), 3, 4096), scale=scale)
    naive = K.decode_attention(q, k, v, lens, scale=scale, impl="naive")
    for impl in cuda_impls("decode", BF16, 128):
        out = checked_or_refused(impl, lambda: K.decode_attention(q, k, v, lens, scale=scale, impl=impl), "scale")
        if out is not None:
            assert_close_as_naive(out, naive, ref, f"{impl} decode scale={scale}")


@pytest.mark.parametrize("impl", ["naive", "triton", "triton-ptr"])
def test_prefill_nan_rules(impl):
    # On Hopper "triton" reads K and V through TMA, "triton-ptr" by pointers; several tiles a row.
    nan_rules.check_prefill(lambda q, k, v: K.attention(q, k, v, causal=True, impl=impl),
                            device="cuda", dtype=BF16, seqlen_q=1000, seqlen_k=990)


@pytest.mark.parametrize("impl", ["naive", "triton-decode", "triton-decode-nopdl"])
def test_decode_nan_rules(impl):
    # Many splits a sequence, merged with and without programmatic dependent launch.
    nan_rules.check_decode(lambda q, k, v, lens: K.decode_attention(q, k, v, lens, impl=impl),
                           device="cuda", dtype=BF16, lengths=(4000, 0, 1700, 2), max_seqlen=4096)
