"""The Triton split-KV decode (kernels/triton_decode.py), and its ablation that launches the
merge after the split grid rather than by programmatic dependent launch (PDL). Both take
windows and softcap.

Imported on first call, as the prefill is (see impls/triton.py).
"""
from __future__ import annotations

import torch

from attnlab.kernels.registry import lazy, register_kernel, triton_probe

KERNEL = "attnlab.kernels.triton_decode"
COMMON = dict(devices=("cpu", "cuda"), dtypes=(torch.float16, torch.bfloat16, torch.float32),
              head_dims=range(16, 257), probe=triton_probe, emulated_on=("cpu",),  # the interpreter
              prefill_partner="triton",  # an end-to-end run of this decode prefills with its family's kernel
              options=("window", "softcap"))


register_kernel(
    "triton-decode", decode=lazy(f"{KERNEL}:decode"), builds=lazy(f"{KERNEL}:builds"),
    speed_rank={"cuda": 15, "cpu": 90},
    description="Triton split-KV decode (flash-decoding) with LSE merge", **COMMON)

register_kernel(
    "triton-decode-nopdl", decode=lazy(f"{KERNEL}:decode", pdl=False), builds=lazy(f"{KERNEL}:builds", pdl=False),
    speed_rank={"cuda": 16, "cpu": 91},
    ablation_of="triton-decode", description="triton-decode with the merge launched after the split grid, not by PDL",
    **COMMON)
