"""torch's scaled_dot_product_attention pinned to one backend each.

On an H100 `sdpa-flash` (FlashAttention-2) and `sdpa-cudnn` are the peers a user would
otherwise pick. SDPA's own `is_causal` is top-left aligned, so the bottom-right rule of
this package is built from it: see `_prefill`.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnlab.kernels.registry import (YES, Availability, autograd_backward, contiguous_head_dim, no,
                                      register_kernel)
from attnlab.kernels.masks import FULL, visible
from attnlab.kernels.paged import FP8_DTYPES, contiguous_caches
from attnlab.models import AttentionMemory

HALF = (torch.float16, torch.bfloat16)


def _prefill(backend, q, k, v, causal, scale, window=FULL):
    """q (B, Sq, H, D); k, v (B, Sk, KVH, D) -> (B, Sq, H, D), bottom-right causal, within `window`."""
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    if causal and seqlen_q > seqlen_k:
        # The first seqlen_q - seqlen_k rows see no key; the rest form a square causal problem.
        out = q.new_zeros(q.shape)
        if seqlen_k:
            out[:, seqlen_q - seqlen_k:] = _prefill(backend, q[:, seqlen_q - seqlen_k:], k, v, True, scale, window)
        return out
    mask, is_causal = _mask(seqlen_q, seqlen_k, causal, q.device, window)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    groups = q.shape[2] // k.shape[2]
    if groups > 1 and not _native_gqa(backend, q.device.type):
        kh, vh = kh.repeat_interleave(groups, dim=1), vh.repeat_interleave(groups, dim=1)
    try:
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=is_causal,
                                                 scale=scale, enable_gqa=kh.shape[1] != qh.shape[1])
    except RuntimeError as exc:
        # torch refuses before launching when the pinned backend cannot take these inputs.
        raise ValueError(f"impl: torch's {backend.name} backend refused {_shape_text(q, k, causal)}: "
                         f"{str(exc).splitlines()[0]}") from exc
    if window != FULL:  # a row the window leaves empty is zeros, where SDPA's softmax over nothing is NaN
        out = out.masked_fill(~mask.any(-1)[None, None, :, None], 0.0)
    return out.transpose(1, 2)


def _mask(seqlen_q, seqlen_k, causal, device, window):
    """(attn_mask, is_causal) for SDPA: its own causal flag where it is right (a square problem),
    an explicit mask for bottom-right causal and for windows (the backends that take a mask)."""
    if window != FULL:
        return visible(seqlen_q, seqlen_k, causal, device, window), False
    if causal and seqlen_q == seqlen_k:
        return None, True
    if causal and seqlen_q > 1:
        from torch.nn.attention.bias import causal_lower_right  # imports torch._dynamo: seconds
        return causal_lower_right(seqlen_q, seqlen_k), False
    return None, False


def _decode(backend, q, k_cache, v_cache, cache_seqlens, scale, window=FULL, **cache):
    """SDPA has no ragged cache: attend per group of equal lengths (reading lengths syncs)."""
    return _prepare_decode(backend, q, k_cache, v_cache, cache_seqlens, scale, window, **cache)()


def _prepare_decode(backend, q, k_cache, v_cache, cache_seqlens, scale, window=FULL, block_table=None,
                    k_descale=None, v_descale=None):
    """Read the lengths once (a host sync) and return a call that needs no sync. SDPA has no
    paged or FP8 cache either: the call gathers the pages up to the longest length and
    dequantises them to q's dtype first, and is timed with those copies."""
    lengths = cache_seqlens.tolist()
    caches = lambda: (k_cache, v_cache)
    if block_table is not None or k_cache.dtype != q.dtype:
        longest = max(lengths)
        caches = lambda: contiguous_caches(q, k_cache, v_cache, longest, block_table, k_descale, v_descale)
    if len(set(lengths)) == 1:
        n = lengths[0]

        def same_lengths():
            k, v = caches()
            return _prefill(backend, q, k[:, :n], v[:, :n], True, scale, window)
        return same_lengths
    groups = [(n, torch.tensor([b for b, m in enumerate(lengths) if m == n], device=q.device))
              for n in sorted(set(lengths))]

    def call():
        k, v = caches()
        out = q.new_empty(q.shape)
        for n, rows in groups:
            out[rows] = _prefill(backend, q[rows], k[rows, :n], v[rows, :n], True, scale, window)
        return out
    return call


@functools.lru_cache(maxsize=None)
def _native_gqa(backend, device_type: str) -> bool:
    """Does this backend take fewer kv heads than query heads (enable_gqa) on this device?
    A device type torch cannot reach here takes nothing."""
    dtype = torch.float32 if device_type == "cpu" else torch.float16
    try:
        q = torch.randn(1, 2, 8, 64, device=device_type, dtype=dtype)
        kv = torch.randn(1, 1, 8, 64, device=device_type, dtype=dtype)
        with sdpa_kernel(backend):
            F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
        return True
    except (RuntimeError, AssertionError):   # torch without CUDA asserts
        return False


