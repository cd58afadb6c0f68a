"""The public attention API: validate once, pick an implementation, run it.

Every tensor is in the flash-attn layout (batch, seqlen, heads, head_dim). All checks
happen here, before any kernel launches, so implementations see only valid input.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from attnlab.kernels import registry
from attnlab.kernels.masks import FULL, PLAIN, checked_variant
from attnlab.kernels.registry import DECODE, PREFILL

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_DECODE_Q_LEN = 16


def attention(q, k, v, *, causal=False, scale=None, window=FULL, softcap=0.0, impl="auto"):
    """Attention of q over k, v: softmax(q k^T * scale) v, per head.

    q: (batch, seqlen_q, heads, head_dim); k, v: (batch, seqlen_k, kv_heads, head_dim),
    heads % kv_heads == 0 (MHA, GQA, MQA). `scale` defaults to 1/sqrt(head_dim).
    `causal` is bottom-right aligned: query i sits at p = i + seqlen_k - seqlen_q and sees key
    j iff j <= p. `window` = (left, right) keeps keys in [p - left, p + right] (-1, or a side wider
    than the context: unbounded); `softcap` > 0 caps each scaled score s to softcap * tanh(s /
    softcap) (masks.py), within float32's range (larger is refused, naming it). A query row
    that sees no key returns zeros. Returns (batch, seqlen_q, heads, head_dim) in q's dtype.
    `impl` names a registered implementation or "auto" (the fastest here that takes these
    inputs and options); a named one that lacks an option refuses it, naming it.
    """
    return prepare_attention(q, k, v, causal=causal, scale=scale, window=window, softcap=softcap, impl=impl)()


def decode_attention(q, k_cache, v_cache, cache_seqlens, *, scale=None, window=FULL, softcap=0.0, impl="auto"):
    """Attention of a few new queries over a KV cache.

    q: (batch, q_len, heads, head_dim) with 1 <= q_len <= 16; k_cache, v_cache:
    (batch, max_seqlen, kv_heads, head_dim); cache_seqlens: int32 (batch,) with
    0 <= len <= max_seqlen, any view (strided, expanded) read as given. Sequence b attends to
    keys [0, cache_seqlens[b]); its q_len queries are the last q_len positions (bottom-right
    causal), within `window` and with
    `softcap` as in `attention`. Rows that see no key are 0.
    """
    return prepare_decode(q, k_cache, v_cache, cache_seqlens, scale=scale, window=window, softcap=softcap,
                          impl=impl)()


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False,
                     scale=None, window=FULL, softcap=0.0, impl="auto"):
    """Attention over packed sequences of different lengths (flash-attn's varlen layout).

    q: (total_q, heads, head_dim); k, v: (total_k, kv_heads, head_dim); cu_seqlens_q and
    cu_seqlens_k: int32 (batch + 1,), starting at 0, non-decreasing, ending at total_q and
    total_k, any view read as given: sequence b is q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]] over
    its own keys, attended on its own by the rules of `attention`. Returns (total_q, heads,
    head_dim) in q's dtype.
    """
    return prepare_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                          scale=scale, window=window, softcap=softcap, impl=impl)()


def prepare_attention(q, k, v, *, causal=False, scale=None, window=FULL, softcap=0.0,
                      impl="auto") -> Callable[[], torch.Tensor]:
    """Validate and choose once; return a call that runs the chosen kernel on these tensors.

    Benchmarks time the returned call, so validation and dispatch stay outside the timing.
    """
    _check_qkv(q, k, v, "k", "v", "seqlen_k")
    _check_causal(causal)
    scale = _check_scale(scale, q.shape[-1])
    variant = checked_variant(window, softcap, scale=scale, seqlen_q=q.shape[1], seqlen_k=k.shape[1])
    chosen = resolve(impl, PREFILL, q, k, v, causal=causal, scale=scale, variant=variant)
    if q.shape[1] == 0 or k.shape[1] == 0 or q.shape[0] == 0:
        return lambda: q.new_zeros(q.shape)
    options = variant.kwargs()
    return lambda: chosen.prefill(q, k, v, causal, scale, **options)


def prepare_decode(q, k_cache, v_cache, cache_seqlens, *, scale=None, window=FULL, softcap=0.0,
                   impl="auto") -> Callable[[], torch.Tensor]:
    """Like `prepare_attention`, for `decode_attention`. The call is for these tensors as they
    are: an implementation may read cache_seqlens here, once (the SDPA adapters do, having
    no ragged cache), so lengths changed later need a new prepare."""
    _check_qkv(q, k_cache, v_cache, "k_cache", "v_cache", "max_seqlen")
    q_len = q.shape[1]
    if not 1 <= q_len <= MAX_DECODE_Q_LEN:
        raise ValueError(f"q: decode takes q_len from 1 to {MAX_DECODE_Q_LEN}, got q_len={q_len}")
    _check_cache_seqlens(cache_seqlens, q.shape[0], k_cache.shape[1], q.device)
    scale = _check_scale(scale, q.shape[-1])
    variant = checked_variant(window, softcap, scale=scale, seqlen_q=q_len, seqlen_k=k_cache.shape[1])
    chosen = resolve(impl, DECODE, q, k_cache, v_cache, scale=scale, variant=variant)
    if q.shape[0] == 0 or k_cache.shape[1] == 0:
        return lambda: q.new_zeros(q.shape)
    options, lens = variant.kwargs(), as_given(cache_seqlens)
    if chosen.prepare_decode is not None:
        return chosen.prepare_decode(q, k_cache, v_cache, lens(), scale, **options)
    return lambda: chosen.decode(q, k_cache, v_cache, lens(), scale, **options)


def prepare_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False, scale=None,
                   window=FULL, softcap=0.0, impl="auto") -> Callable[[], torch.Tensor]:
    """Like `prepare_attention`, for `attention_varlen`."""
    _check_packed(q, k, v)
    _check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q, "max_seqlen_q", q.device)
    _check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[0], max_seqlen_k, "max_seqlen_k", q.device)
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(f"cu_seqlens_k: shape {tuple(cu_seqlens_k.shape)} must equal cu_seqlens_q's "
                         f"{tuple(cu_seqlens_q.shape)} (one entry per sequence, plus one)")
    _check_causal(causal)
    scale = _check_scale(scale, q.shape[-1])
    variant = checked_variant(window, softcap, scale=scale, seqlen_q=max_seqlen_q, seqlen_k=max_seqlen_k)
    chosen = resolve(impl, PREFILL, q[None], k[None], v[None], causal=causal, scale=scale, variant=variant,
                     varlen=True)
    if q.shape[0] == 0:
        return lambda: q.new_zeros(q.shape)
    options, cu_q, cu_k = variant.kwargs(), as_given(cu_seqlens_q), as_given(cu_seqlens_k)
    return lambda: chosen.varlen(q, k, v, cu_q(), cu_k(), max_seqlen_q, max_seqlen_k, causal, scale, **options)


def as_given(index: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The index tensor (lengths, offsets) a kernel reads at each call. Kernels read these by
    pointer, element after element, so a strided or expanded view is copied into a contiguous
    one at every call: read as given, and as it is then, since callers update lengths in place."""
    return (lambda: index) if index.is_contiguous() else index.contiguous


