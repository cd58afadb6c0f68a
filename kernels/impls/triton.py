"""The Triton FlashAttention-2-style prefill (kernels/triton_prefill.py), and its ablation that
reads K and V by pointers where the GPU has TMA. Both take windows, softcap and packed
sequences (varlen), save each row's log-sum-exp on request (prefill_lse), and have
FlashAttention-2's backward (kernels/triton_backward.py).

The kernel module is imported on first call (`lazy`): Triton picks compiler or interpreter
when it is imported, and a command on a machine without a GPU picks the interpreter first.
"""
from __future__ import annotations

import torch

from attnlab.kernels.registry import lazy, register_kernel, triton_probe

KERNEL = "attnlab.kernels.triton_prefill"
BACKWARD = "attnlab.kernels.triton_backward"
COMMON = dict(devices=("cpu", "cuda"), dtypes=(torch.float16, torch.bfloat16, torch.float32),
              head_dims=range(16, 257), probe=triton_probe, emulated_on=("cpu",),  # the interpreter
              options=("window", "softcap"))


def _tune(tma):
    def tune(q, k, v, causal, scale):
        from attnlab.kernels import triton_prefill

        by_tma = tma if tma is not None else triton_prefill.tma_unfit_reason(k, v) is None
        return [dict(tma=by_tma, **triton_prefill.autotune(q, k, v, causal, scale, by_tma))]
    return tune


def _forward_and_backward_builds(capability):
    """The forward's launches, then the backward's (pointer reads only: one set serves both)."""
    return lazy(f"{KERNEL}:builds")(capability) + lazy(f"{BACKWARD}:builds")(capability)


register_kernel(
    "triton", prefill=lazy(f"{KERNEL}:attention"), varlen=lazy(f"{KERNEL}:attention_varlen"),
    prefill_lse=lazy(f"{KERNEL}:attention_lse"), backward=lazy(f"{BACKWARD}:backward"),
    varlen_backward=lazy(f"{BACKWARD}:varlen_backward"),
    builds=_forward_and_backward_builds,
    speed_rank={"cuda": 30, "cpu": 90}, tune=_tune(None),
    description="Triton FlashAttention-2-style forward (tiled, online softmax)", **COMMON)

register_kernel(
    "triton-ptr", prefill=lazy(f"{KERNEL}:attention", tma=False),
    varlen=lazy(f"{KERNEL}:attention_varlen", tma=False), builds=lazy(f"{KERNEL}:builds", tma=False),
    prefill_lse=lazy(f"{KERNEL}:attention_lse", tma=False), backward=lazy(f"{BACKWARD}:backward", tma=False),
    varlen_backward=lazy(f"{BACKWARD}:varlen_backward", tma=False),
    speed_rank={"cuda": 31, "cpu": 91},
    tune=_tune(False), ablation_of="triton",
    description="the triton kernel with K/V read by pointers (cp.async), never by TMA", **COMMON)