def _memory(backend):
    """The fused backends stream K and V, copied per query head only where the adapter must
    (see `_prefill`). The math backend keeps fp32 scores, upcasts half inputs to fp32 (unless
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp is set) and, given enable_gqa,
    repeats K and V per query head itself, so its GQA costs the copies either way. Every backend
    reads a paged or 8-bit cache gathered into a contiguous one (kernels/paged.py)."""
    if backend == SDPBackend.MATH:
        return lambda device_type: AttentionMemory(expands_kv=True, fp32_scores=True, fp32_inputs=True,
                                                   gathers_cache=True)
    return lambda device_type: AttentionMemory(expands_kv=not _native_gqa(backend, device_type), gathers_cache=True)


def _probe(backend):
    def probe(device_type: str) -> Availability:
        if device_type == "cuda" and not torch.cuda.is_available():
            return no("no CUDA device")
        dtype = torch.float32 if device_type == "cpu" else torch.bfloat16
        q = torch.randn(1, 2, 128, 64, device=device_type, dtype=dtype)
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, q, q, is_causal=True)
        except RuntimeError as exc:
            return no(f"torch {torch.__version__} has no {backend.name} kernel here: "
                      f"{str(exc).splitlines()[0][:120]}")
        return YES
    return probe


def _cuda_limits(dtypes, max_head_dim):
    """Rules torch applies to its fused CUDA backends; the CPU flash kernel takes anything."""
    def limits(device_type, dtype, head_dim):
        if device_type != "cuda":
            return YES
        if dtype not in dtypes:
            return no(f"on cuda takes {', '.join(str(d).removeprefix('torch.') for d in dtypes)}")
        if head_dim % 8 or head_dim > max_head_dim:
            return no(f"on cuda takes head_dim a multiple of 8 up to {max_head_dim}")
        return YES
    return limits


def _flash_input_rules(q, k, v, causal, scale) -> Availability:
    """The fused backends' layout rule, and a scale torch's CPU flash kernel gets wrong.

    That kernel fills the causal mask's scores with -inf and only then multiplies by the scale:
    0 x -inf is NaN and a negative scale turns -inf into +inf. Measured on torch 2.13 CPU
    against float64: causal attention with scale 0 or below is NaN or wrong wherever torch's
    causal mask hides a key (square and seqlen_q > seqlen_k prefill, decode with q_len > 1);
    non-causal attention and positive scales are right. Causal calls are refused whole, a
    single query row included, so the rule needs neither shapes nor lengths. The GPU backends
    are held to the same check by test_kernels_gpu.py.
    """
    status = contiguous_head_dim(q, k, v)
    if status and causal and scale <= 0 and q.device.type == "cpu":
        return no(f"is wrong on the CPU for causal attention with scale <= 0 (got {scale:g}): torch's CPU "
                  "flash kernel multiplies the causal mask's -inf by the scale", "scale")
    return status


def _shape_text(q, k, causal):
    return (f"q {tuple(q.shape)}, k {tuple(k.shape)}, {str(q.dtype).removeprefix('torch.')}, "
            f"causal={causal}")


def _register(name, backend, description, dtypes, devices, limits, speed_rank, input_rules=contiguous_head_dim,
              baseline=False, options=()):
    register_kernel(
        name, description=description, dtypes=dtypes, devices=devices, probe=_probe(backend),
        prefill=functools.partial(_prefill, backend),
        decode=functools.partial(_decode, backend),
        prepare_decode=functools.partial(_prepare_decode, backend),
        # autograd through the same call; the backend stays pinned while the gradients are taken
        backward=autograd_backward(functools.partial(_prefill, backend), functools.partial(sdpa_kernel, backend)),
        speed_rank=speed_rank, limits=limits, input_rules=input_rules, memory=_memory(backend), baseline=baseline,
        options=options, paged=True, kv_dtypes=FP8_DTYPES,    # gathered and dequantised inside the call
    )


ALL = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_register("sdpa-flash", SDPBackend.FLASH_ATTENTION, "torch SDPA, FlashAttention-2 backend",
          ALL, ("cpu", "cuda"), _cuda_limits(HALF, 256), {"cpu": 10, "cuda": 40}, _flash_input_rules, baseline=True)
_register("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION, "torch SDPA, cuDNN backend",
          HALF, ("cuda",), _cuda_limits(HALF, 256), {"cuda": 20})
_register("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION, "torch SDPA, memory-efficient backend",
          (torch.float16, torch.bfloat16, torch.float32), ("cuda",),
          _cuda_limits((torch.float16, torch.bfloat16, torch.float32), 512), {"cuda": 50}, options=("window",))
_register("sdpa-math", SDPBackend.MATH, "torch SDPA, math backend (unfused)",
          ALL, ("cpu", "cuda"), None, {"cpu": 20, "cuda": 80}, input_rules=None,  # takes any layout
          baseline=True, options=("window",))
