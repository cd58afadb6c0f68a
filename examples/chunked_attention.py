"""A kernel of one's own, in one file: attention over chunks of keys with an online softmax,
in plain torch, registered as `torch-chunked`.

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


def _attend(q, k, v, mask, scale):
    """q (B, Sq, H, D); k, v (B, Sk, KVH, D); mask (B or 1, Sq, Sk), True where a query sees a key."""
    b, sq, h, d = q.shape
    kv_heads = k.shape[2]
    compute = torch.promote_types(q.dtype, torch.float32)
    # Query heads that share a KV head attend together, so K and V are never copied per head.
    qg = q.reshape(b, sq, kv_heads, h // kv_heads, d).permute(0, 2, 3, 1, 4).to(compute)  # (B, KVH, G, Sq, D)
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
    return out.permute(0, 3, 1, 2, 4).reshape(b, sq, h, d).to(q.dtype)


def prefill(q, k, v, causal, scale):
    return _attend(q, k, v, visible(q.shape[1], k.shape[1], causal, q.device)[None], scale)


def decode(q, k_cache, v_cache, cache_seqlens, scale):
    mask = decode_visible(cache_seqlens, q.shape[1], k_cache.shape[1])
    written = mask.any(1)[:, :, None, None]              # slots past a sequence's length may hold NaN
    return _attend(q, k_cache, v_cache.masked_fill(~written, 0.0), mask, scale)


register_kernel(
    "torch-chunked", prefill=prefill, decode=decode,
    description="example plugin: key chunks, online softmax, plain torch",
    devices=("cpu", "cuda"), dtypes=("float16", "bfloat16", "float32", "float64"),
    # An upper bound for the planners: the scores of one chunk of keys exist at a time, in fp32.
    memory=AttentionMemory(fp32_scores=True),
)
