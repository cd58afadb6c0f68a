"""Paged and FP8 KV caches read the plain way, for implementations that have no paged or FP8
kernel: gather a sequence's pages into a contiguous cache, then dequantise it. Both copy, and
an implementation that calls them inside its timed call pays for the copies, as a user without
a paged kernel would.

Caches follow flash-attn: a paged cache is (num_blocks, page_size, kv_heads, head_dim) with an
int32 block_table (batch, max_blocks_per_seq), sequence b's slot s living at
cache[block_table[b, s // page_size], s % page_size]; an FP8 cache's value attended is the
stored value times its descale, a float32 (batch, kv_heads).
"""
from __future__ import annotations

from typing import Optional

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def gather_pages(cache: torch.Tensor, block_table: torch.Tensor, seqlen: int) -> torch.Tensor:
    """The first `seqlen` slots of every sequence, contiguous: (batch, seqlen, kv_heads, head_dim)
    in the cache's dtype. Table entries past a sequence's length are never valid by contract
    (they may hold anything), so they are clamped into range and their slots hold whatever that
    page holds: callers mask slots past each length, as for any contiguous cache."""
    num_blocks, page_size = cache.shape[:2]
    blocks = -(-seqlen // page_size)
    if blocks == 0 or num_blocks == 0:
        return cache.new_zeros((block_table.shape[0], seqlen, *cache.shape[2:]))
    table = block_table[:, :blocks].long().clamp(0, num_blocks - 1)
    pages = cache[table]                                  # (batch, blocks, page_size, kv_heads, head_dim)
    return pages.flatten(1, 2)[:, :seqlen]


def dequantise(cache: torch.Tensor, descale: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """cache (batch, seqlen, kv_heads, head_dim) as the values attended, in `dtype`: each stored
    value times its sequence's and kv head's descale (float32 (batch, kv_heads); None: 1),
    multiplied in float32 or wider and rounded once."""
    if descale is None:
        return cache.to(dtype)
    wide = torch.promote_types(dtype, torch.float32)
    return (cache.to(wide) * descale.to(wide)[:, None, :, None]).to(dtype)


def contiguous_caches(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlen: int,
                      block_table: Optional[torch.Tensor] = None, k_descale: Optional[torch.Tensor] = None,
                      v_descale: Optional[torch.Tensor] = None) -> tuple:
    """(k, v): (batch, seqlen, kv_heads, head_dim) in q's dtype, gathered from pages where a
    block_table is given (else the first `seqlen` slots) and dequantised."""
    if block_table is not None:
        k_cache, v_cache = gather_pages(k_cache, block_table, seqlen), gather_pages(v_cache, block_table, seqlen)
    else:
        k_cache, v_cache = k_cache[:, :seqlen], v_cache[:, :seqlen]
    return dequantise(k_cache, k_descale, q.dtype), dequantise(v_cache, v_descale, q.dtype)
