"""The Triton backward (kernels/triton_backward.py) and the forward's log-sum-exp, in Triton's
interpreter: dq, dk, dv against float64 autograd of the definition, held to FlashAttention's
criterion (at most twice the error of naive attention's autograd in the same dtype, plus a
slack); fp16 and fp32 only (the interpreter's bf16 tl.dot is wrong)."""
import pytest
import torch

from reference import visible_keys

pytest.importorskip("triton")

from attnlab.kernels import triton_backward, triton_prefill  # noqa: E402
from attnlab.kernels.impls import naive  # noqa: E402

FULL = (-1, -1)


def inputs(seqlen_q, seqlen_k, heads, kv_heads, head_dim, dtype, seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    make = lambda s, h: torch.randn(batch, s, h, head_dim, generator=g).to(dtype)
    return make(seqlen_q, heads), make(seqlen_k, kv_heads), make(seqlen_k, kv_heads), make(seqlen_q, heads)


def float64_grads(q, k, v, dout, causal, scale, window=FULL, softcap=0.0):
    """Autograd of attention written from the definition, in float64."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(groups, 2)) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~visible_keys(q.shape[1], k.shape[1], causal, window), float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)   # a row that sees no key: 0
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v.repeat_interleave(groups, 2))
    return torch.autograd.grad(out, (q, k, v), dout.double())


def naive_grads(q, k, v, dout, causal, scale, window=FULL, softcap=0.0):
    """Autograd of naive attention in the inputs' dtype: the yardstick of rounding error."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = naive.prefill(q, k, v, causal, scale, window=window, softcap=softcap)
    return torch.autograd.grad(out, (q, k, v), dout)


def assert_grads_close(got, q, k, v, dout, causal, scale, window=FULL, softcap=0.0):
    expected = float64_grads(q, k, v, dout, causal, scale, window, softcap)
    yardstick = naive_grads(q, k, v, dout, causal, scale, window, softcap)
    for name, g, ref, same_dtype, like in zip(("dq", "dk", "dv"), got, expected, yardstick, (q, k, v)):
        assert g.shape == like.shape and g.dtype == like.dtype, name
        assert torch.isfinite(g).all(), f"{name}: not finite"
        err = (g.double() - ref).abs().max().item()
        naive_err = (same_dtype.double() - ref).abs().nan_to_num(0.0).max().item()
        bound = 2 * naive_err + torch.finfo(g.dtype).eps * ref.abs().max().item()
        assert err <= bound, f"{name}: max error {err:.3g} > 2 x naive {naive_err:.3g} + slack"


CASES = [  # seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal, window, softcap, scale, dtype
    pytest.param(37, 70, 4, 2, 24, True, FULL, 0.0, 0.3, torch.float32, id="causal-37x70-gqa2-d24-fp32"),
    pytest.param(70, 37, 2, 2, 16, False, FULL, 0.0, 0.3, torch.float32, id="full-70x37-d16-fp32"),
    pytest.param(70, 37, 4, 1, 16, True, FULL, 0.0, 0.25, torch.float16, id="causal-70x37-mqa-d16-fp16"),
    pytest.param(37, 70, 4, 1, 64, False, FULL, 0.0, 0.125, torch.float16, id="full-37x70-mqa-d64-fp16"),
    pytest.param(40, 33, 2, 2, 24, False, (5, 3), 2.0, -0.2, torch.float32, id="window-softcap-negscale-fp32"),
    pytest.param(45, 45, 4, 2, 16, True, (8, -1), 0.0, 0.25, torch.float16, id="causal-window-gqa2-fp16"),
]


@pytest.mark.parametrize("seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal, window, softcap, scale, dtype",
                         CASES)
def test_gradients_match_float64(seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal, window, softcap, scale,
                                 dtype):
    q, k, v, dout = inputs(seqlen_q, seqlen_k, heads, kv_heads, head_dim, dtype)
    out, grads = triton_backward.backward(q, k, v, causal, scale, window=window, softcap=softcap)
    assert torch.equal(out, triton_prefill.attention(q, k, v, causal, scale, window=window, softcap=softcap))
    assert_grads_close(grads(dout), q, k, v, dout, causal, scale, window, softcap)


def test_grads_called_twice_reuse_the_forward():
    q, k, v, dout = inputs(33, 33, 2, 1, 16, torch.float32, batch=2)   # batches: strides and grid
    _, grads = triton_backward.backward(q, k, v, True, 0.25)
    first = grads(dout)
    second = grads(2 * dout)
    assert_grads_close(second, q, k, v, 2 * dout, True, 0.25)
    for a, b in zip(first, grads(dout)):
        assert torch.equal(a, b)


def test_rows_that_see_no_key_give_zero_gradient():
    # Causal with 70 queries over 37 keys: the first 33 rows see nothing.
    q, k, v, dout = inputs(70, 37, 2, 1, 16, torch.float32)
    out, grads = triton_backward.backward(q, k, v, True, 0.25)
    dq, dk, dv = grads(dout)
    assert not out[:, :33].any() and not dq[:, :33].any()
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))


