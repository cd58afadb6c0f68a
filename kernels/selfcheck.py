"""A quick correctness check of every implementation that runs on a device.

Each output is judged by rowcheck.py, as every point a sweep times is: its type, shape, dtype
and device first, then sampled query rows against float64 (every query row of a decode), with
the test suite's bar: at most twice the error of the same rows computed plainly in the same
dtype, plus a small slack. The cases reach past three tiles of the Triton kernels (128 rows or
keys), hold NaN in every slot past a decode cache's lengths, and run each option on prefill and
decode for the implementations that declare it. Each implementation gets its own copies of a
case's inputs, and one that changes them fails, named, while the others see them unchanged.

Every implementation with a backward has its gradients checked through the API, as training
takes them: out, dq, dk and dv against float64 autograd through the quadratic form, by the same
bar (twice the error of that form in the same dtype, plus a slack), on awkward lengths, GQA,
causal with more queries than keys and fewer, the options and packed sequences. These shapes
stay small: a Triton backward is checked in its interpreter through this same path.
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

from attnlab.kernels.api import attention, attention_varlen, decode_attention
from attnlab.kernels.api import FP8_Q_DTYPES
from attnlab.kernels.masks import PLAIN, Variant
from attnlab.kernels.registry import BACKWARD, DECODE, PREFILL, get, implementations, one_line
from attnlab.kernels.rowcheck import RowCheck, _wrong_output, check_decode, check_prefill, check_varlen


class PrefillShape(NamedTuple):
    batch: int
    seqlen_q: int
    seqlen_k: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool


class DecodeShape(NamedTuple):
    lengths: tuple      # cache_seqlens, one per sequence
    max_seqlen: int     # the cache's slots: those past a sequence's length hold NaN
    q_len: int
    heads: int
    kv_heads: int
    head_dim: int


# Awkward lengths, GQA and MQA; the first case of each mode is longer than three 128-row tiles.
PREFILL_CASES = [PrefillShape(1, 611, 700, 4, 2, 64, True), PrefillShape(2, 97, 64, 4, 1, 40, True),
                 PrefillShape(1, 128, 128, 2, 2, 128, False)]
DECODE_CASES = [DecodeShape((0, 57, 419, 700), 733, 1, 8, 2, 64), DecodeShape((130, 5), 130, 4, 4, 4, 128)]
# The options, each on one awkward case per mode, for the implementations that declare them: a
# window narrower than the sequences, a cap the scores reach (queries scaled by OPTION_Q_SCALE),
# and packed sequences of unequal lengths.
VARIANTS = [Variant(window=(24, -1)), Variant(softcap=2.0)]
PREFILL_OPTION_CASE = PrefillShape(2, 97, 131, 4, 2, 64, True)
DECODE_OPTION_CASE = DecodeShape((300, 45, 0), 307, 3, 8, 2, 64)
OPTION_Q_SCALE = 3.0
PACKED_LENGTHS = [(13, 13), (0, 5), (70, 91), (1, 40)]           # (seqlen_q, seqlen_k) per sequence
PACKED_HEADS = (4, 2, 64)                                         # heads, kv_heads, head_dim
# Paged caches (flash-attn's layout), one in the check's dtype and one in FP8 (with a q dtype
# an FP8 cache takes): ragged lengths from 0 to the table's whole reach.
PagedShape = NamedTuple("PagedShape", [("shape", DecodeShape), ("page_size", int), ("kv_dtype", Optional[torch.dtype])])
PAGED_CASES = [PagedShape(DecodeShape((0, 45, 96, 70), 96, 2, 8, 2, 64), 16, None),
               PagedShape(DecodeShape((129, 1, 256), 256, 1, 4, 1, 64), 64, torch.float8_e4m3fn)]
REFERENCE = "naive"       # the plain computation the bound is set by (rowcheck repeats it on the rows): not checked
VARLEN = "varlen"         # the mode column of packed cases
# Gradients: lengths off every tile size, the first rows of the second case seeing no key; the
# options on the first case; packed sequences with one empty and one of more queries than keys.
GRAD_CASES = [PrefillShape(1, 113, 150, 4, 2, 64, True), PrefillShape(1, 203, 150, 2, 1, 32, True),
              PrefillShape(2, 61, 150, 4, 4, 64, False)]
GRAD_PACKED_LENGTHS = [(13, 13), (0, 5), (40, 31), (1, 20)]
VARLEN_BACKWARD = "varlen-backward"    # the mode column of packed gradient cases
REGISTRY_MODE = {PREFILL: PREFILL, DECODE: DECODE, VARLEN: PREFILL, BACKWARD: BACKWARD, VARLEN_BACKWARD: BACKWARD}
PACKED = (VARLEN, VARLEN_BACKWARD)
CASE_MODES = tuple(REGISTRY_MODE)      # the check's modes, as its mode column writes them
GRADIENTS = ("out", "dq", "dk", "dv")


@dataclass(frozen=True)
class Case:
    """One input set: `inputs` by the API's argument names, in the dtype checked, as every
    implementation receives them (a copy each), tensors in the (batch, seqlen, heads, head_dim)
    layout, packed ones (total, heads, head_dim); `call(impl, inputs)` attends over such a copy;
    `judge(out)` is the verdict on an output against `inputs`."""

    mode: str                 # prefill, decode or varlen
    text: str                 # what the table shows
    head_dim: int
    inputs: dict
    call: Callable[[str, dict], object]
    judge: Callable[[object], RowCheck]
    variant: Variant = PLAIN
    page_size: int = 0                           # a decode cache's pages; 0: contiguous
    kv_dtype: Optional[torch.dtype] = None       # a decode cache's dtype; None: the case's


NO_VERDICT = RowCheck(math.inf, 0.0)     # the call raised, or was never made


@dataclass
class CheckResult:
    impl: str
    mode: str
    case: str
    verdict: RowCheck = NO_VERDICT
    error: str = ""           # what the call, or a declaration deciding it, raised

    @property
    def ok(self) -> bool:
        return not self.error and self.verdict.ok

    @property
    def max_error(self) -> float:
        return self.verdict.error

    @property
    def bound(self) -> float:
        return self.verdict.bound

    @property
    def why(self) -> str:
        """The reason on one line: what was raised, or the verdict's description."""
        return self.error or self.verdict.describe()


