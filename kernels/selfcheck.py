"""A quick correctness check of every implementation that runs on a device.

Each result is compared with naive attention in float64 on upcast inputs (exact up to
float64 rounding); the bar is the test suite's: at most twice the error of naive attention
in the same dtype, plus a small slack.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from attnlab.kernels.api import attention, attention_varlen, decode_attention
from attnlab.kernels.masks import PLAIN, Variant
from attnlab.kernels.registry import DECODE, PREFILL, implementations

# (batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal): awkward lengths, GQA.
PREFILL_CASES = [(1, 113, 203, 4, 2, 64, True), (2, 97, 64, 4, 1, 40, True), (1, 128, 128, 2, 2, 128, False)]
DECODE_CASES = [((0, 57, 203), 1, 8, 2, 64), ((130, 5), 4, 4, 4, 128)]  # (lengths, q_len, heads, kv_heads, d)
# The options, each on one awkward case, for the implementations that declare them: a window
# narrower than the sequence, a cap the scores reach, and packed sequences of unequal lengths.
VARIANTS = [Variant(window=(24, -1)), Variant(softcap=2.0)]
PACKED_LENGTHS = [(13, 13), (0, 5), (70, 91), (1, 40)]           # (seqlen_q, seqlen_k) per sequence


@dataclass
class CheckResult:
    impl: str
    mode: str
    case: str
    max_error: float
    bound: float
    error: str = ""           # what the call raised, if it raised


    @property
    def ok(self) -> bool:
        return self.max_error <= self.bound


def _bound(naive_error: float, dtype: torch.dtype) -> float:
    return 2 * naive_error + max(torch.finfo(dtype).eps / 8, 1e-6)


def _error(out: torch.Tensor, ref: torch.Tensor) -> float:
    err = (out.double() - ref).abs().max().item()
    return float("inf") if err != err else err  # NaN never passes


def _usable(mode, device, dtype, head_dim, names, variant=PLAIN, varlen=False):
    return [i.name for i in implementations()
            if i.name != "naive" and (names is None or i.name in names)
            and i.available(device) and i.supports(mode, dtype, head_dim, device) and i.takes(variant, varlen)]


def _compare(impls, mode, case, run, dtype):
    ref, naive = run("naive", torch.float64), run("naive", dtype)
    bound = _bound(_error(naive, ref), dtype)
    return [_measure(name, mode, case, lambda: run(name, dtype), ref, bound) for name in impls]


def _measure(name, mode, case, call, ref, bound) -> CheckResult:
    try:
        out = call()
        if out.shape != ref.shape:
            raise ValueError(f"returned shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
        return CheckResult(name, mode, case, _error(out, ref), bound)
    except Exception as exc:   # a kernel that raises fails its check and the rest still run
        return CheckResult(name, mode, case, float("inf"), bound, f"{type(exc).__name__}: {exc}")


def check(device: str = "cpu", dtype: torch.dtype = torch.float16, seed: int = 0,
          kernels=None) -> list[CheckResult]:
    """Run every usable implementation (or those named in `kernels`) on a few awkward shapes and
    measure its error."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen).to(device)
    results = []
    for b, sq, sk, h, kvh, d, causal in PREFILL_CASES:
        q, k, v = randn(b, sq, h, d), randn(b, sk, kvh, d), randn(b, sk, kvh, d)
        run = lambda name, dt: attention(q.to(dt), k.to(dt), v.to(dt), causal=causal, impl=name)
        case = f"q {tuple(q.shape)} k {tuple(k.shape)} causal={causal}"
        results += _compare(_usable(PREFILL, device, dtype, d, kernels), PREFILL, case, run, dtype)
    for lengths, q_len, h, kvh, d in DECODE_CASES:
        s = max(lengths)
        q, k, v = randn(len(lengths), q_len, h, d), randn(len(lengths), s, kvh, d), randn(len(lengths), s, kvh, d)
        lens = torch.tensor(lengths, dtype=torch.int32, device=device)
        run = lambda name, dt: decode_attention(q.to(dt), k.to(dt), v.to(dt), lens, impl=name)
        case = f"q {tuple(q.shape)} cache {tuple(k.shape)} lengths {list(lengths)}"
        results += _compare(_usable(DECODE, device, dtype, d, kernels), DECODE, case, run, dtype)
    return results + _variants(randn, device, dtype, kernels)


def _variants(randn, device, dtype, kernels) -> list[CheckResult]:
    """Each option on one case, for the implementations that take it; and packed sequences."""
    results = []
    q, k, v = randn(2, 97, 4, 64), randn(2, 131, 2, 64), randn(2, 131, 2, 64)
    for variant in VARIANTS:
        options = dict(window=variant.window, softcap=variant.softcap)
        run = lambda name, dt: attention(q.to(dt) * 3, k.to(dt), v.to(dt), causal=True, impl=name, **options)
        case = f"q {tuple(q.shape)} k {tuple(k.shape)} causal=True " + " ".join(f"{o}={x}" for o, x in options.items()
                                                                                 if o in variant.used())
        results += _compare(_usable(PREFILL, device, dtype, 64, kernels, variant), PREFILL, case, run, dtype)
    cu_q, cu_k = (torch.tensor([0, *itertools.accumulate(n[i] for n in PACKED_LENGTHS)], dtype=torch.int32,
                               device=device) for i in (0, 1))
    pq, pk, pv = randn(int(cu_q[-1]), 4, 64), randn(int(cu_k[-1]), 2, 64), randn(int(cu_k[-1]), 2, 64)
    longest_q, longest_k = (max(n[i] for n in PACKED_LENGTHS) for i in (0, 1))
    run = lambda name, dt: attention_varlen(pq.to(dt), pk.to(dt), pv.to(dt), cu_q, cu_k, longest_q, longest_k,
                                            causal=True, impl=name)
    case = f"packed (seqlen_q, seqlen_k) {PACKED_LENGTHS} causal=True"
    return results + _compare(_usable(PREFILL, device, dtype, 64, kernels, varlen=True), "varlen", case, run, dtype)
