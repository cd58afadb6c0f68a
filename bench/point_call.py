"""A point's call: random inputs of its shape, the validated zero-argument call that attends over
them, and the check of what that call returns, so every point timed is first shown right.

    call = build_call(point, "cuda")
    verdict = call.verify()          # runs it once: sampled rows against float64, inputs unchanged
    timer.time(call.run)
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import torch

from attnlab.bench.workloads import DECODE, Point, doc_lengths
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
    t = t if t.is_floating_point() else t.double()      # lengths and offsets: a few integers
    finite = t.nan_to_num(0.0) if t.isnan().any() else t
    return (int(t.isnan().sum()), finite.sum(dtype=torch.float64).item(),
            torch.linalg.vector_norm(finite, dtype=torch.float64).item())


def build_call(point: Point, device) -> PointCall:
    """Random inputs for the point, the validated call that attends over them, and its check.

    Prefill: q (batch, seq_len, heads, head_dim), k and v (batch, seq_len, kv_heads, head_dim);
    with docs > 1 the same tokens packed, (batch x seq_len, heads, head_dim), as batch x docs
    documents. Decode: q (batch, q_len, heads, head_dim) over a full cache of seq_len tokens.
    The point's window and softcap go with every call.
    """
    from attnlab.kernels import prepare_attention, prepare_decode, prepare_varlen

    q, k, v = random_inputs(point, device)
    window, softcap = point.variant.window, point.variant.softcap
    options = dict(window=window, softcap=softcap)
    scale = point.head_dim ** -0.5
    if point.mode == DECODE:
        lens = torch.full((point.batch,), point.seq_len, dtype=torch.int32, device=device)
        run = prepare_decode(q, k, v, lens, impl=point.kernel, **options)
        return PointCall(run, dict(q=q, k_cache=k, v_cache=v, cache_seqlens=lens),
                         lambda out: check_decode(out, q, k, v, lens, scale=scale, **options))
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


def random_inputs(point: Point, device) -> tuple:
    """q (batch, q_len, heads, head_dim); k and v (batch, seq_len, kv_heads, head_dim)."""
    kw = {"device": device, "dtype": point.torch_dtype}
    b, h, kvh, d = point.batch, point.heads, point.kv_heads, point.head_dim
    return (torch.randn(b, point.q_len, h, d, **kw), torch.randn(b, point.seq_len, kvh, d, **kw),
            torch.randn(b, point.seq_len, kvh, d, **kw))
