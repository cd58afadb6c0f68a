"""FlashAttention-2's backward in Triton, for the forward of triton_prefill.py.

The forward saves each row's log-sum-exp (lse), so the backward never stores the score matrix:
it recomputes each tile's probabilities P = exp(S - lse) from Q and K, then

    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dQ = dS K * scale,   dK = dS^T Q * scale

with delta = rowsum(dO * O) (= rowsum(P * dP)), computed once by a pre-pass. Two kernels share
the work without atomics: one program per key block writes that block's dK and dV, looping over
the query blocks that see it, for every query head of its kv head's group (GQA: K and V are read
in place and dK, dV summed over the group in registers); one program per query block and head
writes dQ, looping over the key blocks it sees. Both visit only the tiles inside the causal or
window band (the forward's band arithmetic, window_band, read from either side), and only the
tiles that cross a band edge or the ragged end pay for masks.

Softcap: the score is s = c * tanh(x / c) of the scaled product x, so dS gains the factor
ds/dx = 1 - (s / c)^2 = 1 - tanh^2. A row that sees no key (lse = -inf) is given lse = +inf here,
so its P is 0 everywhere and it contributes no gradient.

Tensors are in the (batch, seqlen, heads, head_dim) layout.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnlab.kernels.masks import FULL
from attnlab.kernels.registry import triton_interpreting
from attnlab.kernels.triton_prefill import attention_lse, attention_varlen_lse
from attnlab.kernels.triton_tiles import (INTERPRETER_BLOCK, LOG2E, block_d, dot_precision, kernel_band, load_tile,
                                          positive_scale, score_factors, tanh, upcast_dot, window_band)

_LOG2E = tl.constexpr(LOG2E)   # a global a kernel may read


# --- the pre-pass: delta = rowsum(dO * O) -----------------------------------------------------------

@triton.jit
def _bwd_delta(
    Out, DO, Delta,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_dob, stride_dom, stride_doh, stride_dod,
    seqlen_q, heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # Delta (batch, heads, seqlen_q) float32, contiguous like the forward's lse.
    b = tl.program_id(1) // heads
    h = tl.program_id(1) % heads
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = load_tile(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                   offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)
    do = load_tile(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom
                    + offs_d[None, :] * stride_dod, offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + (b * heads + h) * seqlen_q + offs_m, delta, mask=offs_m < seqlen_q)


# --- shared by both kernels ----------------------------------------------------------------------------

@triton.jit
def _scores(qk, qk_scale, cap_log2, SOFTCAP: tl.constexpr):
    """(scores in log2 units, t): the forward's log2_scores, keeping t = tanh of the capped
    argument for the softcap's derivative 1 - t^2 (without softcap t is unused)."""
    if SOFTCAP:
        t = tanh(qk * qk_scale)
        s = t * cap_log2
    else:
        t = qk
        s = qk * qk_scale
    return s, t


@triton.jit
def _row_stats(Lse, Delta, row, offs_m, seqlen_q, CHECKED: tl.constexpr):
    """lse in log2 units and delta of query rows offs_m. Checked: rows past seqlen_q and rows that
    see no key (lse = -inf) get lse = +inf, which makes their P exactly 0 (no -inf - -inf NaN)."""
    if CHECKED:
        lse = tl.load(Lse + row + offs_m, mask=offs_m < seqlen_q, other=float("-inf"))
        delta = tl.load(Delta + row + offs_m, mask=offs_m < seqlen_q, other=0.0)
        lse = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
    else:
        lse = tl.load(Lse + row + offs_m) * _LOG2E
        delta = tl.load(Delta + row + offs_m)
    return lse, delta


# --- dK and dV: one program per (key block, kv head, batch) -------------------------------------------------