def _candidates(names) -> list:
    return [i for i in implementations() if i.name != REFERENCE and (names is None or i.name in names)]


def _usable(mode, device, dtype, head_dim, names, variant=PLAIN, varlen=False, page_size=0, kv_dtype=None) -> tuple:
    """(names of the implementations that take this case, failures of those whose declarations
    raised deciding it): `limits` and `head_dims` are the implementation's own code too."""
    usable, broken = [], []
    for impl in _candidates(names):
        try:
            if (impl.available(device) and impl.supports(mode, dtype, head_dim, device)
                    and impl.takes(variant, varlen, mode) and impl.takes_cache(dtype, page_size, kv_dtype)):
                usable.append(impl.name)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            broken.append((impl.name, f"deciding whether it runs raised {one_line(exc)}"))
    return usable, broken


def _run(name: str, case: Case) -> CheckResult:
    """The implementation on its own copies of the case's inputs, judged; changing a copy fails it."""
    given = {arg: t.clone() for arg, t in case.inputs.items()}
    try:
        verdict = case.judge(case.call(name, given))
    except BaseException as exc:   # a kernel that raises, even SystemExit, fails its check and the rest still run
        if isinstance(exc, KeyboardInterrupt):
            raise
        return CheckResult(name, case.mode, case.text, error=one_line(exc))
    changed = [arg for arg, t in given.items() if not _unchanged(t, case.inputs[arg])]
    if changed:
        verdict = RowCheck(verdict.error, verdict.bound, verdict.rows, reason=f"changed its input {', '.join(changed)}")
    return CheckResult(name, case.mode, case.text, verdict)


def _unchanged(t: torch.Tensor, before: torch.Tensor) -> bool:
    """Bit for bit: NaN in a cache's unwritten slots compares equal to itself, and a kernel that
    cleans it in place has changed its input."""
    bits = lambda x: x.detach().reshape(-1).view(torch.uint8)
    return t.shape == before.shape and t.dtype == before.dtype and torch.equal(bits(t), bits(before))


def _broken_probes(device, names) -> list[CheckResult]:
    """A failure for each implementation whose probe raised here: a fault of the kernel, not of the machine."""
    statuses = [(impl.name, impl.available(device)) for impl in _candidates(names)]
    return [CheckResult(name, "-", "probe", error=status.reason) for name, status in statuses if status.broken]


