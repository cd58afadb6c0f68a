"""FlashAttention-2-style forward attention in Triton.

Each program owns BLOCK_M query rows of one head and streams that head's K/V in BLOCK_N
tiles through an online softmax, so the score matrix never leaves registers. GQA/MQA read
the shared kv head in place. Tensors are in the (batch, seqlen, heads, head_dim) layout, or
packed as (total, heads, head_dim) for `attention_varlen`.

Windows and softcap (the rules of masks.py) are constexpr switches: plain attention compiles to
the kernel it always was, and a window bounds each program's loop to the tiles of its band. The
tiles this kernel shares with the decodes and the backward are those of triton_tiles.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # Triton before 3.3: the pointer path only
    TensorDescriptor = None

from attnlab.kernels.masks import FULL
from attnlab.kernels.registry import triton_interpreting
from attnlab.kernels.triton_tiles import (INTERPRETER_BLOCK, attend_tile, block_d, capability_major, dot_precision,
                                          finished, host_window_band, kernel_band, load_tile, normalise,
                                          output_buffer, positive_scale, score_factors, upcast_dot, window_band)


@triton.jit
def _kv_tile(base, b, kv_h, row0, start_n, stride_n, offs_n, n_keys, offs_d,
             HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
             MASKED: tl.constexpr, TMA: tl.constexpr, PACKED: tl.constexpr):
    """Keys [start_n, start_n + BLOCK_N) of one kv head; with MASKED, rows past n_keys read as 0.

    With TMA, base is a (batch, seqlen, kv_heads, head_dim) tensor descriptor, the sequence's
    keys starting at row row0, and the copy engine fills rows past the tensor's end with zeros;
    otherwise it is the tile's pointers at the sequence's key 0.
    """
    if TMA:
        tile = base.load([b, row0 + start_n, kv_h, 0]).reshape(BLOCK_N, BLOCK_D)
        if PACKED:
            if MASKED:  # packed: past this sequence's end lie the next one's keys, not the copy engine's zeros
                tile = tl.where(offs_n[:, None] < n_keys, tile, 0.0)
    else:
        tile = load_tile(base + start_n * stride_n, offs_n, n_keys, offs_d, HEAD_DIM, BLOCK_D, MASKED)
    return tile


@triton.jit
def _attend_keys(q, k_base, v_base, b, kv_h, row0, lo, hi, n_end, stride_kn, stride_vn, offs_n, offs_d,
                 key_start, key_limit, acc, m_i, l_i, qk_scale, cap_log2,
                 HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
                 WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PACKED: tl.constexpr, TMA: tl.constexpr,
                 UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Keys [lo, hi) tile by tile. With MASKED, key j is visible to row r iff j < key_limit[r]
    (and, with WINDOW, j >= key_start[r]), and keys from n_end on read as 0; without, every key
    is visible and no tile is checked. row0: where the sequence's keys start, for TMA."""
    for start_n in range(lo, hi, BLOCK_N):
        k = _kv_tile(k_base, b, kv_h, row0, start_n, stride_kn, offs_n, n_end - start_n, offs_d,
                     HEAD_DIM, BLOCK_N, BLOCK_D, MASKED, TMA, PACKED)
        v = _kv_tile(v_base, b, kv_h, row0, start_n, stride_vn, offs_n, n_end - start_n, offs_d,
                     HEAD_DIM, BLOCK_N, BLOCK_D, MASKED, TMA, PACKED)
        acc, m_i, l_i = attend_tile(q, k, v, offs_n, key_start - start_n, key_limit - start_n, acc, m_i, l_i,
                                     qk_scale, cap_log2, MASKED, WINDOW, SOFTCAP, UPCAST_DOT, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def _attend_block(q, k_base, v_base, b, kv_h, row0, start_m, offs_m, offs_n, offs_d, seqlen_q, seqlen_k,
                  stride_kn, stride_vn, qk_scale, cap_log2, window_left, window_right,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  IS_CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PACKED: tl.constexpr,
                  TMA: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Query rows [start_m, start_m + BLOCK_M) of one head over the keys they see: (acc, l).

    Each phase is a loop over whole tiles; only those that cross a boundary of what a row
    sees (the diagonal, a window's edge, the ragged end) pay for masks.
    """
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if WINDOW:
        # Row i sits at p = i + seqlen_k - seqlen_q and sees keys [p - left, p + right] (causal
        # is right = 0, an unbounded side a bound past every key). The loop covers only this
        # block's band, so with a fixed window a program reads a fixed number of tiles and the
        # cost grows linearly with context, where the full triangle grows quadratically.
        key_start = offs_m + seqlen_k - seqlen_q - window_left
        key_limit = tl.minimum(offs_m + seqlen_k - seqlen_q + window_right + 1, seqlen_k)
        first_p = start_m + seqlen_k - seqlen_q
        last_p = tl.minimum(start_m + BLOCK_M, seqlen_q) - 1 + seqlen_k - seqlen_q
        lo, unmasked_lo, unmasked_hi, hi = window_band(first_p, last_p, seqlen_k, window_left, window_right,
                                                        BLOCK_N)
        # The band's left edge, its interior with no masks, then its right edge.
        acc, m_i, l_i = _attend_keys(q, k_base, v_base, b, kv_h, row0, lo, unmasked_lo, seqlen_k, stride_kn,
                                     stride_vn, offs_n, offs_d, key_start, key_limit, acc, m_i, l_i, qk_scale,
                                     cap_log2, HEAD_DIM, BLOCK_N, BLOCK_D, True, True, SOFTCAP, PACKED, TMA,
                                     UPCAST_DOT, DOT_PRECISION)
        acc, m_i, l_i = _attend_keys(q, k_base, v_base, b, kv_h, row0, unmasked_lo, unmasked_hi, seqlen_k,
                                     stride_kn, stride_vn, offs_n, offs_d, key_start, key_limit, acc, m_i, l_i,
                                     qk_scale, cap_log2, HEAD_DIM, BLOCK_N, BLOCK_D, False, True, SOFTCAP, PACKED,
                                     TMA, UPCAST_DOT, DOT_PRECISION)
        acc, m_i, l_i = _attend_keys(q, k_base, v_base, b, kv_h, row0, unmasked_hi, hi, seqlen_k, stride_kn,
                                     stride_vn, offs_n, offs_d, key_start, key_limit, acc, m_i, l_i, qk_scale,
                                     cap_log2, HEAD_DIM, BLOCK_N, BLOCK_D, True, True, SOFTCAP, PACKED, TMA,
                                     UPCAST_DOT, DOT_PRECISION)
    else:
        # Bottom-right causal: row i sees keys j < i + 1 + (seqlen_k - seqlen_q).
        if IS_CAUSAL:
            key_limit = offs_m + 1 + seqlen_k - seqlen_q
            hi = tl.minimum(seqlen_k, start_m + BLOCK_M + seqlen_k - seqlen_q)  # blocks past it: skipped
            unmasked_hi = tl.minimum(hi, start_m + 1 + seqlen_k - seqlen_q)      # seen by every row
        else:
            key_limit = tl.zeros([BLOCK_M], dtype=tl.int32) + seqlen_k
            hi = seqlen_k
            unmasked_hi = seqlen_k
        hi = tl.maximum(hi, 0)
        unmasked_hi = tl.maximum(unmasked_hi, 0) // BLOCK_N * BLOCK_N
        # Tiles every row sees in full, with no masks; then the diagonal and the ragged tail.
        acc, m_i, l_i = _attend_keys(q, k_base, v_base, b, kv_h, row0, 0, unmasked_hi, seqlen_k, stride_kn,
                                     stride_vn, offs_n, offs_d, key_limit, key_limit, acc, m_i, l_i, qk_scale,
                                     cap_log2, HEAD_DIM, BLOCK_N, BLOCK_D, False, False, SOFTCAP, PACKED, TMA,
                                     UPCAST_DOT, DOT_PRECISION)
        acc, m_i, l_i = _attend_keys(q, k_base, v_base, b, kv_h, row0, unmasked_hi, hi, seqlen_k, stride_kn,
                                     stride_vn, offs_n, offs_d, key_limit, key_limit, acc, m_i, l_i, qk_scale,
                                     cap_log2, HEAD_DIM, BLOCK_N, BLOCK_D, True, False, SOFTCAP, PACKED, TMA,
                                     UPCAST_DOT, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _store_lse(lse_row, offs_m, seqlen_q, m_i, l_i):
    """Each row's log-sum-exp of its scaled (capped) scores, in natural-log units: m and l are in
    log2 units (see triton_tiles.log2_scores). A row that saw no key has m = -inf and l = 0, so
    -inf (its l is read as 1, sparing log2 a zero)."""
    lse = (m_i + tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i))) * 0.6931471805599453  # ln 2
    tl.store(lse_row + offs_m, lse, mask=offs_m < seqlen_q)


@triton.jit
def _query_block(heads, groups, BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """The query rows this program owns on a grid of (query blocks, batch x heads): (start_m, b, h,
    kv_h). Largest causal blocks first: the long rows start early and the short ones fill the tail."""
    m_block = tl.num_programs(0) - 1 - tl.program_id(0) if IS_CAUSAL else tl.program_id(0)
    b = tl.program_id(1) // heads
    h = tl.program_id(1) % heads
    return m_block * BLOCK_M, b, h, h // groups


@triton.jit
def _forward_block(Q, K, V, Out, Lse, b, q_row0, k_row0, start_m, h, kv_h, heads, seqlen_q, seqlen_k,
                   stride_qb, stride_qm, stride_qh, stride_qd, stride_kb, stride_kn, stride_kh, stride_kd,
                   stride_vb, stride_vn, stride_vh, stride_vd, stride_ob, stride_om, stride_oh, stride_od,
                   stride_lh, qk_scale, cap_log2, window_left, window_right,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   IS_CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PACKED: tl.constexpr,
                   TMA: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   STORE_LSE: tl.constexpr):
    """Query rows [start_m, start_m + BLOCK_M) of head h of one sequence, attended and written.

    The sequence is batch entry b, its queries from row q_row0 and its keys from row k_row0 on:
    dense, entry b from row 0; packed, entry 0 (batch strides 0) from its first rows. With TMA,
    K and V are tensor descriptors, addressed by those coordinates. Lse is (batch, heads, rows),
    rows contiguous, heads stride_lh apart.
    """
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = (Q + b * stride_qb + h * stride_qh + (q_row0 + offs_m[:, None]) * stride_qm
              + offs_d[None, :] * stride_qd)
    q = load_tile(q_ptrs, offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)
    if UPCAST_DOT:
        q = q.to(tl.float32)
    if TMA:
        k_base = K
        v_base = V
    else:
        k_base = (K + b * stride_kb + kv_h * stride_kh + (k_row0 + offs_n[:, None]) * stride_kn
                  + offs_d[None, :] * stride_kd)
        v_base = (V + b * stride_vb + kv_h * stride_vh + (k_row0 + offs_n[:, None]) * stride_vn
                  + offs_d[None, :] * stride_vd)

    acc, l_i, m_i = _attend_block(q, k_base, v_base, b, kv_h, k_row0, start_m, offs_m, offs_n, offs_d, seqlen_q,
                                  seqlen_k, stride_kn, stride_vn, qk_scale, cap_log2, window_left, window_right,
                                  HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, IS_CAUSAL, WINDOW, SOFTCAP, PACKED, TMA,
                                  UPCAST_DOT, DOT_PRECISION)

    out, _ = normalise(acc, l_i)
    if STORE_LSE:  # what the backward recomputes P from
        _store_lse(Lse + (b * heads + h) * stride_lh + q_row0, offs_m, seqlen_q, m_i, l_i)
    o_ptrs = (Out + b * stride_ob + h * stride_oh + (q_row0 + offs_m[:, None]) * stride_om
              + offs_d[None, :] * stride_od)
    o_mask = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=o_mask)


@triton.jit(do_not_specialize=["window_left", "window_right"])  # one build serves every window
def _attention_fwd(
    Q, K, V, Out,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_om, stride_oh, stride_od,
    seqlen_q, seqlen_k, heads, groups, qk_scale, cap_log2, window_left, window_right, seq_bucket, Lse,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr, STORE_LSE: tl.constexpr = False,
):
    start_m, b, h, kv_h = _query_block(heads, groups, BLOCK_M, IS_CAUSAL)
    # Sequence b is entry b of the batch; Lse is (batch, heads, seqlen_q), contiguous.
    _forward_block(Q, K, V, Out, Lse, b, 0, 0, start_m, h, kv_h, heads, seqlen_q, seqlen_k,
                   stride_qb, stride_qm, stride_qh, stride_qd, stride_kb, stride_kn, stride_kh, stride_kd,
                   stride_vb, stride_vn, stride_vh, stride_vd, stride_ob, stride_om, stride_oh, stride_od, seqlen_q,
                   qk_scale, cap_log2, window_left, window_right, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N,
                   IS_CAUSAL, WINDOW, SOFTCAP, False, TMA, UPCAST_DOT, DOT_PRECISION, STORE_LSE)


@triton.jit(do_not_specialize=["window_left", "window_right"])
def _attention_varlen_fwd(
    Q, K, V, Out, CuSeqlensQ, CuSeqlensK,
    stride_qm, stride_qh, stride_qd,
    stride_kn, stride_kh, stride_kd,
    stride_vn, stride_vh, stride_vd,
    stride_om, stride_oh, stride_od,
    heads, groups, qk_scale, cap_log2, window_left, window_right, seq_bucket, Lse, stride_lh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr, STORE_LSE: tl.constexpr = False,
):
    # Packed sequences: the grid covers the longest one, and sequence b's rows and keys are
    # q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]] and k[cu_seqlens_k[b]:cu_seqlens_k[b + 1]].
    start_m, b, h, kv_h = _query_block(heads, groups, BLOCK_M, IS_CAUSAL)
    q_start = tl.load(CuSeqlensQ + b)
    seqlen_q = tl.load(CuSeqlensQ + b + 1) - q_start
    if start_m >= seqlen_q:  # this sequence ends before this block
        return
    k_start = tl.load(CuSeqlensK + b)
    seqlen_k = tl.load(CuSeqlensK + b + 1) - k_start
    # TMA descriptors are over (1, total_k, kv_heads, head_dim): the sequence's keys start at row
    # k_start of entry 0. Lse is (heads, total_q), flash-attn's packed layout.
    _forward_block(Q, K, V, Out, Lse, 0, q_start, k_start, start_m, h, kv_h, heads, seqlen_q, seqlen_k,
                   0, stride_qm, stride_qh, stride_qd, 0, stride_kn, stride_kh, stride_kd,
                   0, stride_vn, stride_vh, stride_vd, 0, stride_om, stride_oh, stride_od, stride_lh,
                   qk_scale, cap_log2, window_left, window_right, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N,
                   IS_CAUSAL, WINDOW, SOFTCAP, True, TMA, UPCAST_DOT, DOT_PRECISION, STORE_LSE)


def _set_kv_tiles(nargs):
    """Autotuning picks BLOCK_N; a tensor descriptor must copy tiles of that size."""
    for name in ("K", "V"):
        if not isinstance(nargs[name], torch.Tensor):
            nargs[name].block_shape = kv_block_shape(nargs["BLOCK_N"], nargs["BLOCK_D"])


def _configs():
    """Ampere and Hopper starting points: (BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    shapes = [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4), (64, 64, 4, 3), (64, 32, 4, 2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s, pre_hook=_set_kv_tiles)
            for m, n, w, s in shapes]


def _prune(configs, named_args, **kwargs):
    """Keep few tiles per case: each one compiled and timed is device time.

    fp32 (true fp32 products on FMA units) and head dims over 128 get the small tiles that
    fit shared memory; 16-bit types up to 128 try the wide tiles and one small one.
    """
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    small = [c for c in configs if c.kwargs["BLOCK_M"] == 64]
    if named_args["Q"].dtype == torch.float32:
        return small[-1:]
    if block_d > 128:
        return small
    return [c for c in configs if c.kwargs["BLOCK_M"] == 128] + small[:1]


def _tuned(kernel):
    key = ["HEAD_DIM", "IS_CAUSAL", "WINDOW", "SOFTCAP", "seq_bucket", "TMA"]
    return triton.autotune(configs=_configs(), key=key, prune_configs_by={"early_config_prune": _prune})(kernel)


_attention_fwd_tuned = _tuned(_attention_fwd)
_attention_varlen_fwd_tuned = _tuned(_attention_varlen_fwd)


def autotune(q, k, v, causal: bool, scale: float, tma: bool | None = None) -> dict:
    """Tune this case afresh (forgetting earlier choices) and say what autotuning saw: the
    median time of every tile it tried, in ms, and the tile it chose. Needs a GPU."""
    if triton_interpreting():
        raise RuntimeError("autotuning needs a GPU: the interpreter runs fixed tiles")
    _attention_fwd_tuned.cache.clear()
    attention(q, k, v, causal, scale, tma)

    def tile(config):
        return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)

    def median_ms(timing):  # do_bench gives (median, p20, p80)
        return timing[0] if isinstance(timing, (list, tuple)) else timing

    return {"tiles": [dict(tile(c), median_ms=median_ms(t)) for c, t in _attention_fwd_tuned.configs_timings.items()],
            "chosen": tile(_attention_fwd_tuned.best_config)}


def kv_block_shape(block_n: int, block_d: int) -> list[int]:
    return [1, block_n, 1, block_d]  # one kv head's keys, in the (batch, seqlen, kv_heads, head_dim) layout


def tma_unfit_reason(k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why K and V cannot be read through tensor descriptors (TMA); None if they can.

    The copy engine needs Hopper or later, 16-byte aligned bases and strides, and a
    contiguous head_dim.
    """
    if TensorDescriptor is None:
        return f"Triton {triton.__version__} has no host tensor descriptors"
    if k.device.type == "cuda" and capability_major(k.device) < 9:
        return "tensor descriptors need compute capability 9.0 or later"
    for name, t in (("k", k), ("v", v)):
        if 0 in t.shape:
            return f"{name} is empty"
        if t.stride(-1) != 1:
            return f"{name}'s head_dim is not contiguous"
        if t.data_ptr() % 16 or any(stride * t.element_size() % 16 for stride in t.stride()[:-1]):
            return f"{name}'s base or strides are not 16-byte aligned"
    return None


def key_ranges(seqlen_q: int, seqlen_k: int, causal: bool, window=FULL, block_m: int = 128,
               block_n: int = 64) -> list:
    """[lo, hi) of the keys each query block's program loops over, as the kernel bounds its
    loop: the work a window saves, countable without a GPU (tiles: ceil((hi - lo) / block_n))."""
    causal, bounds = kernel_band(causal, window, seqlen_q, seqlen_k)
    ranges = []
    for start_m in range(0, seqlen_q, block_m):
        if bounds is None:
            hi = min(seqlen_k, start_m + block_m + seqlen_k - seqlen_q) if causal else seqlen_k
            ranges.append((0, max(hi, 0)))
            continue
        first_p = start_m + seqlen_k - seqlen_q
        last_p = min(start_m + block_m, seqlen_q) - 1 + seqlen_k - seqlen_q
        lo, _, _, hi = host_window_band(first_p, last_p, seqlen_k, *bounds, block_n)
        ranges.append((lo, hi))
    return ranges


def _use_tma(tma: bool | None, k: torch.Tensor, v: torch.Tensor) -> bool:
    unfit = tma_unfit_reason(k, v)
    if tma and unfit:
        raise ValueError(f"tma=True, but {unfit}")
    if tma is None:
        return unfit is None and not triton_interpreting()
    return bool(tma)


def _descriptors(k: torch.Tensor, v: torch.Tensor, bd: int) -> tuple:
    """K and V as (batch, seqlen, kv_heads, head_dim) tensor descriptors. Compiled, the tile size
    is a placeholder until autotuning sets it (_set_kv_tiles)."""
    block_n = INTERPRETER_BLOCK if triton_interpreting() else 16
    return tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), kv_block_shape(block_n, bd)) for t in (k, v))


def _launch(kernel, tuned, args: tuple, meta: dict, rows: int, programs: int, dtype: torch.dtype) -> None:
    """Run kernel on a grid of (query blocks of `rows` rows, programs)."""
    if triton_interpreting():
        # The interpreter runs programs one by one: small fixed tiles, no autotuning.
        grid = (triton.cdiv(rows, INTERPRETER_BLOCK), programs)
        kernel[grid](*args, **meta, BLOCK_M=INTERPRETER_BLOCK, BLOCK_N=INTERPRETER_BLOCK, UPCAST_DOT=upcast_dot(dtype))
    else:
        grid = lambda cfg: (triton.cdiv(rows, cfg["BLOCK_M"]), programs)
        tuned[grid](*args, **meta, UPCAST_DOT=False)


def _meta(head_dim: int, causal: bool, bounds, softcap: float, dtype: torch.dtype, tma: bool) -> dict:
    return dict(HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), IS_CAUSAL=causal, WINDOW=bounds is not None,
                SOFTCAP=softcap > 0, DOT_PRECISION=dot_precision(dtype), TMA=tma)


def attention(q, k, v, causal: bool, scale: float, tma: bool | None = None, window=FULL,
              softcap: float = 0.0) -> torch.Tensor:
    """q (B, Sq, H, D); k, v (B, Sk, KVH, D) -> (B, Sq, H, D) in q's dtype, with `window` and
    `softcap` as in masks.py.

    tma: read K and V through tensor descriptors; None uses them on a GPU that has them
    when the tensors fit, True insists (ValueError if they cannot be used), False never.
    """
    return _attention(q, k, v, causal, scale, tma, window, softcap, lse=None)


def attention_lse(q, k, v, causal: bool, scale: float, tma: bool | None = None, window=FULL,
                  softcap: float = 0.0) -> tuple:
    """`attention` and each row's log-sum-exp of its scaled (capped) visible scores: (out, lse),
    lse float32 (batch, heads, seqlen_q), -inf for a row that sees no key (naive.prefill_lse's
    convention), so partial results over key blocks merge exactly and the backward recomputes
    the softmax from it."""
    batch, seqlen_q, heads = q.shape[:3]
    lse = torch.empty(batch, heads, seqlen_q, dtype=torch.float32, device=q.device)
    return _attention(q, k, v, causal, scale, tma, window, softcap, lse=lse), lse


def _attention(q, k, v, causal, scale, tma, window, softcap, lse) -> torch.Tensor:
    """attention, writing each row's log-sum-exp into `lse` unless it is None."""
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    causal, bounds = kernel_band(causal, window, seqlen_q, seqlen_k)
    q, scale = positive_scale(q, scale)
    tma = _use_tma(tma, k, v)
    strides = (*q.stride(), *k.stride(), *v.stride())
    if tma:
        k, v = _descriptors(k, v, block_d(head_dim))
    out = output_buffer(q)
    args = (q, k, v, out, *strides, *out.stride(), seqlen_q, seqlen_k, heads, heads // kv_heads,
            *score_factors(scale, softcap), *(bounds or (0, 0)), triton.next_power_of_2(max(seqlen_q, seqlen_k)),
            out if lse is None else lse)
    meta = dict(_meta(head_dim, causal, bounds, softcap, q.dtype, tma), STORE_LSE=lse is not None)
    _launch(_attention_fwd, _attention_fwd_tuned, args, meta, seqlen_q, batch * heads, q.dtype)
    return finished(out, q.dtype)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                     scale: float, window=FULL, softcap: float = 0.0, tma: bool | None = None) -> torch.Tensor:
    """Packed sequences: q (total_q, H, D); k, v (total_k, KVH, D); cu_seqlens_q and cu_seqlens_k
    int32 (batch + 1,) -> (total_q, H, D) in q's dtype. Sequence b is attended on its own, as
    `attention` would; max_seqlen_q and max_seqlen_k are at least its lengths. tma as there.
    """
    return _attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window,
                             softcap, tma, lse=None)


def attention_varlen_lse(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                         scale: float, window=FULL, softcap: float = 0.0, tma: bool | None = None) -> tuple:
    """`attention_varlen` and each row's log-sum-exp, (out, lse): lse float32 (heads, total_q),
    flash-attn's packed layout, -inf for a row that sees no key."""
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    return _attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window,
                             softcap, tma, lse=lse), lse


