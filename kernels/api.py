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
from attnlab.kernels.paged import FP8_DTYPES
from attnlab.kernels.registry import BACKWARD, DECODE, FWD_BWD, PREFILL

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FP8_Q_DTYPES = (torch.float16, torch.bfloat16, torch.float32)     # q's dtypes over an FP8 cache
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
    Differentiable: where grad mode is on and q, k or v requires grad, the output's gradients
    come from the implementation's declared backward (dk, dv summed over each kv head's group; a
    row that sees no key adds none); a named one without a backward is refused, "auto" picks one
    that has one. So for `attention_varlen` and the `prepare_*` calls.
    """
    return prepare_attention(q, k, v, causal=causal, scale=scale, window=window, softcap=softcap, impl=impl)()


def decode_attention(q, k_cache, v_cache, cache_seqlens, *, block_table=None, k_descale=None, v_descale=None,
                     scale=None, window=FULL, softcap=0.0, impl="auto"):
    """Attention of a few new queries over a KV cache.

    q: (batch, q_len, heads, head_dim) with 1 <= q_len <= 16; k_cache, v_cache:
    (batch, max_seqlen, kv_heads, head_dim); cache_seqlens: int32 (batch,) with
    0 <= len <= max_seqlen, any view (strided, expanded) read as given. Sequence b attends to
    keys [0, cache_seqlens[b]); its q_len queries are the last q_len positions (bottom-right
    causal), within `window` and with
    `softcap` as in `attention`. Rows that see no key are 0.

    Paged (flash-attn's layout): with `block_table`, int32 (batch, max_blocks_per_seq), the
    caches are (num_blocks, page_size, kv_heads, head_dim) and sequence b's slot s lives at
    k_cache[block_table[b, s // page_size], s % page_size]; max_seqlen is max_blocks_per_seq *
    page_size. Only the entries a sequence's length uses are read, and checked to lie in
    [0, num_blocks); the rest may hold anything. FP8: caches in torch.float8_e4m3fn or
    torch.float8_e5m2 (both alike) with q in float16, bfloat16 or float32; `k_descale`,
    `v_descale`: float32 (batch, kv_heads) or None (1), a stored value times its descale being
    the value attended. The table and descales are read as given, like the lengths.
    """
    return prepare_decode(q, k_cache, v_cache, cache_seqlens, block_table=block_table, k_descale=k_descale,
                          v_descale=v_descale, scale=scale, window=window, softcap=softcap, impl=impl)()


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
    chosen = resolve(impl, _mode(q, k, v), q, k, v, causal=causal, scale=scale, variant=variant)
    empty = q.shape[1] == 0 or k.shape[1] == 0 or q.shape[0] == 0
    options = variant.kwargs()
    if _wants_grads(q, k, v):
        return _differentiable(q, k, v, None if empty else lambda *qkv: chosen.backward(*qkv, causal, scale, **options))
    if empty:
        return lambda: q.new_zeros(q.shape)
    return lambda: chosen.prefill(q, k, v, causal, scale, **options)


def prepare_decode(q, k_cache, v_cache, cache_seqlens, *, block_table=None, k_descale=None, v_descale=None,
                   scale=None, window=FULL, softcap=0.0, impl="auto") -> Callable[[], torch.Tensor]:
    """Like `prepare_attention`, for `decode_attention`. The call is for these tensors as they
    are: an implementation may read cache_seqlens here, once (the SDPA adapters do, having
    no ragged cache), so lengths changed later need a new prepare."""
    paged = block_table is not None
    _check_caches(q, k_cache, v_cache, paged)
    q_len = q.shape[1]
    if not 1 <= q_len <= MAX_DECODE_Q_LEN:
        raise ValueError(f"q: decode takes q_len from 1 to {MAX_DECODE_Q_LEN}, got q_len={q_len}")
    max_seqlen = _check_block_table(block_table, q.shape[0], k_cache.shape[1], q.device) if paged else k_cache.shape[1]
    _check_cache_seqlens(cache_seqlens, q.shape[0], max_seqlen, q.device, "block_table" if paged else "max_seqlen")
    if paged:
        _check_used_blocks(block_table, cache_seqlens, k_cache.shape[:2])
    _check_descales(k_descale, v_descale, k_cache, q)
    scale = _check_scale(scale, q.shape[-1])
    variant = checked_variant(window, softcap, scale=scale, seqlen_q=q_len, seqlen_k=max_seqlen)
    chosen = resolve(impl, DECODE, q, k_cache, v_cache, scale=scale, variant=variant,
                     page_size=k_cache.shape[1] if paged else 0)
    if q.shape[0] == 0 or max_seqlen == 0:
        return lambda: q.new_zeros(q.shape)
    options, lens = variant.kwargs(), as_given(cache_seqlens)
    if chosen.decode_workspace:
        options["workspace"] = {}      # this prepared call's scratch buffers, kept from its first call on
    cache_views = {name: as_given(t) for name, t in (("block_table", block_table), ("k_descale", k_descale),
                                                      ("v_descale", v_descale)) if t is not None}
    if chosen.prepare_decode is not None:
        return chosen.prepare_decode(q, k_cache, v_cache, lens(), scale, **options,
                                     **{name: view() for name, view in cache_views.items()})
    if not cache_views:
        return lambda: chosen.decode(q, k_cache, v_cache, lens(), scale, **options)
    return lambda: chosen.decode(q, k_cache, v_cache, lens(), scale, **options,
                                 **{name: view() for name, view in cache_views.items()})


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
    chosen = resolve(impl, _mode(q, k, v), q[None], k[None], v[None], causal=causal, scale=scale, variant=variant,
                     varlen=True)
    options, cu_q, cu_k = variant.kwargs(), as_given(cu_seqlens_q), as_given(cu_seqlens_k)
    if _wants_grads(q, k, v):
        return _differentiable(q, k, v, None if q.shape[0] == 0 else lambda *qkv: chosen.varlen_backward(
            *qkv, cu_q(), cu_k(), max_seqlen_q, max_seqlen_k, causal, scale, **options))
    if q.shape[0] == 0:
        return lambda: q.new_zeros(q.shape)
    return lambda: chosen.varlen(q, k, v, cu_q(), cu_k(), max_seqlen_q, max_seqlen_k, causal, scale, **options)


def as_given(index: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The index tensor (lengths, offsets) a kernel reads at each call. Kernels read these by
    pointer, element after element, so a strided or expanded view is copied into a contiguous
    one at every call: read as given, and as it is then, since callers update lengths in place."""
    return (lambda: index) if index.is_contiguous() else index.contiguous


def resolve(impl: str, mode: str, q: torch.Tensor, k=None, v=None, *, causal=False,
            scale=None, variant=PLAIN, varlen: bool = False, page_size: int = 0,
            kv_dtype=None) -> registry.Implementation:
    """The implementation that runs `mode` on these inputs: `impl` by name, or for "auto" the
    fastest whose checks accept them.

    Tensors in the (batch, seqlen, heads, head_dim) layout; in decode k and v are the caches,
    and decode is causal. With q alone (a probe, as planners pass) only q's device, dtype and
    head_dim are checked; with k and v, each implementation's input rules too (layout, scale).
    The variant's options, and `varlen`, must be ones the implementation takes; in decode, so
    must a cache in pages of `page_size` tokens (0: contiguous) stored in `kv_dtype` (default
    k's dtype, or q's).
    """
    if not isinstance(impl, str):
        raise TypeError(f"impl: expected a name or 'auto', got {type(impl).__name__}")
    inputs = (q, k, v, causal or mode == DECODE, _check_scale(scale, q.shape[-1]))
    wanted = dict(variant=variant, varlen=varlen, page_size=page_size, kv_dtype=kv_dtype)
    if impl == "auto":
        return _fastest(mode, inputs, wanted)
    chosen = registry.get(impl)
    if mode in (BACKWARD, FWD_BWD) and chosen.backward is None:
        raise ValueError(f"impl: {impl!r} has no backward (it serves {', '.join(chosen.modes)}), and gradients were "
                         f"asked for (q, k or v requires grad); these inputs run with gradients on: "
                         f"{_serving(mode, inputs, wanted)}")
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


def _wants_grads(*tensors) -> bool:
    """Gradients are asked for: grad mode is on and some input requires grad."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _mode(q, k, v) -> str:
    """The mode a prefill-shaped call resolves in: the backward's where gradients are asked for."""
    return BACKWARD if _wants_grads(q, k, v) else PREFILL


def _differentiable(q, k, v, backward) -> Callable[[], torch.Tensor]:
    """A call whose output carries a grad_fn taking its gradients from the implementation:
    `backward(q, k, v) -> (out, grads)`; None where no row sees a key (out and gradients zeros)."""
    return lambda: _Gradients.apply(backward or _no_keys, q, k, v)


def _no_keys(q, k, v) -> tuple:
    return q.new_zeros(q.shape), lambda dout: (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v))


class _Gradients(torch.autograd.Function):
    """Attention whose backward is the implementation's own `grads(dout) -> (dq, dk, dv)`."""

    @staticmethod
    def forward(ctx, backward, q, k, v):
        out, ctx.grads = backward(q, k, v)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        return (None, *ctx.grads(dout.contiguous()))


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


def _check_cache_seqlens(cache_seqlens, batch: int, max_seqlen: int, device: torch.device,
                         bound: str = "max_seqlen") -> None:
    """`bound` names what sets max_seqlen: the cache's dim 1, or a paged cache's block_table."""
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
        if bound == "block_table" and lo >= 0 and hi > max_seqlen:
            raise ValueError(f"block_table: its max_blocks_per_seq x page_size = {max_seqlen} slots are too few for "
                             f"cache_seqlens' longest length {hi}")
        if lo < 0 or hi > max_seqlen:
            raise ValueError(f"cache_seqlens: lengths must lie in [0, {max_seqlen}] (max_seqlen), "
                             f"got min {lo}, max {hi}")


def _check_caches(q, k_cache, v_cache, paged: bool) -> None:
    """decode's q and caches by _check_qkv's rules, but for two: a cache may be stored in FP8
    (both alike, q then in float16, bfloat16 or float32), and with a block_table it is paged,
    its first dimension counting pages, not sequences."""
    if not paged and not any(getattr(t, "dtype", None) in FP8_DTYPES for t in (k_cache, v_cache)):
        return _check_qkv(q, k_cache, v_cache, "k_cache", "v_cache", "max_seqlen")
    layout = ("(num_blocks, page_size, kv_heads, head_dim) paged by block_table" if paged
              else "(batch, max_seqlen, kv_heads, head_dim)")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            expected = "(batch, q_len, heads, head_dim)" if name == "q" else layout
            raise ValueError(f"{name}: expected a 4-D tensor {expected}, got shape {tuple(t.shape)}")
    if q.dtype not in DTYPES:
        raise TypeError(f"q: dtype must be one of float16, bfloat16, float32, float64, got {q.dtype}")
    fp8 = k_cache.dtype in FP8_DTYPES
    if fp8 and q.dtype not in FP8_Q_DTYPES:
        raise TypeError(f"q: with an FP8 cache ({k_cache.dtype}) q must be float16, bfloat16 or float32, "
                        f"got {q.dtype}")
    if k_cache.dtype != q.dtype and not fp8:
        raise TypeError(f"k_cache: dtype {k_cache.dtype} must be q's ({q.dtype}), torch.float8_e4m3fn or "
                        f"torch.float8_e5m2")
    if v_cache.dtype != k_cache.dtype:
        raise TypeError(f"v_cache: dtype {v_cache.dtype} must equal k_cache's {k_cache.dtype}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache: shape {tuple(v_cache.shape)} must equal k_cache's {tuple(k_cache.shape)}")
    if not paged and k_cache.shape[0] != q.shape[0]:
        raise ValueError(f"k_cache: batch {k_cache.shape[0]} does not match q's batch {q.shape[0]}")
    if paged and k_cache.shape[1] == 0:
        raise ValueError(f"k_cache: page_size (dim 1) must be at least 1, got shape {tuple(k_cache.shape)}")
    # The head and device rules are _check_qkv's, on a cache-shaped stand-in that holds nothing.
    stand_in = q.new_empty(()).expand(q.shape[0], 1, *k_cache.shape[2:])
    _check_qkv(q, stand_in, stand_in, "k_cache", "v_cache", "max_seqlen")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.device != q.device:
            raise ValueError(f"{name}: device {t.device} does not match q's device {q.device}")


def _check_block_table(block_table, batch: int, page_size: int, device: torch.device) -> int:
    """A paged cache's table; returns max_seqlen, max_blocks_per_seq x page_size."""
    if not isinstance(block_table, torch.Tensor):
        raise TypeError(f"block_table: expected an int32 torch.Tensor, got {type(block_table).__name__}")
    if block_table.dtype != torch.int32:
        raise TypeError(f"block_table: dtype must be torch.int32, got {block_table.dtype}")
    if block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(f"block_table: expected shape ({batch}, max_blocks_per_seq) (a row of page numbers per "
                         f"sequence), got {tuple(block_table.shape)}")
    if block_table.device != device:
        raise ValueError(f"block_table: device {block_table.device} does not match q's device {device}")
    return block_table.shape[1] * page_size


def _check_used_blocks(block_table, cache_seqlens, cache_shape) -> None:
    """Every table entry a sequence's length uses names a page of the cache. Entries past a
    length are never read (flash-attn's rule), so they are not checked and may hold anything."""
    num_blocks, page_size = cache_shape
    device = block_table.device
    if not block_table.numel() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return      # as for the lengths: a graph being captured cannot sync, its eager call was checked
    used_blocks = (cache_seqlens.long() + page_size - 1) // page_size
    used = torch.arange(block_table.shape[1], device=device)[None, :] < used_blocks[:, None]
    wrong = used & ((block_table < 0) | (block_table >= num_blocks))
    if bool(wrong.any()):
        b, i = (int(x) for x in wrong.nonzero()[0])
        raise ValueError(f"block_table: entries a sequence's length uses must lie in [0, {num_blocks}) (k_cache's "
                         f"num_blocks), got block_table[{b}, {i}] = {int(block_table[b, i])}")


def _check_descales(k_descale, v_descale, k_cache, q) -> None:
    """Descales, float32 (batch, kv_heads), go with an FP8 cache only."""
    for name, t in (("k_descale", k_descale), ("v_descale", v_descale)):
        if t is None:
            continue
        if k_cache.dtype not in FP8_DTYPES:
            raise ValueError(f"{name}: descales go with an FP8 cache (float8_e4m3fn, float8_e5m2), got a cache in "
                             f"{k_cache.dtype}; pass None")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a float32 torch.Tensor or None, got {type(t).__name__}")
        if t.dtype != torch.float32:
            raise TypeError(f"{name}: dtype must be torch.float32, got {t.dtype}")
        expected = (q.shape[0], k_cache.shape[2])
        if tuple(t.shape) != expected:
            raise ValueError(f"{name}: expected shape {expected} (batch, kv_heads), got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name}: device {t.device} does not match q's device {q.device}")


def _describe(q: torch.Tensor) -> str:
    return f"dtype {str(q.dtype).removeprefix('torch.')}, head_dim {q.shape[-1]}"
