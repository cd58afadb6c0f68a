"""Split-KV decode in one kernel per call: the last split of each group merges the group.

The split programs are those of kernels/triton_decode.py: each (sequence, kv head, row block,
split) attends every query row of the block to its slice of the cache with the online softmax
(window, softcap, paged and FP8 caches, ragged splitting as there) and stores a partial output
with its log-sum-exp for the rows that exist. Then, instead of a second launch, each program
counts itself in an atomic counter of its (sequence, kv head, row block); the program that
arrives last has every other split's partial result visible to it, merges them by log-sum-exp
and writes the output. A call is one launch, and the merge of one group starts as soon as that
group's splits are done, without waiting for the whole grid. Tensors are in the (batch,
seqlen, heads, head_dim) layout; cache_seqlens may be ragged, 0 included.

A sequence's splits past its keys exit at once and do not count themselves: the group waits
for the splits that hold keys (sequence_splits says how many). The counters are int32 zeros;
the last program of a group puts its counter back to 0, so the same counters serve every call
(a serving loop, a CUDA graph) and a call is then exactly one kernel: they and the partial
buffers are kept in the prepared call's workspace (triton_decode.scratch), or passed as `counters`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnlab.kernels.masks import FULL
from attnlab.kernels.registry import triton_interpreting
from attnlab.kernels.triton_decode import (CacheArguments, attend_split, cache_text, inspect_cache, inspect_fp8,
                                           inspect_ints, merge_row, scratch, split_plan, store_row)
from attnlab.kernels.triton_tiles import (dot_precision, finished, output_buffer, positive_scale, score_factors,
                                          sm_count, upcast_dot)

MIN_TILES_PER_SPLIT = 4     # K/V tiles a split reads at least, against the partial it writes and the merge reads
MAX_SPLITS = 64             # what one program merges at most: all of a row's splits in one read


@triton.jit(do_not_specialize=["window_left"])  # one build serves every window
def _decode_fused(
    Q, K, V, Lens, BlockTable, KDescale, VDescale, Out, Opart, Lpart, Counters,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_tb, stride_tn,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_pb, stride_ph, stride_ps,
    q_len, groups, kv_heads, num_splits, qk_scale, cap_log2, window_left,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PAGE_SIZE: tl.constexpr, KV_FP8: tl.constexpr, FP8_SPECIALS: tl.constexpr, SPLIT_BLOCK: tl.constexpr,
    MIN_TILES: tl.constexpr,
):
    b, kv_h, count = attend_split(
        Q, K, V, Lens, BlockTable, KDescale, VDescale, Opart, Lpart, stride_qb, stride_qm, stride_qh, stride_qd,
        stride_kb, stride_kn, stride_kh, stride_kd, stride_vb, stride_vn, stride_vh, stride_vd, stride_tb, stride_tn,
        stride_pb, stride_ph, stride_ps, q_len, groups, kv_heads, num_splits, qk_scale, cap_log2, window_left,
        HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, WINDOW, SOFTCAP, UPCAST_DOT, DOT_PRECISION, PAGE_SIZE, KV_FP8,
        FP8_SPECIALS, MIN_TILES)
    if tl.program_id(2) < count:   # a split past the sequence's keys wrote nothing: the group does not wait for it
        n_rows = groups * q_len
        group = b * stride_pb + kv_h * stride_ph
        # Arrival: every thread's stores are done (the barrier) before one release-acquire increment
        # publishes them at GPU scope; the program that sees count - 1 before it is the last of its
        # group, and the acquire makes every other split's partial result visible to it.
        tl.debug_barrier()
        counter = Counters + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == count - 1:
            # The merge, row by row, each row's splits read at once (merge_row).
            row0 = tl.program_id(1) * BLOCK_M
            for row in range(row0, tl.minimum(row0 + BLOCK_M, n_rows)):
                merged = merge_row(Opart, Lpart, group + row, stride_ps, count, SPLIT_BLOCK, BLOCK_D)
                store_row(Out, merged, b, kv_h * groups + row // q_len, row % q_len, stride_ob, stride_om,
                          stride_oh, stride_od, HEAD_DIM, BLOCK_D)
            # Every split of the group has arrived: the counter is free, and left at 0 for the next call.
            tl.store(counter, 0)


def choose_splits(programs: int, span: int, block_n: int, device: torch.device) -> int:
    """How many splits a call's programs divide each sequence's keys into.

    More splits fill the GPU: about two waves of programs over the SMs keep every SM busy while
    the last wave drains (a fixed 4 in the interpreter). Fewer splits cost less to merge: each
    split writes a partial result the group's last program reads back after everything else of
    its group is done. So each split reads at least MIN_TILES_PER_SPLIT K/V tiles (its own reads
    then outweigh its partial many times over; the kernel holds a short sequence to this too),
    and at most MAX_SPLITS are merged, in one read per row. Chosen from the cache's capacity,
    not the lengths, so the launch needs no sync.
    """
    target = 4 if device.type != "cuda" or triton_interpreting() else 2 * sm_count(device.index or 0)
    fill = triton.cdiv(target, programs)
    worth = triton.cdiv(span, MIN_TILES_PER_SPLIT * block_n)
    return max(1, min(fill, worth, MAX_SPLITS))


def decode(q, k_cache, v_cache, cache_seqlens, scale: float, num_splits: int | None = None, window=FULL,
           softcap: float = 0.0, counters: torch.Tensor | None = None, block_table=None, k_descale=None,
           v_descale=None, workspace: dict | None = None) -> torch.Tensor:
    """q (B, q_len, H, D); caches (B, max_seqlen, KVH, D), or with `block_table` (int32
    (B, max_blocks_per_seq)) paged (num_blocks, page_size, KVH, D); cache_seqlens int32 (B,);
    caches in q's dtype or FP8 (float8_e4m3fn, float8_e5m2) with `k_descale`/`v_descale`
    float32 (B, KVH) or None (1); `window` and `softcap` as in masks.py. num_splits: at most
    MAX_SPLITS.

    counters: int32 zeros of at least B x KVH x cdiv(H // KVH x q_len, 64) elements on q's device,
    which every call leaves at zero; None uses the workspace's (triton_decode.scratch). Calls
    that share them must not run at the same time (on two streams).
    """
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    caches = CacheArguments(q, k_cache, v_cache, block_table, k_descale, v_descale)
    q, scale = positive_scale(q, scale)
    groups = heads // kv_heads
    n_rows = groups * q_len
    if num_splits is not None and not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits: expected 1 to {MAX_SPLITS} (what one program merges), got {num_splits}")
    bd, block_m, row_blocks, block_n, left, splits = split_plan(
        batch, kv_heads, n_rows, head_dim, q_len, caches.max_seqlen, window, num_splits, choose_splits, q.device)

    groups_total = batch * kv_heads * row_blocks
    if counters is None:
        counters = scratch(workspace, (groups_total,), torch.int32, q.device, zeros=True)
    elif counters.dtype != torch.int32 or counters.device != q.device or counters.numel() < groups_total:
        raise ValueError(f"counters: expected int32 zeros of at least {groups_total} elements on {q.device}, "
                         f"got {counters.dtype} of {counters.numel()} on {counters.device}")
    lse_part = scratch(workspace, (batch, kv_heads, splits, n_rows), torch.float32, q.device)
    out_part = scratch(workspace, (batch, kv_heads, splits, n_rows, bd), torch.float32, q.device)
    out = output_buffer(q)
    _decode_fused[(batch * kv_heads, row_blocks, splits)](
        q, *caches.tensors[:2], cache_seqlens, *caches.tensors[2:], out, out_part, lse_part, counters,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *caches.table_strides, *out.stride(),
        *lse_part.stride()[:3], q_len, groups, kv_heads, splits, *score_factors(scale, softcap), max(left, 0),
        HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_M=block_m, BLOCK_N=block_n, WINDOW=left >= 0, SOFTCAP=softcap > 0,
        UPCAST_DOT=upcast_dot(q.dtype), DOT_PRECISION=dot_precision(q.dtype), **caches.constexprs,
        SPLIT_BLOCK=triton.next_power_of_2(splits), MIN_TILES=MIN_TILES_PER_SPLIT,
        **({} if triton_interpreting() else dict(num_warps=4, num_stages=3)),
    )
    return finished(out, q.dtype)


# --- what `attnlab inspect` compiles: one llama3-8b decode step over a 32k cache ---------------------------

def builds(capability: int) -> list:
    """The one launch of a decode call, bf16 q, head_dim 128, 32 query and 8 kv heads (4 rows per
    group, in a 16-row tile), 32 splits of a 32k cache (what choose_splits gives on an H100): over
    a contiguous bf16 cache, and over pages of 64 tokens of FP8 (triton_decode.inspect_fp8)."""
    from attnlab.kernels.inspect import Build

    splits, rows, bd = 32, 4, 128

    def build(name: str, page_size: int, kv_dtype: str) -> Build:
        pointers, cache, labels = inspect_cache(page_size, kv_dtype)
        constexprs = dict(HEAD_DIM=128, BLOCK_D=bd, BLOCK_M=16, BLOCK_N=64, WINDOW=False, SOFTCAP=False,
                          UPCAST_DOT=False, DOT_PRECISION="ieee", SPLIT_BLOCK=splits,
                          MIN_TILES=MIN_TILES_PER_SPLIT, **cache)
        labels = dict(mode="decode", dtype="bf16", head_dim=128, **labels,
                      config="split 16x64/w4/s3, merged by the last" + cache_text(labels))
        return Build(name, _decode_fused, inspect_ints(32768, splits, rows, bd, page_size), constexprs,
                     pointers=pointers, options=dict(num_warps=4, num_stages=3), labels=labels, kernels_per_call=1)
    return [build("decode_fused", 0, "bfloat16"), build("decode_fused_paged_fp8", 64, inspect_fp8(capability))]
