"""Gradients through the API: dq, dk and dv of every implementation with a backward that runs
here, against float64 autograd through the definition, by FlashAttention's bar (at most twice
the naive implementation's error in the same dtype, plus a unit in the last place at the
gradient's magnitude); and the API's rules: a named implementation without a backward is
refused by name, `auto` moves on, a row that sees no key adds no gradient (no NaN), and the
gradients may be asked for twice. Tensors in the (batch, seqlen, heads, head_dim) layout."""
import itertools

import pytest
import torch

import attnlab.kernels as K
from attnlab.kernels import registry, selfcheck
from attnlab.kernels.masks import FULL
from paths import ROOT
from reference import visible_keys

# (batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal): awkward lengths, GQA and MQA,
# causal with fewer queries than keys and more (the first 53 rows of the second see no key).
SHAPES = [(1, 113, 150, 4, 2, 64, True), (1, 203, 150, 2, 1, 80, True), (2, 61, 150, 4, 4, 16, False),
          (1, 150, 60, 4, 2, 16, True)]
OPTION_VALUES = {"window": (24, 8), "softcap": 2.0}   # each on SHAPES[0]; the cap reached with q scaled by 3
PACKED = [(13, 13), (0, 5), (40, 31), (1, 20), (29, 0)]   # (seqlen_q, seqlen_k) per sequence
PACKED_HEADS = (4, 2, 64)


def with_backward(option=None, varlen=False):
    """Every registered implementation whose backward runs on this CPU (plugins and the Triton
    kernels included once they declare one) and takes `option`, naive aside (the yardstick)."""
    variant = K.Variant(**({option: OPTION_VALUES[option]} if option else {}))
    return [pytest.param(i.name, marks=[pytest.mark.slow] if i.ablation_of else [])
            for i in K.implementations()
            if i.name != "naive" and "backward" in i.modes and i.available("cpu")
            and i.supports("backward", torch.float16, 64, "cpu") and i.takes(variant, varlen, "backward")]


def matrix():
    """(impl, dtype, shape) for `with_backward()`: fp16 everywhere, and bf16 where the backward
    runs natively or fp32 where it runs in an emulator (Triton's interpreter gets bf16 dots
    wrong). An emulated backward's cases beyond fp16 on the first two shapes are marked slow."""
    params = []
    for param in with_backward():
        name = param.values[0]
        emulated = "cpu" in K.get(name).emulated_on
        for dtype, (i, shape) in itertools.product((torch.float16, torch.float32 if emulated else torch.bfloat16),
                                                   enumerate(SHAPES)):
            slow = emulated and (dtype != torch.float16 or i >= 2)
            params.append(pytest.param(name, dtype, shape, marks=[*param.marks, *([pytest.mark.slow] if slow else [])],
                                       id=f"{name}-{str(dtype).removeprefix('torch.')}-{'x'.join(map(str, shape))}"))
    return params


def random_inputs(shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(dtype) for shape in shapes]


def exact_gradients(q, k, v, dout, mask, scale, softcap=0.0):
    """(out, dq, dk, dv) in float64 by autograd through the definition, per kv head's group; mask
    (Sq, Sk). A row that sees no key has zero weights."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    kh, vh = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kh) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    blind = ~mask.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")).masked_fill(blind, 0.0), -1).masked_fill(blind, 0)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vh)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout.double()))


def api_gradients(impl, q, k, v, dout, **kwargs):
    """(out, dq, dk, dv) through attention(), q, k and v leaves that require grad."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = K.attention(q, k, v, impl=impl, **kwargs)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout))


def assert_as_close_as_naive(found, naive, exact, what):
    for name, got, plain, ref in zip(("out", "dq", "dk", "dv"), found, naive, exact):
        assert got.dtype == plain.dtype and got.shape == ref.shape, f"{what}: {name} {got.dtype} {tuple(got.shape)}"
        assert not got.isnan().any(), f"{what}: NaN in {name}"
        eps = torch.finfo(got.dtype).eps
        err, plain_err = ((t.double() - ref).abs().max().item() for t in (got, plain))
        bound = 2 * plain_err + eps * ref.abs().max().item() + max(eps / 8, 1e-6)
        assert err <= bound, f"{what}: {name} max error {err:.3g} > 2 x naive {plain_err:.3g} + slack"


