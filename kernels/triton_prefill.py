"""FlashAttention-2-style forward attention in Triton.

Each program owns BLOCK_M query rows of one head and streams that head's K/V in BLOCK_N
tiles through an online softmax, so the score matrix never leaves registers. GQA/MQA read
the shared kv head in place. Tensors are in the (batch, seqlen, heads, head_dim) layout.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from attnlab.kernels.registry import triton_interpreting

LOG2E = 1.4426950408889634


@triton.jit
def _load_tile(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    # Masks only where a tile can run past the tensor: the last rows, or a padded head_dim.
    if CHECK_ROWS:
        if BLOCK_D == HEAD_DIM:
            return tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if BLOCK_D == HEAD_DIM:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)


@triton.jit
def _attend_tile(q, k_ptrs, v_ptrs, offs_n, n_keys, offs_d, key_limit, acc, m_i, l_i, qk_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
                 UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One step of the online softmax over a K/V tile.

    Scores are kept in log2 units (scale * log2 e folded into qk_scale) so exp2 does the work.
    With MASKED, key n is visible to row r iff n < key_limit[r] (and n < n_keys); rows that
    have seen nothing keep m = -inf, handled by the safe maximum below.
    """
    k = _load_tile(k_ptrs, offs_n, n_keys, offs_d, HEAD_DIM, BLOCK_D, MASKED)
    v = _load_tile(v_ptrs, offs_n, n_keys, offs_d, HEAD_DIM, BLOCK_D, MASKED)
    if UPCAST_DOT:  # Triton's interpreter multiplies bf16 wrongly; fp32 operands are exact there
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        qk = tl.where(offs_n[None, :] < key_limit[:, None], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    if MASKED:
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new_safe = m_new
    p = tl.math.exp2(qk - m_new_safe[:, None])
    alpha = tl.math.exp2(m_i - m_new_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attention_fwd(
    Q, K, V, Out,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_om, stride_oh, stride_od,
    seqlen_q, seqlen_k, heads, groups, qk_scale, seq_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Largest causal blocks first: the long rows start early and the short ones fill the tail.
    m_block = tl.num_programs(0) - 1 - tl.program_id(0) if IS_CAUSAL else tl.program_id(0)
    start_m = m_block * BLOCK_M
    b = tl.program_id(1) // heads
    h = tl.program_id(1) % heads
    kv_h = h // groups

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = _load_tile(q_ptrs, offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)
    if UPCAST_DOT:
        q = q.to(tl.float32)
    k_ptrs = K + b * stride_kb + kv_h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + b * stride_vb + kv_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

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

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Tiles every row sees in full: no masks at all.
    for start_n in range(0, unmasked_hi, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, k_ptrs + start_n * stride_kn, v_ptrs + start_n * stride_vn,
                                     offs_n, BLOCK_N, offs_d, key_limit, acc, m_i, l_i, qk_scale,
                                     HEAD_DIM, BLOCK_D, False, UPCAST_DOT, DOT_PRECISION)
    # The diagonal and the ragged tail: masked per element.
    for start_n in range(unmasked_hi, hi, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, k_ptrs + start_n * stride_kn, v_ptrs + start_n * stride_vn,
                                     offs_n, seqlen_k - start_n, offs_d, key_limit - start_n,
                                     acc, m_i, l_i, qk_scale,
                                     HEAD_DIM, BLOCK_D, True, UPCAST_DOT, DOT_PRECISION)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # a row that saw no key stays 0
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    o_mask = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=o_mask)


def _configs():
    """Ampere and Hopper starting points: (BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    shapes = [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def _prune(configs, named_args, **kwargs):
    """Keep few tiles per case: each one compiled and timed is device time.

    fp32 (true fp32 products on FMA units) and head dims over 128 get the small tile that
    fits shared memory; 16-bit types up to 128 try the wide tiles.
    """
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    small = [c for c in configs if c.kwargs["BLOCK_M"] == 64]
    if named_args["Q"].dtype == torch.float32:
        return small[-1:]
    if block_d > 128:
        return small
    return configs[:3]


_attention_fwd_tuned = triton.autotune(
    configs=_configs(), key=["HEAD_DIM", "IS_CAUSAL", "seq_bucket"],
    prune_configs_by={"early_config_prune": _prune},
)(_attention_fwd)


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products, not TF32, so fp32 means fp32 accuracy.
    return "ieee"


def upcast_dot(dtype: torch.dtype) -> bool:
    """Triton's interpreter (3.6 to 3.9) gets tl.dot on bf16 wrong; fp32 operands are exact."""
    return triton_interpreting() and dtype == torch.bfloat16


def attention(q, k, v, causal: bool, scale: float) -> torch.Tensor:
    """q (B, Sq, H, D); k, v (B, Sk, KVH, D) -> (B, Sq, H, D) in q's dtype."""
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    out = torch.empty_like(q)
    args = (q, k, v, out, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            seqlen_q, seqlen_k, heads, heads // kv_heads, scale * LOG2E,
            triton.next_power_of_2(max(seqlen_q, seqlen_k)))
    meta = dict(HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), IS_CAUSAL=causal,
                DOT_PRECISION=dot_precision(q.dtype))
    if triton_interpreting():
        # The interpreter runs programs one by one: small fixed tiles, no autotuning.
        grid = (triton.cdiv(seqlen_q, 32), batch * heads)
        _attention_fwd[grid](*args, **meta, BLOCK_M=32, BLOCK_N=32, UPCAST_DOT=upcast_dot(q.dtype))
    else:
        grid = lambda cfg: (triton.cdiv(seqlen_q, cfg["BLOCK_M"]), batch * heads)
        _attention_fwd_tuned[grid](*args, **meta, UPCAST_DOT=False)
    return out
