"""torch's FlexAttention: windows, softcap and packed sequences as mask and score mods over
block masks, compiled to Triton kernels on the GPU.

On the CPU it runs eagerly (torch's unfused reference, which materialises the scores): right,
but its times say nothing of the compiled kernel, so it counts as emulated there. Compiling for
the CPU works too, but takes about half a minute per shape.
"""
from __future__ import annotations

import functools
import warnings

import torch

from attnlab.kernels.masks import FULL
from attnlab.kernels.registry import (YES, autograd_backward, autograd_varlen_backward, cuda_capability, no,
                                      register_kernel)
from attnlab.models import AttentionMemory
from attnlab.visibility import sees


def _flex():
    from torch.nn.attention import flex_attention
    return flex_attention


def _probe(device_type: str):
    try:
        _flex()
    except Exception as exc:
        return no(f"torch.nn.attention.flex_attention not importable ({type(exc).__name__}: {exc})")
    return YES if device_type == "cpu" else cuda_capability(8, "FlexAttention's Triton kernels")


def _limits(device_type, dtype, head_dim):
    if device_type == "cuda" and head_dim not in (16, 32, 64, 128, 256):
        return no(f"compiled FlexAttention takes head_dim 16, 32, 64, 128 or 256, not {head_dim}")
    return YES


@functools.lru_cache(maxsize=None)
def _compiled():
    return torch.compile(_flex().flex_attention, dynamic=False)


def _backward_limits(device_type, dtype, head_dim):
    if device_type != "cuda":
        return no(f"FlexAttention has no backward on {device_type} (torch {torch.__version__} refuses it)")
    return YES


def _capped(softcap: float):
    def score_mod(score, b, h, q_idx, kv_idx):   # FlexAttention's scores arrive scaled
        return softcap * torch.tanh(score / softcap)
    return score_mod


def _run(q, k, v, block_mask, scale, softcap):
    """q (B, Sq, H, D), k and v (B, Sk, KVH, D) -> (B, Sq, H, D)."""
    score_mod = _capped(softcap) if softcap > 0 else None
    run = _compiled() if q.device.type == "cuda" else _flex().flex_attention
    if not torch.is_grad_enabled():   # on a CPU torch refuses inputs that require grad, even where none is taken
        q, k, v = q.detach(), k.detach(), v.detach()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        out = run(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=score_mod,
                  block_mask=block_mask, scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2).contiguous()


@functools.lru_cache(maxsize=64)
def _block_mask(seqlen_q, seqlen_k, causal, window, device):
    offset = seqlen_k - seqlen_q

    def mask_mod(b, h, q_idx, kv_idx):
        return sees(q_idx + offset, kv_idx, causal, window)
    return _flex().create_block_mask(mask_mod, None, None, seqlen_q, seqlen_k, device=device)


def prefill(q, k, v, causal, scale, window=FULL, softcap=0.0):
    block_mask = _block_mask(q.shape[1], k.shape[1], causal, tuple(window), str(q.device))
    return _run(q, k, v, block_mask, scale, softcap)


def prepare_decode(q, k_cache, v_cache, cache_seqlens, scale, window=FULL, softcap=0.0):
    """The block mask is built from the lengths once, here; the call reuses it. Slots past a
    length may hold anything, NaN too, and a masked score's zero weight times NaN is NaN in
    P @ V: where the cache is not full, V is zeroed past each length here, once per prepare."""
    lens, q_len = cache_seqlens.long(), q.shape[1]
    if bool((lens < k_cache.shape[1]).any()):
        written = torch.arange(k_cache.shape[1], device=q.device)[None, :] < lens[:, None]
        v_cache = v_cache.masked_fill(~written[:, :, None, None], 0.0)

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx < lens[b]) & sees(q_idx + lens[b] - q_len, kv_idx, True, window)
    block_mask = _flex().create_block_mask(mask_mod, q.shape[0], None, q_len, k_cache.shape[1], device=q.device)
    return lambda: _run(q, k_cache, v_cache, block_mask, scale, softcap)


def decode(q, k_cache, v_cache, cache_seqlens, scale, window=FULL, softcap=0.0):
    return prepare_decode(q, k_cache, v_cache, cache_seqlens, scale, window, softcap)()


def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window=FULL,
           softcap=0.0):
    """Packed sequences as one batch of one, with a document mask: a query sees keys of its own
    sequence only, by the rule of masks.py within it."""
    cu_q, cu_k = cu_seqlens_q.long(), cu_seqlens_k.long()
    doc_q = torch.searchsorted(cu_q, torch.arange(q.shape[0], device=q.device), right=True) - 1
    doc_k = torch.searchsorted(cu_k, torch.arange(k.shape[0], device=q.device), right=True) - 1
    len_q, len_k = cu_q.diff(), cu_k.diff()

    def mask_mod(b, h, q_idx, kv_idx):
        d = doc_q[q_idx]
        p = q_idx - cu_q[d] + len_k[d] - len_q[d]
        return (doc_k[kv_idx] == d) & sees(p, kv_idx - cu_k[d], causal, window)
    block_mask = _flex().create_block_mask(mask_mod, None, None, q.shape[0], k.shape[0], device=q.device)
    return _run(q[None], k[None], v[None], block_mask, scale, softcap)[0]


# No paged or FP8 caches (so both are refused by name): torch 2.13's paged FlexAttention
# (torch.nn.attention.experimental._paged_attention, private) keeps a page table of its own over
# a (1, kv_heads, pages x page_size, head_dim) pool, and run eagerly on the CPU it scores every
# sequence against the whole pool, letting NaN in pages a sequence does not own reach P @ V.
register_kernel(
    "flex", prefill=prefill, decode=decode, prepare_decode=prepare_decode, varlen=varlen,
    backward=autograd_backward(prefill), varlen_backward=autograd_varlen_backward(varlen),
    backward_limits=_backward_limits,
    options=("window", "softcap"), description="torch FlexAttention: block masks and score mods, compiled on a GPU",
    devices=("cpu", "cuda"), dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
    probe=_probe, limits=_limits, speed_rank={"cuda": 35, "cpu": 95}, emulated_on=("cpu",),
    # eagerly on the CPU, K and V repeated per head and the scores materialised; compiled, streamed
    memory=lambda device_type: AttentionMemory(expands_kv=True, fp32_scores=True) if device_type == "cpu"
    else AttentionMemory(),
)