@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_base, do_base, Lse, Delta, row, lo, hi, seqlen_q, seqlen_k,
                stride_qm, stride_dom, offs_m, offs_n, offs_d, pos_shift, window_left, window_right,
                qk_scale, cap_log2,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST_DOT: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """Adds the query rows [lo, hi) of one head to this key block's dK (unscaled) and dV, tile by
    tile, in the transposed form (keys as rows) so dK and dV come out of the dots in place.
    With MASKED, key n is seen by query m iff n < key_limit[m] (and, with WINDOW, n >= key_start[m]),
    and rows past seqlen_q read as 0; without, every query of every tile sees every key."""
    for start_m in range(lo, hi, BLOCK_M):
        q = load_tile(q_base + start_m * stride_qm, offs_m, seqlen_q - start_m, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        do = load_tile(do_base + start_m * stride_dom, offs_m, seqlen_q - start_m, offs_d, HEAD_DIM, BLOCK_D,
                        MASKED)
        if UPCAST_DOT:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse, delta = _row_stats(Lse, Delta, row, start_m + offs_m, seqlen_q, MASKED)
        # P^T for this tile, recomputed from the saved lse.
        s, t = _scores(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION), qk_scale, cap_log2, SOFTCAP)
        if MASKED:
            pos = start_m + offs_m + pos_shift       # each query's position among the keys
            visible = offs_n[:, None] < tl.minimum(pos + window_right + 1, seqlen_k)[None, :]
            if WINDOW:
                visible = visible & (offs_n[:, None] >= (pos - window_left)[None, :])
            s = tl.where(visible, s, float("-inf"))
        p = tl.math.exp2(s - lse[None, :])
        dv += tl.dot(p.to(do.dtype), do, input_precision=DOT_PRECISION)
        # dS^T = P^T * (dP^T - delta), dP^T = V dO^T; softcap's chain rule through tanh.
        dp = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[None, :])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dk += tl.dot(ds.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _sequence(CuSeqlensQ, CuSeqlensK, b, seqlen_q, seqlen_k, PACKED: tl.constexpr):
    """Sequence b's first row of q and of k (0, 0 in a batch) and its lengths: packed, its rows are
    q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]] and its keys likewise."""
    q_start = 0
    k_start = 0
    if PACKED:
        q_start = tl.load(CuSeqlensQ + b)
        seqlen_q = tl.load(CuSeqlensQ + b + 1) - q_start
        k_start = tl.load(CuSeqlensK + b)
        seqlen_k = tl.load(CuSeqlensK + b + 1) - k_start
    return q_start, k_start, seqlen_q, seqlen_k


@triton.jit(do_not_specialize=["window_left", "window_right"])
def _bwd_dkdv(
    Q, K, V, DO, Lse, Delta, DK, DV, CuSeqlensQ, CuSeqlensK,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_dkb, stride_dkn, stride_dkh, stride_dkd,
    stride_dvb, stride_dvn, stride_dvh, stride_dvd,
    seqlen_q, seqlen_k, heads, kv_heads, groups, qk_scale, cap_log2, scale, window_left, window_right,
    stride_lb, stride_lh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PACKED: tl.constexpr = False,
):
    start_n = tl.program_id(0) * BLOCK_N
    b = tl.program_id(1) // kv_heads
    kv_h = tl.program_id(1) % kv_heads
    q_start, k_start, seqlen_q, seqlen_k = _sequence(CuSeqlensQ, CuSeqlensK, b, seqlen_q, seqlen_k, PACKED)
    if start_n >= seqlen_k:  # a packed sequence that ends before this block
        return
    # Each tensor from its sequence's first row (packed: the batch stride is 0).
    Q += b * stride_qb + q_start * stride_qm
    DO += b * stride_dob + q_start * stride_dom
    K += b * stride_kb + k_start * stride_kn
    V += b * stride_vb + k_start * stride_vn
    DK += b * stride_dkb + k_start * stride_dkn
    DV += b * stride_dvb + k_start * stride_dvn
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)

    # This block's keys and values stay in registers for the whole program.
    k = load_tile(K + kv_h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                   offs_n, seqlen_k, offs_d, HEAD_DIM, BLOCK_D, True)
    v = load_tile(V + kv_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                   offs_n, seqlen_k, offs_d, HEAD_DIM, BLOCK_D, True)
    if UPCAST_DOT:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # The queries that see any of keys [start_n, last_n]: query m sits at position m + pos_shift
    # and sees keys [position - left, position + right], so key n is seen from the positions
    # [n - right, n + left], the forward's band with the sides swapped. (lo, unmasked_lo,
    # unmasked_hi, hi) in query rows; the queries in [unmasked_lo, unmasked_hi) see every key here.
    pos_shift = seqlen_k - seqlen_q
    last_n = tl.minimum(start_n + BLOCK_N, seqlen_k) - 1
    lo, unmasked_lo, unmasked_hi, hi = window_band(start_n - pos_shift, last_n - pos_shift, seqlen_q,
                                                    window_right, window_left, BLOCK_M)

    # Every query head of this kv head's group, read in place; dK and dV sum over them.
    for g in range(0, groups):
        h = kv_h * groups + g
        q_base = Q + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
        do_base = DO + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod
        row = b * stride_lb + h * stride_lh + q_start
        # The band's near edge, its interior with no masks, then its far edge and ragged end.
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, Lse, Delta, row, lo, unmasked_lo, seqlen_q, seqlen_k,
                             stride_qm, stride_dom, offs_m, offs_n, offs_d, pos_shift, window_left, window_right,
                             qk_scale, cap_log2, HEAD_DIM, BLOCK_D, BLOCK_M, True, WINDOW, SOFTCAP, UPCAST_DOT,
                             DOT_PRECISION)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, Lse, Delta, row, unmasked_lo, unmasked_hi, seqlen_q,
                             seqlen_k, stride_qm, stride_dom, offs_m, offs_n, offs_d, pos_shift, window_left,
                             window_right, qk_scale, cap_log2, HEAD_DIM, BLOCK_D, BLOCK_M, False, WINDOW, SOFTCAP,
                             UPCAST_DOT, DOT_PRECISION)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, Lse, Delta, row, unmasked_hi, hi, seqlen_q, seqlen_k,
                             stride_qm, stride_dom, offs_m, offs_n, offs_d, pos_shift, window_left, window_right,
                             qk_scale, cap_log2, HEAD_DIM, BLOCK_D, BLOCK_M, True, WINDOW, SOFTCAP, UPCAST_DOT,
                             DOT_PRECISION)

    # dS was taken with respect to the scaled product: the scale comes back once, here.
    mask = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    tl.store(DK + kv_h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             (dk * scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + kv_h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=mask)


# --- dQ: one program per (query block, head, batch) ------------------------------------------------------

@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_base, v_base, lo, hi, seqlen_k, stride_kn, stride_vn, offs_m, offs_n,
              offs_d, pos_shift, window_left, window_right, qk_scale, cap_log2,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Adds keys [lo, hi) to this query block's dQ (unscaled), tile by tile. With MASKED, key n is
    seen by query m iff n < key_limit[m] (and, with WINDOW, n >= key_start[m]), and keys past
    seqlen_k read as 0; without, every query sees every key of every tile."""
    pos = offs_m + pos_shift
    key_limit = tl.minimum(pos + window_right + 1, seqlen_k)
    key_start = pos - window_left
    for start_n in range(lo, hi, BLOCK_N):
        k = load_tile(k_base + start_n * stride_kn, offs_n, seqlen_k - start_n, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        v = load_tile(v_base + start_n * stride_vn, offs_n, seqlen_k - start_n, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        if UPCAST_DOT:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s, t = _scores(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), qk_scale, cap_log2, SOFTCAP)
        if MASKED:
            visible = (start_n + offs_n)[None, :] < key_limit[:, None]
            if WINDOW:
                visible = visible & ((start_n + offs_n)[None, :] >= key_start[:, None])
            s = tl.where(visible, s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])
        ds = p * (tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION) - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=["window_left", "window_right"])
def _bwd_dq(
    Q, K, V, DO, Lse, Delta, DQ, CuSeqlensQ, CuSeqlensK,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_dqb, stride_dqm, stride_dqh, stride_dqd,
    seqlen_q, seqlen_k, heads, groups, qk_scale, cap_log2, scale, window_left, window_right, stride_lb, stride_lh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PACKED: tl.constexpr = False,
):
    start_m = tl.program_id(0) * BLOCK_M
    b = tl.program_id(1) // heads
    h = tl.program_id(1) % heads
    kv_h = h // groups
    q_start, k_start, seqlen_q, seqlen_k = _sequence(CuSeqlensQ, CuSeqlensK, b, seqlen_q, seqlen_k, PACKED)
    if start_m >= seqlen_q:  # a packed sequence that ends before this block
        return
    Q += b * stride_qb + q_start * stride_qm
    DO += b * stride_dob + q_start * stride_dom
    DQ += b * stride_dqb + q_start * stride_dqm
    K += b * stride_kb + k_start * stride_kn
    V += b * stride_vb + k_start * stride_vn
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    # This block's queries, output gradients and row statistics stay in registers.
    q = load_tile(Q + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                   offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)
    do = load_tile(DO + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                    offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)
    if UPCAST_DOT:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse, delta = _row_stats(Lse, Delta, b * stride_lb + h * stride_lh + q_start, offs_m, seqlen_q, True)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # The keys these rows see, as the forward bounds its loop: the band's left edge, its interior
    # with no masks, then its right edge (the causal diagonal) and the ragged end.
    pos_shift = seqlen_k - seqlen_q
    first_p = start_m + pos_shift
    last_p = tl.minimum(start_m + BLOCK_M, seqlen_q) - 1 + pos_shift
    lo, unmasked_lo, unmasked_hi, hi = window_band(first_p, last_p, seqlen_k, window_left, window_right, BLOCK_N)
    k_base = K + kv_h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_base = V + kv_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, lo, unmasked_lo, seqlen_k, stride_kn, stride_vn, offs_m,
                   offs_n, offs_d, pos_shift, window_left, window_right, qk_scale, cap_log2, HEAD_DIM, BLOCK_D,
                   BLOCK_N, True, WINDOW, SOFTCAP, UPCAST_DOT, DOT_PRECISION)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, unmasked_lo, unmasked_hi, seqlen_k, stride_kn, stride_vn,
                   offs_m, offs_n, offs_d, pos_shift, window_left, window_right, qk_scale, cap_log2, HEAD_DIM,
                   BLOCK_D, BLOCK_N, False, WINDOW, SOFTCAP, UPCAST_DOT, DOT_PRECISION)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, unmasked_hi, hi, seqlen_k, stride_kn, stride_vn, offs_m,
                   offs_n, offs_d, pos_shift, window_left, window_right, qk_scale, cap_log2, HEAD_DIM, BLOCK_D,
                   BLOCK_N, True, WINDOW, SOFTCAP, UPCAST_DOT, DOT_PRECISION)

    mask = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    tl.store(DQ + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             (dq * scale).to(DQ.dtype.element_ty), mask=mask)


# --- tiles: autotuned on a GPU, small and fixed in the interpreter --------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) by the largest BLOCK_D each serves. Each was compiled
# for sm_90 in bf16 (`attnlab inspect --arch 90`): up to 128 they use wgmma and spill nothing.
# dK/dV holds K, V, dK and dV of its key block in registers, so its query tile is narrow and its
# warps many; dQ holds Q, dO and dQ, and streams K and V.
# At 128 each list starts with a tile that spills nothing with a window and softcap (dK/dV) or
# packed sequences (dQ) too, where the next, wider one spills a few bytes.
DKDV_TILES = {64: [(32, 128, 8, 2), (64, 64, 8, 2), (32, 64, 8, 2)], 128: [(16, 64, 8, 2), (32, 64, 8, 2)],
              256: [(16, 32, 4, 2)]}
DQ_TILES = {64: [(128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3)],
            128: [(128, 32, 8, 2), (128, 64, 8, 2), (64, 32, 4, 3)], 256: [(32, 32, 4, 2)]}
FP32_TILE = (16, 32, 4, 2)      # fp32 multiplies on FMA units: small tiles, few registers


def _tile(config) -> tuple:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def _configs(tiles: dict) -> list:
    shapes = dict.fromkeys([t for listed in tiles.values() for t in listed] + [FP32_TILE])
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def _pruner(tiles: dict):
    """Keeps the tiles listed for this head dim (each is compiled and timed), or fp32's own."""
    def prune(configs, named_args, **kwargs):
        bd = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
        if named_args["Q"].dtype == torch.float32:
            keep = [FP32_TILE]
        else:
            keep = tiles[min(d for d in tiles if d >= bd)]
        return [c for tile in keep for c in configs if _tile(c) == tile]     # in the listed order
    return prune


_KEY = ["HEAD_DIM", "WINDOW", "SOFTCAP", "seqlen_q", "seqlen_k"]
_bwd_dkdv_tuned = triton.autotune(configs=_configs(DKDV_TILES), key=_KEY,
                                  prune_configs_by={"early_config_prune": _pruner(DKDV_TILES)})(
    _bwd_dkdv)
_bwd_dq_tuned = triton.autotune(configs=_configs(DQ_TILES), key=_KEY,
                                prune_configs_by={"early_config_prune": _pruner(DQ_TILES)})(
    _bwd_dq)
DELTA_BLOCK = 64


def _launch(kernel, tuned, args: tuple, meta: dict, rows: int, programs: int, block: str) -> None:
    """Run kernel on a grid of (blocks of `rows` along its `block` axis, programs)."""
    if triton_interpreting():
        grid = (triton.cdiv(rows, INTERPRETER_BLOCK), programs)
        kernel[grid](*args, **meta, BLOCK_M=INTERPRETER_BLOCK, BLOCK_N=INTERPRETER_BLOCK)
    else:
        tuned[lambda cfg: (triton.cdiv(rows, cfg[block]), programs)](*args, **meta)


# --- the host side ------------------------------------------------------------------------------------------

def backward(q, k, v, causal: bool, scale: float, window=FULL, softcap: float = 0.0, tma: bool | None = None):
    """Forward and what the backward needs: (out, grads), grads(dout) -> (dq, dk, dv) in the
    shapes and dtypes of q, k, v, callable any number of times. q (B, Sq, H, D); k, v (B, Sk, KVH, D);
    dout like out. window, softcap as in masks.py; tma as for triton_prefill.attention (the
    forward's K/V reads; the backward kernels read by pointers)."""
    out, lse = attention_lse(q, k, v, causal, scale, tma, window, softcap)
    return out, lambda dout: gradients(q, k, v, out, lse, dout, causal, scale, window, softcap)


def varlen_backward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                    scale: float, window=FULL, softcap: float = 0.0, tma: bool | None = None):
    """`backward` for packed sequences: q (total_q, H, D); k, v (total_k, KVH, D); cu_seqlens_q,
    cu_seqlens_k int32 (batch + 1,), as triton_prefill.attention_varlen takes them."""
    out, lse = attention_varlen_lse(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                                    window, softcap, tma)
    packed = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return out, lambda dout: gradients(q, k, v, out, lse, dout, causal, scale, window, softcap, packed)


