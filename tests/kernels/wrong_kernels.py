"""Kernels a plugin might register, each wrong in one way `attnlab check` must catch while right
on plain short shapes: the calls of tests/kernels/test_check_catches.py, which registers them
itself (in its process, or from a plugin file in another). Tensors are (batch, seqlen, heads,
head_dim), as the API passes them."""
from attnlab.kernels.impls import naive
from attnlab.kernels.masks import FULL, decode_visible

BUG_FROM = 256      # the first query row short_sighted_prefill gets wrong is the one after this


def short_sighted_prefill(q, k, v, causal, scale):
    """Right, but a query past BUG_FROM sees one key fewer: a causal offset off by one."""
    out = naive.prefill(q, k, v, causal, scale)
    if causal and q.shape[1] > BUG_FROM + 1:
        shifted = naive.prefill(q[:, BUG_FROM:], k[:, :-1], v[:, :-1], causal, scale)
        out[:, BUG_FROM + 1:] = shifted[:, 1:]
    return out


def leaky_decode(q, k_cache, v_cache, cache_seqlens, scale):
    """Masks the scores past each length but multiplies the values there: 0 x NaN reaches the row."""
    return naive._attend(q, k_cache, v_cache, decode_visible(cache_seqlens, q.shape[1], k_cache.shape[1])[:, None],
                         scale)


def windowless_decode(q, k_cache, v_cache, cache_seqlens, scale, window=FULL):
    """Declares the window and ignores it."""
    return naive.decode(q, k_cache, v_cache, cache_seqlens, scale)


def capless_decode(q, k_cache, v_cache, cache_seqlens, scale, softcap=0.0):
    """Declares the softcap and ignores it."""
    return naive.decode(q, k_cache, v_cache, cache_seqlens, scale)


def capless_prefill(q, k, v, causal, scale, softcap=0.0):
    """Declares the softcap and ignores it."""
    return naive.prefill(q, k, v, causal, scale)


def returns_none(*args, **options):
    return None


def float64_prefill(q, k, v, causal, scale):
    """Right values, in float64 whatever the input's dtype."""
    return naive.prefill(q, k, v, causal, scale).double()


def doubles_q_after(q, k, v, causal, scale):
    """The right answer, then q doubled in place: the caller's input changed."""
    out = naive.prefill(q, k, v, causal, scale)
    q.mul_(2)
    return out


def cleans_the_cache(q, k_cache, v_cache, cache_seqlens, scale):
    """The right answer, with the NaN past the lengths zeroed in the caller's cache first."""
    v_cache.nan_to_num_(0.0)
    return naive.decode(q, k_cache, v_cache, cache_seqlens, scale)


# name: (what its register_kernel call declares besides devices and dtypes, what check's table
# says of each case it fails in float16)
PLUGINS = {
    "bad-past-256": (dict(prefill=short_sighted_prefill), "over bound"),
    "bad-leaky": (dict(decode=leaky_decode), "max error inf over bound"),
    "bad-window": (dict(decode=windowless_decode, options=("window",)), "over bound"),
    "bad-none": (dict(prefill=returns_none, decode=returns_none), "returned NoneType, not a tensor"),
    "bad-fp64": (dict(prefill=float64_prefill), "returned dtype torch.float64, expected torch.float16"),
    "bad-changes-q": (dict(prefill=doubles_q_after), "changed its input q"),
}
