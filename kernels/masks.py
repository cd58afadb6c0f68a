"""Which keys each query sees: the one definition every implementation follows."""
from __future__ import annotations

import torch


def visible(seqlen_q: int, seqlen_k: int, causal: bool, device=None) -> torch.Tensor:
    """Bool (seqlen_q, seqlen_k): query i sees key j iff j <= i + seqlen_k - seqlen_q (bottom-right)."""
    if not causal:
        return torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    return j <= i + (seqlen_k - seqlen_q)


def decode_visible(cache_seqlens: torch.Tensor, q_len: int, max_seqlen: int) -> torch.Tensor:
    """Bool (batch, q_len, max_seqlen): the last q_len positions of each sequence, causal."""
    lens = cache_seqlens.long()[:, None, None]
    i = torch.arange(q_len, device=cache_seqlens.device)[None, :, None]
    j = torch.arange(max_seqlen, device=cache_seqlens.device)[None, None, :]
    return (j < lens) & (j <= i + lens - q_len)
