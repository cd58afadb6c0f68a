"""attnlab.kernels: attention implementations, their registry and the public API.

Tensors are in the flash-attn layout (batch, seqlen, heads, head_dim). This package knows
nothing of timing, NVML or plots. A kernel is one file that calls `register_kernel`: the
in-tree ones in impls/ are imported here; plugins are loaded by `load_plugins` (the CLI and
the benchmark grid call it).
"""
from attnlab.kernels.api import (attention, attention_varlen, decode_attention, prepare_attention, prepare_decode,
                                 prepare_varlen, resolve)
from attnlab.kernels.masks import OPTIONS, Variant
from attnlab.kernels.plugins import ENTRY_POINT_GROUP, ENV_VAR, PluginFailure, load_builtin, load_plugins
from attnlab.kernels.registry import (DECODE, MODES, PREFILL, YES, Availability, Implementation, contiguous_head_dim,
                                      get, implementations, lazy, no, register_kernel, triton_interpreting,
                                      triton_probe)

load_builtin()

__all__ = ["attention", "decode_attention", "attention_varlen", "prepare_attention", "prepare_decode",
           "prepare_varlen", "resolve", "OPTIONS", "Variant",
           "register_kernel", "load_plugins", "PluginFailure", "ENV_VAR", "ENTRY_POINT_GROUP",
           "implementations", "get", "Implementation", "Availability", "YES", "no", "lazy",
           "contiguous_head_dim", "triton_probe", "triton_interpreting", "MODES", "PREFILL", "DECODE"]