def check_case(impl, dtype, shape, q_scale=1.0, **options):
    b, sq, sk, h, kvh, d, causal = shape
    q, k, v, dout = random_inputs([(b, sq, h, d), (b, sk, kvh, d), (b, sk, kvh, d), (b, sq, h, d)], dtype)
    q = q * q_scale
    mask = visible_keys(sq, sk, causal, options.get("window", FULL))
    exact = exact_gradients(q, k, v, dout, mask, d ** -0.5, options.get("softcap", 0.0))
    naive = api_gradients("naive", q, k, v, dout, causal=causal, **options)
    found = api_gradients(impl, q, k, v, dout, causal=causal, **options)
    assert_as_close_as_naive(found, naive, exact, f"{impl} {dtype} {shape} {options}")


@pytest.mark.parametrize("impl,dtype,shape", matrix())
def test_gradients_match_float64(impl, dtype, shape):
    check_case(impl, dtype, shape)


@pytest.mark.parametrize("impl,option", [pytest.param(p.values[0], option, marks=p.marks, id=f"{p.values[0]}-{option}")
                                         for option in OPTION_VALUES for p in with_backward(option)])
def test_gradients_with_options(impl, option):
    check_case(impl, torch.float16, SHAPES[0], q_scale=3.0, **{option: OPTION_VALUES[option]})


def test_naive_in_float64_is_the_definition():
    for shape, options in [(SHAPES[1], {}), *((SHAPES[0], {name: value}) for name, value in OPTION_VALUES.items())]:
        b, sq, sk, h, kvh, d, causal = shape
        q, k, v, dout = random_inputs([(b, sq, h, d), (b, sk, kvh, d), (b, sk, kvh, d), (b, sq, h, d)],
                                      torch.float64)
        exact = exact_gradients(q, k, v, dout, visible_keys(sq, sk, causal, options.get("window", FULL)), d ** -0.5,
                                options.get("softcap", 0.0))
        for found, ref in zip(api_gradients("naive", q, k, v, dout, causal=causal, **options), exact):
            assert torch.allclose(found, ref, atol=1e-10, rtol=0)


def packed_inputs(dtype):
    h, kvh, d = PACKED_HEADS
    cu_q, cu_k = (torch.tensor([0, *itertools.accumulate(n[i] for n in PACKED)], dtype=torch.int32) for i in (0, 1))
    q, k, v, dout = random_inputs([(int(cu_q[-1]), h, d), (int(cu_k[-1]), kvh, d), (int(cu_k[-1]), kvh, d),
                                   (int(cu_q[-1]), h, d)], dtype)
    return q, k, v, dout, cu_q, cu_k


def varlen_gradients(impl, q, k, v, dout, cu_q, cu_k):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    longest = [max(n[i] for n in PACKED) for i in (0, 1)]
    out = K.attention_varlen(q, k, v, cu_q, cu_k, *longest, causal=True, impl=impl)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout))


@pytest.mark.parametrize("impl", ["naive", *with_backward(varlen=True)])
def test_packed_sequences_have_each_their_own_gradients(impl):
    for dtype in (torch.float16,):
        q, k, v, dout, cu_q, cu_k = packed_inputs(dtype)
        exact = [torch.zeros(t.shape, dtype=torch.float64) for t in (q, q, k, v)]
        bounds = zip(cu_q.tolist(), cu_q.tolist()[1:], cu_k.tolist(), cu_k.tolist()[1:])
        for q0, q1, k0, k1 in bounds:
            mask = visible_keys(q1 - q0, k1 - k0, True)
            one = exact_gradients(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], dout[None, q0:q1], mask,
                                  q.shape[-1] ** -0.5)
            for whole, part, rows in zip(exact, one, (slice(q0, q1), slice(q0, q1), slice(k0, k1), slice(k0, k1))):
                whole[rows] = part[0]
        found = varlen_gradients(impl, q, k, v, dout, cu_q, cu_k)
        naive = varlen_gradients("naive", q, k, v, dout, cu_q, cu_k)
        assert_as_close_as_naive(found, naive, exact, f"{impl} packed {dtype}")


