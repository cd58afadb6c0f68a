"""Is an output right, at any length? A few query rows against float64 attention computed for
those rows only, so a 128k prefill is checked in milliseconds and every point timed can be.

The rows sampled: every row of a sequence up to `ALL_ROWS` long; past that the first and the
last, both sides of tile boundaries (every multiple of `TILE`, a power of two that smaller
power-of-two tiles divide, spread over the sequence), and random ones from a seeded generator. The pass criterion is the test suite's and `attnlab
check`'s (FlashAttention's): the error against float64 at most twice that of the same rows
computed the plain way in the input dtype (scores and P @ V in that dtype, softmax in float32),
plus a small slack. The output's type, shape, dtype and device are checked first.

Tensors are in the flash-attn layout: q (batch, seqlen_q, heads, head_dim), k and v
(batch, seqlen_k, kv_heads, head_dim); packed ones (total, heads, head_dim).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from attnlab.kernels.masks import FULL, capped
from attnlab.kernels.paged import FP8_DTYPES
from attnlab.visibility import sees

ALL_ROWS = 256         # a sequence this short is compared row by row
TILE = 64              # rows on both sides of every multiple of this are tile edges for tiles of 16 to 64
EDGES = 16             # tile boundaries sampled per sequence, spread evenly
RANDOM_ROWS = 8
SEQUENCES = 8          # sequences of a batch checked, spread evenly
SCORES_BUDGET = 1 << 25   # float64 values held at once (256 MB): heads are taken a few at a time


@dataclass(frozen=True)
class RowCheck:
    """The verdict on one output: `error` the largest absolute error of the rows checked against
    float64, `bound` what it may be; `reason` says what was wrong when the output could not be
    compared at all (not a tensor, or of the wrong shape, dtype or device)."""

    error: float
    bound: float
    rows: int = 0
    reason: str = ""

    @property
    def ok(self) -> bool:
        return not self.reason and self.error <= self.bound

    def describe(self) -> str:
        if self.reason:
            return self.reason
        return f"max error {self.error:.3g} {'within' if self.ok else 'over'} bound {self.bound:.3g} ({self.rows} rows)"


def sample_rows(seqlen_q: int, seed: int = 0) -> list[int]:
    """Sorted distinct query rows of a sequence of seqlen_q to compare (see the module doc)."""
    if seqlen_q <= ALL_ROWS:
        return list(range(max(seqlen_q, 0)))
    edges = range(TILE, seqlen_q, TILE)
    step = max(1, math.ceil(len(edges) / EDGES))
    rows = {0, seqlen_q - 1, *itertools.chain.from_iterable((e - 1, e) for e in edges[::step])}
    gen = torch.Generator().manual_seed(seed)
    rows.update(torch.randint(seqlen_q, (RANDOM_ROWS,), generator=gen).tolist())
    return sorted(rows)


def check_prefill(out, q, k, v, *, causal: bool, scale: float, window=FULL, softcap: float = 0.0,
                  seed: int = 0) -> RowCheck:
    """`out` of attention(q, k, v, ...) against float64 on sampled rows of sampled sequences."""
    wrong = _wrong_output(out, q)
    if wrong:
        return wrong
    rows = torch.tensor(sample_rows(q.shape[1], seed), dtype=torch.long, device=q.device)
    positions = rows + (k.shape[1] - q.shape[1])
    keys = torch.arange(k.shape[1], device=q.device)
    mask = sees(positions[:, None], keys[None, :], causal, window)            # (rows, seqlen_k)
    compared = [_compare(out[b, rows], q[b, rows], k[b], v[b], mask, scale, softcap) for b in _sequences(q.shape[0])]
    return _verdict(compared, q.dtype)


def check_decode(out, q, k_cache, v_cache, cache_seqlens, *, scale: float, window=FULL,
                 softcap: float = 0.0, block_table=None, k_descale=None, v_descale=None) -> RowCheck:
    """`out` of decode_attention(...) against float64: every query row of sampled sequences,
    over the keys each length makes visible (slots past it hold anything, NaN included). A
    paged cache is read through its block_table, an FP8 one times its descales in float64;
    the plain computation attends over those values rounded to q's dtype."""
    wrong = _wrong_output(out, q)
    if wrong:
        return wrong
    q_len = q.shape[1]
    compared = []
    for b in _sequences(q.shape[0]):
        n = int(cache_seqlens[b])
        keys = torch.arange(n, device=q.device)
        positions = torch.arange(q_len, device=q.device) + n - q_len
        mask = sees(positions[:, None], keys[None, :], True, window)
        (k, k_scale), (v, v_scale) = (_sequence_cache(cache, b, n, block_table, descale)
                                      for cache, descale in ((k_cache, k_descale), (v_cache, v_descale)))
        compared.append(_compare(out[b], q[b], k, v, mask, scale, softcap, k_scale, v_scale))
    return _verdict(compared, q.dtype)


