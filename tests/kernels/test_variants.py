"""Windows, softcapping and packed sequences: the API's rules (kernels/masks.py) against a
float64 reference written pair by pair, for every registered implementation, plugins
included. An implementation answers right or refuses by naming the option; none drops one."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab.kernels as K
from attnlab.kernels.masks import visible
from reference import (assert_close_as_naive, contract_impls, decode_mask, max_error, random_qkv, reference,
                       reference_varlen, visible_keys)

WINDOWS = [(16, -1), (-1, 8), (5, 7), (0, 0), (500, 500), (3, -1)]


def takes(impl, *options, varlen=False):
    return bool(K.get(impl).takes(K.Variant(**{o: v for o, v in options}), varlen=varlen))


def run_or_refused(impl, option, call):
    """The call's output, or None where `impl` does not declare an option and refused it by name."""
    if takes(impl, *option):
        return call()
    name = next(o for o, _ in option if o not in K.get(impl).options)
    with pytest.raises(ValueError, match=rf"^{name}: {impl!r} does not "):
        call()
    return None


# --- the rule itself, and naive as the yardstick ---

@pytest.mark.parametrize("seqlen_q,seqlen_k", [(7, 7), (5, 11), (11, 5), (1, 9)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", WINDOWS + [(-1, -1)])
def test_the_mask_is_the_rule_written_pair_by_pair(seqlen_q, seqlen_k, causal, window):
    assert torch.equal(visible(seqlen_q, seqlen_k, causal, window=window), visible_keys(seqlen_q, seqlen_k, causal,
                                                                                        window))


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("softcap", [0.0, 2.0])
@pytest.mark.parametrize("causal", [False, True])
def test_naive_prefill_matches_float64(window, softcap, causal):
    q, k, v = random_qkv(2, 37, 53, 4, 2, 16, torch.float64)
    q = q * 3   # scores wide enough that the cap bites
    ref = reference(q, k, v, visible_keys(37, 53, causal, window)[None], softcap=softcap)
    out = K.attention(q, k, v, causal=causal, window=window, softcap=softcap, impl="naive")
    assert max_error(out, ref) < 1e-12


def test_softcap_changes_the_answer_and_a_window_can_empty_a_row():
    q, k, v = random_qkv(1, 12, 4, 2, 2, 16, torch.float32)
    plain = K.attention(q * 4, k, v, impl="naive")
    assert (plain - K.attention(q * 4, k, v, softcap=1.0, impl="naive")).abs().max() > 1e-2
    out = K.attention(q, k, v, causal=True, window=(2, -1), impl="naive")
    assert torch.equal(out[:, :8], torch.zeros_like(out[:, :8]))  # rows p < 0 see no key
    assert out[:, 8:].abs().sum() > 0


# --- every registered implementation: right, or refuses by name ---

@pytest.mark.parametrize("impl", contract_impls("prefill"))
@pytest.mark.parametrize("window,softcap", [((6, -1), 0.0), ((-1, 3), 0.0), ((4, 4), 0.0), ((-1, -1), 5.0),
                                            ((9, -1), 3.0)])
@pytest.mark.parametrize("causal", [False, True])
def test_prefill_variants(impl, window, softcap, causal):
    q, k, v = random_qkv(2, 41, 67, 4, 2, 32, torch.float32)
    q = q * 3
    options = [(n, x) for n, x, on in (("window", window, window != (-1, -1)), ("softcap", softcap, softcap > 0)) if on]
    call = lambda name: K.attention(q, k, v, causal=causal, window=window, softcap=softcap, impl=name)
    out = run_or_refused(impl, options, lambda: call(impl))
    if out is not None:
        ref = reference(q, k, v, visible_keys(41, 67, causal, window)[None], softcap=softcap)
        assert_close_as_naive(out, call("naive"), ref, f"{impl} window {window} softcap {softcap} causal {causal}")


@pytest.mark.parametrize("impl", contract_impls("decode"))
@pytest.mark.parametrize("window,softcap", [((10, -1), 0.0), ((0, -1), 0.0), ((-1, -1), 4.0), ((25, -1), 2.0)])
@pytest.mark.parametrize("q_len", [1, 3])
def test_decode_variants_over_ragged_caches(impl, window, softcap, q_len):
    q, k, v = random_qkv(4, q_len, 90, 4, 1, 32, torch.float32)
    q = q * 3
    lens = torch.tensor([0, 2, 57, 90], dtype=torch.int32)
    options = [(n, x) for n, x, on in (("window", window, window != (-1, -1)), ("softcap", softcap, softcap > 0)) if on]
    call = lambda name: K.decode_attention(q, k, v, lens, window=window, softcap=softcap, impl=name)
    out = run_or_refused(impl, options, lambda: call(impl))
    if out is not None:
        ref = reference(q, k, v, decode_mask(lens, q_len, 90, window), softcap=softcap)
        assert_close_as_naive(out, call("naive"), ref, f"{impl} decode window {window} softcap {softcap}")


def packed(lengths_q, lengths_k, heads=4, kv_heads=2, head_dim=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    cu = lambda lengths: torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(lengths_q), heads, head_dim, generator=g).to(dtype)
    k, v = (torch.randn(sum(lengths_k), kv_heads, head_dim, generator=g).to(dtype) for _ in range(2))
    return q, k, v, cu(lengths_q), cu(lengths_k), max(lengths_q), max(lengths_k)


@pytest.mark.parametrize("impl", contract_impls("prefill"))
@pytest.mark.parametrize("causal,window,softcap", [(True, (-1, -1), 0.0), (False, (-1, -1), 0.0),
                                                   (True, (7, -1), 0.0), (True, (-1, -1), 4.0)])
def test_varlen_packs_sequences_that_never_see_each_other(impl, causal, window, softcap):
    q, k, v, cu_q, cu_k, max_q, max_k = packed([13, 0, 40, 5], [13, 3, 61, 2])
    options = [(n, x) for n, x, on in (("window", window, window != (-1, -1)), ("softcap", softcap, softcap > 0)) if on]
    call = lambda name: K.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, window=window,
                                           softcap=softcap, impl=name)
    if not takes(impl, *options, varlen=True):
        what = "cu_seqlens_q" if K.get(impl).varlen is None else options[0][0]
        with pytest.raises(ValueError, match=rf"^{what}: {impl!r} does not "):
            call(impl)
        return
    ref = reference_varlen(q, k, v, cu_q, cu_k, causal, window=window, softcap=softcap)
    assert_close_as_naive(call(impl), call("naive"), ref, f"{impl} varlen causal {causal} window {window}")


def test_auto_takes_the_fastest_implementation_that_declares_the_option():
    q, k, v = random_qkv(1, 16, 16, 2, 2, 32, torch.float32)
    plain = K.resolve("auto", "prefill", q, k, v)
    windowed = K.resolve("auto", "prefill", q, k, v, variant=K.Variant(window=(4, -1)))
    capped = K.resolve("auto", "prefill", q, k, v, variant=K.Variant(softcap=5.0))
    assert "window" not in plain.options or plain is windowed
    assert "window" in windowed.options and "softcap" in capped.options


# --- the API names what is wrong ---

@pytest.mark.parametrize("call,argument", [
    (lambda q, k, v: K.attention(q, k, v, window=(3,)), "window"),
    (lambda q, k, v: K.attention(q, k, v, window=(-2, 4)), "window"),
    (lambda q, k, v: K.attention(q, k, v, window=(1.5, 4)), "window"),
    (lambda q, k, v: K.attention(q, k, v, softcap=-1.0), "softcap"),
    (lambda q, k, v: K.attention(q, k, v, softcap=float("inf")), "softcap"),
])
def test_bad_options_are_named(call, argument):
    q, k, v = random_qkv(1, 4, 4, 2, 2, 16, torch.float32)
    with pytest.raises(ValueError, match=rf"^{argument}: "):
        call(q, k, v)


@pytest.mark.parametrize("change,argument", [
    (dict(cu_q=torch.tensor([0, 5, 3, 58], dtype=torch.int32)), "cu_seqlens_q"),
    (dict(cu_q=torch.tensor([0, 13, 58], dtype=torch.int64)), "cu_seqlens_q"),
    (dict(cu_k=torch.tensor([0, 13, 50], dtype=torch.int32)), "cu_seqlens_k"),
    (dict(max_q=10), "max_seqlen_q"),
    (dict(q=torch.zeros(58, 4, 32, 1)), "q"),
])
def test_bad_varlen_inputs_are_named(change, argument):
    q, k, v, cu_q, cu_k, max_q, max_k = packed([13, 45], [13, 66])
    given = dict(q=q, k=k, v=v, cu_q=cu_q, cu_k=cu_k, max_q=max_q, max_k=max_k, **{})
    given.update(change)
    with pytest.raises(ValueError, match=rf"^{argument}: "):
        K.attention_varlen(given["q"], given["k"], given["v"], given["cu_q"], given["cu_k"], given["max_q"],
                           given["max_k"], impl="naive")


@settings(max_examples=25, deadline=None)
@given(seqlen_q=st.integers(1, 40), seqlen_k=st.integers(1, 40), left=st.integers(-1, 45),
       right=st.integers(-1, 45), causal=st.booleans(), softcap=st.sampled_from([0.0, 1.5, 30.0]))
def test_naive_follows_the_rule_for_any_window(seqlen_q, seqlen_k, left, right, causal, softcap):
    q, k, v = random_qkv(1, seqlen_q, seqlen_k, 2, 1, 16, torch.float64)
    ref = reference(q, k, v, visible_keys(seqlen_q, seqlen_k, causal, (left, right))[None], softcap=softcap)
    out = K.attention(q, k, v, causal=causal, window=(left, right), softcap=softcap, impl="naive")
    assert max_error(out, ref) < 1e-12