def why_not(name: str, device: str, dtype: torch.dtype, modes=None) -> str:
    """Why the implementation `name` takes none of the check's cases (of `modes`, as `check`
    takes them) on `device` in `dtype`, on one line: the registry's reason."""
    impl = get(name)
    if name == REFERENCE:
        return "it is the reference the others are checked against"
    status = impl.available(device)
    if not status:
        return one_line(status.reason)
    device_type = torch.device(device).type
    cases = ([(PREFILL, c.head_dim) for c in PREFILL_CASES] + [(DECODE, c.head_dim) for c in DECODE_CASES]
             + [(BACKWARD, c.head_dim) for c in GRAD_CASES])
    wanted = {REGISTRY_MODE[m] for m in modes or CASE_MODES}
    refused = [s for s in (impl.supports(mode, dtype, d, device_type) for mode, d in cases if mode in wanted) if not s]
    return one_line(refused[0].reason) if refused else "it takes none of the check's cases"


def check(device: str = "cpu", dtype: torch.dtype = torch.float16, seed: int = 0,
          kernels=None, modes=None) -> list[CheckResult]:
    """Run every usable implementation (or those named in `kernels`) on the check's cases (or
    those of the `modes` named, as the mode column writes them: CASE_MODES) and judge each
    output; one result per implementation and case."""
    unknown = [m for m in modes or () if m not in CASE_MODES]
    if unknown:
        raise ValueError(f"modes: expected some of {', '.join(CASE_MODES)}, got {', '.join(map(repr, unknown))}")
    results = _broken_probes(device, kernels)
    for case in cases(device, dtype, seed):
        if modes is not None and case.mode not in modes:
            continue
        mode = REGISTRY_MODE[case.mode]
        usable, broken = _usable(mode, device, dtype, case.head_dim, kernels, case.variant, case.mode in PACKED,
                                 case.page_size, case.kv_dtype)
        results += [CheckResult(name, case.mode, case.text, error=reason) for name, reason in broken]
        results += [_run(name, case) for name in usable]
    return results


