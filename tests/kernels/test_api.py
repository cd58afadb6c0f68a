"""The API's contract: bad input gets a ValueError or TypeError that names the argument,
before any kernel launches; the registry answers what runs here and why not."""
import pytest
import torch

import attnlab.kernels as K
from attnlab.kernels import registry


def qkv(batch=2, seqlen_q=8, seqlen_k=8, heads=4, kv_heads=2, head_dim=16, dtype=torch.float32):
    return (torch.randn(batch, seqlen_q, heads, head_dim, dtype=dtype),
            torch.randn(batch, seqlen_k, kv_heads, head_dim, dtype=dtype),
            torch.randn(batch, seqlen_k, kv_heads, head_dim, dtype=dtype))


def cache(batch=2, max_seqlen=8, kv_heads=2, head_dim=16, q_len=1, heads=4):
    q = torch.randn(batch, q_len, heads, head_dim)
    k = torch.randn(batch, max_seqlen, kv_heads, head_dim)
    return q, k, k.clone(), torch.full((batch,), max_seqlen, dtype=torch.int32)


def bad_prefill_cases():
    q, k, v = qkv()
    yield "q", TypeError, (q.numpy(), k, v), {}
    yield "q", ValueError, (q[0], k, v), {}
    yield "k", ValueError, (q, k[..., 0], v), {}
    yield "v", ValueError, (q, k, v[:, :4]), {}
    yield "k", ValueError, (q, k[:1], v[:1]), {}                               # batch
    yield "k", ValueError, (q, k[..., :8], v[..., :8]), {}                     # head_dim
    yield "k", ValueError, (q[:, :, :3], k, v), {}                             # 3 heads over 2 kv heads
    yield "k", TypeError, (q, k.double(), v.double()), {}                      # dtype mismatch
    yield "q", TypeError, (q.int(), k.int(), v.int()), {}                      # unsupported dtype
    yield "scale", TypeError, (q, k, v), {"scale": "0.1"}
    yield "scale", ValueError, (q, k, v), {"scale": float("nan")}
    yield "causal", TypeError, (q, k, v), {"causal": 1}
    yield "impl", ValueError, (q, k, v), {"impl": "no-such-kernel"}
    yield "impl", TypeError, (q, k, v), {"impl": None}
    yield "impl", ValueError, (q, k, v), {"impl": "sdpa-cudnn"}               # not on a CPU
    yield "impl", ValueError, (q, k, v), {"impl": "triton-decode"}            # decode only
    q8, k8, v8 = qkv(head_dim=8)
    yield "impl", ValueError, (q8, k8, v8), {"impl": "triton"}                # head_dim 8 < 16


@pytest.mark.parametrize("argument,error,args,kwargs", list(bad_prefill_cases()))
def test_attention_rejects_bad_input(argument, error, args, kwargs):
    with pytest.raises(error, match=rf"^{argument}:"):
        K.attention(*args, **kwargs)


def bad_decode_cases():
    q, k, v, lens = cache()
    yield "q", ValueError, (torch.randn(2, 17, 4, 16), k, v, lens)            # q_len > 16
    yield "k_cache", ValueError, (q, k[:1], v[:1], lens)
    yield "v_cache", ValueError, (q, k, v[:, :4], lens)
    yield "cache_seqlens", TypeError, (q, k, v, [8, 8])
    yield "cache_seqlens", TypeError, (q, k, v, lens.long())
    yield "cache_seqlens", ValueError, (q, k, v, lens[:1])
    yield "cache_seqlens", ValueError, (q, k, v, torch.tensor([8, 9], dtype=torch.int32))
    yield "cache_seqlens", ValueError, (q, k, v, torch.tensor([-1, 3], dtype=torch.int32))


@pytest.mark.parametrize("argument,error,args", list(bad_decode_cases()))
def test_decode_rejects_bad_input(argument, error, args):
    with pytest.raises(error, match=rf"^{argument}:"):
        K.decode_attention(*args)


def test_unavailable_impl_lists_the_available_ones():
    q, k, v = qkv()
    with pytest.raises(ValueError) as info:
        K.attention(q, k, v, impl="flash-attn")
    message = str(info.value)
    assert "naive" in message and "sdpa-math" in message and "flash-attn" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_device_mismatch_is_named():
    q, k, v = qkv()
    meta = torch.empty(k.shape, device="meta")
    with pytest.raises(ValueError, match="^k: device"):
        K.attention(q, meta, meta)


def test_registry_describes_every_implementation():
    names = [i.name for i in K.implementations()]
    assert names == sorted(set(names), key=names.index)  # unique
    expected = {"naive", "triton", "triton-decode", "flash-attn",
                "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math"}
    assert expected <= set(names)
    for impl in K.implementations():
        assert set(impl.modes) <= set(K.MODES) and impl.modes
        status = impl.available("cpu")
        assert status.ok or status.reason, f"{impl.name} unavailable without a reason"
    assert K.get("triton").modes == ("prefill", "backward", "fwd_bwd") and K.get("triton-decode").modes == ("decode",)
    assert not K.get("flash-attn").available("cpu")


def test_auto_picks_the_fastest_usable_here():
    q, k, v = qkv()
    chosen = K.resolve("auto", "prefill", q)
    ranks = {i.name: i.speed_rank.get("cpu", 100) for i in K.implementations()
             if i.available("cpu") and i.supports("prefill", q.dtype, 16, "cpu")}
    assert chosen.name == min(ranks, key=ranks.get)
    out = K.attention(q, k, v, impl="auto")
    assert torch.allclose(out, K.attention(q, k, v, impl="naive"), atol=1e-5)


def test_triton_needs_the_interpreter_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    registry._cached_probe.cache_clear()
    try:
        status = K.get("triton").available("cpu")
        assert not status and "TRITON_INTERPRET" in status.reason
    finally:
        registry._cached_probe.cache_clear()


def test_empty_sequences_give_zeros():
    q, k, v = qkv(seqlen_k=0)
    assert torch.equal(K.attention(q, k, v, impl="triton"), torch.zeros_like(q))
    q, k, v, _ = cache()
    out = K.decode_attention(q, k, v, torch.zeros(2, dtype=torch.int32), impl="triton-decode")
    assert torch.equal(out, torch.zeros_like(q))


def test_a_prepared_sdpa_decode_reads_the_lengths_once(monkeypatch):
    # SDPA has no ragged cache, so its adapter needs the lengths on the host: read at prepare
    # time, not inside the timed call (where it would be a device sync).
    q, k, v, _ = cache(batch=3, max_seqlen=8)
    lens = torch.tensor([8, 3, 8], dtype=torch.int32)
    expected = K.decode_attention(q, k, v, lens, impl="naive")
    call = K.prepare_decode(q, k, v, lens, impl="sdpa-math")
    reads = []
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(1) or [])
    for _ in range(3):
        assert torch.allclose(call(), expected, atol=1e-5)
    assert not reads


def test_the_registry_says_which_decodes_read_lengths_on_the_host():
    syncing = {i.name for i in K.implementations() if i.decode_reads_lengths_on_host}
    # SDPA has no ragged cache; flex builds its block mask from the lengths once per prepare
    assert syncing >= {"sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math", "flex"}
    assert not syncing & {"naive", "triton-decode", "flash-attn"}
