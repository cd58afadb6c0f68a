"""The pieces the Triton kernels share: jit tiles (a masked tile load, the online softmax step,
the final normalisation, the window's tile band) and the host helpers that set their switches.

Prefill (triton_prefill.py), its backward (triton_backward.py), the decodes (triton_decode.py,
triton_decode_fused.py) and the warp-specialised prefill (triton_ws.py) build on these.
Tensors are in the (batch, seqlen, heads, head_dim) layout. Scores are kept in log2 units, so
that exp2 does the work: `score_factors` folds log2(e) into the factors `log2_scores` applies.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from attnlab.kernels.masks import FULL
from attnlab.kernels.registry import triton_interpreting

LOG2E = 1.4426950408889634
INTERPRETER_BLOCK = 32   # query and key tiles in the interpreter: small and fixed, no autotuning


# --- jit tiles --------------------------------------------------------------------------------------------

@triton.jit
def load_tile(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
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
def tanh(x):
    """tanh in fp32 from exp2, which the GPU and Triton's interpreter both have (libdevice's tanh
    does not run in the interpreter). (1 - e) / (1 + e) with e = exp(-2|x|) cancels near 0, so
    |x| < 0.4 takes tanh's odd Taylor series to x^13 (the first term left out is under 1e-8 of
    the result there). A few ulp from tanh in fp32; NaN stays NaN and +-inf gives +-1."""
    ax = tl.abs(x)
    e = tl.math.exp2(ax * -2.8853900817779268)  # exp(-2|x|)
    far = (1.0 - e) / (1.0 + e)
    x2 = x * x
    near = x + x * x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * (0.021869488536155203 + x2 * (-0.008863235529902197
                                                                   + x2 * 0.003592128036572481)))))
    return tl.where(ax < 0.4, near, tl.where(x < 0, -far, far))


@triton.jit
def log2_scores(qk, qk_scale, cap_log2, SOFTCAP: tl.constexpr):
    """Scores in log2 units, as exp2 wants them. Plain: qk_scale = scale * log2(e), one multiply.
    With SOFTCAP the cap acts on the true scaled score, so the log2 factor moves past tanh:
    qk_scale = scale / softcap is the factor inside it and cap_log2 = softcap * log2(e) the one
    outside, giving softcap * tanh(scale * qk / softcap) * log2(e)."""
    if SOFTCAP:
        scores = tanh(qk * qk_scale) * cap_log2
    else:
        scores = qk * qk_scale
    return scores


@triton.jit
def attend_tile(q, k, v, offs_n, key_start, key_limit, acc, m_i, l_i, qk_scale, cap_log2,
                MASKED: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
                UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One step of the online softmax over a K/V tile.

    Scores are kept in log2 units (see log2_scores) so exp2 does the work. With MASKED, key n
    of the tile is visible to row r iff n < key_limit[r] and, with WINDOW, n >= key_start[r];
    rows that have seen nothing keep m = -inf, handled by the safe maximum below.

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
        visible = offs_n[None, :] < key_limit[:, None]
        if WINDOW:
            visible = visible & (offs_n[None, :] >= key_start[:, None])
        qk = tl.where(visible, log2_scores(qk, qk_scale, cap_log2, SOFTCAP), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_new_safe[:, None])
    elif SOFTCAP:  # tanh bends the scores: cap each one, then take the row maximum
        qk = log2_scores(qk, qk_scale, cap_log2, SOFTCAP)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_new_safe = m_new
        p = tl.math.exp2(qk - m_new[:, None])
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
def normalise(acc, l_i):
    """(acc / l per row, whether the row saw a key). A row that saw no key (l = 0) is zeros by
    contract, even where 0 x V gave NaN (a NaN value in a tile it shared); any other l, NaN
    included (`!=`, not `>`: NaN > 0 is false), divides, so a row that met a NaN stays NaN."""
    seen = l_i != 0.0
    return tl.where(seen[:, None], acc / tl.where(seen, l_i, 1.0)[:, None], 0.0), seen


@triton.jit
def window_band(first_p, last_p, seqlen_k, left, right, BLOCK_N: tl.constexpr):
    """The keys rows at positions [first_p, last_p] see in the window (left, right), as tile
    bounds (lo, unmasked_lo, unmasked_hi, hi): every visible key lies in [lo, hi), and each
    tile in [unmasked_lo, unmasked_hi) is seen whole by every row, so it needs no masks.
    Tiles start at multiples of BLOCK_N; every value is clamped at 0 before dividing (Triton
    divides towards 0, Python down). host_window_band is this arithmetic in Python."""
    lo = tl.maximum(first_p - left, 0) // BLOCK_N * BLOCK_N
    hi = tl.maximum(tl.minimum(last_p + right + 1, seqlen_k), lo)
    unmasked_lo = tl.minimum((tl.maximum(last_p - left, lo) + BLOCK_N - 1) // BLOCK_N * BLOCK_N, hi)
    unmasked_hi = tl.maximum(tl.maximum(tl.minimum(first_p + right + 1, hi), 0) // BLOCK_N * BLOCK_N, unmasked_lo)
    return lo, unmasked_lo, unmasked_hi, hi


# --- the host side: the switches and factors the tiles take -------------------------------------------------

def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products, not TF32, so fp32 means fp32 accuracy.
    return "ieee"


def upcast_dot(dtype: torch.dtype) -> bool:
    """Triton's interpreter (3.6 to 3.9) gets tl.dot on bf16 wrong; fp32 operands are exact."""
    return triton_interpreting() and dtype == torch.bfloat16


