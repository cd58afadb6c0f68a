"""The Triton split-KV decode (kernels/triton_decode.py), and its ablation that launches the
merge after the split grid rather than by programmatic dependent launch (PDL). Both take
windows and softcap, and read paged caches (pages of 16 to 256 tokens) and FP8 caches with
their descales in the kernel.

Imported on first call, as the prefill is (see impls/triton.py).
"""
from __future__ import annotations

import torch

from attnlab.kernels.registry import YES, lazy, no, register_kernel, triton_probe

KERNEL = "attnlab.kernels.triton_decode"
PAGE_SIZES = tuple(1 << n for n in range(4, 9))         # 16 to 256 tokens (triton_decode.PAGE_SIZES)
FP8_CACHES = (torch.float8_e4m3fn, torch.float8_e5m2)   # converted and descaled in the kernel


def converts_the_cache(q, k_cache, v_cache, causal=None, scale=None):
    """Triton converts float8_e4m3fn on compute capability 8.9 and later only (Ada, Hopper);
    float8_e5m2 everywhere."""
    if k_cache.dtype == torch.float8_e4m3fn and k_cache.is_cuda:
        major, minor = torch.cuda.get_device_capability(k_cache.device)
        if (major, minor) < (8, 9):
            return no(f"reads float8_e4m3fn caches on compute capability 8.9 and later, not {major}.{minor}", "k")
    return YES


COMMON = dict(devices=("cpu", "cuda"), dtypes=(torch.float16, torch.bfloat16, torch.float32),
              head_dims=range(16, 257), probe=triton_probe, emulated_on=("cpu",),  # the interpreter
              prefill_partner="triton",  # an end-to-end run of this decode prefills with its family's kernel
              options=("window", "softcap"), paged=PAGE_SIZES, kv_dtypes=FP8_CACHES, input_rules=converts_the_cache,
              decode_workspace=True)


register_kernel(
    "triton-decode", decode=lazy(f"{KERNEL}:decode"), builds=lazy(f"{KERNEL}:builds"),
    speed_rank={"cuda": 15, "cpu": 90},
    description="Triton split-KV decode (flash-decoding) with LSE merge", **COMMON)

register_kernel(
    "triton-decode-nopdl", decode=lazy(f"{KERNEL}:decode", pdl=False), builds=lazy(f"{KERNEL}:builds", pdl=False),
    speed_rank={"cuda": 16, "cpu": 91},
    ablation_of="triton-decode", description="triton-decode with the merge launched after the split grid, not by PDL",
    **COMMON)
