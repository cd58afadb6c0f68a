"""attnlab.kernels: attention implementations, their registry and the public API.

Tensors are in the flash-attn layout (batch, seqlen, heads, head_dim). This package knows
nothing of timing, NVML or plots.
"""
from attnlab.kernels import flash, naive, sdpa, triton_attention  # noqa: F401  (each registers itself)
from attnlab.kernels.api import (attention, decode_attention, prepare_attention, prepare_decode,
                                 resolve)
from attnlab.kernels.registry import DECODE, MODES, PREFILL, Availability, Implementation, get, implementations

__all__ = ["attention", "decode_attention", "prepare_attention", "prepare_decode", "resolve",
           "implementations", "get", "Implementation", "Availability", "MODES", "PREFILL", "DECODE"]
