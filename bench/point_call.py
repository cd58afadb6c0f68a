"""A point's call: random inputs of its shape, the validated zero-argument call that attends over
them, and the check of what that call returns, so every point timed is first shown right. A
backward point's call returns its gradients, each checked as an output is (kernels/gradcheck.py).

    call = build_call(point, "cuda")
    verdict = call.verify()          # runs it once: sampled rows against float64, inputs unchanged
    timer.time(call.run)
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable

import torch

from attnlab.bench.workloads import DECODE, Point, doc_lengths
from attnlab.schema import BACKWARD, FWD_BWD
from attnlab.kernels.rowcheck import RowCheck, check_decode, check_prefill, check_varlen


@dataclass
class PointCall:
    """`run` attends over `inputs` (by name); `check(out)` judges what it returned."""

    run: Callable[[], torch.Tensor]
    inputs: dict
    check: Callable[[object], RowCheck]

    def verify(self) -> RowCheck:
        """Run the call once and check its output; a call that changed an input fails, named,
        since its inputs are no longer the ones the reference reads, nor the ones timed."""
        before = {name: fingerprint(t) for name, t in self.inputs.items()}
        verdict = self.check(self.run())
        changed = [name for name, t in self.inputs.items() if fingerprint(t) != before[name]]
        if changed:
            return RowCheck(verdict.error, verdict.bound, verdict.rows, reason=f"changed its input {', '.join(changed)}")
        return verdict


def fingerprint(t: torch.Tensor) -> tuple:
    """A tensor's NaN count, and the sum and norm of the rest in float64, reduced where it lives:
    any write to it changes them but by a chance a kernel would have to aim for."""
    if t.element_size() == 1 and t.is_floating_point():     # an 8-bit cache: its bytes, which any write changes
        t = t.view(torch.uint8)
    t = t if t.is_floating_point() else t.double()      # lengths and offsets: a few integers
    finite = t.nan_to_num(0.0) if t.isnan().any() else t
    return (int(t.isnan().sum()), finite.sum(dtype=torch.float64).item(),
            torch.linalg.vector_norm(finite, dtype=torch.float64).item())


def build_call(point: Point, device) -> PointCall:
    """Random inputs for the point, the validated call that attends over them, and its check.

    Prefill: q (batch, seq_len, heads, head_dim), k and v (batch, seq_len, kv_heads, head_dim);
    with docs > 1 the same tokens packed, (batch x seq_len, heads, head_dim), as batch x docs
    documents. Decode: q (batch, q_len, heads, head_dim) over a cache as `decode_inputs` lays it
    out. Backward and fwd_bwd: as prefill, with an output gradient (`backward_call`). The
    point's window and softcap go with every call.
    """
    from attnlab.kernels import prepare_attention, prepare_decode, prepare_varlen

    window, softcap = point.variant.window, point.variant.softcap
    options = dict(window=window, softcap=softcap)
    scale = point.head_dim ** -0.5
    if point.mode == DECODE:
        inputs = decode_inputs(point, device)
        cache_options = {name: t for name, t in inputs.items() if name in CACHE_OPTIONS}
        run = prepare_decode(inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["cache_seqlens"],
                             impl=point.kernel, **cache_options, **options)
        return PointCall(run, inputs, lambda out: check_cached(out, inputs, scale=scale, **options))
    if point.mode in (BACKWARD, FWD_BWD):
        return backward_call(point, device)
    q, k, v = random_inputs(point, device)
    if point.docs > 1:
        lengths = doc_lengths(point.seq_len, point.docs) * point.batch
        cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
        pq, pk, pv = (t.flatten(0, 1) for t in (q, k, v))
        run = prepare_varlen(pq, pk, pv, cu, cu, max(lengths), max(lengths), causal=point.causal, impl=point.kernel,
                             **options)
        return PointCall(run, dict(q=pq, k=pk, v=pv, cu_seqlens=cu),
                         lambda out: check_varlen(out, pq, pk, pv, cu, cu, causal=point.causal, scale=scale, **options))
    run = prepare_attention(q, k, v, causal=point.causal, impl=point.kernel, **options)
    return PointCall(run, dict(q=q, k=k, v=v),
                     lambda out: check_prefill(out, q, k, v, causal=point.causal, scale=scale, **options))


def backward_call(point: Point, device) -> PointCall:
    """A training point's call on q, k, v as for prefill and a random output gradient dout
    (batch, seq_len, heads, head_dim). Backward: the forward runs here, once, outside the timing,
    and `run` is grads(dout) on its saved state, returning (dq, dk, dv). Forward and backward
    (fwd_bwd): `run` does both, returning (out, (dq, dk, dv)). The check holds the forward's
    output and every gradient against float64 (kernels/gradcheck.py)."""
    from attnlab.kernels.api import resolve
    from attnlab.kernels.gradcheck import check_backward
    from attnlab.kernels.masks import checked_variant

    q, k, v = random_inputs(point, device)
    dout = torch.randn_like(q)
    scale = point.head_dim ** -0.5
    variant = checked_variant(point.variant.window, point.variant.softcap, scale=scale, seqlen_q=point.q_len,
                              seqlen_k=point.seqlen_k)
    chosen = resolve(point.kernel, point.mode, q, k, v, causal=point.causal, scale=scale, variant=variant)
    options = variant.kwargs()
    shape = dict(causal=point.causal, scale=scale, window=variant.window, softcap=variant.softcap)
    inputs = dict(q=q, k=k, v=v, dout=dout)
    if point.mode == BACKWARD:
        out, grads = chosen.backward(q, k, v, point.causal, scale, **options)
        return PointCall(lambda: grads(dout), inputs,
                         lambda found: check_backward(q, k, v, dout, found, out=out, **shape))

    def forward_and_backward():
        out, grads = chosen.backward(q, k, v, point.causal, scale, **options)
        return out, grads(dout)
    return PointCall(forward_and_backward, inputs,
                     lambda found: check_backward(q, k, v, dout, found[1], out=found[0], **shape))


CACHE_OPTIONS = ("block_table", "k_descale", "v_descale")      # decode_attention's keywords, passed where set


def decode_inputs(point: Point, device) -> dict:
    """decode_attention's inputs for a decode point, by name: q (batch, q_len, heads, head_dim);
    k_cache and v_cache, (batch, seq_len, kv_heads, head_dim) or, with page_size, pages
    (num_blocks, page_size, kv_heads, head_dim) in shuffled physical order behind an int32
    block_table (batch, ceil(seq_len / page_size)); cache_seqlens (batch,) int32 from
    `point.cache_lengths()`; and with an 8-bit cache, float32 k_descale and v_descale
    (batch, kv_heads), one scale a (sequence, kv head) chosen to use the format's range."""
    q, k, v = random_inputs(point, device)
    lengths = torch.tensor(point.cache_lengths(), dtype=torch.int32, device=device)
    inputs = dict(q=q, k_cache=k, v_cache=v, cache_seqlens=lengths)
    if point.fp8_cache:
        gen = torch.Generator(device="cpu").manual_seed(point.lengths_seed + 1)
        for name in ("k", "v"):
            inputs[f"{name}_cache"], inputs[f"{name}_descale"] = quantise(inputs[f"{name}_cache"],
                                                                          point.kv_torch_dtype, gen)
    if point.page_size:
        gen = torch.Generator(device="cpu").manual_seed(point.lengths_seed + 2)
        pages = [math.ceil(n / point.page_size) for n in point.cache_lengths()]
        physical = torch.randperm(sum(pages), generator=gen).to(device)
        for name in ("k_cache", "v_cache"):
            inputs[name] = to_pages(inputs[name], pages, point.page_size, physical)
        inputs["block_table"] = block_table(pages, math.ceil(point.seq_len / point.page_size), physical)
    return inputs