def _sequence_cache(cache, b: int, n: int, block_table, descale) -> tuple:
    """Sequence b's first n slots (n, kv_heads, head_dim), from its pages where paged, as stored,
    and the descale (kv_heads,) an FP8 cache's values are multiplied by (None otherwise): the
    product is taken a few heads at a time (`_attend`), so a long FP8 cache is never widened whole."""
    if block_table is None:
        slots = cache[b, :n]
    else:
        page_size = cache.shape[1]
        slots = cache[block_table[b, :-(-n // page_size)].long()].flatten(0, 1)[:n]
    if slots.dtype not in FP8_DTYPES:
        return slots, None
    return slots, (torch.ones(slots.shape[1], device=slots.device) if descale is None else descale[b])


def check_varlen(out, q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal: bool, scale: float, window=FULL,
                 softcap: float = 0.0, seed: int = 0) -> RowCheck:
    """`out` of attention_varlen(...) against float64: sampled rows of sampled packed sequences."""
    wrong = _wrong_output(out, q)
    if wrong:
        return wrong
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    compared = []
    for b in _sequences(len(bounds_q) - 1):
        q0, q1, k0, k1 = bounds_q[b], bounds_q[b + 1], bounds_k[b], bounds_k[b + 1]
        if q1 == q0:
            continue
        rows = torch.tensor(sample_rows(q1 - q0, seed), dtype=torch.long, device=q.device)
        keys = torch.arange(k1 - k0, device=q.device)
        mask = sees((rows + (k1 - k0) - (q1 - q0))[:, None], keys[None, :], causal, window)
        compared.append(_compare(out[q0 + rows], q[q0 + rows], k[k0:k1], v[k0:k1], mask, scale, softcap))
    return _verdict(compared, q.dtype)


def _wrong_output(out, q) -> RowCheck | None:
    """A verdict where the output is not an answer of the right form to compare at all."""
    if not isinstance(out, torch.Tensor):
        return RowCheck(math.inf, 0.0, reason=f"returned {type(out).__name__}, not a tensor")
    for what, got, want in (("shape", tuple(out.shape), tuple(q.shape)), ("dtype", out.dtype, q.dtype),
                            ("device", out.device, q.device)):
        if got != want:
            return RowCheck(math.inf, 0.0, reason=f"returned {what} {got}, expected {want}")
    return None


def _sequences(batch: int) -> list[int]:
    step = max(1, math.ceil(batch / SEQUENCES))
    return sorted({*range(0, batch, step), batch - 1}) if batch else []


def _compare(out, q, k, v, mask, scale, softcap, k_scale=None, v_scale=None) -> tuple:
    """One sequence's rows: out and q (rows, heads, head_dim), k and v (keys, kv_heads, head_dim)
    times k_scale and v_scale (kv_heads,) where given, mask (rows, keys) -> (error, the plain
    computation's error, rows)."""
    ref = _attend(q, k, v, mask, scale, softcap, torch.float64, k_scale, v_scale)
    plain = _attend(q, k, v, mask, scale, softcap, q.dtype, k_scale, v_scale)
    return _error(out, ref), _error(plain, ref), q.shape[0]


def _attend(q, k, v, mask, scale, softcap, dtype, k_scale=None, v_scale=None) -> torch.Tensor:
    """Attention of the rows, heads a few at a time: scores and P @ V in `dtype`, softmax in
    float32 or wider (float64 for the reference); a row that sees no key is zeros. K and V are
    multiplied by k_scale and v_scale (kv_heads,) in float64 first, where given (FP8 caches)."""
    rows, heads = q.shape[0], q.shape[1]
    groups = heads // k.shape[1]
    softmax_dtype = torch.promote_types(dtype, torch.float32)
    # The scores, and K and V gathered per head, of a chunk each stay within the budget.
    per_chunk = max(1, SCORES_BUDGET // max(1, rows * k.shape[0], 2 * k.shape[0] * k.shape[-1]))
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for h0 in range(0, heads, per_chunk):
        h = torch.arange(h0, min(heads, h0 + per_chunk), device=q.device)
        kv = h // groups
        qh, kh, vh = q[:, h].to(dtype), _scaled(k, k_scale, kv, dtype), _scaled(v, v_scale, kv, dtype)
        scores = torch.einsum("rhd,nhd->hrn", qh, kh).to(softmax_dtype) * scale
        scores = capped(scores, softcap).masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0).to(dtype)
        # A hidden key's value may be NaN (decode's unwritten slots): 0 x NaN must not reach the sum.
        vh = vh.masked_fill(~mask.any(0)[:, None, None], 0)
        out[:, h] = torch.einsum("hrn,nhd->rhd", probs, vh).double()
    return out


def _scaled(cache, descale, kv_heads, dtype) -> torch.Tensor:
    """cache[:, kv_heads] in `dtype`, times its descale per kv head (exactly, in float64) where given."""
    slots = cache[:, kv_heads]
    if descale is None:
        return slots.to(dtype)
    return (slots.double() * descale[kv_heads].double()[None, :, None]).to(dtype)


def _error(out, ref) -> float:
    err = (out.double() - ref).abs().max().item() if out.numel() else 0.0
    return math.inf if math.isnan(err) else err


def _verdict(compared: list, dtype: torch.dtype) -> RowCheck:
    """One verdict over every sequence compared: the largest error against twice the largest
    error of the plain computation, plus a slack."""
    slack = max(torch.finfo(dtype).eps / 8, 1e-6)
    error, plain_error = (max((c[i] for c in compared), default=0.0) for i in (0, 1))
    return RowCheck(error, 2 * plain_error + slack, rows=sum(c[2] for c in compared))
