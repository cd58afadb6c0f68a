"""Adapter to the flash-attn package (FlashAttention-2/3), where it is installed.

flash-attn uses this package's layout and bottom-right causal rule, so the calls pass
straight through, gradients included. It is a CUDA source build and never a requirement.
"""
from __future__ import annotations

import importlib

import torch

from attnlab.kernels.masks import FULL
from attnlab.kernels.registry import (autograd_backward, autograd_varlen_backward, contiguous_head_dim,
                                      cuda_capability, no, register_kernel)


def _flash_attn():
    return importlib.import_module("flash_attn")


def _probe(device_type: str):
    try:
        module = _flash_attn()
    except Exception as exc:  # ImportError, or a build that fails to load its CUDA library
        return no(f"flash-attn not importable ({type(exc).__name__}: {exc}); install attnlab[flash]")
    return cuda_capability(8, f"flash-attn {module.__version__}")


def prefill(q, k, v, causal, scale, window=FULL, softcap=0.0):
    return _flash_attn().flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, window_size=window,
                                         softcap=softcap)


def decode(q, k_cache, v_cache, cache_seqlens, scale, window=FULL, softcap=0.0, block_table=None):
    """A paged cache's block_table passes straight through (flash-attn's own convention). Its
    FlashAttention-2 build takes no FP8 cache and no descales, so it declares none."""
    return _flash_attn().flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens,
                                                 block_table=block_table, softmax_scale=scale, causal=True,
                                                 window_size=window, softcap=softcap)


# flash_attn_with_kvcache refuses pages of other sizes ("Paged KV cache block size must be divisible by 256").
PAGE_SIZES = (lambda size: size % 256 == 0, "multiples of 256")


def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window=FULL,
           softcap=0.0):
    return _flash_attn().flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                softmax_scale=scale, causal=causal, window_size=window,
                                                softcap=softcap)


register_kernel(
    "flash-attn", prefill=prefill, decode=decode, varlen=varlen, options=("window", "softcap"),  # same conventions
    # flash_attn_func and flash_attn_varlen_func are differentiable: their backward kernels, windows and softcap too
    backward=autograd_backward(prefill), varlen_backward=autograd_varlen_backward(varlen),
    description="flash-attn package: flash_attn_func, flash_attn_with_kvcache",
    devices=("cuda",), dtypes=(torch.float16, torch.bfloat16), head_dims=range(8, 257, 8),
    probe=_probe, speed_rank=10, baseline=True,
    input_rules=contiguous_head_dim,  # flash_attn_with_kvcache asserts it; flash_attn_func would copy
    paged=PAGE_SIZES,
)
