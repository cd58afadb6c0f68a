"""Which keys each query sees, and how its scores are shaped, as torch masks: the rule itself is
attnlab/visibility.py (no torch, so analysis draws the same masks).

Within a sequence of seqlen_q queries over seqlen_k keys, query i sits at position
p = i + seqlen_k - seqlen_q (bottom-right); `window` = (left, right) bounds the keys it sees
(-1: unbounded), and with `softcap` > 0 a score s (already scaled) becomes
softcap * tanh(s / softcap). A query that sees no key gives zeros.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnlab.visibility import FULL, sees

OPTIONS = ("window", "softcap")


@dataclass(frozen=True)
class Variant:
    """The options of one attention call beyond causal and scale; the defaults are plain attention."""

    window: tuple = FULL
    softcap: float = 0.0

    def used(self) -> tuple:
        """The options this call sets, by name."""
        return tuple(name for name, on in (("window", self.window != FULL), ("softcap", self.softcap > 0)) if on)

    def kwargs(self) -> dict:
        """What an implementation's call receives: only the options set, so a kernel that declares
        none keeps its five-argument signature."""
        return {name: getattr(self, name) for name in self.used()}


PLAIN = Variant()


# Fused kernels apply a cap in float32 as tanh(s * (scale / softcap)) * (softcap * log2(e)): both
# factors must be normal float32 numbers, or the scores silently become 0 or inf.
_FP32 = torch.finfo(torch.float32)
MAX_SOFTCAP = _FP32.max / math.log2(math.e)


def checked_variant(window=FULL, softcap=0.0, *, scale=1.0, seqlen_q=0, seqlen_k=0) -> Variant:
    """A Variant from the API's arguments, or an error naming the argument. A window side that
    reaches past all seqlen_q + seqlen_k positions bounds nothing, so it becomes -1 (unbounded):
    the same answer, and no huge number reaches a kernel's index arithmetic."""
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window)):
        raise ValueError(f"window: expected (left, right), each a number of keys >= 0 or -1 for unbounded, "
                         f"got {window!r}")
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0 <= softcap < float("inf"):
        raise ValueError(f"softcap: expected a finite number >= 0 (0: off), got {softcap!r}")
    if softcap > 0 and (softcap > MAX_SOFTCAP or 0 < abs(scale) / softcap < _FP32.tiny):
        raise ValueError(f"softcap: {softcap!r} with scale {scale!r} is beyond float32 (scale / softcap must be "
                         f"at least {_FP32.tiny:.3g} and softcap at most {MAX_SOFTCAP:.3g}); a cap that far above "
                         f"the scores changes none of them: pass softcap=0")
    reach = seqlen_q + seqlen_k
    return Variant(tuple(-1 if w > reach else int(w) for w in window), float(softcap))


def visible(seqlen_q: int, seqlen_k: int, causal: bool, device=None, window=FULL) -> torch.Tensor:
    """Bool (seqlen_q, seqlen_k): which keys each query sees."""
    p = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    return sees(p, torch.arange(seqlen_k, device=device)[None, :], causal, window)


def decode_visible(cache_seqlens: torch.Tensor, q_len: int, max_seqlen: int, window=FULL) -> torch.Tensor:
    """Bool (batch, q_len, max_seqlen): the last q_len positions of each sequence, causal, in its window."""
    lens = cache_seqlens.long()[:, None, None]
    p = torch.arange(q_len, device=cache_seqlens.device)[None, :, None] + lens - q_len
    j = torch.arange(max_seqlen, device=cache_seqlens.device)[None, None, :]
    return (j < lens) & sees(p, j, True, window)


def capped(scores: torch.Tensor, softcap: float) -> torch.Tensor:
    """Scaled scores with Gemma 2's logit cap applied (unchanged when softcap is 0)."""
    return scores if softcap <= 0 else softcap * torch.tanh(scores / softcap)