def _attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window,
                      softcap, tma, lse) -> torch.Tensor:
    """attention_varlen, writing each row's log-sum-exp into `lse` unless it is None."""
    heads, head_dim = q.shape[1], q.shape[2]
    batch, kv_heads = cu_seqlens_q.shape[0] - 1, k.shape[1]
    if q.shape[0] == 0 or batch == 0:
        return torch.zeros_like(q)
    out = output_buffer(q)
    causal, bounds = kernel_band(causal, window, max_seqlen_q, max_seqlen_k)
    q, scale = positive_scale(q, scale)
    tma = _use_tma(tma, k[None], v[None])  # as a batch of one: a sequence is a run of its rows
    strides = (*q.stride(), *k.stride(), *v.stride())
    if tma:
        k, v = _descriptors(k[None], v[None], block_d(head_dim))
    args = (q, k, v, out, cu_seqlens_q, cu_seqlens_k, *strides, *out.stride(), heads, heads // kv_heads,
            *score_factors(scale, softcap), *(bounds or (0, 0)),
            triton.next_power_of_2(max(max_seqlen_q, max_seqlen_k, 1)), out if lse is None else lse,
            0 if lse is None else lse.stride(0))
    meta = dict(_meta(head_dim, causal, bounds, softcap, q.dtype, tma), STORE_LSE=lse is not None)
    _launch(_attention_varlen_fwd, _attention_varlen_fwd_tuned, args, meta, max_seqlen_q, batch * heads, q.dtype)
    return finished(out, q.dtype)