@pytest.mark.parametrize("impl", ["naive", *with_backward()])
def test_a_row_that_sees_no_key_adds_no_gradient_and_no_nan(impl):
    # causal, 150 queries over 60 keys: the first 90 rows see no key
    q, k, v, dout = random_inputs([(1, 150, 4, 16), (1, 60, 2, 16), (1, 60, 2, 16), (1, 150, 4, 16)], torch.float32)
    out, dq, dk, dv = api_gradients(impl, q, k, v, dout, causal=True)
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert not t.isnan().any(), f"{impl}: NaN in {name}"
    for blind_rows in (out[:, :90], dq[:, :90]):
        assert torch.equal(blind_rows, torch.zeros_like(blind_rows))
    # the blind rows' dout changes nothing
    dout[:, :90] = 1e4
    assert torch.equal(api_gradients(impl, q, k, v, dout, causal=True)[3], dv)


def test_naive_keeps_a_nan_that_a_row_sees():
    q, k, v = random_inputs([(1, 150, 4, 16), (1, 60, 2, 16), (1, 60, 2, 16)], torch.float32)
    k[:, 7] = float("nan")
    out = K.attention(q, k, v, causal=True, impl="naive")
    assert out[:, 90 + 7:].isnan().all() and not out[:, :90 + 7].isnan().any()


@pytest.mark.parametrize("impl", ["naive", *with_backward()])
def test_gradients_may_be_asked_for_twice(impl):
    q, k, v, dout = random_inputs([(1, 33, 4, 16), (1, 47, 2, 16), (1, 47, 2, 16), (1, 33, 4, 16)], torch.float32)
    out, grads = K.get(impl).backward(q, k, v, True, 0.25)
    first, second = grads(dout), grads(dout)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert [t.shape for t in first] == [q.shape, k.shape, v.shape]
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    through_api = K.attention(q, k, v, causal=True, scale=0.25, impl=impl)
    again = [torch.autograd.grad(through_api, (q, k, v), dout, retain_graph=True) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*again))
    assert all(torch.equal(a, b) for a, b in zip(first, again[0]))


def test_sdpa_takes_its_gradients_from_the_pinned_backend():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(str(func))
            return func(*args, **(kwargs or {}))

    q, k, v, dout = random_inputs([(1, 40, 4, 16), (1, 40, 2, 16), (1, 40, 2, 16), (1, 40, 4, 16)], torch.float32)
    seen = {}
    for impl in ("sdpa-flash", "sdpa-math"):
        _, grads = K.get(impl).backward(q, k, v, True, 0.25)
        with Ops() as ops:
            grads(dout)
        seen[impl] = {name for name in ops.names if "flash_attention" in name and "backward" in name}
    assert seen["sdpa-flash"] and not seen["sdpa-math"], seen


def register_without_backward(name, rank=0):
    registry.register_kernel(name, prefill=lambda q, k, v, causal, scale: K.attention(q, k, v, causal=causal,
                                                                                        scale=scale, impl="naive"),
                             devices="cpu", dtypes=("float32",), speed_rank=rank)


def test_a_named_implementation_without_a_backward_is_refused_by_name():
    register_without_backward("test-forward-only")
    try:
        q, k, v = (t.requires_grad_() for t in random_inputs([(1, 8, 2, 16)] * 3, torch.float32))
        with pytest.raises(ValueError, match=r"^impl: 'test-forward-only' has no backward .*naive"):
            K.attention(q, k, v, impl="test-forward-only")
        with torch.no_grad():       # no gradients asked for: it runs
            K.attention(q, k, v, impl="test-forward-only")
        assert K.attention(q.detach(), k.detach(), v.detach(), impl="test-forward-only").grad_fn is None
    finally:
        registry.unregister("test-forward-only")


def test_auto_moves_on_to_an_implementation_with_a_backward():
    register_without_backward("test-fastest-forward")
    try:
        q, k, v = random_inputs([(1, 8, 2, 16)] * 3, torch.float32)
        assert K.resolve("auto", "prefill", q, k, v).name == "test-fastest-forward"
        chosen = K.resolve("auto", "backward", q, k, v)
        assert chosen.name != "test-fastest-forward" and chosen.backward is not None
        q.requires_grad_()
        out = K.attention(q, k, v)
        assert out.grad_fn is not None and torch.autograd.grad(out.sum(), q)[0].shape == q.shape
    finally:
        registry.unregister("test-fastest-forward")


