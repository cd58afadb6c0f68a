"""Split-KV ("flash-decoding") attention for a few new queries over a KV cache, in Triton.

Decoding has too few queries to fill a GPU, so the cache is split along its length:
step 1 gives each (sequence, kv head, split) a program that attends every query row of
the kv head's group (all its query heads x q_len) to its slice, reading each K/V tile once,
and writes a partial output with its log-sum-exp; step 2 merges the splits. Tensors are in
the (batch, seqlen, heads, head_dim) layout; cache_seqlens may be ragged, 0 included.

With a window (masks.py) the splits tile only the keys the window can reach, the last
q_len + left of each sequence, so a fixed window costs the same at any cache length.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from attnlab.kernels.masks import FULL
from attnlab.kernels.registry import triton_interpreting
from attnlab.kernels.triton_prefill import (_attend_keys, _load_tile, _normalise, block_d, capability_major,
                                            dot_precision, finished, output_buffer, positive_scale, score_factors,
                                            upcast_dot)


@triton.jit
def split_bounds(seqlen, q_len, pos, split, split_len, window_left, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr):
    """The keys one split of a sequence attends: per row, the visible keys [key_start, key_limit)
    (the last q_len positions, causal); for the split, [start, end), of which the tiles in
    [unmasked_start, unmasked_end) are seen whole by every row."""
    key_limit = seqlen - q_len + 1 + pos
    if WINDOW:
        # Row r sees keys [key_limit - 1 - left, key_limit): together the rows reach back to
        # seqlen - q_len - left, and the splits tile from that key's tile on. Tiles from
        # seqlen - 1 - left on are inside every row's window.
        key_start = key_limit - 1 - window_left
        start = tl.maximum(seqlen - q_len - window_left, 0) // BLOCK_N * BLOCK_N + split * split_len
        end = tl.minimum(start + split_len, seqlen)
        unmasked_start = tl.minimum(tl.maximum((tl.maximum(seqlen - 1 - window_left, 0) + BLOCK_N - 1)
                                               // BLOCK_N * BLOCK_N, start), end)
    else:
        key_start = key_limit
        start = split * split_len
        end = tl.minimum(start + split_len, seqlen)
        unmasked_start = start
    unmasked_end = tl.maximum(tl.minimum(end, seqlen - q_len + 1), unmasked_start)
    unmasked_end = unmasked_start + (unmasked_end - unmasked_start) // BLOCK_N * BLOCK_N
    return key_limit, key_start, start, end, unmasked_start, unmasked_end


@triton.jit
def split_partial(Q, K, V, Lens, b, kv_h, split, stride_qb, stride_qm, stride_qh, stride_qd, stride_kb, stride_kn,
                  stride_kh, stride_kd, stride_vb, stride_vn, stride_vh, stride_vd, q_len, groups, split_len, qk_scale,
                  cap_log2, window_left, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST_DOT: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """One split of one (sequence, kv head, row block): the online softmax over the split's keys,
    as (acc, m_i, l_i) unnormalised, with the tile's rows and head_dim offsets."""
    # Row r of the tile is query position r % q_len of query head kv_h * groups + r // q_len.
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_rows = groups * q_len
    head = kv_h * groups + rows // q_len
    pos = rows % q_len
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q_ptrs = Q + b * stride_qb + head[:, None] * stride_qh + pos[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = _load_tile(q_ptrs, rows, n_rows, offs_d, HEAD_DIM, BLOCK_D, True)
    if UPCAST_DOT:
        q = q.to(tl.float32)

    seqlen = tl.load(Lens + b)
    key_limit, key_start, start, end, unmasked_start, unmasked_end = split_bounds(
        seqlen, q_len, pos, split, split_len, window_left, BLOCK_N, WINDOW)

    k_ptrs = K + b * stride_kb + kv_h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + b * stride_vb + kv_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if WINDOW:  # the window's left edge, where rows differ in what they see
        acc, m_i, l_i = _attend_keys(q, k_ptrs, v_ptrs, b, kv_h, 0, start, unmasked_start, end, stride_kn,
                                     stride_vn, offs_n, offs_d, key_start, key_limit, acc, m_i, l_i, qk_scale,
                                     cap_log2, HEAD_DIM, BLOCK_N, BLOCK_D, True, True, SOFTCAP, False, False,
                                     UPCAST_DOT, DOT_PRECISION)
    # Tiles every row sees whole; then the causal diagonal of the last q_len keys, and the end.
    acc, m_i, l_i = _attend_keys(q, k_ptrs, v_ptrs, b, kv_h, 0, unmasked_start, unmasked_end, end, stride_kn,
                                 stride_vn, offs_n, offs_d, key_start, key_limit, acc, m_i, l_i, qk_scale,
                                 cap_log2, HEAD_DIM, BLOCK_N, BLOCK_D, False, WINDOW, SOFTCAP, False, False,
                                 UPCAST_DOT, DOT_PRECISION)
    acc, m_i, l_i = _attend_keys(q, k_ptrs, v_ptrs, b, kv_h, 0, unmasked_end, end, end, stride_kn, stride_vn,
                                 offs_n, offs_d, key_start, key_limit, acc, m_i, l_i, qk_scale,
                                 cap_log2, HEAD_DIM, BLOCK_N, BLOCK_D, True, WINDOW, SOFTCAP, False, False,
                                 UPCAST_DOT, DOT_PRECISION)

    return acc, m_i, l_i, rows, offs_d


@triton.jit(do_not_specialize=["window_left"])  # one build serves every window
def _decode_split(
    Q, K, V, Lens, Opart, Lpart,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_pb, stride_ph, stride_ps, stride_pm,
    q_len, groups, kv_heads, split_len, qk_scale, cap_log2, window_left,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:  # the merge may launch now, and waits in gdc_wait for this grid's results
        gdc_launch_dependents()
    b = tl.program_id(0) // kv_heads
    kv_h = tl.program_id(0) % kv_heads
    split = tl.program_id(2)
    acc, m_i, l_i, rows, offs_d = split_partial(
        Q, K, V, Lens, b, kv_h, split, stride_qb, stride_qm, stride_qh, stride_qd, stride_kb, stride_kn, stride_kh,
        stride_kd, stride_vb, stride_vn, stride_vh, stride_vd, q_len, groups, split_len, qk_scale, cap_log2,
        window_left, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, WINDOW, SOFTCAP, UPCAST_DOT, DOT_PRECISION)

    # Partial result of this split: normalised output and log2-sum-exp2. A row that saw no key
    # here contributes nothing (output 0, lse -inf); a row that met a NaN has lse NaN, and the
    # merge's exp2(lse - m) makes its result NaN.
    out, seen = _normalise(acc, l_i)
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    part = b * stride_pb + kv_h * stride_ph + split * stride_ps
    tl.store(Opart + part * BLOCK_D + rows[:, None] * BLOCK_D + offs_d[None, :], out)
    tl.store(Lpart + part + rows, lse)


@triton.jit
def _decode_merge(
    Opart, Lpart, Out,
    stride_pb, stride_ph, stride_ps, stride_pm,
    stride_ob, stride_om, stride_oh, stride_od,
    q_len, groups, kv_heads, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    # One program per query row, reading SPLIT_BLOCK splits per step: a loop over splits one by
    # one would wait on memory once per split, which costs more than the merge's reads.
    if PDL:  # launched before the split grid ended: wait until its partial results are visible
        gdc_wait()
    b = tl.program_id(0) // kv_heads
    kv_h = tl.program_id(0) % kv_heads
    row = tl.program_id(1)
    offs_s = tl.arange(0, SPLIT_BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    base = b * stride_pb + kv_h * stride_ph + row * stride_pm
    m = tl.full([], float("-inf"), dtype=tl.float32)
    total = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for first in range(0, num_splits, SPLIT_BLOCK):
        splits = first + offs_s
        part = base + splits * stride_ps
        lse = tl.load(Lpart + part, mask=splits < num_splits, other=float("-inf"))
        o = tl.load(Opart + part[:, None] * BLOCK_D + offs_d[None, :], mask=(splits < num_splits)[:, None],
                    other=0.0)
        m_new = tl.maximum(m, tl.max(lse, 0))  # ignores a NaN lse; its weight below is NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m - m_safe)
        weight = tl.math.exp2(lse - m_safe)
        acc = acc * alpha + tl.sum(o * weight[:, None], 0)
        total = total * alpha + tl.sum(weight, 0)
        m = m_new
    out = acc / tl.where(total == 0.0, 1.0, total)
    head = kv_h * groups + row // q_len
    pos = row % q_len
    o_ptrs = Out + b * stride_ob + head * stride_oh + pos * stride_om + offs_d * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def choose_splits(programs: int, max_seqlen: int, block_n: int, device: torch.device) -> int:
    """Enough splits for about two waves of programs on the GPU, never a split under one tile.

    Chosen from the cache's capacity, not the lengths, so the launch needs no device sync.
    """
    target = 4 if device.type != "cuda" else 2 * _sm_count(device.index or 0)
    return max(1, min(triton.cdiv(target, programs), triton.cdiv(max_seqlen, block_n), 256))


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch: Hopper or later, compiled (not interpreted)."""
    return device.type == "cuda" and not triton_interpreting() and capability_major(device) >= 9


def window_left(window, max_seqlen: int) -> int:
    """The window's left side as decode uses it: -1 where no row can reach past it (decode is
    causal, so the right side never matters)."""
    left = window[0]
    return left if 0 <= left < max_seqlen - 1 else -1


def split_span(max_seqlen: int, q_len: int, left: int, block_n: int) -> int:
    """How many keys of a sequence the splits must cover: all of them, or with a window only
    those from the tile of its first key on: under q_len + left + block_n, at any length."""
    return max_seqlen if left < 0 else min(max_seqlen, q_len + left + block_n - 1)


def split_plan(batch, kv_heads, n_rows, head_dim, q_len, max_seqlen, window, num_splits, choose, device) -> tuple:
    """The tiles and splits of a split-KV decode: (BLOCK_D, BLOCK_M, row blocks, BLOCK_N, the window's
    left reach, keys per split, splits); `choose(programs, span, block_n, device)` picks the split
    count where `num_splits` does not."""
    bd = block_d(head_dim)
    block_m = max(16, min(64, triton.next_power_of_2(n_rows)))
    row_blocks = triton.cdiv(n_rows, block_m)
    block_n = 32 if triton_interpreting() else (64 if bd <= 128 else 32)
    left = window_left(window, max_seqlen)
    span = split_span(max_seqlen, q_len, left, block_n)
    splits = num_splits or choose(batch * kv_heads * row_blocks, span, block_n, device)
    split_len = triton.cdiv(triton.cdiv(span, splits), block_n) * block_n
    return bd, block_m, row_blocks, block_n, left, split_len, triton.cdiv(span, split_len)


def decode(q, k_cache, v_cache, cache_seqlens, scale: float, num_splits: int | None = None,
           pdl: bool | None = None, window=FULL, softcap: float = 0.0) -> torch.Tensor:
    """q (B, q_len, H, D); caches (B, max_seqlen, KVH, D); cache_seqlens int32 (B,); `window` and
    `softcap` as in masks.py.

    pdl: launch the merge with programmatic dependent launch, so that its launch overlaps
    the split grid; None uses it where the GPU has it.
    """
    batch, q_len, heads, head_dim = q.shape
    max_seqlen, kv_heads = k_cache.shape[1], k_cache.shape[2]
    q, scale = positive_scale(q, scale)
    supported = pdl_supported(q.device)
    if pdl and not supported:
        raise ValueError(f"pdl=True, but programmatic dependent launch needs a compiled kernel on compute "
                         f"capability 9.0 or later ({q.device})")
    pdl = supported if pdl is None else pdl
    groups = heads // kv_heads
    interpreting = triton_interpreting()
    bd, block_m, row_blocks, block_n, left, split_len, splits = split_plan(
        batch, kv_heads, groups * q_len, head_dim, q_len, max_seqlen, window, num_splits, choose_splits, q.device)

    rows_padded = row_blocks * block_m
    lse_part = torch.empty(batch, kv_heads, splits, rows_padded, device=q.device, dtype=torch.float32)
    out_part = torch.empty(batch, kv_heads, splits, rows_padded, bd, device=q.device, dtype=torch.float32)
    out = output_buffer(q)
    _decode_split[(batch * kv_heads, row_blocks, splits)](
        q, k_cache, v_cache, cache_seqlens, out_part, lse_part,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *lse_part.stride(),
        q_len, groups, kv_heads, split_len, *score_factors(scale, softcap), max(left, 0),
        HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_M=block_m, BLOCK_N=block_n, WINDOW=left >= 0, SOFTCAP=softcap > 0,
        UPCAST_DOT=upcast_dot(q.dtype), DOT_PRECISION=dot_precision(q.dtype), PDL=pdl,
        **({} if interpreting else dict(num_warps=4, num_stages=3)),
    )
    _decode_merge[(batch * kv_heads, groups * q_len)](
        out_part, lse_part, out, *lse_part.stride(), *out.stride(),
        q_len, groups, kv_heads, splits, HEAD_DIM=head_dim, BLOCK_D=bd,
        SPLIT_BLOCK=min(64, triton.next_power_of_2(splits)), PDL=pdl, **({"launch_pdl": True} if pdl else {}),
    )
    return finished(out, q.dtype)


# --- what `attnlab inspect` compiles: one llama3-8b decode step over a 32k cache ---------------------------

def _inspect_ints(cache_len: int, splits: int, rows: int, head_dim: int) -> dict:
    from attnlab.kernels.inspect import contiguous_strides, named_strides

    heads, kv_heads = 32, 8
    ints = dict(q_len=1, groups=heads // kv_heads, kv_heads=kv_heads, split_len=cache_len // splits, num_splits=splits)
    for prefix, shape in (("q", [1, 1, heads, head_dim]), ("o", [1, 1, heads, head_dim]),
                          ("k", [1, cache_len, kv_heads, head_dim]), ("v", [1, cache_len, kv_heads, head_dim])):
        ints.update(named_strides(prefix, shape, "bmhd" if prefix in "qo" else "bnhd"))
    ints.update(zip(("stride_pb", "stride_ph", "stride_ps", "stride_pm"), contiguous_strides([1, kv_heads, splits, rows])))
    return ints


def builds(capability: int, pdl: bool | None = None) -> list:
    """The two launches of a decode call (the split grid, then the merge), bf16, head_dim 128, with
    programmatic dependent launch where the GPU has it (Hopper on); and the split with a window and
    softcap. `pdl` False: launched one after the other."""
    from attnlab.kernels.inspect import Build

    pdl = capability >= 90 if pdl is None else pdl
    splits, rows, bd = 32, 16, 128
    ints, pointers = _inspect_ints(32768, splits, rows, bd), {"Opart": "*fp32", "Lpart": "*fp32", "Lens": "*i32"}
    labels = dict(mode="decode", dtype="bf16", head_dim=128, pdl=pdl, config="split 16x64/w4/s3")

    def split(variant: bool) -> Build:
        constexprs = dict(HEAD_DIM=128, BLOCK_D=bd, BLOCK_M=rows, BLOCK_N=64, WINDOW=variant, SOFTCAP=variant,
                          UPCAST_DOT=False, DOT_PRECISION="ieee", PDL=pdl)
        return Build("decode_split_window" if variant else "decode_split", _decode_split, ints, constexprs,
                     pointers=pointers, options=dict(num_warps=4, num_stages=3), labels=labels, kernels_per_call=2)
    merge = Build("decode_merge", _decode_merge, ints, dict(HEAD_DIM=128, BLOCK_D=bd, SPLIT_BLOCK=32, PDL=pdl),
                  pointers=pointers, options=dict(launch_pdl=True) if pdl else {}, labels=labels, kernels_per_call=2)
    return [split(False), merge, split(True)]
