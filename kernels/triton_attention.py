"""Registers the Triton kernels; Triton itself is imported on first use, not at import time.

Triton reads TRITON_INTERPRET when a kernel module is imported, so importing lazily also lets
a command choose the interpreter on a machine without a GPU.
"""
from __future__ import annotations

import importlib

import torch

from attnlab.kernels.registry import YES, Implementation, no, register, triton_interpreting

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _probe(device_type: str):
    try:
        import triton
    except Exception as exc:
        return no(f"triton not importable ({type(exc).__name__}: {exc})")
    if device_type == "cpu":
        if not triton_interpreting():
            return no("on a CPU Triton runs only in its interpreter: set TRITON_INTERPRET=1")
        return YES
    if triton_interpreting():
        return no("TRITON_INTERPRET=1 is set: Triton kernels run on the CPU, not on this GPU")
    if not torch.cuda.is_available():
        return no("no CUDA device")
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return no(f"needs compute capability 8.0+ for bf16 tensor cores, found {major}.{minor}")
    return YES


def _lazy(module: str, function: str, **options):
    def call(*args):
        return getattr(importlib.import_module(f"attnlab.kernels.{module}"), function)(*args, **options)
    return call


_COMMON = dict(dtypes=DTYPES, head_dims=lambda d: 16 <= d <= 256, head_dims_text="16 to 256",
               devices=("cpu", "cuda"), probe=_probe, emulated_on=("cpu",))  # the interpreter

register(Implementation(
    name="triton", description="Triton FlashAttention-2-style forward (tiled, online softmax)",
    prefill=_lazy("triton_prefill", "attention"), speed_rank={"cuda": 30, "cpu": 90}, **_COMMON))

register(Implementation(
    name="triton-ptr", description="the triton kernel with K/V read by pointers (cp.async), never by TMA",
    prefill=_lazy("triton_prefill", "attention", tma=False), speed_rank={"cuda": 31, "cpu": 91},
    ablation_of="triton", **_COMMON))

register(Implementation(
    name="triton-decode", description="Triton split-KV decode (flash-decoding) with LSE merge",
    decode=_lazy("triton_decode", "decode"), speed_rank={"cuda": 15, "cpu": 90}, **_COMMON))

register(Implementation(
    name="triton-decode-nopdl", description="triton-decode with the merge launched after the split grid, not by PDL",
    decode=_lazy("triton_decode", "decode", pdl=False), speed_rank={"cuda": 16, "cpu": 91},
    ablation_of="triton-decode", **_COMMON))