def cases(device, dtype: torch.dtype, seed: int = 0) -> list[Case]:
    """Every case of the check, its inputs drawn from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
    return ([_prefill_case(shape, randn, seed) for shape in PREFILL_CASES]
            + [_decode_case(shape, randn) for shape in DECODE_CASES]
            + [_prefill_case(PREFILL_OPTION_CASE, randn, seed, v, OPTION_Q_SCALE) for v in VARIANTS]
            + [_decode_case(DECODE_OPTION_CASE, randn, v, OPTION_Q_SCALE) for v in VARIANTS]
            + [_varlen_case(randn, device, seed)]
            + [_gradient_case(shape, randn) for shape in GRAD_CASES]
            + [_gradient_case(GRAD_CASES[0], randn, v, OPTION_Q_SCALE) for v in VARIANTS]
            + [_varlen_gradient_case(randn, device)]
            + [_paged_case(paged, randn, gen, dtype) for paged in PAGED_CASES
               if paged.kv_dtype is None or dtype in FP8_Q_DTYPES])


def _options(variant: Variant) -> tuple:
    """(the keywords the API and rowcheck take for the variant, the options it sets as the table writes them)."""
    options = dict(window=variant.window, softcap=variant.softcap)
    return options, "".join(f" {name}={options[name]}" for name in variant.used())


def _prefill_case(shape: PrefillShape, randn, seed: int, variant: Variant = PLAIN, q_scale: float = 1.0) -> Case:
    b, sq, sk, h, kvh, d, causal = shape
    inputs = dict(q=randn(b, sq, h, d) * q_scale, k=randn(b, sk, kvh, d), v=randn(b, sk, kvh, d))
    options, named = _options(variant)
    return Case(PREFILL, f"q {(b, sq, h, d)} k {(b, sk, kvh, d)} causal={causal}{named}", d, inputs,
                lambda impl, t: attention(**t, causal=causal, impl=impl, **options),
                lambda out: check_prefill(out, **inputs, causal=causal, scale=d ** -0.5, seed=seed, **options),
                variant)


def _decode_case(shape: DecodeShape, randn, variant: Variant = PLAIN, q_scale: float = 1.0) -> Case:
    lengths, max_seqlen, q_len, h, kvh, d = shape
    b = len(lengths)
    q = randn(b, q_len, h, d) * q_scale
    k_cache, v_cache = (_nan_past(randn(b, max_seqlen, kvh, d), lengths) for _ in range(2))
    lens = torch.tensor(lengths, dtype=torch.int32, device=q.device)
    inputs = dict(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=lens)
    options, named = _options(variant)
    text = f"q {tuple(q.shape)} cache {tuple(k_cache.shape)} lengths {list(lengths)}{named}, NaN past the lengths"
    return Case(DECODE, text, d, inputs, lambda impl, t: decode_attention(**t, impl=impl, **options),
                lambda out: check_decode(out, **inputs, scale=d ** -0.5, **options), variant)


def _nan_past(cache: torch.Tensor, lengths) -> torch.Tensor:
    """The cache (batch, max_seqlen, kv_heads, head_dim) with NaN in every slot past its sequence's
    length: slots a kernel may never let reach an output."""
    for b, n in enumerate(lengths):
        cache[b, n:] = float("nan")
    return cache


def _paged_case(paged: PagedShape, randn, gen, dtype) -> Case:
    """A decode case over a paged cache, its pages shuffled, NaN in every slot no length reaches
    and -1 in every table entry none uses; FP8 with a descale per sequence and kv head where asked."""
    (lengths, max_seqlen, q_len, h, kvh, d), page_size, kv_dtype = paged
    b, per_seq = len(lengths), -(-max_seqlen // page_size)
    num_blocks = b * per_seq + 1                  # one page no sequence names
    table = torch.randperm(num_blocks, generator=gen)[:b * per_seq].view(b, per_seq).int()
    written = torch.zeros(num_blocks, page_size, dtype=torch.bool)
    for row, n in enumerate(lengths):
        written.view(-1)[(table[row, :, None] * page_size + torch.arange(page_size)).view(-1)[:n]] = True
        table[row, -(-n // page_size):] = -1
    q = randn(b, q_len, h, d) * OPTION_Q_SCALE
    k_cache, v_cache = (randn(num_blocks, page_size, kvh, d).masked_fill(~written[..., None, None].to(q.device),
                                                                       float("nan")) for _ in range(2))
    inputs = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_table=table.to(q.device),
                  cache_seqlens=torch.tensor(lengths, dtype=torch.int32, device=q.device))
    stored = "" if kv_dtype is None else f" {str(kv_dtype).removeprefix('torch.')} with descales"
    if kv_dtype is not None:
        inputs.update(k_cache=k_cache.to(kv_dtype), v_cache=v_cache.to(kv_dtype),
                      **{name: (torch.rand(b, kvh, generator=gen) * 1.5 + 0.25).to(q.device)
                         for name in ("k_descale", "v_descale")})
    text = (f"q {tuple(q.shape)} paged cache {tuple(k_cache.shape)}{stored} lengths {list(lengths)}, "
            f"pages shuffled, NaN past the lengths")
    return Case(DECODE, text, d, inputs, lambda impl, t: decode_attention(**t, impl=impl),
                lambda out: check_decode(out, **inputs, scale=d ** -0.5), page_size=page_size, kv_dtype=kv_dtype)


def _varlen_case(randn, device, seed: int) -> Case:
    h, kvh, d = PACKED_HEADS
    cu_q, cu_k = (torch.tensor([0, *itertools.accumulate(n[i] for n in PACKED_LENGTHS)], dtype=torch.int32,
                               device=device) for i in (0, 1))
    inputs = dict(q=randn(int(cu_q[-1]), h, d), k=randn(int(cu_k[-1]), kvh, d), v=randn(int(cu_k[-1]), kvh, d),
                  cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    longest_q, longest_k = (max(n[i] for n in PACKED_LENGTHS) for i in (0, 1))
    return Case(VARLEN, f"packed (seqlen_q, seqlen_k) {PACKED_LENGTHS} causal=True", d, inputs,
                lambda impl, t: attention_varlen(**t, max_seqlen_q=longest_q, max_seqlen_k=longest_k, causal=True,
                                                 impl=impl),
                lambda out: check_varlen(out, **inputs, causal=True, scale=d ** -0.5, seed=seed))


def _gradient_case(shape: PrefillShape, randn, variant: Variant = PLAIN, q_scale: float = 1.0) -> Case:
    b, sq, sk, h, kvh, d, causal = shape
    inputs = dict(q=randn(b, sq, h, d) * q_scale, k=randn(b, sk, kvh, d), v=randn(b, sk, kvh, d))
    options, named = _options(variant)
    run = lambda impl, t: attention(**t, causal=causal, impl=impl, **options)
    return Case(BACKWARD, f"q {(b, sq, h, d)} k {(b, sk, kvh, d)} causal={causal}{named}, gradients", d, inputs,
                lambda impl, t: _gradients(run, impl, t, _dout(inputs)), _gradient_judge(run, inputs), variant)


def _varlen_gradient_case(randn, device) -> Case:
    h, kvh, d = PACKED_HEADS
    lengths = GRAD_PACKED_LENGTHS
    cu_q, cu_k = (torch.tensor([0, *itertools.accumulate(n[i] for n in lengths)], dtype=torch.int32,
                               device=device) for i in (0, 1))
    inputs = dict(q=randn(int(cu_q[-1]), h, d), k=randn(int(cu_k[-1]), kvh, d), v=randn(int(cu_k[-1]), kvh, d),
                  cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    longest_q, longest_k = (max(n[i] for n in lengths) for i in (0, 1))
    run = lambda impl, t: attention_varlen(**t, max_seqlen_q=longest_q, max_seqlen_k=longest_k, causal=True,
                                           impl=impl)
    return Case(VARLEN_BACKWARD, f"packed (seqlen_q, seqlen_k) {lengths} causal=True, gradients", d, inputs,
                lambda impl, t: _gradients(run, impl, t, _dout(inputs)), _gradient_judge(run, inputs))


def _dout(inputs: dict) -> torch.Tensor:
    """The output's gradient every implementation of a case receives: drawn from the case's inputs
    by a generator of its own, so that adding a case leaves the others' inputs as they were."""
    gen = torch.Generator().manual_seed(int(inputs["q"].shape.numel()))
    return torch.randn(inputs["q"].shape, generator=gen).to(inputs["q"])


