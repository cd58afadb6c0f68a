"""The warp-specialised Hopper prefill (kernels/triton_ws.py): Triton's compiler splits its
loop over K/V tiles into a producer warpgroup (TMA copies) and two consumer warpgroups (wgmma
and softmax), so softmax overlaps a matmul.

What it takes is declared here, without Triton: the kernel module is imported on first call
(`lazy`), since Triton picks compiler or interpreter when it is imported. Until a profile
shows it faster than `triton`, `auto` ranks it after it.
"""
from __future__ import annotations

import inspect

import torch

from attnlab.kernels.registry import YES, cuda_capability, lazy, no, register_kernel, triton_probe

# A tile spans exactly one head's columns of a row, so head_dim is a power of two; 256 does not
# fit shared memory beside two K/V stages.
HEAD_DIMS = (16, 32, 64, 128)


def probe(device_type: str):
    """Runs in the interpreter on a CPU, and compiled on Hopper or later with a Triton that has
    in-kernel tensor descriptors and automatic warp specialisation."""
    status = triton_probe(device_type)
    if not status:
        return status
    import triton
    import triton.language as tl

    if not hasattr(tl, "make_tensor_descriptor"):
        return no(f"Triton {triton.__version__} cannot make tensor descriptors in a kernel")
    if "warp_specialize" not in inspect.signature(tl.range).parameters:
        return no(f"Triton {triton.__version__} has no automatic warp specialisation (3.5 or later)")
    if device_type == "cuda":
        return cuda_capability(9, "wgmma, TMA and warp specialisation (Hopper)")
    return YES


def limits(device_type: str, dtype: torch.dtype, head_dim: int):
    """fp32 is exact in the interpreter; on a GPU fp32 takes no tensor cores, and the loop
    neither partitions nor fits in registers."""
    if device_type == "cuda" and dtype == torch.float32:
        return no("runs fp16 and bf16 on a GPU (fp32 takes no tensor cores there); fp32 runs on 'triton'")
    return YES


def row_layout(name: str, t: torch.Tensor):
    """Whether `t` (batch, seqlen, heads, head_dim) can be read as 2-D (seqlen, heads * head_dim)
    rows through a tensor descriptor: each row's heads side by side (head_dim contiguous, heads
    head_dim apart), and a 16-byte aligned base and batch and row strides. A refusal names `name`."""
    if t.stride(3) != 1 or (t.shape[2] > 1 and t.stride(2) != t.shape[3]):
        return no(f"needs heads side by side in each row (strides (..., head_dim, 1)), got strides {t.stride()}",
                  name)
    if t.data_ptr() % 16 or any(s * t.element_size() % 16 for s in t.stride()[:2]):
        return no(f"needs a 16-byte aligned base, batch and row strides, got strides {t.stride()} of "
                  f"{t.element_size()}-byte elements", name)
    return YES


def input_rules(q, k, v, causal=None, scale=None):
    for name, t in (("q", q), ("k", k), ("v", v)):
        status = row_layout(name, t)
        if not status:
            return status
    return YES


register_kernel(
    "triton-ws", prefill=lazy("attnlab.kernels.triton_ws:attention"), builds=lazy("attnlab.kernels.triton_ws:builds"),
    devices=("cpu", "cuda"),
    dtypes=(torch.float16, torch.bfloat16, torch.float32), head_dims=HEAD_DIMS, probe=probe, limits=limits,
    input_rules=input_rules, emulated_on=("cpu",), speed_rank={"cuda": 32, "cpu": 92},
    description="Triton FlashAttention forward, loop warp-specialised by the compiler (Hopper, TMA, wgmma)")
