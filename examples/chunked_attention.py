"""A kernel of one's own, in one file: attention over chunks of keys with an online softmax,
in plain torch, registered as `torch-chunked`, with a backward that recomputes each chunk's
weights from the saved log-sum-exp (as FlashAttention-2 does), so gradients flow through
attnlab's API and `attnlab check` holds them to float64.

    attnlab kernels --kernel-module examples/chunked_attention.py
    attnlab check --kernel-module examples/chunked_attention.py --kernels torch-chunked
    attnlab sweep --kernel-module examples/chunked_attention.py --kernels torch-chunked,naive \
        --workload cpu-small --device cpu

Tensors are in attnlab's layout, (batch, seqlen, heads, head_dim), already checked by the API.
"""
import torch

from attnlab.kernels import register_kernel
from attnlab.kernels.masks import decode_visible, visible
from attnlab.models import AttentionMemory

CHUNK_KEYS = 64     # small, so that even short checks cross chunks


def _grouped(t, kv_heads, compute):
    """(B, Sq, H, D) -> (B, KVH, G, Sq, D) in `compute`: query heads that share a KV head attend
    together, so K and V are never copied per head."""
    b, sq, h, d = t.shape
    return t.reshape(b, sq, kv_heads, h // kv_heads, d).permute(0, 2, 3, 1, 4).to(compute)


def _ungrouped(t, dtype):
    """(B, KVH, G, Sq, D) -> (B, Sq, H, D) in `dtype`."""
    b, kv_heads, g, sq, d = t.shape
    return t.permute(0, 3, 1, 2, 4).reshape(b, sq, kv_heads * g, d).to(dtype)


def _attend(q, k, v, mask, scale):
    """q (B, Sq, H, D); k, v (B, Sk, KVH, D); mask (B or 1, Sq, Sk), True where a query sees a key.
    -> (out (B, Sq, H, D), each row's log-sum-exp of its scaled scores (B, KVH, G, Sq), -inf for a
    row that sees no key)."""
    compute = torch.promote_types(q.dtype, torch.float32)
    qg = _grouped(q, k.shape[2], compute)               # (B, KVH, G, Sq, D)
    m = qg.new_full(qg.shape[:-1], float("-inf"))       # running max of each query's scores
    l = qg.new_zeros(qg.shape[:-1])                      # running sum of exp(score - m)
    acc = torch.zeros_like(qg)                           # running sum of exp(score - m) * v
    for start in range(0, k.shape[1], CHUNK_KEYS):
        kc, vc = (t[:, start:start + CHUNK_KEYS].to(compute) for t in (k, v))
        seen = mask[:, None, None, :, start:start + CHUNK_KEYS]
        s = torch.einsum("bkgqd,bckd->bkgqc", qg, kc).mul(scale).masked_fill(~seen, float("-inf"))
        m_new = torch.maximum(m, s.amax(-1))
        m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)   # a row that has seen nothing yet
        p = torch.exp(s - m_safe[..., None])
        alpha = torch.exp(m - m_safe)
        l = l * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + torch.einsum("bkgqc,bckd->bkgqd", p, vc)
        m = m_new
    out = (acc / l[..., None]).masked_fill(l[..., None] == 0, 0.0)  # a row that sees no key is zeros
    return _ungrouped(out, q.dtype), m + torch.log(l)


def prefill(q, k, v, causal, scale):
    return _attend(q, k, v, visible(q.shape[1], k.shape[1], causal, q.device)[None], scale)[0]


def backward(q, k, v, causal, scale):
    """The forward, keeping its output and log-sum-exp; `grads(dout)` -> (dq, dk, dv) recomputes
    each chunk's weights from them, so no score matrix outlives a chunk, and may be called again."""
    mask = visible(q.shape[1], k.shape[1], causal, q.device)[None]
    out, lse = _attend(q, k, v, mask, scale)
    return out, lambda dout: _gradients(q, k, v, mask, scale, out, lse, dout)


def _gradients(q, k, v, mask, scale, out, lse, dout):
    compute = torch.promote_types(q.dtype, torch.float32)
    qg, dog = _grouped(q, k.shape[2], compute), _grouped(dout, k.shape[2], compute)
    delta = (_grouped(out, k.shape[2], compute) * dog).sum(-1)    # rowsum(dO * O): softmax's backward per row
    lse = lse.masked_fill(lse == float("-inf"), 0.0)              # a row that sees no key: all its weights are 0
    dq, dk, dv = torch.zeros_like(qg), k.new_zeros(k.shape, dtype=compute), v.new_zeros(v.shape, dtype=compute)
    for start in range(0, k.shape[1], CHUNK_KEYS):
        keys = slice(start, start + CHUNK_KEYS)
        kc, vc = k[:, keys].to(compute), v[:, keys].to(compute)
        s = torch.einsum("bkgqd,bckd->bkgqc", qg, kc) * scale
        p = torch.exp(s - lse[..., None]).masked_fill(~mask[:, None, None, :, keys], 0.0)   # the forward's weights
        ds = p * (torch.einsum("bkgqd,bckd->bkgqc", dog, vc) - delta[..., None]) * scale  # through the softmax
        dv[:, keys] = torch.einsum("bkgqc,bkgqd->bckd", p, dog)     # summed over each KV head's query heads
        dk[:, keys] = torch.einsum("bkgqc,bkgqd->bckd", ds, qg)
        dq += torch.einsum("bkgqc,bckd->bkgqd", ds, kc)
    return _ungrouped(dq, q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def decode(q, k_cache, v_cache, cache_seqlens, scale):
    mask = decode_visible(cache_seqlens, q.shape[1], k_cache.shape[1])
    written = mask.any(1)[:, :, None, None]              # slots past a sequence's length may hold NaN
    return _attend(q, k_cache, v_cache.masked_fill(~written, 0.0), mask, scale)[0]


register_kernel(
    "torch-chunked", prefill=prefill, decode=decode, backward=backward,
    description="example plugin: key chunks, online softmax, plain torch",
    devices=("cpu", "cuda"), dtypes=("float16", "bfloat16", "float32", "float64"),
    # An upper bound for the planners: the scores of one chunk of keys exist at a time, in fp32.
    memory=AttentionMemory(fp32_scores=True),
)
