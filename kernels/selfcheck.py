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
from attnlab.kernels.registry import DECODE, PREFILL, get, implementations, one_line

# (batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal): awkward lengths, GQA.
PREFILL_CASES = [(1, 113, 203, 4, 2, 64, True), (2, 97, 64, 4, 1, 40, True), (1, 128, 128, 2, 2, 128, False)]
DECODE_CASES = [((0, 57, 203), 1, 8, 2, 64), ((130, 5), 4, 4, 4, 128)]  # (lengths, q_len, heads, kv_heads, d)
# The options, each on one awkward case, for the implementations that declare them: a window
# narrower than the sequence, a cap the scores reach, and packed sequences of unequal lengths.
VARIANTS = [Variant(window=(24, -1)), Variant(softcap=2.0)]
PACKED_LENGTHS = [(13, 13), (0, 5), (70, 91), (1, 40)]           # (seqlen_q, seqlen_k) per sequence
REFERENCE = "naive"       # what the others are compared with in each dtype


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


def _candidates(names) -> list:
    return [i for i in implementations() if i.name != REFERENCE and (names is None or i.name in names)]


def _usable(mode, device, dtype, head_dim, names, variant=PLAIN, varlen=False) -> tuple:
    """(names of the implementations that take this case, failures of those whose declarations
    raised deciding it): `limits` and `head_dims` are the implementation's own code too."""
    usable, broken = [], []
    for impl in _candidates(names):
        try:
            if impl.available(device) and impl.supports(mode, dtype, head_dim, device) and impl.takes(variant, varlen):
                usable.append(impl.name)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            broken.append((impl.name, f"deciding whether it runs raised {one_line(exc)}"))
    return usable, broken


def _compare(chosen, mode, case, run, dtype):
    usable, broken = chosen
    ref, naive = run(REFERENCE, torch.float64), run(REFERENCE, dtype)
    bound = _bound(_error(naive, ref), dtype)
    return ([CheckResult(name, mode, case, float("inf"), bound, error) for name, error in broken]
            + [_measure(name, mode, case, lambda: run(name, dtype), ref, bound) for name in usable])


def _measure(name, mode, case, call, ref, bound) -> CheckResult:
    try:
        out = call()
        if out.shape != ref.shape:
            raise ValueError(f"returned shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
        return CheckResult(name, mode, case, _error(out, ref), bound)
    except BaseException as exc:   # a kernel that raises, even SystemExit, fails its check and the rest still run
        if isinstance(exc, KeyboardInterrupt):
            raise
        return CheckResult(name, mode, case, float("inf"), bound, one_line(exc))


def _broken_probes(device, names) -> list[CheckResult]:
    """A failure for each implementation whose probe raised here: a fault of the kernel, not of the machine."""
    statuses = [(impl.name, impl.available(device)) for impl in _candidates(names)]
    return [CheckResult(name, "-", "probe", float("inf"), 0.0, status.reason)
            for name, status in statuses if status.broken]


def why_not(name: str, device: str, dtype: torch.dtype) -> str:
    """Why the implementation `name` takes none of the check's cases on `device` in `dtype`, on
    one line: the registry's reason."""
    impl = get(name)
    if name == REFERENCE:
        return "it is the reference the others are checked against"
    status = impl.available(device)
    if not status:
        return one_line(status.reason)
    device_type = torch.device(device).type
    cases = [(PREFILL, case[5]) for case in PREFILL_CASES] + [(DECODE, case[4]) for case in DECODE_CASES]
    refused = [s for s in (impl.supports(mode, dtype, d, device_type) for mode, d in cases) if not s]
    return one_line(refused[0].reason) if refused else "it takes none of the check's cases"


def check(device: str = "cpu", dtype: torch.dtype = torch.float16, seed: int = 0,
          kernels=None) -> list[CheckResult]:
    """Run every usable implementation (or those named in `kernels`) on a few awkward shapes and
    measure its error."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen).to(device)
    results = _broken_probes(device, kernels)
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
