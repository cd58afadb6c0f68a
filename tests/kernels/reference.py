"""Float64 attention written from the definition, independent of attnlab.kernels, and the
pass criterion of FlashAttention's own suite: a kernel's error against float64 is at most
twice the naive implementation's error in the same dtype, plus a small slack."""
import torch

import attnlab.kernels as K


def visible_keys(seqlen_q, seqlen_k, causal):
    """Bool (seqlen_q, seqlen_k), bottom-right aligned: query i sees key j iff j <= i + sk - sq."""
    mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool)
    if causal:
        for i in range(seqlen_q):
            mask[i, max(0, i + seqlen_k - seqlen_q + 1):] = False
    return mask


def reference(q, k, v, mask, scale=None):
    """q (B, Sq, H, D), k/v (B, Sk, KVH, D), mask (B or 1, Sq, Sk) -> float64 (B, Sq, H, D)."""
    q, k, v = (t.detach().double() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    groups = q.shape[2] // k.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    for h in range(q.shape[2]):
        scores = torch.einsum("bqd,bkd->bqk", q[:, :, h], k[:, :, h // groups]) * scale
        scores = scores.masked_fill(~mask.to(q.device), float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        out[:, :, h] = torch.einsum("bqk,bkd->bqd", probs, v[:, :, h // groups])
    return out


def decode_mask(cache_seqlens, q_len, max_seqlen):
    rows = []
    for n in cache_seqlens.tolist():
        m = torch.zeros(q_len, max_seqlen, dtype=torch.bool)
        if n:
            m[:, :n] = visible_keys(q_len, n, True)
        rows.append(m)
    return torch.stack(rows)


def slack(dtype):
    return max(torch.finfo(dtype).eps / 8, 1e-6)


def max_error(out, ref):
    return (out.detach().double().to(ref.device) - ref).abs().max().item()


def assert_close_as_naive(out, naive_out, ref, what=""):
    err, naive_err = max_error(out, ref), max_error(naive_out, ref)
    assert out.dtype == naive_out.dtype
    assert not torch.isnan(out).any(), f"{what}: NaN in output"
    bound = 2 * naive_err + slack(out.dtype)
    assert err <= bound, f"{what}: max error {err:.3g} > 2 x naive {naive_err:.3g} + slack"


def random_qkv(batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, dtype, device="cpu", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    make = lambda s, h: torch.randn(batch, s, h, head_dim, generator=g).to(device=device, dtype=dtype)
    return make(seqlen_q, heads), make(seqlen_k, kv_heads), make(seqlen_k, kv_heads)


def contract_impls(mode, with_yardstick=False):
    """Every registered implementation that runs `mode` on this CPU, plugins included (tests/conftest.py
    loads ATTNLAB_KERNEL_MODULES), as pytest params; naive, the yardstick the others are held to, only
    when asked. An ablation is its parent with one feature off, and is marked `slow`."""
    import pytest

    return [pytest.param(i.name, marks=[pytest.mark.slow] if i.ablation_of else [])
            for i in K.implementations()
            if mode in i.modes and i.available("cpu") and (with_yardstick or i.name != "naive")]


def skip_unless_supported(impl, mode, dtype, head_dim):
    import pytest

    status = K.get(impl).supports(mode, dtype, head_dim, "cpu")
    if not status:
        pytest.skip(f"{impl}: {status.reason}")


def usable(mode, device, dtype, head_dim):
    """Names of registered implementations that can run this case here."""
    return [i.name for i in K.implementations()
            if i.available(device) and i.supports(mode, dtype, head_dim, device)]
