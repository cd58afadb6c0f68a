"""Warp-specialised FlashAttention forward for Hopper, in Triton.

The kernel of triton_prefill.py keeps softmax and the two matmuls in the same warps, so on
Hopper the tensor cores wait while the exponentials run. Triton's automatic warp
specialisation (`tl.range(..., warp_specialize=True)`) splits the loop over K/V tiles into a
producer warpgroup that only issues the TMA copies and two consumer warpgroups of 64 query
rows each that run wgmma and softmax, so one group's softmax can run while the other's
matmul holds the tensor cores. The compiler partitions the loop only in the form it knows,
so this kernel is written in that form:
  - 4 warps per program: they become the producer, and the pass adds the two consumers
    (12 warps, registers moved from the producer to the consumers by setmaxnreg);
  - tensor descriptors made inside the kernel (`tl.make_tensor_descriptor`), 2-D, over a
    sequence's (seqlen, heads * head_dim) rows, a head read at column head * head_dim, so GQA
    needs no copies; Q is loaded and O stored through them too;
  - one loop over K/V tiles: causal attention masks every tile rather than splitting the loop
    into the unmasked tiles and the diagonal.
Each descriptor starts at its sequence's first row, so the copy engine zero-fills keys past
seqlen_k and clips the store of the last query tile at seqlen_q: nothing reads or writes the
next sequence's rows. Triton's interpreter runs the same kernel, descriptors included, on
small tiles.

Tensors are in the (batch, seqlen, heads, head_dim) layout; causal is bottom-right aligned
(query i sees key j iff j <= i + seqlen_k - seqlen_q) and a row that sees no key is zeros.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnlab.kernels.impls.triton_ws import HEAD_DIMS, row_layout
from attnlab.kernels.registry import triton_interpreting
from attnlab.kernels.triton_tiles import INTERPRETER_BLOCK, LOG2E, dot_precision, normalise, upcast_dot


@triton.jit
def _rows(base, n_rows, row_stride, width, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """A 2-D descriptor over n_rows rows of `width` contiguous elements, row_stride apart, copied in
    (BLOCK_ROWS, BLOCK_COLS) tiles; rows past n_rows read as zeros and are never written."""
    return tl.make_tensor_descriptor(base, shape=[n_rows, width], strides=[row_stride, 1],
                                     block_shape=[BLOCK_ROWS, BLOCK_COLS])


@triton.jit
def _attend_tile(q, k, v, key, key_limit, acc, m_i, l_i, qk_scale, MASK_KEYS: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """One step of the online softmax over a K/V tile whose keys are `key`.

    Scores are kept in log2 units (qk_scale folds in log2(e)) so exp2 does the work. With
    MASK_KEYS, key j is visible to row r iff j < key_limit[r]: keys past the end, and for
    causal attention past the diagonal, become -inf by a select, so a NaN there never reaches
    p. A row that has seen nothing keeps m = -inf, which the safe maximum turns into
    exp2(-inf) = 0 rather than exp2(-inf - (-inf)) = NaN.
    """
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASK_KEYS:
        qk = tl.where(key[None, :] < key_limit[:, None], qk * qk_scale, float("-inf"))
    else:
        qk = qk * qk_scale
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attention_ws_fwd(
    Q, K, V, Out,
    stride_qb, stride_qm, stride_kb, stride_kn, stride_vb, stride_vn, stride_ob, stride_om,
    seqlen_q, seqlen_k, heads, kv_heads, groups, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
    MASK_KEYS: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Heaviest causal query tiles first: the longest rows start early, the short ones fill the tail.
    m_block = tl.num_programs(0) - 1 - tl.program_id(0) if IS_CAUSAL else tl.program_id(0)
    start_m = m_block * BLOCK_M
    b = (tl.program_id(1) // heads).to(tl.int64)  # batch offsets can pass 2**31 elements
    h = tl.program_id(1) % heads
    kv_h = h // groups

    # This sequence's rows as 2-D descriptors over (seqlen, heads * head_dim); head h is the
    # HEAD_DIM columns from h * HEAD_DIM, and GQA reads kv head h // groups the same way.
    q_desc = _rows(Q + b * stride_qb, seqlen_q, stride_qm, heads * HEAD_DIM, BLOCK_M, HEAD_DIM)
    k_desc = _rows(K + b * stride_kb, seqlen_k, stride_kn, kv_heads * HEAD_DIM, BLOCK_N, HEAD_DIM)
    v_desc = _rows(V + b * stride_vb, seqlen_k, stride_vn, kv_heads * HEAD_DIM, BLOCK_N, HEAD_DIM)
    o_desc = _rows(Out + b * stride_ob, seqlen_q, stride_om, heads * HEAD_DIM, BLOCK_M, HEAD_DIM)

    q = q_desc.load([start_m, h * HEAD_DIM])
    if UPCAST_DOT:  # Triton's interpreter multiplies bf16 wrongly; fp32 operands are exact there
        q = q.to(tl.float32)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)

    # Row i sees keys j < key_limit[i]: every key, or with bottom-right causality those up to
    # its diagonal i + seqlen_k - seqlen_q. Tiles wholly past the last row's diagonal are skipped.
    # MASK_KEYS is off only where no tile crosses either bound (not causal, seqlen_k a multiple
    # of BLOCK_N); the loop is the same single loop either way.
    if IS_CAUSAL:
        key_limit = tl.minimum(offs_m + 1 + seqlen_k - seqlen_q, seqlen_k)
        hi = tl.maximum(tl.minimum(seqlen_k, start_m + BLOCK_M + seqlen_k - seqlen_q), 0)
    else:
        key_limit = tl.zeros([BLOCK_M], dtype=tl.int32) + seqlen_k
        hi = seqlen_k

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # One loop over the K/V tiles: the form the compiler warp-specialises, a producer warpgroup
    # copying K and V tiles ahead into shared memory while the consumer warpgroups compute.
    for start_n in tl.range(0, hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        k = k_desc.load([start_n, kv_h * HEAD_DIM])
        v = v_desc.load([start_n, kv_h * HEAD_DIM])
        if UPCAST_DOT:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        acc, m_i, l_i = _attend_tile(q, k, v, start_n + offs_n, key_limit, acc, m_i, l_i, qk_scale,
                                     MASK_KEYS, DOT_PRECISION)

    # The copy engine clips the store at seqlen_q: the last tile's padding rows are not written.
    out, _ = normalise(acc, l_i)
    o_desc.store([start_m, h * HEAD_DIM], out.to(Out.dtype.element_ty))


# Hopper tiles, (BLOCK_M, BLOCK_N, num_stages) by head_dim, all with num_warps=4, the count the
# compiler partitions (to 12 warps: a producer warpgroup and two consumers of 64 rows each).
# K/V stages are as many as fit 227 KiB of shared memory: head_dim 128 holds two.
HOPPER_TILES = {16: (128, 128, 3), 32: (128, 128, 3), 64: (128, 128, 3), 128: (128, 128, 2)}
NUM_WARPS = 4


def _scratch(size: int, alignment: int, stream):
    """Global memory for the descriptors the kernel makes (128 bytes each, per program); torch's
    CUDA allocations are aligned beyond the 128 bytes asked."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """In-kernel descriptors live in scratch memory the host allocates at launch: install an
    allocator unless the caller set one."""
    try:
        from triton.runtime._allocation import NullAllocator, _allocator
        unset = isinstance(_allocator.get(), NullAllocator)
    except ImportError:  # another Triton's layout: install ours
        unset = True
    if unset:
        triton.set_allocator(_scratch)


def _launch_meta(head_dim: int, dtype: torch.dtype) -> dict:
    if triton_interpreting():
        # The interpreter runs programs one by one on small tiles; bf16 products go through fp32.
        return dict(BLOCK_M=INTERPRETER_BLOCK, BLOCK_N=INTERPRETER_BLOCK, WARP_SPECIALIZE=True,
                    UPCAST_DOT=upcast_dot(dtype))
    block_m, block_n, stages = HOPPER_TILES[head_dim]
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, WARP_SPECIALIZE=True, UPCAST_DOT=False,
                num_warps=NUM_WARPS, num_stages=stages)


def launch(q, k, v, out, causal: bool, scale: float) -> tuple:
    """(grid, arguments, options) of the kernel's launch for these tensors: what `attention` runs,
    and what an offline build for a GPU compiles."""
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    meta = _launch_meta(head_dim, q.dtype)
    grid = (triton.cdiv(seqlen_q, meta["BLOCK_M"]), batch * heads)
    args = (q, k, v, out, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), seqlen_q, seqlen_k, heads, kv_heads, heads // kv_heads, scale * LOG2E)
    # Keys need masks where a tile crosses the diagonal or the end of the keys.
    mask_keys = bool(causal) or seqlen_k % meta["BLOCK_N"] != 0
    return grid, args, dict(meta, HEAD_DIM=head_dim, IS_CAUSAL=bool(causal), MASK_KEYS=mask_keys,
                            DOT_PRECISION=dot_precision(q.dtype))


def attention(q, k, v, causal: bool, scale: float) -> torch.Tensor:
    """q (B, Sq, H, D); k, v (B, Sk, KVH, D) -> (B, Sq, H, D) in q's dtype.

    D is one of HEAD_DIMS, H a multiple of KVH, and each tensor's rows fit a descriptor
    (row_layout); ValueError otherwise.
    """
    if q.shape[3] not in HEAD_DIMS:
        raise ValueError(f"q: head_dim must be one of {HEAD_DIMS}, got {q.shape[3]}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        status = row_layout(name, t)
        if not status:
            raise ValueError(f"{name}: {status.reason}")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.numel() == 0 or k.shape[1] == 0:
        return out.zero_()
    if not triton_interpreting():
        _ensure_allocator()
    grid, args, options = launch(q, k, v, out, causal, scale)
    _attention_ws_fwd[grid](*args, **options)
    return out


def builds(capability: int) -> list:
    """What `attnlab inspect` compiles: the launch a llama3-8b prefill at 16k makes (32 heads over 8
    kv heads, bf16), head_dim 128 causal and not, and 64 causal; none below Hopper, where the probe
    refuses the kernel."""
    from attnlab.kernels.inspect import Build

    if capability < 90:
        return []
    result = []
    for head_dim, causal in ((128, True), (128, False), (64, True)):
        q = torch.empty(1, 16384, 32, head_dim, dtype=torch.bfloat16, device="meta")
        k = torch.empty(1, 16384, 8, head_dim, dtype=torch.bfloat16, device="meta")
        _, args, meta = launch(q, k, k, q, causal, head_dim ** -0.5)
        options = dict(num_warps=meta.pop("num_warps"), num_stages=meta.pop("num_stages"))
        runtime = [name for name in _attention_ws_fwd.arg_names if name not in meta]
        ints = {name: value for name, value in zip(runtime, args) if not isinstance(value, (torch.Tensor, float))}
        result.append(Build("prefill_ws", _attention_ws_fwd, ints, meta, options=options,
                            labels=dict(mode="prefill", dtype="bf16", head_dim=head_dim, causal=causal, tma=True,
                                        config=f"{meta['BLOCK_M']}x{meta['BLOCK_N']}/w{options['num_warps']}"
                                               f"/s{options['num_stages']}")))
    return result
