"""Split-KV ("flash-decoding") attention for a few new queries over a KV cache, in Triton.

Decoding has too few queries to fill a GPU, so the cache is split along its length:
step 1 gives each (sequence, kv head, split) a program that attends every query row of
the kv head's group (all its query heads x q_len) to its slice, reading each K/V tile once,
and writes a partial output with its log-sum-exp; step 2 merges the splits. Tensors are in
the (batch, seqlen, heads, head_dim) layout; cache_seqlens may be ragged, 0 included.

Ragged batches: the grid has one split count for every sequence (chosen on the host from the
cache's capacity, so a call reads no lengths on the host and stays one CUDA-graph-capturable
launch per step), but each sequence divides its own keys among them: its split length follows
its length (`sequence_splits`), and a program whose split starts past its sequence's keys
exits at once, writing nothing. A short sequence costs what it reads, its keys still spread
over every split so that a batch of short sequences fills the GPU; the merge reads only the
splits that hold keys.

With a window (masks.py) the splits tile only the keys the window can reach, the last
q_len + left of each sequence, so a fixed window costs the same at any cache length.

Caches: contiguous (batch, max_seqlen, kv_heads, head_dim), or paged (num_blocks, page_size,
kv_heads, head_dim) read through an int32 block_table (batch, max_blocks_per_seq), page sizes
powers of two from 16 to 256. Tiles and pages are both powers of two and tiles start at
multiples of BLOCK_N, so a tile lies within one page (one table entry per tile, the tile's
rows contiguous as in a contiguous cache) or spans whole pages (one table entry per key, each
key's head_dim still one contiguous vector). The tile keeps its size either way: tiles cut
to a page of 16 would take four times the loop steps and mma calls of narrower shape, where
the per-key lookups cost BLOCK_N table reads from one cache line per tile. FP8 caches
(float8_e4m3fn, float8_e5m2) are converted to q's dtype tile by tile, and their descales
applied where that is exact: the K descale folds into the score scale (per program one
multiply), the V descale into each split's output.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from attnlab.kernels.masks import FULL
from attnlab.kernels.registry import triton_interpreting
from attnlab.kernels.triton_tiles import (attend_tile, block_d, capability_major, dot_precision, finished, load_tile,
                                          normalise, output_buffer, positive_scale, score_factors, sm_count, upcast_dot)

PAGE_SIZES = tuple(1 << n for n in range(4, 9))     # 16 to 256 tokens
FP8_KINDS = {torch.float8_e4m3fn: 1, torch.float8_e5m2: 2}   # the kernels' KV_FP8


@triton.jit
def sequence_splits(seqlen, q_len, window_left, num_splits, BLOCK_N: tl.constexpr, MIN_TILES: tl.constexpr,
                    WINDOW: tl.constexpr):
    """How one sequence divides its keys among the grid's num_splits: (first, split_len, count).

    The splits tile keys [first, seqlen): all of them, or with a window those from the tile of
    the first key any row reaches (seqlen - q_len - left). split_len, a multiple of BLOCK_N and at
    least MIN_TILES tiles, follows the sequence's own length; `count` splits hold keys, at least 1
    (split 0 always runs, so an empty sequence still has its rows written, as 0)."""
    if WINDOW:
        first = tl.maximum(seqlen - q_len - window_left, 0) // BLOCK_N * BLOCK_N
    else:
        first = seqlen * 0
    span = seqlen - first
    split_len = tl.maximum(tl.cdiv(tl.cdiv(span, num_splits), BLOCK_N), MIN_TILES) * BLOCK_N
    count = tl.maximum(tl.cdiv(span, split_len), 1)
    return first, split_len, count


@triton.jit
def split_bounds(seqlen, q_len, pos, start, split_len, window_left, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr):
    """The keys one split of a sequence attends: per row, the visible keys [key_start, key_limit)
    (the last q_len positions, causal); for the split, [start, end), of which the tiles in
    [unmasked_start, unmasked_end) are seen whole by every row."""
    key_limit = seqlen - q_len + 1 + pos
    end = tl.minimum(start + split_len, seqlen)
    if WINDOW:
        # Row r sees keys [key_limit - 1 - left, key_limit). Tiles from seqlen - 1 - left on are
        # inside every row's window.
        key_start = key_limit - 1 - window_left
        unmasked_start = tl.minimum(tl.maximum((tl.maximum(seqlen - 1 - window_left, 0) + BLOCK_N - 1)
                                               // BLOCK_N * BLOCK_N, start), end)
    else:
        key_start = key_limit
        unmasked_start = start
    unmasked_end = tl.maximum(tl.minimum(end, seqlen - q_len + 1), unmasked_start)
    unmasked_end = unmasked_start + (unmasked_end - unmasked_start) // BLOCK_N * BLOCK_N
    return key_limit, key_start, end, unmasked_start, unmasked_end


@triton.jit
def _tile_pages(BlockTable, b, stride_tb, stride_tn, start_n, offs_n, n_keys, PAGE_SIZE: tl.constexpr,
                BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """Where keys [start_n, start_n + BLOCK_N) of sequence b live: the sequence itself in a
    contiguous cache (PAGE_SIZE 0), else the tile's page, or each key's page where a tile spans
    several. Table entries past the sequence's pages may hold anything, so keys from n_keys on
    read entry 0's place (their loads are masked too)."""
    if PAGE_SIZE == 0:
        pages = b
    elif PAGE_SIZE >= BLOCK_N:
        pages = tl.load(BlockTable + b * stride_tb + (start_n // PAGE_SIZE) * stride_tn).to(tl.int64)
    else:
        entries = BlockTable + b * stride_tb + ((start_n + offs_n) // PAGE_SIZE) * stride_tn
        if MASKED:
            pages = tl.load(entries, mask=offs_n < n_keys, other=0).to(tl.int64)
        else:
            pages = tl.load(entries).to(tl.int64)
    return pages


@triton.jit
def _tile_ptrs(Cache, head_ptrs, pages, start_n, offs_n, tile_offsets, stride_b, stride_n,
               PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Pointers to the tile's keys from _tile_pages's answer, in a cache with strides (stride_b,
    stride_n) over its first two dims: each key's row offset added to head_ptrs (the kv head's
    head_dim vector at row 0), or within one page a scalar base plus the loop's fixed
    tile_offsets (keys x head_dim). Page offsets are int64: pages times their stride may pass 2**31."""
    if PAGE_SIZE == 0:
        ptrs = head_ptrs + (pages * stride_b + (start_n + offs_n) * stride_n)[:, None]
    elif PAGE_SIZE >= BLOCK_N:
        ptrs = (Cache + pages * stride_b + (start_n % PAGE_SIZE) * stride_n) + tile_offsets
    else:
        ptrs = head_ptrs + (pages * stride_b + ((start_n + offs_n) % PAGE_SIZE) * stride_n)[:, None]
    return ptrs


@triton.jit
def _from_fp8(bits, KV_FP8: tl.constexpr, DTYPE: tl.constexpr, FP8_SPECIALS: tl.constexpr):
    """A tile of the cache in DTYPE: FP8 caches come as their bytes (uint8) and are converted here.

    Triton's interpreter (3.9) converts every FP8 byte as a finite number: it reads e4m3fn's NaN
    (0x7f, 0xff) as +-480 and e5m2's infinities and NaNs as finite powers of two. A GPU converts
    them right. The cache is passed as bytes so that, with FP8_SPECIALS (interpreted only), the
    exponent and mantissa bits can put those values right; compiled, the bitcast is free."""
    if KV_FP8 == 1:
        values = bits.to(tl.float8e4nv, bitcast=True).to(DTYPE)
        if FP8_SPECIALS:
            values = tl.where((bits & 0x7F) == 0x7F, float("nan"), values).to(DTYPE)
    elif KV_FP8 == 2:
        values = bits.to(tl.float8e5, bitcast=True).to(DTYPE)
        if FP8_SPECIALS:
            inf = tl.where((bits & 0x80) != 0, float("-inf"), float("inf"))
            special = tl.where((bits & 0x03) == 0, inf, float("nan"))
            values = tl.where((bits & 0x7C) == 0x7C, special, values).to(DTYPE)
    else:
        values = bits
    return values


@triton.jit
def _attend_cache(q, K, V, BlockTable, b, kv_h, lo, hi, n_end, stride_kb, stride_kn, stride_kh, stride_kd,
                  stride_vb, stride_vn, stride_vh, stride_vd, stride_tb, stride_tn, offs_n, offs_d,
                  key_start, key_limit, acc, m_i, l_i, qk_scale, cap_log2,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
                  WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST_DOT: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, PAGE_SIZE: tl.constexpr, KV_FP8: tl.constexpr,
                  FP8_SPECIALS: tl.constexpr):
    """Keys [lo, hi) of sequence b's kv head kv_h, tile by tile, through the online softmax
    (attend_tile's rules: with MASKED, key j is visible to row r iff key_start[r] <= j <
    key_limit[r], and keys from n_end on read as 0)."""
    k_head = kv_h * stride_kh + offs_d[None, :] * stride_kd
    v_head = kv_h * stride_vh + offs_d[None, :] * stride_vd
    k_tile = offs_n[:, None] * stride_kn + k_head
    v_tile = offs_n[:, None] * stride_vn + v_head
    for start_n in range(lo, hi, BLOCK_N):
        pages = _tile_pages(BlockTable, b, stride_tb, stride_tn, start_n, offs_n, n_end - start_n, PAGE_SIZE,
                            BLOCK_N, MASKED)
        k_ptrs = _tile_ptrs(K, K + k_head, pages, start_n, offs_n, k_tile, stride_kb, stride_kn, PAGE_SIZE, BLOCK_N)
        v_ptrs = _tile_ptrs(V, V + v_head, pages, start_n, offs_n, v_tile, stride_vb, stride_vn, PAGE_SIZE, BLOCK_N)
        k = load_tile(k_ptrs, offs_n, n_end - start_n, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        v = load_tile(v_ptrs, offs_n, n_end - start_n, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        k = _from_fp8(k, KV_FP8, q.dtype, FP8_SPECIALS)
        v = _from_fp8(v, KV_FP8, q.dtype, FP8_SPECIALS)
        acc, m_i, l_i = attend_tile(q, k, v, offs_n, key_start - start_n, key_limit - start_n, acc, m_i, l_i,
                                     qk_scale, cap_log2, MASKED, WINDOW, SOFTCAP, UPCAST_DOT, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def split_partial(Q, K, V, BlockTable, KDescale, VDescale, b, kv_h, seqlen, start, split_len,
                  stride_qb, stride_qm, stride_qh, stride_qd, stride_kb, stride_kn, stride_kh, stride_kd,
                  stride_vb, stride_vn, stride_vh, stride_vd, stride_tb, stride_tn,
                  q_len, groups, qk_scale, cap_log2, window_left,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST_DOT: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, PAGE_SIZE: tl.constexpr, KV_FP8: tl.constexpr,
                  FP8_SPECIALS: tl.constexpr):
    """One split, keys [start, start + split_len), of one (sequence, kv head, row block): each row's
    output over the split's keys (normalised, V descaled) and its log2-sum-exp2 (-inf where the
    row saw no key here, NaN where it met a NaN), with the tile's rows and head_dim offsets.
    Descales are contiguous (batch, kv_heads), indexed by program_id(0) = b * kv_heads + kv_h."""
    # Row r of the tile is query position r % q_len of query head kv_h * groups + r // q_len.
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_rows = groups * q_len
    head = kv_h * groups + rows // q_len
    pos = rows % q_len
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q_ptrs = Q + b * stride_qb + head[:, None] * stride_qh + pos[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = load_tile(q_ptrs, rows, n_rows, offs_d, HEAD_DIM, BLOCK_D, True)
    if UPCAST_DOT:
        q = q.to(tl.float32)
    if KDescale is not None:
        # q . (k x d) = d x (q . k): the descale joins the score scale. The unmasked tiles take
        # the row maximum before scaling, which needs a scale >= 0: a negative descale's sign
        # moves into q, exactly.
        k_descale = tl.load(KDescale + tl.program_id(0))
        q = tl.where(k_descale < 0, -q, q)
        qk_scale = qk_scale * tl.abs(k_descale)

    key_limit, key_start, end, unmasked_start, unmasked_end = split_bounds(
        seqlen, q_len, pos, start, split_len, window_left, BLOCK_N, WINDOW)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if WINDOW:  # the window's left edge, where rows differ in what they see
        acc, m_i, l_i = _attend_cache(q, K, V, BlockTable, b, kv_h, start, unmasked_start, end, stride_kb, stride_kn,
                                      stride_kh, stride_kd, stride_vb, stride_vn, stride_vh, stride_vd, stride_tb,
                                      stride_tn, offs_n, offs_d, key_start, key_limit, acc, m_i, l_i, qk_scale,
                                      cap_log2, HEAD_DIM, BLOCK_N, BLOCK_D, True, True, SOFTCAP, UPCAST_DOT,
                                      DOT_PRECISION, PAGE_SIZE, KV_FP8, FP8_SPECIALS)
    # Tiles every row sees whole; then the causal diagonal of the last q_len keys, and the end.
    acc, m_i, l_i = _attend_cache(q, K, V, BlockTable, b, kv_h, unmasked_start, unmasked_end, end, stride_kb,
                                  stride_kn, stride_kh, stride_kd, stride_vb, stride_vn, stride_vh, stride_vd,
                                  stride_tb, stride_tn, offs_n, offs_d, key_start, key_limit, acc, m_i, l_i,
                                  qk_scale, cap_log2, HEAD_DIM, BLOCK_N, BLOCK_D, False, WINDOW, SOFTCAP,
                                  UPCAST_DOT, DOT_PRECISION, PAGE_SIZE, KV_FP8, FP8_SPECIALS)
    acc, m_i, l_i = _attend_cache(q, K, V, BlockTable, b, kv_h, unmasked_end, end, end, stride_kb, stride_kn,
                                  stride_kh, stride_kd, stride_vb, stride_vn, stride_vh, stride_vd, stride_tb,
                                  stride_tn, offs_n, offs_d, key_start, key_limit, acc, m_i, l_i, qk_scale,
                                  cap_log2, HEAD_DIM, BLOCK_N, BLOCK_D, True, WINDOW, SOFTCAP, UPCAST_DOT,
                                  DOT_PRECISION, PAGE_SIZE, KV_FP8, FP8_SPECIALS)

    # A row that saw no key here contributes nothing (output 0, lse -inf); a row that met a NaN
    # has lse NaN, and the merge's exp2(lse - m) makes its result NaN.
    out, seen = normalise(acc, l_i)
    if VDescale is not None:    # sum p (v x d) / l = d x (sum p v / l)
        out = out * tl.load(VDescale + tl.program_id(0))
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    return out, lse, rows, offs_d


@triton.jit
def store_partial(Opart, Lpart, part, rows, offs_d, out, lse, n_rows, BLOCK_D: tl.constexpr):
    """A split's partial result for the rows that exist: the partial buffers are (batch, kv_heads,
    splits, rows, BLOCK_D) and (batch, kv_heads, splits, rows), `part` the split's first row."""
    valid = rows < n_rows
    tl.store(Opart + (part + rows)[:, None] * BLOCK_D + offs_d[None, :], out, mask=valid[:, None])
    tl.store(Lpart + part + rows, lse, mask=valid)


@triton.jit
def attend_split(Q, K, V, Lens, BlockTable, KDescale, VDescale, Opart, Lpart,
                 stride_qb, stride_qm, stride_qh, stride_qd, stride_kb, stride_kn, stride_kh, stride_kd,
                 stride_vb, stride_vn, stride_vh, stride_vd, stride_tb, stride_tn, stride_pb, stride_ph, stride_ps,
                 q_len, groups, kv_heads, num_splits, qk_scale, cap_log2, window_left,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST_DOT: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, PAGE_SIZE: tl.constexpr, KV_FP8: tl.constexpr,
                 FP8_SPECIALS: tl.constexpr, MIN_TILES: tl.constexpr):
    """The split work of a program on the grid (batch x kv_heads, row blocks, splits): its split of
    its sequence's keys (sequence_splits, splits of at least MIN_TILES tiles), attended by its row
    block and stored as a partial result, where the split holds keys. (b, kv_h, count): the
    program's sequence and kv head, and how many splits of the sequence hold keys."""
    b = tl.program_id(0) // kv_heads
    kv_h = tl.program_id(0) % kv_heads
    split = tl.program_id(2)
    seqlen = tl.load(Lens + b)
    first, split_len, count = sequence_splits(seqlen, q_len, window_left, num_splits, BLOCK_N, MIN_TILES, WINDOW)
    if split < count:   # past the sequence's keys: nothing to read, nothing a merge reads
        out, lse, rows, offs_d = split_partial(
            Q, K, V, BlockTable, KDescale, VDescale, b, kv_h, seqlen, first + split * split_len, split_len,
            stride_qb, stride_qm, stride_qh, stride_qd, stride_kb, stride_kn, stride_kh, stride_kd,
            stride_vb, stride_vn, stride_vh, stride_vd, stride_tb, stride_tn, q_len, groups, qk_scale, cap_log2,
            window_left, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, WINDOW, SOFTCAP, UPCAST_DOT, DOT_PRECISION,
            PAGE_SIZE, KV_FP8, FP8_SPECIALS)
        store_partial(Opart, Lpart, b * stride_pb + kv_h * stride_ph + split * stride_ps, rows, offs_d, out, lse,
                      groups * q_len, BLOCK_D)
    return b, kv_h, count


@triton.jit
def merge_row(Opart, Lpart, row_part, stride_ps, count, SPLIT_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """One query row's output from its first `count` splits' partial results (row_part: its entry
    in split 0), reading SPLIT_BLOCK splits at once: a loop over splits one by one would wait on
    memory once per split, which costs more than the merge's reads. Each split weighs
    exp2(lse - max lse); one that saw nothing (lse -inf) weighs 0, and a row that saw no key
    anywhere keeps total 0 and is 0. Loads skip L1 (.cg): other programs wrote the partials."""
    offs_s = tl.arange(0, SPLIT_BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    m = tl.full([], float("-inf"), dtype=tl.float32)
    total = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for first in range(0, count, SPLIT_BLOCK):
        splits = first + offs_s
        part = row_part + splits * stride_ps
        lse = tl.load(Lpart + part, mask=splits < count, other=float("-inf"), cache_modifier=".cg")
        o = tl.load(Opart + part[:, None] * BLOCK_D + offs_d[None, :], mask=(splits < count)[:, None], other=0.0,
                    cache_modifier=".cg")
        m_new = tl.maximum(m, tl.max(lse, 0))  # ignores a NaN lse; its weight below is NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m - m_safe)
        weight = tl.math.exp2(lse - m_safe)
        acc = acc * alpha + tl.sum(o * weight[:, None], 0)
        total = total * alpha + tl.sum(weight, 0)
        m = m_new
    return acc / tl.where(total == 0.0, 1.0, total)


@triton.jit
def store_row(Out, out, b, head, pos, stride_ob, stride_om, stride_oh, stride_od, HEAD_DIM: tl.constexpr,
              BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    o_ptrs = Out + b * stride_ob + head * stride_oh + pos * stride_om + offs_d * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)


@triton.jit(do_not_specialize=["window_left"])  # one build serves every window
def _decode_split(
    Q, K, V, Lens, BlockTable, KDescale, VDescale, Opart, Lpart,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_tb, stride_tn, stride_pb, stride_ph, stride_ps,
    q_len, groups, kv_heads, num_splits, qk_scale, cap_log2, window_left,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PAGE_SIZE: tl.constexpr, KV_FP8: tl.constexpr, FP8_SPECIALS: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:  # the merge may launch now, and waits in gdc_wait for this grid's results
        gdc_launch_dependents()
    attend_split(Q, K, V, Lens, BlockTable, KDescale, VDescale, Opart, Lpart, stride_qb, stride_qm, stride_qh,
                 stride_qd, stride_kb, stride_kn, stride_kh, stride_kd, stride_vb, stride_vn, stride_vh, stride_vd,
                 stride_tb, stride_tn, stride_pb, stride_ph, stride_ps, q_len, groups, kv_heads, num_splits, qk_scale,
                 cap_log2, window_left, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, WINDOW, SOFTCAP, UPCAST_DOT,
                 DOT_PRECISION, PAGE_SIZE, KV_FP8, FP8_SPECIALS, 1)


@triton.jit(do_not_specialize=["window_left"])
def _decode_merge(
    Opart, Lpart, Out, Lens,
    stride_pb, stride_ph, stride_ps,
    stride_ob, stride_om, stride_oh, stride_od,
    q_len, groups, kv_heads, num_splits, window_left,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_BLOCK: tl.constexpr,
    WINDOW: tl.constexpr, PDL: tl.constexpr,
):
    # One program per query row; the lengths say how many splits of its sequence hold keys.
    b = tl.program_id(0) // kv_heads
    kv_h = tl.program_id(0) % kv_heads
    row = tl.program_id(1)
    seqlen = tl.load(Lens + b)
    _, _, count = sequence_splits(seqlen, q_len, window_left, num_splits, BLOCK_N, 1, WINDOW)
    if PDL:  # launched before the split grid ended: wait until its partial results are visible
        gdc_wait()
    out = merge_row(Opart, Lpart, b * stride_pb + kv_h * stride_ph + row, stride_ps, count, SPLIT_BLOCK, BLOCK_D)
    store_row(Out, out, b, kv_h * groups + row // q_len, row % q_len, stride_ob, stride_om, stride_oh, stride_od,
              HEAD_DIM, BLOCK_D)


def choose_splits(programs: int, max_seqlen: int, block_n: int, device: torch.device) -> int:
    """Enough splits for about two waves of programs on the GPU, never a split under one tile.

    Chosen from the cache's capacity, not the lengths, so the launch needs no device sync.
    """
    target = 4 if device.type != "cuda" else 2 * sm_count(device.index or 0)
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
    """The tiles and grid of a split-KV decode: (BLOCK_D, BLOCK_M, row blocks, BLOCK_N, the window's
    left reach, splits); `choose(programs, span, block_n, device)` picks the split count where
    `num_splits` does not. Each sequence then divides its own keys among the splits."""
    bd = block_d(head_dim)
    block_m = max(16, min(64, triton.next_power_of_2(n_rows)))
    row_blocks = triton.cdiv(n_rows, block_m)
    block_n = 32 if triton_interpreting() else (64 if bd <= 128 else 32)
    left = window_left(window, max_seqlen)
    span = split_span(max_seqlen, q_len, left, block_n)
    splits = num_splits or choose(batch * kv_heads * row_blocks, span, block_n, device)
    return bd, block_m, row_blocks, block_n, left, splits


class CacheArguments:
    """A decode's caches as its kernels read them: tensors (K, V, BlockTable, KDescale, VDescale),
    the table's strides, the constexprs (PAGE_SIZE, KV_FP8, FP8_SPECIALS) and the longest
    sequence the caches hold (max_seqlen)."""

    def __init__(self, q, k_cache, v_cache, block_table=None, k_descale=None, v_descale=None):
        kind = FP8_KINDS.get(k_cache.dtype, 0)
        if not kind and k_cache.dtype != q.dtype:
            raise TypeError(f"k_cache: dtype {k_cache.dtype} is neither q's ({q.dtype}) nor an FP8 type "
                            f"({', '.join(map(str, FP8_KINDS))})")
        if v_cache.dtype != k_cache.dtype:
            raise TypeError(f"v_cache: dtype {v_cache.dtype} must equal k_cache's {k_cache.dtype}")
        if not kind and (k_descale is not None or v_descale is not None):
            raise ValueError(f"k_descale: descales take an FP8 cache, got k_cache of {k_cache.dtype}")
        if block_table is None:
            page_size, max_seqlen, table_strides = 0, k_cache.shape[1], (0, 0)
        else:
            page_size = k_cache.shape[1]
            if page_size not in PAGE_SIZES:
                raise ValueError(f"k_cache: page size (dim 1) must be a power of two from {PAGE_SIZES[0]} to "
                                 f"{PAGE_SIZES[-1]}, got {page_size}")
            max_seqlen, table_strides = block_table.shape[1] * page_size, tuple(block_table.stride())
        # Bytes, converted in the kernel (_from_fp8 says why).
        as_read = (lambda t: t.view(torch.uint8)) if kind else (lambda t: t)
        descale = lambda d: None if d is None else d.to(torch.float32).contiguous()
        self.tensors = (as_read(k_cache), as_read(v_cache), block_table, descale(k_descale), descale(v_descale))
        self.table_strides = table_strides
        self.constexprs = dict(PAGE_SIZE=page_size, KV_FP8=kind, FP8_SPECIALS=bool(kind) and triton_interpreting())
        self.max_seqlen = max_seqlen


def scratch(workspace: dict | None, shape, dtype: torch.dtype, device: torch.device,
            zeros: bool = False) -> torch.Tensor:
    """Scratch memory of a call (partial results; the fused kernel's counters, zeros that every
    call leaves at zero). `workspace`: the dict a prepared call owns (the API passes one per
    `prepare_decode`), in which they are made by its first call and reused by its later ones,
    since allocating and zero-filling per call is a fixed cost of every decode step; the calls
    of one prepared call run one after another. None: made for this call alone, as is anything
    made while a CUDA graph is captured (the graph keeps it)."""
    def make():
        return (torch.zeros if zeros else torch.empty)(tuple(shape), dtype=dtype, device=device)
    if workspace is None or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return make()
    key = (tuple(shape), dtype, device, zeros)
    if key not in workspace:
        workspace[key] = make()
    return workspace[key]


def decode(q, k_cache, v_cache, cache_seqlens, scale: float, num_splits: int | None = None,
           pdl: bool | None = None, window=FULL, softcap: float = 0.0, block_table=None, k_descale=None,
           v_descale=None, workspace: dict | None = None) -> torch.Tensor:
    """q (B, q_len, H, D); caches (B, max_seqlen, KVH, D), or with `block_table` (int32
    (B, max_blocks_per_seq)) paged (num_blocks, page_size, KVH, D); cache_seqlens int32 (B,);
    caches in q's dtype or FP8 (float8_e4m3fn, float8_e5m2) with `k_descale`/`v_descale`
    float32 (B, KVH) or None (1); `window` and `softcap` as in masks.py.

    pdl: launch the merge with programmatic dependent launch, so that its launch overlaps
    the split grid; None uses it where the GPU has it. workspace: see `scratch`.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    caches = CacheArguments(q, k_cache, v_cache, block_table, k_descale, v_descale)
    q, scale = positive_scale(q, scale)
    supported = pdl_supported(q.device)
    if pdl and not supported:
        raise ValueError(f"pdl=True, but programmatic dependent launch needs a compiled kernel on compute "
                         f"capability 9.0 or later ({q.device})")
    pdl = supported if pdl is None else pdl
    groups = heads // kv_heads
    n_rows = groups * q_len
    bd, block_m, row_blocks, block_n, left, splits = split_plan(
        batch, kv_heads, n_rows, head_dim, q_len, caches.max_seqlen, window, num_splits, choose_splits, q.device)

    lse_part = scratch(workspace, (batch, kv_heads, splits, n_rows), torch.float32, q.device)
    out_part = scratch(workspace, (batch, kv_heads, splits, n_rows, bd), torch.float32, q.device)
    out = output_buffer(q)
    _decode_split[(batch * kv_heads, row_blocks, splits)](
        q, *caches.tensors[:2], cache_seqlens, *caches.tensors[2:], out_part, lse_part,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *caches.table_strides, *lse_part.stride()[:3],
        q_len, groups, kv_heads, splits, *score_factors(scale, softcap), max(left, 0),
        HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_M=block_m, BLOCK_N=block_n, WINDOW=left >= 0, SOFTCAP=softcap > 0,
        UPCAST_DOT=upcast_dot(q.dtype), DOT_PRECISION=dot_precision(q.dtype), **caches.constexprs, PDL=pdl,
        **({} if triton_interpreting() else dict(num_warps=4, num_stages=3)),
    )
    _decode_merge[(batch * kv_heads, n_rows)](
        out_part, lse_part, out, cache_seqlens, *lse_part.stride()[:3], *out.stride(),
        q_len, groups, kv_heads, splits, max(left, 0), HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_N=block_n,
        SPLIT_BLOCK=min(64, triton.next_power_of_2(splits)), WINDOW=left >= 0, PDL=pdl,
        **({"launch_pdl": True} if pdl else {}),
    )
    return finished(out, q.dtype)


# --- what `attnlab inspect` compiles: one llama3-8b decode step over a 32k cache ---------------------------

INSPECT_CACHES = {   # name suffix -> page size: contiguous, one page per tile, several pages per tile
    "": 0, "_paged": 64, "_paged16": 16}


def inspect_fp8(capability: int) -> str:
    """The FP8 cache a build reads: float8_e4m3fn from compute capability 8.9 on (Triton converts
    it there only), float8_e5m2 before."""
    return "float8_e4m3fn" if capability >= 89 else "float8_e5m2"


def inspect_ints(cache_len: int, splits: int, rows: int, head_dim: int, page_size: int = 0) -> dict:
    """The integer arguments of the decode kernels for batch 1, 32 query and 8 kv heads."""
    from attnlab.kernels.inspect import contiguous_strides, named_strides

    heads, kv_heads = 32, 8
    ints = dict(q_len=1, groups=heads // kv_heads, kv_heads=kv_heads, num_splits=splits)
    cache = [cache_len // page_size, page_size] if page_size else [1, cache_len]
    for prefix, shape in (("q", [1, 1, heads, head_dim]), ("o", [1, 1, heads, head_dim]),
                          ("k", cache + [kv_heads, head_dim]), ("v", cache + [kv_heads, head_dim])):
        ints.update(named_strides(prefix, shape, "bmhd" if prefix in "qo" else "bnhd"))
    ints.update(zip(("stride_tb", "stride_tn"), contiguous_strides([1, cache_len // page_size])
                    if page_size else (0, 0)))
    ints.update(zip(("stride_pb", "stride_ph", "stride_ps"), contiguous_strides([1, kv_heads, splits, rows])))
    return ints


def inspect_cache(page_size: int, kv_dtype: str) -> tuple:
    """(pointers, constexprs, labels) of a build over this cache (kv_dtype a torch dtype's name): a
    contiguous cache has no table, and an FP8 one comes as bytes with float32 descales
    (CacheArguments)."""
    kind = FP8_KINDS.get(getattr(torch, kv_dtype), 0)
    pointers = {"Opart": "*fp32", "Lpart": "*fp32", "Lens": "*i32", "Counters": "*i32"}
    constexprs = dict(PAGE_SIZE=page_size, KV_FP8=kind, FP8_SPECIALS=False)
    if page_size:
        pointers["BlockTable"] = "*i32"
    else:
        constexprs["BlockTable"] = None
    if kind:
        pointers.update(K="*u8", V="*u8", KDescale="*fp32", VDescale="*fp32")
    else:
        constexprs.update(KDescale=None, VDescale=None)
    return pointers, constexprs, dict(page_size=page_size, kv_dtype=kv_dtype)


def cache_text(labels: dict) -> str:
    """How a build's config names its cache: nothing for the contiguous bf16 one."""
    parts = ([f"pages of {labels['page_size']}"] if labels["page_size"] else []) + \
        ([labels["kv_dtype"]] if labels["kv_dtype"] != "bfloat16" else [])
    return "".join(f", {p}" for p in parts)


def builds(capability: int, pdl: bool | None = None) -> list:
    """The two launches of a decode call (the split grid, then the merge), bf16 q, head_dim 128, with
    programmatic dependent launch where the GPU has it (Hopper on); the split with a window and
    softcap; and the split over paged caches (pages of 64, one table entry per tile; of 16, one per
    key) and over pages of 64 of FP8 (inspect_fp8). `pdl` False: launched one after the other."""
    from attnlab.kernels.inspect import Build

    pdl = capability >= 90 if pdl is None else pdl
    splits, rows, bd = 32, 4, 128
    base = dict(mode="decode", dtype="bf16", head_dim=128, pdl=pdl, config="split 16x64/w4/s3")

    def split(name: str, page_size: int, kv_dtype: str, variant: bool = False) -> Build:
        pointers, cache, labels = inspect_cache(page_size, kv_dtype)
        constexprs = dict(HEAD_DIM=128, BLOCK_D=bd, BLOCK_M=16, BLOCK_N=64, WINDOW=variant, SOFTCAP=variant,
                          UPCAST_DOT=False, DOT_PRECISION="ieee", PDL=pdl, **cache)
        return Build(name, _decode_split, inspect_ints(32768, splits, rows, bd, page_size), constexprs,
                     pointers=pointers, options=dict(num_warps=4, num_stages=3),
                     labels=dict(base, **labels, config=base["config"] + cache_text(labels)), kernels_per_call=2)
    pointers, _, labels = inspect_cache(0, "bfloat16")
    merge = Build("decode_merge", _decode_merge, inspect_ints(32768, splits, rows, bd),
                  dict(HEAD_DIM=128, BLOCK_D=bd, BLOCK_N=64, SPLIT_BLOCK=32, WINDOW=False, PDL=pdl),
                  pointers=pointers, options=dict(launch_pdl=True) if pdl else {}, labels=dict(base, **labels),
                  kernels_per_call=2)
    return [split("decode_split", 0, "bfloat16"), merge, split("decode_split_window", 0, "bfloat16", True),
            *(split(f"decode_split{suffix}", page_size, "bfloat16") for suffix, page_size in INSPECT_CACHES.items()
              if page_size),
            split("decode_split_paged_fp8", 64, inspect_fp8(capability))]
