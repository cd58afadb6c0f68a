"""A kernel plugin for the planted-change check: naive attention, run PLANTED_REPEAT times a call
(default once), so two sweeps that differ only in that variable measure a known slowdown."""
import os

import torch

from attnlab.kernels import register_kernel
from attnlab.kernels.impls import naive

REPEAT = int(os.environ.get("PLANTED_REPEAT", "1"))


def prefill(q, k, v, causal, scale):
    for _ in range(REPEAT - 1):
        naive.prefill(q, k, v, causal, scale)
    return naive.prefill(q, k, v, causal, scale)


def decode(q, k_cache, v_cache, cache_seqlens, scale):
    for _ in range(REPEAT - 1):
        naive.decode(q, k_cache, v_cache, cache_seqlens, scale)
    return naive.decode(q, k_cache, v_cache, cache_seqlens, scale)


register_kernel("planted", prefill=prefill, decode=decode, devices=("cpu",), dtypes=(torch.float32,),
                description="naive, repeated PLANTED_REPEAT times a call")