def test_an_option_or_device_the_backward_does_not_take_is_refused_by_name():
    q, k, v = (t.requires_grad_() for t in random_inputs([(1, 8, 2, 16)] * 3, torch.float32))
    with pytest.raises(ValueError, match="^window: 'sdpa-flash' does not support window"):
        K.attention(q, k, v, window=(2, 2), impl="sdpa-flash")
    with pytest.raises(ValueError, match="^impl: 'flex' cannot run backward .*no backward on cpu"):
        K.attention(q, k, v, impl="flex")
    with torch.no_grad():
        K.attention(q, k, v, impl="flex")      # its forward runs here


def test_prepared_calls_and_empty_inputs_carry_gradients():
    q, k, v = (t.requires_grad_() for t in random_inputs([(2, 9, 4, 16), (2, 0, 2, 16), (2, 0, 2, 16)],
                                                       torch.float32))
    out = K.prepare_attention(q, k, v, impl="naive")()
    assert torch.equal(out, torch.zeros_like(out))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in torch.autograd.grad(out.sum(), (q, k, v)))
    q, k, v = (t.detach().requires_grad_() for t in random_inputs([(1, 9, 4, 16), (1, 11, 2, 16), (1, 11, 2, 16)],
                                                                  torch.float32))
    call = K.prepare_attention(q, k, v, causal=True, impl="sdpa-math")
    first, second = (torch.autograd.grad(call().square().sum(), (q, k, v)) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_the_registry_declares_backwards():
    naive = K.get("naive")
    assert naive.modes == ("prefill", "decode", "backward", "fwd_bwd") and naive.prefill_lse is not None
    assert naive.supports("fwd_bwd", torch.float16, 64, "cpu")
    impl = registry.register_kernel(
        "test-lazy-backward", prefill=registry.lazy("attnlab.kernels.impls.naive:prefill"),
        backward=registry.lazy("test_gradients:naive_backward_by_name"), devices="cpu", dtypes="float32")
    try:
        assert impl.modes == ("prefill", "backward", "fwd_bwd") and not impl.takes(K.Variant(), True, "backward")
        q, k, v, dout = random_inputs([(1, 20, 2, 16), (1, 30, 2, 16), (1, 30, 2, 16), (1, 20, 2, 16)], torch.float32)
        found = api_gradients("test-lazy-backward", q, k, v, dout, causal=True)
        expected = api_gradients("naive", q, k, v, dout, causal=True)
        assert all(torch.equal(a, b) for a, b in zip(found, expected))
    finally:
        registry.unregister("test-lazy-backward")
    with pytest.raises(ValueError, match="^backward_options:"):
        registry.register_kernel("test-bad", prefill=lambda *a: None, backward=lambda *a: None, options=("window",),
                                 backward_options=("softcap",), devices="cpu", dtypes="float32")
    with pytest.raises(ValueError, match="^backward:"):
        registry.register_kernel("test-bad", prefill=lambda *a: None, backward=3, devices="cpu", dtypes="float32")


def naive_backward_by_name(q, k, v, causal, scale, **options):
    """A backward reached through lazy("module:function"), as a Triton kernel's would be."""
    return K.get("naive").backward(q, k, v, causal, scale, **options)


@pytest.mark.slow     # the example plugin through `attnlab check`'s gradient cases
def test_the_example_plugins_backward_passes_the_check():
    from attnlab.kernels.plugins import load_plugins

    loaded_here = "torch-chunked" not in {i.name for i in K.implementations()}
    if loaded_here:
        assert not load_plugins([str(ROOT / "examples" / "chunked_attention.py")])
    try:
        results = selfcheck.check("cpu", torch.float16, kernels=["torch-chunked"], modes=["backward"])
        assert len(results) == len(selfcheck.GRAD_CASES) and all(r.ok for r in results), [r.why for r in results]
    finally:
        if loaded_here:
            registry.unregister("torch-chunked")


def test_the_check_fails_wrong_gradients_and_says_which():
    right = K.get("naive").backward

    def wrong_dk(q, k, v, causal, scale, **options):
        out, grads = right(q, k, v, causal, scale, **options)
        return out, lambda dout: (lambda dq, dk, dv: (dq, dk * 1.05, dv))(*grads(dout))

    registry.register_kernel("test-wrong-dk", prefill=K.get("naive").prefill, backward=wrong_dk,
                             devices="cpu", dtypes=("float16",))
    try:
        results = selfcheck.check("cpu", torch.float16, kernels=["test-wrong-dk"], modes=["backward"])
    finally:
        registry.unregister("test-wrong-dk")
    assert results and all(not r.ok and r.why.startswith("dk: max error") for r in results), [r.why for r in results]
