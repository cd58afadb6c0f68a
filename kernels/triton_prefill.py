"""FlashAttention-2-style forward attention in Triton.

Each program owns BLOCK_M query rows of one head and streams that head's K/V in BLOCK_N
tiles through an online softmax, so the score matrix never leaves registers. GQA/MQA read
the shared kv head in place. Tensors are in the (batch, seqlen, heads, head_dim) layout.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # Triton before 3.3: the pointer path only
    TensorDescriptor = None

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
def _kv_tile(base, b, kv_h, start_n, stride_n, offs_n, n_keys, offs_d,
             HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
             MASKED: tl.constexpr, TMA: tl.constexpr):
    """Keys [start_n, start_n + BLOCK_N) of one kv head; with MASKED, rows past n_keys read as 0.

    With TMA, base is a (batch, seqlen, kv_heads, head_dim) tensor descriptor and the copy
    engine fills rows past the tensor's end with zeros; otherwise it is the tile's pointers at
    key 0.
    """
    if TMA:
        tile = base.load([b, start_n, kv_h, 0]).reshape(BLOCK_N, BLOCK_D)
    else:
        tile = _load_tile(base + start_n * stride_n, offs_n, n_keys, offs_d, HEAD_DIM, BLOCK_D, MASKED)
    return tile


@triton.jit
def _attend_tile(q, k, v, offs_n, key_limit, acc, m_i, l_i, qk_scale,
                 MASKED: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One step of the online softmax over a K/V tile.

    Scores are kept in log2 units (scale * log2 e folded into qk_scale) so exp2 does the work.
    With MASKED, key n of the tile is visible to row r iff n < key_limit[r]; rows that have
    seen nothing keep m = -inf, handled by the safe maximum below.

    NaN needs no extra work: a NaN in q or in a key the row sees makes its score NaN, exp2
    keeps it in p, so l and acc turn NaN for good (the running maximum ignores it: tl.max and
    tl.maximum drop NaN, as the GPU's max does). A key the row cannot see is replaced by -inf
    with a select, never multiplied, so a NaN there never reaches p.
    """
    if UPCAST_DOT:  # Triton's interpreter multiplies bf16 wrongly; fp32 operands are exact there
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASKED:
        qk = tl.where(offs_n[None, :] < key_limit[:, None], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_new_safe[:, None])
    else:
        # qk_scale >= 0 (see positive_scale), so the scaled row maximum is the maximum of the
        # scaled scores, and each score costs one fused multiply-add on its way to exp2.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_new_safe = m_new
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attend_keys(q, k_base, v_base, b, kv_h, lo, hi, n_end, stride_kn, stride_vn, offs_n, offs_d,
                 key_limit, acc, m_i, l_i, qk_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
                 TMA: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Keys [lo, hi) tile by tile. With MASKED, key j is visible to row r iff j < key_limit[r],
    and keys from n_end on read as 0; without, every key is visible and no tile is checked."""
    for start_n in range(lo, hi, BLOCK_N):
        k = _kv_tile(k_base, b, kv_h, start_n, stride_kn, offs_n, n_end - start_n, offs_d,
                     HEAD_DIM, BLOCK_N, BLOCK_D, MASKED, TMA)
        v = _kv_tile(v_base, b, kv_h, start_n, stride_vn, offs_n, n_end - start_n, offs_d,
                     HEAD_DIM, BLOCK_N, BLOCK_D, MASKED, TMA)
        acc, m_i, l_i = _attend_tile(q, k, v, offs_n, key_limit - start_n, acc, m_i, l_i, qk_scale,
                                     MASKED, UPCAST_DOT, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def _normalise(acc, l_i):
    """(acc / l per row, whether the row saw a key). A row that saw no key (l = 0) is zeros by
    contract, even where 0 x V gave NaN (a NaN value in a tile it shared); any other l, NaN
    included (`!=`, not `>`: NaN > 0 is false), divides, so a row that met a NaN stays NaN."""
    seen = l_i != 0.0
    return tl.where(seen[:, None], acc / tl.where(seen, l_i, 1.0)[:, None], 0.0), seen


@triton.jit
def _attention_fwd(
    Q, K, V, Out,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_om, stride_oh, stride_od,
    seqlen_q, seqlen_k, heads, groups, qk_scale, seq_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr,
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
    if TMA:  # K and V are tensor descriptors, addressed by coordinates
        k_base = K
        v_base = V
    else:
        k_base = K + b * stride_kb + kv_h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
        v_base = V + b * stride_vb + kv_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

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
    # Tiles every row sees in full, with no masks; then the diagonal and the ragged tail.
    acc, m_i, l_i = _attend_keys(q, k_base, v_base, b, kv_h, 0, unmasked_hi, seqlen_k, stride_kn, stride_vn,
                                 offs_n, offs_d, key_limit, acc, m_i, l_i, qk_scale,
                                 HEAD_DIM, BLOCK_N, BLOCK_D, False, TMA, UPCAST_DOT, DOT_PRECISION)
    acc, m_i, l_i = _attend_keys(q, k_base, v_base, b, kv_h, unmasked_hi, hi, seqlen_k, stride_kn, stride_vn,
                                 offs_n, offs_d, key_limit, acc, m_i, l_i, qk_scale,
                                 HEAD_DIM, BLOCK_N, BLOCK_D, True, TMA, UPCAST_DOT, DOT_PRECISION)

    out, _ = _normalise(acc, l_i)
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    o_mask = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=o_mask)


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


_attention_fwd_tuned = triton.autotune(
    configs=_configs(), key=["HEAD_DIM", "IS_CAUSAL", "seq_bucket", "TMA"],
    prune_configs_by={"early_config_prune": _prune},
)(_attention_fwd)


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


def capability_major(device: torch.device) -> int:
    """The CUDA device's compute capability major version, asked once per device."""
    return _capability_major(torch.device(device).index or 0)


@functools.lru_cache(maxsize=None)
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def positive_scale(q: torch.Tensor, scale: float) -> tuple:
    """(q, scale) with scale >= 0, as the kernels need: a negative scale moves into q, exactly."""
    return (-q, -scale) if scale < 0 else (q, scale)


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products, not TF32, so fp32 means fp32 accuracy.
    return "ieee"


def upcast_dot(dtype: torch.dtype) -> bool:
    """Triton's interpreter (3.6 to 3.9) gets tl.dot on bf16 wrong; fp32 operands are exact."""
    return triton_interpreting() and dtype == torch.bfloat16


def attention(q, k, v, causal: bool, scale: float, tma: bool | None = None) -> torch.Tensor:
    """q (B, Sq, H, D); k, v (B, Sk, KVH, D) -> (B, Sq, H, D) in q's dtype.

    tma: read K and V through tensor descriptors; None uses them on a GPU that has them
    when the tensors fit, True insists (ValueError if they cannot be used), False never.
    """
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    q, scale = positive_scale(q, scale)
    interpreting = triton_interpreting()
    unfit = tma_unfit_reason(k, v)
    if tma and unfit:
        raise ValueError(f"tma=True, but {unfit}")
    if tma is None:
        tma = unfit is None and not interpreting
    bd = block_d(head_dim)
    block_m, block_n = (32, 32) if interpreting else (None, None)
    strides = (*q.stride(), *k.stride(), *v.stride())
    if tma:  # the tile size is a placeholder until autotuning sets it (_set_kv_tiles)
        k, v = (TensorDescriptor(t, list(t.shape), list(t.stride()), kv_block_shape(block_n or 16, bd))
                for t in (k, v))
    out = torch.empty_like(q)
    args = (q, k, v, out, *strides, *out.stride(),
            seqlen_q, seqlen_k, heads, heads // kv_heads, scale * LOG2E,
            triton.next_power_of_2(max(seqlen_q, seqlen_k)))
    meta = dict(HEAD_DIM=head_dim, BLOCK_D=bd, IS_CAUSAL=causal, DOT_PRECISION=dot_precision(q.dtype), TMA=tma)
    if interpreting:
        # The interpreter runs programs one by one: small fixed tiles, no autotuning.
        grid = (triton.cdiv(seqlen_q, block_m), batch * heads)
        _attention_fwd[grid](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n, UPCAST_DOT=upcast_dot(q.dtype))
    else:
        grid = lambda cfg: (triton.cdiv(seqlen_q, cfg["BLOCK_M"]), batch * heads)
        _attention_fwd_tuned[grid](*args, **meta, UPCAST_DOT=False)
    return out

