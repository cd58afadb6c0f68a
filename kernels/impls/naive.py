"""The quadratic baseline: the full score matrix in memory, softmax in fp32; every option
(windows, softcap, packed sequences), and gradients by autograd through the same operations,
as the yardstick for those who take them.

Scores and P @ V run in the input dtype, as a framework's plain attention would, so its
error is the honest yardstick for what a dtype costs.
"""
from __future__ import annotations

import torch

from attnlab.kernels.masks import FULL, capped, decode_visible, visible
from attnlab.kernels.paged import FP8_DTYPES, contiguous_caches
from attnlab.kernels.registry import autograd_backward, autograd_varlen_backward, register_kernel
from attnlab.models import AttentionMemory

# K and V repeated for every query head, the whole score matrix in fp32: on every device; a paged
# or 8-bit cache gathered into a contiguous one first.
MEMORY = AttentionMemory(expands_kv=True, fp32_scores=True, gathers_cache=True)


def _attend(q, k, v, mask, scale, softcap=0.0):
    """q (B, Sq, H, D); k, v (B, Sk, KVH, D); mask broadcastable to (B, H, Sq, Sk)."""
    return _attend_scores(q, k, v, mask, scale, softcap)[0]


def _attend_scores(q, k, v, mask, scale, softcap=0.0):
    """(_attend's output, the scaled visible scores (B, H, Sq, Sk) its softmax took, -inf where hidden)."""
    groups = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2)                                   # (B, H, Sq, D)
    kh = k.transpose(1, 2).repeat_interleave(groups, dim=1)  # (B, H, Sk, D)
    vh = v.transpose(1, 2).repeat_interleave(groups, dim=1)
    softmax_dtype = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64 for fp64 input
    scores = capped((qh @ kh.transpose(-1, -2)).to(softmax_dtype) * scale, softcap)  # the (B, H, Sq, Sk) matrix
    scores = scores.masked_fill(~mask, float("-inf"))       # a select: a hidden NaN key is gone
    # A row that sees no key is all -inf, whose softmax is NaN, and NaN weights would make NaN
    # gradients too: by contract its weights and output are zeros. Only those rows are touched,
    # so a NaN in q or in a key or value a row sees stays NaN.
    empty = ~mask.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    out = (probs.to(q.dtype) @ vh).masked_fill(empty, 0.0)
    return out.transpose(1, 2).contiguous(), scores


def prefill(q, k, v, causal, scale, window=FULL, softcap=0.0):
    return _attend(q, k, v, visible(q.shape[1], k.shape[1], causal, q.device, window), scale, softcap)


def prefill_lse(q, k, v, causal, scale, window=FULL, softcap=0.0):
    """prefill's output and each row's log-sum-exp of its scaled (capped) visible scores, so
    partial results over key blocks merge exactly (ring attention). q (B, Sq, H, D), k and v
    (B, Sk, KVH, D) -> out as prefill's, lse (B, H, Sq) in float32 (float64 for float64 input,
    naive's softmax dtype); -inf for a row that sees no key."""
    out, scores = _attend_scores(q, k, v, visible(q.shape[1], k.shape[1], causal, q.device, window), scale, softcap)
    return out, torch.logsumexp(scores, dim=-1)


def decode(q, k_cache, v_cache, cache_seqlens, scale, window=FULL, softcap=0.0, block_table=None, k_descale=None,
           v_descale=None):
    if block_table is not None or k_cache.dtype != q.dtype:     # paged or FP8: gathered and dequantised here
        seqlen = block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1]
        k_cache, v_cache = contiguous_caches(q, k_cache, v_cache, seqlen, block_table, k_descale, v_descale)
    mask = decode_visible(cache_seqlens, q.shape[1], k_cache.shape[1], window)[:, None]  # (B, 1, q_len, S)
    # Slots past a sequence's length may hold anything (NaN too); 0 x NaN would leak into P @ V.
    written = torch.arange(k_cache.shape[1], device=q.device) < cache_seqlens[:, None].long()
    return _attend(q, k_cache, v_cache.masked_fill(~written[:, :, None, None], 0.0), mask, scale, softcap)


def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window=FULL,
           softcap=0.0):
    """Each packed sequence on its own: q (total_q, H, D), k and v (total_k, KVH, D)."""
    out = q.new_zeros(q.shape)
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for q0, q1, k0, k1 in zip(starts_q, starts_q[1:], starts_k, starts_k[1:]):
        if q1 > q0 and k1 > k0:
            out[q0:q1] = prefill(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], causal, scale, window, softcap)[0]
    return out


register_kernel(
    "naive", prefill=prefill, decode=decode, varlen=varlen, options=("window", "softcap"),
    backward=autograd_backward(prefill), varlen_backward=autograd_varlen_backward(varlen), prefill_lse=prefill_lse,
    description="quadratic baseline: full score matrix, softmax in fp32",
    devices=("cpu", "cuda"), dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
    speed_rank={"cpu": 30, "cuda": 90}, memory=MEMORY, baseline=True,
    paged=True, kv_dtypes=FP8_DTYPES,      # pages gathered and dequantised inside the call
)