@pytest.mark.parametrize("causal, window, softcap", [(True, FULL, 0.0), (False, (4, 2), 3.0)])
def test_lse_matches_naive(causal, window, softcap):
    q, k, v, _ = inputs(70, 37, 4, 2, 24, torch.float32, batch=2)
    out, lse = triton_prefill.attention_lse(q, k, v, causal, 0.3, window=window, softcap=softcap)
    naive_out, naive_lse = naive.prefill_lse(q, k, v, causal, 0.3, window=window, softcap=softcap)
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, 70)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(naive_lse))
    seen = torch.isfinite(naive_lse)
    torch.testing.assert_close(lse[seen], naive_lse[seen], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, naive_out, atol=1e-5, rtol=1e-5)


def test_registered_backward_and_lse():
    import attnlab.kernels as K

    impl = K.get("triton")
    assert impl.backward is not None and impl.prefill_lse is not None
    q, k, v, dout = inputs(20, 20, 2, 2, 16, torch.float32)
    out, grads = impl.backward(q, k, v, False, 0.25, softcap=1.5)
    assert_grads_close(grads(dout), q, k, v, dout, False, 0.25, softcap=1.5)


@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False])
def test_several_blocks_each_way(causal):
    # Several key and query blocks, so every band phase (edge, interior, diagonal, tail) runs.
    q, k, v, dout = inputs(150, 131, 4, 2, 64, torch.float16, seed=1, batch=2)
    _, grads = triton_backward.backward(q, k, v, causal, 0.125)
    assert_grads_close(grads(dout), q, k, v, dout, causal, 0.125)


@pytest.mark.slow
def test_hopper_builds_use_wgmma_and_do_not_spill():
    # Compiled for sm_90 without a GPU, in a process of its own (no interpreter): the tiles
    # autotuning may pick for bf16 head dims 64 and 128 multiply on wgmma and spill nothing, and
    # so does the first tile with a window and softcap, and with packed sequences.
    import json
    import os
    import subprocess
    import sys

    script = ("import json; from attnlab.kernels import triton_backward as B; "
              "from attnlab.kernels.inspect import compile_build; "
              "print(json.dumps([compile_build(b, 90) for b in B.builds(90)]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    bf16 = [r for r in rows if r["dtype"] == "bf16" and r["head_dim"] in (64, 128)]
    assert {"backward_delta", "backward_dkdv", "backward_dq"} == {r["kernel"] for r in bf16}
    assert any(r["window"] and r["softcap"] for r in bf16) and any(r["varlen"] for r in bf16)
    for r in bf16:
        assert r["spill_bytes"] == 0, r
        assert r["wgmma"] or r["kernel"] == "backward_delta", r


PACKED = [(13, 13), (0, 5), (40, 31), (1, 20), (29, 0)]   # (seqlen_q, seqlen_k) per sequence, empty ones too


@pytest.mark.parametrize("causal, window, softcap, dtype", [(True, FULL, 0.0, torch.float32),
                                                            (False, (4, 2), 1.5, torch.float16)])
def test_packed_sequences_match_float64(causal, window, softcap, dtype):
    import attnlab.kernels as K

    cu_q, cu_k = (torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
                  for lengths in zip(*PACKED))
    g = torch.Generator().manual_seed(3)
    q, dout = (torch.randn(int(cu_q[-1]), 4, 24, generator=g).to(dtype) for _ in range(2))
    k, v = (torch.randn(int(cu_k[-1]), 2, 24, generator=g).to(dtype) for _ in range(2))
    max_q, max_k = (max(lengths) for lengths in zip(*PACKED))
    out, grads = triton_backward.varlen_backward(q, k, v, cu_q, cu_k, max_q, max_k, causal, 0.3, window=window,
                                                 softcap=softcap)
    found = grads(dout)
    _, naive_grads_of = K.get("naive").varlen_backward(q, k, v, cu_q, cu_k, max_q, max_k, causal, 0.3,
                                                       window=window, softcap=softcap)
    yardstick = naive_grads_of(dout)
    # Each sequence on its own against float64, the packed gradients cut the same way.
    starts = list(zip(cu_q.tolist(), cu_q.tolist()[1:], cu_k.tolist(), cu_k.tolist()[1:]))
    for name, got, plain, whole, by_key in zip(("dq", "dk", "dv"), found, yardstick, (q, k, v), (False, True, True)):
        assert got.shape == whole.shape and got.dtype == whole.dtype and torch.isfinite(got).all(), name
        for q0, q1, k0, k1 in starts:
            exact = float64_grads(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], dout[None, q0:q1], causal, 0.3,
                                  window, softcap)[("dq", "dk", "dv").index(name)][0]
            rows = slice(k0, k1) if by_key else slice(q0, q1)
            err = (got[rows].double() - exact).abs().max().item() if exact.numel() else 0.0
            naive_err = (plain[rows].double() - exact).abs().nan_to_num(0.0).max().item() if exact.numel() else 0.0
            bound = 2 * naive_err + torch.finfo(dtype).eps * (exact.abs().max().item() if exact.numel() else 0.0)
            assert err <= bound, f"{name} rows {rows}: {err:.3g} > 2 x naive {naive_err:.3g} + slack"