def gradients(q, k, v, out, lse, dout, causal: bool, scale: float, window=FULL, softcap: float = 0.0,
              packed=None) -> tuple:
    """(dq, dk, dv) of attention's out (with its lse, from attention_lse) for the output gradient
    dout; `packed`: (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) for packed
    sequences, out and lse then from attention_varlen_lse."""
    if tuple(dout.shape) != tuple(out.shape):
        raise ValueError(f"dout: expected shape {tuple(out.shape)} (the output's), got {tuple(dout.shape)}")
    dout = dout.to(out.dtype)     # the dots take operands of one dtype
    if packed is not None:        # a packed tensor is a batch of one whose sequences the kernels find
        q, k, v, out, dout = (t[None] for t in (q, k, v, out, dout))
        lse = lse[None]
        cu_seqlens_q, cu_seqlens_k, seqlen_q, seqlen_k = packed
        batch = cu_seqlens_q.shape[0] - 1
    else:
        cu_seqlens_q = cu_seqlens_k = lse        # not read
        batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
    heads, head_dim, kv_heads = q.shape[2], q.shape[3], k.shape[2]
    if 0 in q.shape or 0 in k.shape or batch == 0:
        return tuple(torch.zeros_like(t[0] if packed else t) for t in (q, k, v))
    causal, bounds = kernel_band(causal, window, seqlen_q, seqlen_k)
    flipped = scale < 0
    q, scale = positive_scale(q, scale)
    left, right = _sides(causal, bounds, seqlen_q, seqlen_k)
    # Packed rows that belong to no sequence are never written: zeros.
    dq, dk, dv = (_grad_buffer(t, zeros=packed is not None) for t in (q, k, v))
    delta = torch.empty_like(lse)
    meta = dict(HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim))
    _bwd_delta[(triton.cdiv(q.shape[1], DELTA_BLOCK), q.shape[0] * heads)](
        out, dout, delta, *out.stride(), *dout.stride(), q.shape[1], heads, **meta, BLOCK_M=DELTA_BLOCK)

    meta.update(WINDOW=bounds is not None, SOFTCAP=softcap > 0, UPCAST_DOT=upcast_dot(q.dtype),
                DOT_PRECISION=dot_precision(q.dtype), PACKED=packed is not None)
    common = (q, k, v, dout, lse, delta)
    strides = _strides(packed, q, k, v, dout)
    factors = (*score_factors(scale, softcap), scale, left, right, lse.stride(0) if packed is None else 0,
               lse.stride(1))
    _launch(_bwd_dkdv, _bwd_dkdv_tuned, (*common, dk, dv, cu_seqlens_q, cu_seqlens_k, *strides,
                                        *_strides(packed, dk, dv), seqlen_q, seqlen_k, heads, kv_heads,
                                        heads // kv_heads, *factors),
            meta, seqlen_k, batch * kv_heads, "BLOCK_N")
    _launch(_bwd_dq, _bwd_dq_tuned, (*common, dq, cu_seqlens_q, cu_seqlens_k, *strides, *_strides(packed, dq),
                                     seqlen_q, seqlen_k, heads, heads // kv_heads, *factors),
            meta, seqlen_q, batch * heads, "BLOCK_M")
    dq = -dq if flipped else dq   # the kernels saw -q (positive_scale)
    grads = dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    return tuple(g[0] for g in grads) if packed is not None else grads


def _strides(packed, *tensors) -> tuple:
    """The tensors' strides in turn; packed, a batch stride of 0 (sequences are found by row)."""
    return tuple(s for t in tensors for s in (0 if packed is not None else t.stride(0), *t.stride()[1:]))


def _sides(causal: bool, bounds, seqlen_q: int, seqlen_k: int) -> tuple:
    """(left, right) of the band the kernels loop over: kernel_band's window, or for plain
    attention an unbounded left side and, causal, right = 0 (a bound past every key: unbounded)."""
    if bounds is not None:
        return bounds
    unbounded = seqlen_q + seqlen_k
    return unbounded, 0 if causal else unbounded


def _grad_buffer(t: torch.Tensor, zeros: bool) -> torch.Tensor:
    """Where a gradient is written: like t, but fp32 for bf16 in the interpreter, which rounds
    towards zero where a GPU rounds to nearest (see triton_tiles.output_buffer)."""
    dtype = torch.float32 if upcast_dot(t.dtype) else t.dtype
    return torch.zeros_like(t, dtype=dtype) if zeros else torch.empty_like(t, dtype=dtype)


# --- what `attnlab inspect` compiles: the backward's launches at the llama3-8b shapes (16k tokens) -------------

def _inspect_ints(head_dim: int, kernel) -> dict:
    from attnlab.kernels.inspect import named_strides
    from attnlab.kernels.triton_prefill import INSPECT_HEADS, INSPECT_KV_HEADS, INSPECT_SEQLEN

    ints = dict(seqlen_q=INSPECT_SEQLEN, seqlen_k=INSPECT_SEQLEN, heads=INSPECT_HEADS, kv_heads=INSPECT_KV_HEADS,
                groups=INSPECT_HEADS // INSPECT_KV_HEADS, stride_lb=INSPECT_HEADS * INSPECT_SEQLEN,
                stride_lh=INSPECT_SEQLEN)
    for prefix in ("q", "o", "do", "dq", "k", "v", "dk", "dv"):
        by_query = prefix in ("q", "o", "do", "dq")
        shape = [1, INSPECT_SEQLEN, INSPECT_HEADS if by_query else INSPECT_KV_HEADS, head_dim]
        ints.update(named_strides(prefix, shape, "bmhd" if by_query else "bnhd"))
    return {name: value for name, value in ints.items() if name in kernel.arg_names}


def inspect_build(capability: int, kernel_name: str, dtype: torch.dtype, head_dim: int, config,
                  window: bool = False, softcap: bool = False, varlen: bool = False):
    """One backward launch ("delta", "dkdv" or "dq") as the JIT builds it for a llama3-8b-shaped
    call (16k tokens, causal: the band is the kernels' arguments, not a constexpr)."""
    from attnlab.kernels.inspect import Build

    kernel = {"delta": _bwd_delta, "dkdv": _bwd_dkdv, "dq": _bwd_dq}[kernel_name]
    tensor_type = "*" + {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), **config.kwargs)
    tile = f"{config.kwargs['BLOCK_M']}x{config.kwargs.get('BLOCK_N', '-')}"
    if kernel_name != "delta":
        constexprs.update(WINDOW=window, SOFTCAP=softcap, UPCAST_DOT=False, DOT_PRECISION=dot_precision(dtype),
                          PACKED=varlen)
    return Build(f"backward_{kernel_name}", kernel, _inspect_ints(head_dim, kernel), constexprs, tensor_type,
                 pointers={"Lse": "*fp32", "Delta": "*fp32", "CuSeqlensQ": "*i32", "CuSeqlensK": "*i32"},
                 options=dict(num_warps=config.num_warps, num_stages=config.num_stages),
                 labels=dict(mode="backward", dtype=tensor_type[1:], head_dim=head_dim, causal=True, tma=False,
                             window=window, softcap=softcap, varlen=varlen,
                             config=f"{tile}/w{config.num_warps}/s{config.num_stages}"))


def tuned_configs(kernel_name: str, dtype: torch.dtype, head_dim: int) -> list:
    """The tiles autotuning may try for this kernel and case."""
    if kernel_name == "delta":
        return [triton.Config({"BLOCK_M": DELTA_BLOCK}, num_warps=4, num_stages=1)]
    tiles = DKDV_TILES if kernel_name == "dkdv" else DQ_TILES
    return _pruner(tiles)(_configs(tiles), {"Q": torch.empty(0, dtype=dtype)}, BLOCK_D=block_d(head_dim))


def builds(capability: int) -> list:
    """What a backward call compiles to: the pre-pass and every tile autotuning may pick for the
    two gradient kernels, bf16 head dims 64 and 128; fp32 and an unaligned head_dim; window with
    softcap; packed sequences."""
    result = [inspect_build(capability, name, torch.bfloat16, head_dim, config)
              for head_dim in (64, 128) for name in ("delta", "dkdv", "dq")
              for config in tuned_configs(name, torch.bfloat16, head_dim)]
    for name in ("dkdv", "dq"):
        result.append(inspect_build(capability, name, torch.float32, 64, tuned_configs(name, torch.float32, 64)[0]))
        result.append(inspect_build(capability, name, torch.float16, 59, tuned_configs(name, torch.float16, 59)[0]))
        first = tuned_configs(name, torch.bfloat16, 128)[0]
        result.append(inspect_build(capability, name, torch.bfloat16, 128, first, window=True, softcap=True))
        result.append(inspect_build(capability, name, torch.bfloat16, 128, first, varlen=True))
    return result