def quantise(cache: torch.Tensor, dtype: torch.dtype, gen: torch.Generator) -> tuple:
    """An 8-bit copy of `cache` (batch, seqlen, kv_heads, head_dim) and its float32 descales
    (batch, kv_heads): each (sequence, kv head) scaled by a random factor of 1/4 to 4 first, so
    that a kernel applying the wrong descale, or none, is caught; then stored over the format's
    range (stored x descale is the value attended)."""
    batch, _, kv_heads, _ = cache.shape
    spread = torch.exp2(torch.rand(batch, kv_heads, generator=gen) * 4 - 2).to(cache.device)
    largest = torch.finfo(dtype).max
    stored = torch.empty(cache.shape, dtype=dtype, device=cache.device)
    descale = torch.empty(batch, kv_heads, dtype=torch.float32, device=cache.device)
    for b in range(batch):      # one sequence at a time in float32: bounded memory at 128k
        values = cache[b].float() * spread[b][None, :, None]
        descale[b] = values.abs().amax(dim=(0, 2)).clamp(min=1e-12) / largest
        stored[b] = (values / descale[b][None, :, None]).to(dtype)
    return stored, descale


def to_pages(cache: torch.Tensor, pages: list, page_size: int, physical: torch.Tensor) -> torch.Tensor:
    """(batch, seqlen, kv_heads, head_dim) -> (sum(pages), page_size, kv_heads, head_dim): sequence
    b's first pages[b] pages, the i-th page of all in order stored at physical[i]."""
    batch, seqlen, kv_heads, head_dim = cache.shape
    padded_len = max(pages, default=0) * page_size      # whole pages; the last one's tail stays zero
    padded = cache.new_zeros(batch, padded_len, kv_heads, head_dim)
    padded[:, :min(seqlen, padded_len)] = cache[:, :padded_len]
    logical = torch.cat([padded[b, :n * page_size].view(n, page_size, kv_heads, head_dim)
                         for b, n in enumerate(pages) if n])
    paged = torch.empty_like(logical)
    paged[physical] = logical
    return paged


def block_table(pages: list, max_blocks: int, physical: torch.Tensor) -> torch.Tensor:
    """int32 (batch, max_blocks): sequence b's pages where `to_pages` stored them; entries past
    its pages point at page 0, which it never reads."""
    table = torch.zeros(len(pages), max_blocks, dtype=torch.int32, device=physical.device)
    first = 0
    for b, n in enumerate(pages):
        table[b, :n] = physical[first:first + n].to(torch.int32)
        first += n
    return table


def check_cached(out, inputs: dict, *, scale: float, **options) -> RowCheck:
    """`out` of decode_attention over `inputs` (as `decode_inputs` names them) against float64."""
    cache_options = {name: t for name, t in inputs.items() if name in CACHE_OPTIONS}
    return check_decode(out, inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["cache_seqlens"], scale=scale,
                        **cache_options, **options)


def random_inputs(point: Point, device) -> tuple:
    """q (batch, q_len, heads, head_dim); k and v (batch, seq_len, kv_heads, head_dim)."""
    kw = {"device": device, "dtype": point.torch_dtype}
    b, h, kvh, d = point.batch, point.heads, point.kv_heads, point.head_dim
    return (torch.randn(b, point.q_len, h, d, **kw), torch.randn(b, point.seq_len, kvh, d, **kw),
            torch.randn(b, point.seq_len, kvh, d, **kw))