def _gradients(run: Callable, impl: str, inputs: dict, dout: torch.Tensor) -> tuple:
    """(out, dq, dk, dv) of run(impl, inputs) through autograd, q, k and v being leaves that require grad."""
    leaves = {arg: t.detach().requires_grad_() if arg in "qkv" else t for arg, t in inputs.items()}
    with torch.enable_grad():
        out = run(impl, leaves)
        return (out.detach(), *torch.autograd.grad(out, [leaves[arg] for arg in "qkv"], dout))


def _gradient_judge(run: Callable, inputs: dict) -> Callable[[tuple], RowCheck]:
    """The verdict on (out, dq, dk, dv): each against float64 autograd through the reference, within
    twice the reference's own error in the inputs' dtype plus a slack; the worst of the four."""
    @functools.lru_cache(maxsize=None)
    def references() -> tuple:
        exact = {arg: t.double() if t.is_floating_point() else t for arg, t in inputs.items()}
        return (_gradients(run, REFERENCE, exact, _dout(inputs).double()),
                _gradients(run, REFERENCE, inputs, _dout(inputs)))

    def judge(found) -> RowCheck:
        exact, plain = references()
        like = (inputs["q"], inputs["q"], inputs["k"], inputs["v"])
        if not isinstance(found, tuple) or len(found) != len(GRADIENTS):
            return RowCheck(math.inf, 0.0, reason=f"returned {type(found).__name__}, not (out, dq, dk, dv)")
        verdicts = [_gradient_verdict(name, *four) for name, *four in zip(GRADIENTS, found, like, exact, plain)]
        failed = [v for v in verdicts if not v.ok]
        return failed[0] if failed else max(verdicts, key=lambda v: v.error / v.bound)
    return judge


def _gradient_verdict(name: str, found, like: torch.Tensor, exact: torch.Tensor, plain: torch.Tensor) -> RowCheck:
    wrong = _wrong_output(found, like)
    if wrong:
        return RowCheck(wrong.error, wrong.bound, reason=f"{name}: {wrong.reason}")
    error = lambda t: math.inf if t.isnan().any() else (t.double() - exact).abs().max().item() if t.numel() else 0.0
    # The slack: one unit in the last place of the dtype at the gradient's largest magnitude (a
    # gradient sums over many rows, and a kernel may round its partial sums there), and a little.
    eps = torch.finfo(like.dtype).eps
    slack = eps * (exact.abs().max().item() if exact.numel() else 0.0) + max(eps / 8, 1e-6)
    err, bound = error(found), 2 * error(plain) + slack
    rows = like.shape[:-2].numel()
    if err > bound:
        return RowCheck(err, bound, rows, reason=f"{name}: max error {err:.3g} over bound {bound:.3g}")
    return RowCheck(err, bound, rows)