def resolve(impl: str, mode: str, q: torch.Tensor, k=None, v=None, *, causal=False,
            scale=None, variant=PLAIN, varlen: bool = False) -> registry.Implementation:
    """The implementation that runs `mode` on these inputs: `impl` by name, or for "auto" the
    fastest whose checks accept them.

    Tensors in the (batch, seqlen, heads, head_dim) layout; in decode k and v are the caches,
    and decode is causal. With q alone (a probe, as planners pass) only q's device, dtype and
    head_dim are checked; with k and v, each implementation's input rules too (layout, scale).
    The variant's options, and `varlen`, must be ones the implementation takes.
    """
    if not isinstance(impl, str):
        raise TypeError(f"impl: expected a name or 'auto', got {type(impl).__name__}")
    inputs = (q, k, v, causal or mode == DECODE, _check_scale(scale, q.shape[-1]))
    wanted = dict(variant=variant, varlen=varlen)
    if impl == "auto":
        return _fastest(mode, inputs, wanted)
    chosen = registry.get(impl)
    status = chosen.serves(mode, *inputs, **wanted)
    if status.argument:
        raise ValueError(f"{_refusal(chosen, status, mode)}; these inputs run on: {_serving(mode, inputs, wanted)}")
    if not status:
        raise ValueError(f"impl: {impl!r} cannot run {mode} for {_describe(q)} on {q.device.type} "
                         f"({status.reason}); available here: {_serving(mode, inputs, wanted)}")
    return chosen