# --- what `attnlab inspect` compiles: the launches of a call at the llama3-8b shapes ----------------------

INSPECT_HEADS, INSPECT_KV_HEADS, INSPECT_SEQLEN = 32, 8, 16384


def _inspect_ints(head_dim: int, varlen: bool) -> dict:
    from attnlab.kernels.inspect import named_strides

    ints = dict(heads=INSPECT_HEADS, groups=INSPECT_HEADS // INSPECT_KV_HEADS, seq_bucket=INSPECT_SEQLEN)
    if not varlen:
        ints.update(seqlen_q=INSPECT_SEQLEN, seqlen_k=INSPECT_SEQLEN)
    else:
        ints.update(stride_lh=INSPECT_SEQLEN)   # lse (heads, total_q)
    for prefix, heads in (("q", INSPECT_HEADS), ("k", INSPECT_KV_HEADS), ("v", INSPECT_KV_HEADS), ("o", INSPECT_HEADS)):
        shape = [INSPECT_SEQLEN, heads, head_dim] if varlen else [1, INSPECT_SEQLEN, heads, head_dim]
        ints.update(named_strides(prefix, shape, "bmhd" if prefix in "qo" else "bnhd"))
    return ints


def inspect_build(capability: int, dtype: torch.dtype, head_dim: int, causal: bool, config, tma: bool,
                  window: bool = False, softcap: bool = False, varlen: bool = False):
    """One prefill launch as the JIT builds it for a llama3-8b-shaped call (16k tokens)."""
    from attnlab.kernels.inspect import Build

    bd = block_d(head_dim)
    tensor_type = "*" + {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=bd, IS_CAUSAL=causal, WINDOW=window, SOFTCAP=softcap,
                      UPCAST_DOT=False, DOT_PRECISION="ieee", TMA=tma, **config.kwargs)
    constexprs["STORE_LSE"] = False
    block = kv_block_shape(config.kwargs["BLOCK_N"], bd)
    name = "prefill_varlen" if varlen else "prefill_window" if window or softcap else "prefill"
    return Build(name, _attention_varlen_fwd if varlen else _attention_fwd, _inspect_ints(head_dim, varlen),
                 constexprs, tensor_type, pointers={"CuSeqlensQ": "*i32", "CuSeqlensK": "*i32", "Lse": "*fp32"},
                 descriptors={"K": block, "V": block} if tma else {},
                 options=dict(num_warps=config.num_warps, num_stages=config.num_stages),
                 labels=dict(mode="prefill", dtype=tensor_type[1:], head_dim=head_dim, causal=causal, tma=tma,
                             window=window, softcap=softcap, varlen=varlen,
                             config=f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']}/w{config.num_warps}"
                                    f"/s{config.num_stages}"))


def tuned_configs(dtype: torch.dtype, head_dim: int) -> list:
    """The tiles autotuning may try for this case."""
    return _prune(_configs(), {"Q": torch.empty(0, dtype=dtype)}, BLOCK_D=block_d(head_dim))


def builds(capability: int, tma: bool | None = None) -> list:
    """What a prefill call compiles to: every tile autotuning may pick, bf16 causal, head dims 64 to
    256, by TMA where the GPU has it and by pointers; fp32 and an unaligned head_dim; and the
    variants (window with softcap, packed sequences). `tma` False: the pointer path only."""
    paths = [p for p in (capability >= 90, False) if tma is None or p == tma]
    result = [inspect_build(capability, torch.bfloat16, head_dim, True, config, path)
              for head_dim in (64, 128, 256) for config in tuned_configs(torch.bfloat16, head_dim)
              for path in dict.fromkeys(paths if head_dim == 128 else paths[:1])]
    result.append(inspect_build(capability, torch.float32, 64, False, tuned_configs(torch.float32, 64)[0], paths[0]))
    result.append(inspect_build(capability, torch.float16, 59, False, _configs()[0], False))
    first = tuned_configs(torch.bfloat16, 128)[0]
    return result + [inspect_build(capability, torch.bfloat16, 128, True, first, paths[0], window=True, softcap=True),
                     inspect_build(capability, torch.bfloat16, 128, True, first, paths[0], varlen=True),
                     inspect_build(capability, torch.bfloat16, 128, False, first, False, window=True, varlen=True)]
