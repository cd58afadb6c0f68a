"""Split-KV decode in one kernel per call: the last split of each group merges the group.

The split programs are those of kernels/triton_decode.py: each (sequence, kv head, row block,
split) attends every query row of the block to its slice of the cache with the online softmax
(window and softcap as there) and stores a partial output with its log-sum-exp, here only for
the rows that exist. Then, instead of a second launch, each program counts itself in an atomic
counter of its (sequence, kv head, row block); the program that arrives last has every other
split's partial result visible to it, merges them by log-sum-exp and writes the output. A call
is one launch, and the merge of one group starts as soon as that group's splits are done,
without waiting for the whole grid. Tensors are in the (batch, seqlen, heads, head_dim) layout;
cache_seqlens may be ragged, 0 included.

The counters are int32 zeros; the last program of a group puts its counter back to 0, so a
caller may pass the same `counters` to every call (a serving loop, a CUDA graph) and the call
is then exactly one kernel. Without them a call allocates zeros, since the module keeps no state.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnlab.kernels.masks import FULL
from attnlab.kernels.registry import triton_interpreting
from attnlab.kernels.triton_decode import _inspect_ints, _sm_count, split_partial, split_plan
from attnlab.kernels.triton_prefill import (_normalise, dot_precision, finished, output_buffer, positive_scale,
                                            score_factors, upcast_dot)

MIN_TILES_PER_SPLIT = 4     # K/V tiles a split reads at least, against the partial it writes and the merge reads
MAX_SPLITS = 64             # what one program merges at most: its reads are the call's tail


@triton.jit(do_not_specialize=["window_left"])  # one build serves every window
def _decode_fused(
    Q, K, V, Lens, Out, Opart, Lpart, Counters,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_pb, stride_ph, stride_ps,
    q_len, groups, kv_heads, split_len, num_splits, qk_scale, cap_log2, window_left,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0) // kv_heads
    kv_h = tl.program_id(0) % kv_heads
    split = tl.program_id(2)
    acc, m_i, l_i, rows, offs_d = split_partial(
        Q, K, V, Lens, b, kv_h, split, stride_qb, stride_qm, stride_qh, stride_qd, stride_kb, stride_kn, stride_kh,
        stride_kd, stride_vb, stride_vn, stride_vh, stride_vd, q_len, groups, split_len, qk_scale, cap_log2,
        window_left, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, WINDOW, SOFTCAP, UPCAST_DOT, DOT_PRECISION)
    valid = rows < groups * q_len
    head, pos = kv_h * groups + rows // q_len, rows % q_len      # query head and position of each row

    # Partial result of this split, for the rows that exist: normalised output and
    # log2-sum-exp2. A row that saw no key here has output 0 and lse -inf; one that met a NaN
    # has lse NaN, and the merge's exp2(lse - m) makes its result NaN.
    out, seen = _normalise(acc, l_i)
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    group = b * stride_pb + kv_h * stride_ph
    part = group + split * stride_ps + rows
    tl.store(Opart + part[:, None] * BLOCK_D + offs_d[None, :], out, mask=valid[:, None])
    tl.store(Lpart + part, lse, mask=valid)

    # Arrival: every thread's stores are done (the barrier) before one release-acquire increment
    # publishes them at GPU scope; the program that sees num_splits - 1 before it is the last
    # of its group, and the acquire makes every other split's partial result visible to it.
    tl.debug_barrier()
    counter = Counters + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
    if arrived == num_splits - 1:
        # The merge, split by split: rescale what is summed so far to the running maximum lse,
        # and add this split's output weighted by exp2(lse - max). A split that saw nothing
        # (lse -inf) weighs 0; rows that saw no key anywhere keep total 0 and are written 0.
        m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        total = tl.zeros([BLOCK_M], dtype=tl.float32)
        merged = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for s in range(0, num_splits):
            part = group + s * stride_ps + rows
            lse = tl.load(Lpart + part, mask=valid, other=float("-inf"), cache_modifier=".cg")
            o = tl.load(Opart + part[:, None] * BLOCK_D + offs_d[None, :], mask=valid[:, None], other=0.0,
                        cache_modifier=".cg")
            m_new = tl.maximum(m, lse)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m - m_safe)
            weight = tl.math.exp2(lse - m_safe)
            merged = merged * alpha[:, None] + o * weight[:, None]
            total = total * alpha + weight
            m = m_new
        merged = merged / tl.where(total == 0.0, 1.0, total)[:, None]
        o_ptrs = (Out + b * stride_ob + head[:, None] * stride_oh + pos[:, None] * stride_om
                  + offs_d[None, :] * stride_od)
        tl.store(o_ptrs, merged.to(Out.dtype.element_ty), mask=valid[:, None] & (offs_d[None, :] < HEAD_DIM))
        # Every split of the group has arrived: the counter is free, and left at 0 for the next call.
        tl.store(counter, 0)


def choose_splits(programs: int, span: int, block_n: int, device: torch.device) -> int:
    """How many splits a call's programs divide each sequence's keys into.

    More splits fill the GPU: about two waves of programs over the SMs keep every SM busy while
    the last wave drains (a fixed 4 in the interpreter). Fewer splits cost less to merge: each
    split writes a partial result the group's last program reads back, one split after another,
    after everything else of its group is done. So each split reads at least MIN_TILES_PER_SPLIT
    K/V tiles (its own reads then outweigh its partial many times over), and at most MAX_SPLITS
    are merged. Chosen from the cache's capacity, not the lengths, so the launch needs no sync.
    """
    target = 4 if device.type != "cuda" or triton_interpreting() else 2 * _sm_count(device.index or 0)
    fill = triton.cdiv(target, programs)
    worth = triton.cdiv(span, MIN_TILES_PER_SPLIT * block_n)
    return max(1, min(fill, worth, MAX_SPLITS))


def decode(q, k_cache, v_cache, cache_seqlens, scale: float, num_splits: int | None = None, window=FULL,
           softcap: float = 0.0, counters: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, q_len, H, D); caches (B, max_seqlen, KVH, D); cache_seqlens int32 (B,); `window` and
    `softcap` as in masks.py.

    counters: int32 zeros of at least B x KVH x cdiv(H // KVH x q_len, 64) elements on q's device,
    which every call leaves at zero; None allocates them for this call. Calls that share them
    must not run at the same time (on two streams).
    """
    batch, q_len, heads, head_dim = q.shape
    max_seqlen, kv_heads = k_cache.shape[1], k_cache.shape[2]
    q, scale = positive_scale(q, scale)
    groups = heads // kv_heads
    n_rows = groups * q_len
    interpreting = triton_interpreting()
    bd, block_m, row_blocks, block_n, left, split_len, splits = split_plan(
        batch, kv_heads, n_rows, head_dim, q_len, max_seqlen, window, num_splits, choose_splits, q.device)

    groups_total = batch * kv_heads * row_blocks
    if counters is None:
        counters = torch.zeros(groups_total, device=q.device, dtype=torch.int32)
    elif counters.dtype != torch.int32 or counters.device != q.device or counters.numel() < groups_total:
        raise ValueError(f"counters: expected int32 zeros of at least {groups_total} elements on {q.device}, "
                         f"got {counters.dtype} of {counters.numel()} on {counters.device}")
    lse_part = torch.empty(batch, kv_heads, splits, n_rows, device=q.device, dtype=torch.float32)
    out_part = torch.empty(batch, kv_heads, splits, n_rows, bd, device=q.device, dtype=torch.float32)
    out = output_buffer(q)
    _decode_fused[(batch * kv_heads, row_blocks, splits)](
        q, k_cache, v_cache, cache_seqlens, out, out_part, lse_part, counters,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(), *lse_part.stride()[:3],
        q_len, groups, kv_heads, split_len, splits, *score_factors(scale, softcap), max(left, 0),
        HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_M=block_m, BLOCK_N=block_n, WINDOW=left >= 0, SOFTCAP=softcap > 0,
        UPCAST_DOT=upcast_dot(q.dtype), DOT_PRECISION=dot_precision(q.dtype),
        **({} if interpreting else dict(num_warps=4, num_stages=3)),
    )
    return finished(out, q.dtype)


# --- what `attnlab inspect` compiles: one llama3-8b decode step over a 32k cache ---------------------------

def builds(capability: int) -> list:
    """The one launch of a decode call, bf16, head_dim 128, 32 query and 8 kv heads (4 rows per
    group, in a 16-row tile), 32 splits of a 32k cache: what choose_splits gives on an H100."""
    from attnlab.kernels.inspect import Build

    splits, rows, bd = 32, 4, 128
    ints = _inspect_ints(32768, splits, rows, bd)
    pointers = {"Opart": "*fp32", "Lpart": "*fp32", "Lens": "*i32", "Counters": "*i32"}
    labels = dict(mode="decode", dtype="bf16", head_dim=128, config="split 16x64/w4/s3, merged by the last")
    constexprs = dict(HEAD_DIM=128, BLOCK_D=bd, BLOCK_M=16, BLOCK_N=64, WINDOW=False, SOFTCAP=False,
                      UPCAST_DOT=False, DOT_PRECISION="ieee")
    return [Build("decode_fused", _decode_fused, ints, constexprs, pointers=pointers,
                  options=dict(num_warps=4, num_stages=3), labels=labels, kernels_per_call=1)]