def _fastest(mode: str, inputs: tuple, wanted: dict) -> registry.Implementation:
    """The first implementation, in speed order, that serves these inputs; ablations run only
    when named."""
    q, device_type = inputs[0], inputs[0].device.type
    ranked = sorted((i for i in registry.implementations() if not i.ablation_of),
                    key=lambda i: i.speed_rank.get(device_type, 100))
    refused = []
    for candidate in ranked:
        status = candidate.serves(mode, *inputs, **wanted)
        if status:
            return candidate
        if status.argument:
            refused.append(_refusal(candidate, status, mode))
    because = f" ({'; '.join(refused)})" if refused else ""
    raise ValueError(f"impl: no implementation runs {mode} for {_describe(q)} on {device_type}{because}")


def _serving(mode: str, inputs: tuple, wanted: dict) -> str:
    return ", ".join(i.name for i in registry.implementations() if i.serves(mode, *inputs, **wanted)) or "none"


def _refusal(impl: registry.Implementation, status: registry.Availability, mode: str) -> str:
    """A refused input as the API's errors say it: the argument first, named as the API names
    it (in decode, k and v are the caches)."""
    role = status.argument
    argument = f"{role}_cache" if mode == DECODE and role in ("k", "v") else role
    return f"{argument}: {impl.name!r} {status.reason}"


def _check_qkv(q, k, v, k_name: str, v_name: str, k_len_name: str) -> None:
    for name, t in (("q", q), (k_name, k), (v_name, v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor (batch, seqlen, heads, head_dim), "
                             f"got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name}: dtype must be one of float16, bfloat16, float32, float64, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"{v_name}: shape {tuple(v.shape)} must equal {k_name}'s {tuple(k.shape)}")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"{k_name}: batch {k.shape[0]} does not match q's batch {q.shape[0]}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"{k_name}: head_dim {k.shape[3]} does not match q's head_dim {q.shape[3]}")
    if q.shape[3] == 0:
        raise ValueError("q: head_dim must be at least 1, got 0")
    heads, kv_heads = q.shape[2], k.shape[2]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"{k_name}: heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    for name, t in ((k_name, k), (v_name, v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} does not match q's dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: device {t.device} does not match q's device {q.device}")


def _check_causal(causal) -> None:
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")


def _check_packed(q, k, v) -> None:
    """The varlen layout: (total, heads, head_dim), checked as the batched layout is with a batch of one."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name}: expected a 3-D tensor (total, heads, head_dim) of packed sequences, "
                             f"got shape {tuple(t.shape)}")
    _check_qkv(q[None], k[None], v[None], "k", "v", "total_k")


def _check_cu_seqlens(cu, name: str, total: int, max_seqlen, max_name: str, device) -> None:
    if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name}: expected an int32 tensor of shape (batch + 1,), got "
                         f"{getattr(cu, 'dtype', type(cu).__name__)} {tuple(getattr(cu, 'shape', ()))}")
    if cu.device != device:
        raise ValueError(f"{name}: device {cu.device} does not match q's device {device}")
    bounds = cu.tolist()
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    if bounds[0] != 0 or bounds[-1] != total or min(lengths) < 0:
        raise ValueError(f"{name}: expected offsets from 0, non-decreasing, ending at {total} (the packed "
                         f"length), got {bounds[:8]}{' ...' if len(bounds) > 8 else ''}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < max(lengths):
        raise ValueError(f"{max_name}: expected an int at least the longest sequence ({max(lengths)}), "
                         f"got {max_seqlen!r}")


def _check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite number, got {scale}")
    return float(scale)


def _check_cache_seqlens(cache_seqlens, batch: int, max_seqlen: int, device: torch.device) -> None:
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens: expected an int32 torch.Tensor, got {type(cache_seqlens).__name__}")
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens: dtype must be torch.int32, got {cache_seqlens.dtype}")
    if tuple(cache_seqlens.shape) != (batch,):
        raise ValueError(f"cache_seqlens: expected shape ({batch},) (one length per sequence), "
                         f"got {tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != device:
        raise ValueError(f"cache_seqlens: device {cache_seqlens.device} does not match q's device {device}")
    # Reading the lengths syncs with the device; a CUDA graph being captured cannot, and its
    # lengths were checked by the eager call that preceded the capture.
    if batch and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
        if lo < 0 or hi > max_seqlen:
            raise ValueError(f"cache_seqlens: lengths must lie in [0, {max_seqlen}] (max_seqlen), "
                             f"got min {lo}, max {hi}")


def _describe(q: torch.Tensor) -> str:
    return f"dtype {str(q.dtype).removeprefix('torch.')}, head_dim {q.shape[-1]}"
