"""Float64 attention written from the definition, independent of attnlab.kernels, and the
pass criterion of FlashAttention's own suite: a kernel's error against float64 is at most
twice the naive implementation's error in the same dtype, plus a small slack."""
import torch

import attnlab.kernels as K


def visible_keys(seqlen_q, seqlen_k, causal, window=(-1, -1)):
    """Bool (seqlen_q, seqlen_k), written out one pair at a time from the definition: query i sits
    at p = i + sk - sq and sees key j iff it is inside the window (left, right; -1 unbounded)
    and, when causal, j <= p."""
    left, right = window
    mask = torch.zeros(seqlen_q, seqlen_k, dtype=torch.bool)
    for i in range(seqlen_q):
        p = i + seqlen_k - seqlen_q
        for j in range(seqlen_k):
            mask[i, j] = ((left < 0 or j >= p - left) and (right < 0 or j <= p + right)
                          and (not causal or j <= p))
    return mask


def reference(q, k, v, mask, scale=None, softcap=0.0):
    """q (B, Sq, H, D), k/v (B, Sk, KVH, D), mask (B or 1, Sq, Sk) -> float64 (B, Sq, H, D)."""
    q, k, v = (t.detach().double() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    groups = q.shape[2] // k.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    for h in range(q.shape[2]):
        scores = torch.einsum("bqd,bkd->bqk", q[:, :, h], k[:, :, h // groups]) * scale
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        scores = scores.masked_fill(~mask.to(q.device), float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        out[:, :, h] = torch.einsum("bqk,bkd->bqd", probs, v[:, :, h // groups])
    return out


def decode_mask(cache_seqlens, q_len, max_seqlen, window=(-1, -1)):
    rows = []
    for n in cache_seqlens.tolist():
        m = torch.zeros(q_len, max_seqlen, dtype=torch.bool)
        if n:
            m[:, :n] = visible_keys(q_len, n, True, window)
        rows.append(m)
    return torch.stack(rows)


def reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale=None, window=(-1, -1), softcap=0.0):
    """Packed sequences (total, heads, head_dim), each attended on its own -> float64 (total_q, H, D)."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    bounds = zip(cu_seqlens_q.tolist(), cu_seqlens_q.tolist()[1:], cu_seqlens_k.tolist(), cu_seqlens_k.tolist()[1:])
    for q0, q1, k0, k1 in bounds:
        if q1 > q0:
            mask = visible_keys(q1 - q0, k1 - k0, causal, window)[None]
            out[q0:q1] = reference(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], mask, scale, softcap)[0]
    return out


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
