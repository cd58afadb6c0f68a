"""Which keys a query sees: the one rule, written once, for every array type that has
comparison operators (numpy arrays, torch tensors, FlexAttention's index tensors). No torch.

A query at position p (within its sequence, bottom-right aligned: p = i + seqlen_k - seqlen_q)
sees key j iff (left < 0 or j >= p - left) and (right < 0 or j <= p + right) and
(not causal or j <= p), with window = (left, right) and -1 meaning unbounded.
"""
FULL = (-1, -1)


def sees(p, j, causal: bool, window=FULL):
    """The rule, elementwise over broadcast p and j."""
    left, right = window
    seen = (j <= p) | (not causal)
    if left >= 0:
        seen = seen & (j >= p - left)
    if right >= 0:
        seen = seen & (j <= p + right)
    return seen



def band(window_keys: int, causal: bool) -> tuple:
    """(left, right) for a sliding window of `window_keys` keys per query (0: none): the query and
    the keys before it when causal, as many on each side when not."""
    if not window_keys:
        return FULL
    return (window_keys - 1, -1 if causal else window_keys - 1)
