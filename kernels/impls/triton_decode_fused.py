"""The Triton split-KV decode in one kernel per call (kernels/triton_decode_fused.py): the last
split of each group merges it, where triton-decode launches a merge after the split grid. Takes
windows and softcap, paged and FP8 caches as triton-decode does. Ranked after triton-decode
until a profile shows it faster.

Imported on first call, as the prefill is (see impls/triton.py).
"""
from __future__ import annotations

import torch

from attnlab.kernels.impls.triton_decode import FP8_CACHES, PAGE_SIZES, converts_the_cache
from attnlab.kernels.registry import lazy, register_kernel, triton_probe

KERNEL = "attnlab.kernels.triton_decode_fused"

register_kernel(
    "triton-decode-fused", decode=lazy(f"{KERNEL}:decode"), builds=lazy(f"{KERNEL}:builds"),
    options=("window", "softcap"), paged=PAGE_SIZES, kv_dtypes=FP8_CACHES, input_rules=converts_the_cache,
    decode_workspace=True,
    devices=("cpu", "cuda"), dtypes=(torch.float16, torch.bfloat16, torch.float32),
    head_dims=range(16, 257), probe=triton_probe, emulated_on=("cpu",),  # the interpreter
    prefill_partner="triton",  # an end-to-end run of this decode prefills with its family's kernel
    speed_rank={"cuda": 17, "cpu": 92},
    description="Triton split-KV decode in one kernel: the last split of each group merges it by LSE")
