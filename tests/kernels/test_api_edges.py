"""Edges of the API on the CPU: "auto" takes the fastest implementation that accepts the call's
inputs, an adapter refuses inputs its backend gets wrong, and NaN propagates (nan_rules.py).
The Triton kernels run in the interpreter, so shapes stay small."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import attnlab.kernels as K
import nan_rules
from attnlab.kernels import triton_decode, triton_prefill
from reference import assert_close_as_naive, decode_mask, random_qkv, reference, visible_keys

SCALES = [0.0, -1.0, 0.5]


def assert_auto_prefill_right(q, k, v, causal, scale):
    sq, sk = q.shape[1], k.shape[1]
    ref = reference(q, k, v, visible_keys(sq, sk, causal)[None], scale=scale)
    naive = K.attention(q, k, v, causal=causal, scale=scale, impl="naive")
    out = K.attention(q, k, v, causal=causal, scale=scale)
    assert_close_as_naive(out, naive, ref, f"auto {sq}x{sk} causal={causal} scale={scale}")


def assert_auto_decode_right(q, k, v, lengths, scale):
    lens = torch.tensor(lengths, dtype=torch.int32)
    ref = reference(q, k, v, decode_mask(lens, q.shape[1], k.shape[1]), scale=scale)
    naive = K.decode_attention(q, k, v, lens, scale=scale, impl="naive")
    out = K.decode_attention(q, k, v, lens, scale=scale)
    assert_close_as_naive(out, naive, ref, f"auto decode lengths {lengths} scale={scale}")


# --- auto moves past an implementation that refuses the inputs ---

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale", SCALES)
def test_auto_prefill_is_right_for_any_scale(scale, causal):
    # Square (torch's own causal mask) and seqlen_q > seqlen_k (rows that see no key).
    for seqlen_q, seqlen_k in [(32, 32), (45, 40)]:
        assert_auto_prefill_right(*random_qkv(2, seqlen_q, seqlen_k, 4, 2, 16, torch.float32), causal, scale)


@pytest.mark.parametrize("scale", SCALES)
def test_auto_decode_is_right_for_any_scale(scale):
    # A length equal to q_len, one under it, an empty cache and a full one.
    q, k, v = random_qkv(4, 3, 48, 4, 2, 16, torch.float32)
    assert_auto_decode_right(q, k, v, [3, 2, 0, 48], scale)


def test_auto_takes_a_strided_head_dim():
    q, k, v = (t[..., ::2] for t in random_qkv(2, 20, 30, 4, 2, 64, torch.float32))
    assert q.stride(-1) == 2
    assert_auto_prefill_right(q, k, v, True, None)
    assert_auto_decode_right(q[:, :2], k, v, [30, 30], None)  # one length: the slices reach torch as they are


def test_sdpa_flash_names_the_strided_argument():
    q, k, v = random_qkv(2, 20, 30, 4, 2, 64, torch.float32)
    with pytest.raises(ValueError, match=r"^q: 'sdpa-flash' needs a contiguous head_dim.*stride 2"):
        K.attention(q[..., ::2], k[..., ::2], v[..., ::2], impl="sdpa-flash")
    lens = torch.tensor([30, 30], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"^k_cache: 'sdpa-flash'.*run on: .*sdpa-math"):
        K.decode_attention(q[:, :1, :, :32], k[..., ::2], v[..., ::2], lens, impl="sdpa-flash")


@pytest.mark.parametrize("scale", [0.0, -1.0])
def test_sdpa_flash_on_the_cpu_refuses_causal_scales_of_zero_or_below(scale):
    q, k, v = random_qkv(1, 32, 32, 2, 1, 16, torch.float32)
    with pytest.raises(ValueError, match=r"^scale: 'sdpa-flash' is wrong on the CPU"):
        K.attention(q, k, v, causal=True, scale=scale, impl="sdpa-flash")
    with pytest.raises(ValueError, match=r"^scale: 'sdpa-flash'"):
        K.decode_attention(q[:, :3], k, v, torch.tensor([32], dtype=torch.int32), scale=scale, impl="sdpa-flash")
    # Without a causal mask the kernel is right, and is taken.
    ref = reference(q, k, v, visible_keys(32, 32, False)[None], scale=scale)
    naive = K.attention(q, k, v, scale=scale, impl="naive")
    assert_close_as_naive(K.attention(q, k, v, scale=scale, impl="sdpa-flash"), naive, ref, "non-causal")


def test_torchs_cpu_flash_kernel_is_still_wrong_where_the_adapter_refuses():
    # The evidence for the rule above: should this start failing, torch has mended its kernel
    # and the rule in kernels/impls/sdpa.py can go.
    q = torch.randn(1, 2, 32, 16)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(q, q, q, is_causal=True, scale=0.0)
    assert torch.isnan(out).any()


# --- NaN propagates, and stays out of rows that cannot see it ---

def scale_of(q):
    return q.shape[-1] ** -0.5


PREFILL_RUNS = {
    "naive": lambda q, k, v: K.attention(q, k, v, causal=True, impl="naive"),
    "triton": lambda q, k, v: K.attention(q, k, v, causal=True, impl="triton"),  # pointers
    "triton-tma": lambda q, k, v: triton_prefill.attention(q, k, v, True, scale_of(q), tma=True),
}
DECODE_RUNS = {
    "naive": lambda q, k, v, lens: K.decode_attention(q, k, v, lens, impl="naive"),
    "triton-decode": lambda q, k, v, lens: K.decode_attention(q, k, v, lens, impl="triton-decode"),
    "triton-decode-3-splits": lambda q, k, v, lens: triton_decode.decode(q, k, v, lens, scale_of(q), num_splits=3),
}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, in the interpreter, on all-NaN rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("run", PREFILL_RUNS)
def test_prefill_nan_rules(run, dtype):
    nan_rules.check_prefill(PREFILL_RUNS[run], dtype=dtype)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("run", [pytest.param(run, marks=pytest.mark.slow) if "splits" in run else run
                                 for run in DECODE_RUNS])        # three splits: the interpreter's slowest
def test_decode_nan_rules(run, dtype):
    nan_rules.check_decode(DECODE_RUNS[run], dtype=dtype)