def positive_scale(q: torch.Tensor, scale: float) -> tuple:
    """(q, scale) with scale >= 0, as the kernels need: a negative scale moves into q, exactly."""
    return (-q, -scale) if scale < 0 else (q, scale)


def score_factors(scale: float, softcap: float) -> tuple:
    """(qk_scale, cap_log2) for log2_scores: the scale with log2(e) folded in, or with a cap,
    the factor inside tanh and the one that takes its output to log2 units."""
    if softcap > 0:
        return scale / softcap, softcap * LOG2E
    return scale * LOG2E, 0.0


def output_buffer(q: torch.Tensor) -> torch.Tensor:
    """Where a kernel writes its output: like q, but fp32 for bf16 in the interpreter, which
    converts fp32 to bf16 towards zero where a GPU rounds to nearest (twice the rounding
    error); `finished` then rounds as the GPU would."""
    return torch.empty_like(q, dtype=torch.float32) if upcast_dot(q.dtype) else torch.empty_like(q)


def finished(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return out.to(dtype)  # the same tensor unless output_buffer widened it


def kernel_band(causal: bool, window, seqlen_q: int, seqlen_k: int) -> tuple:
    """(causal, bounds): the call as the kernels run it, for sequences of at most seqlen_q
    queries over seqlen_k keys. Causal is folded into the window (it is right = 0), and a side
    that reaches past every key is unbounded; what stays plain runs the plain kernel (bounds
    None, causal or not), anything else the window path with bounds (left, right), an
    unbounded side given as a bound past every key so the kernel never tests for -1."""
    if tuple(window) == FULL:
        return causal, None
    left, right = window
    right = 0 if causal else right
    left = -1 if left >= seqlen_k - 1 else left    # the last row reaches key 0: so does every row
    right = -1 if right >= seqlen_q - 1 else right  # the first row reaches the last key
    if left < 0 and right < 0:
        return False, None
    if left < 0 and right == 0:
        return True, None
    unbounded = seqlen_q + seqlen_k
    return causal, (unbounded if left < 0 else left, unbounded if right < 0 else right)


def host_window_band(first_p: int, last_p: int, seqlen_k: int, left: int, right: int, block_n: int) -> tuple:
    """The kernels' window_band in Python: (lo, unmasked_lo, unmasked_hi, hi) for rows at
    positions [first_p, last_p] in the window (left, right), each side a bound >= 0."""
    lo = max(first_p - left, 0) // block_n * block_n
    hi = max(min(last_p + right + 1, seqlen_k), lo)
    unmasked_lo = min((max(last_p - left, lo) + block_n - 1) // block_n * block_n, hi)
    unmasked_hi = max(max(min(first_p + right + 1, hi), 0) // block_n * block_n, unmasked_lo)
    return lo, unmasked_lo, unmasked_hi, hi


# --- the device, asked once ---------------------------------------------------------------------------------

def capability_major(device: torch.device) -> int:
    """The CUDA device's compute capability major version, asked once per device."""
    return _capability_major(torch.device(device).index or 0)


@functools.lru_cache(maxsize=None)
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    """How many SMs CUDA device `index` has, asked once per device."""
    return torch.cuda.get_device_properties(index).multi_processor_count
