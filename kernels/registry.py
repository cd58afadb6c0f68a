"""The registry of attention implementations: the one piece of global state.

A new kernel is one module in this package that calls `register(...)`; the public
API, the CLI and the sweep all read this table and nothing else.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from attnlab.models import AttentionMemory

PREFILL, DECODE = "prefill", "decode"
MODES = (PREFILL, DECODE)


@dataclass(frozen=True)
class Availability:
    """Whether an implementation can run; `reason` says why not, and `argument`, where one of
    the call's own inputs is at fault ("q", "k", "v", "causal" or "scale"), which one."""

    ok: bool
    reason: str = ""
    argument: str = ""

    def __bool__(self) -> bool:
        return self.ok


YES = Availability(True)


def no(reason: str, argument: str = "") -> Availability:
    return Availability(False, reason, argument)


def contiguous_head_dim(q, k, v, causal=None, scale=None) -> Availability:
    """An input rule of fused kernels that read head_dim as contiguous vectors (torch's fused
    SDPA backends refuse anything else; flash-attn asserts it of a KV cache)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            return no(f"needs a contiguous head_dim (stride 1), got stride {t.stride(-1)}", name)
    return YES


@dataclass(frozen=True)
class Implementation:
    """One attention implementation and what it serves.

    `prefill(q, k, v, causal, scale)` and `decode(q, k_cache, v_cache, cache_seqlens, scale)`
    take validated tensors in the (batch, seqlen, heads, head_dim) layout.
    `probe(device_type)` answers availability; `speed_rank` orders `impl="auto"` (lower is faster);
    `limits(device_type, dtype, head_dim)`, where given, adds rules that differ by device: known
    before any tensor exists, so planners ask them too.
    `input_rules(q, k, v, causal, scale)`, where given, refuses one call's inputs that the
    kernel cannot take or would get wrong (a layout, a scale), as `no(reason, argument)`;
    `impl="auto"` then moves on to the next fastest. Decode passes the caches as k and v, and
    causal=True.
    `prepare_decode(q, k_cache, v_cache, cache_seqlens, scale)`, where given, does host-side
    work once and returns the call (the SDPA adapters read the lengths there, not per call).
    `emulated_on` names device types where it runs only in an emulator: right, but its
    times say nothing about the kernel.
    `ablation_of` names the implementation this one is with one feature turned off, for
    measuring what that feature is worth; `auto` and the sweeps' defaults leave it out.
    `memory(device_type)`, where given, says what a call allocates beyond its inputs and
    output on that device type (see `attention_memory`); without it, nothing: K and V are
    streamed in place, as a fused kernel does.
    """

    name: str
    description: str
    dtypes: tuple
    head_dims: Callable[[int], bool]
    head_dims_text: str
    devices: tuple
    probe: Callable[[str], Availability]
    prefill: Optional[Callable] = None
    decode: Optional[Callable] = None
    speed_rank: dict = field(default_factory=dict)
    limits: Optional[Callable[[str, torch.dtype, int], Availability]] = None
    input_rules: Optional[Callable[..., Availability]] = None
    prepare_decode: Optional[Callable] = None
    emulated_on: tuple = ()
    ablation_of: str = ""
    memory: Optional[Callable[[str], AttentionMemory]] = None

    def attention_memory(self, device_type: str) -> AttentionMemory:
        """What one call, prefill or decode, allocates beyond its inputs and output on this
        device type: the memory models of the sweep and the end-to-end planner read this."""
        return self.memory(device_type) if self.memory else AttentionMemory()

    @property
    def decode_reads_lengths_on_host(self) -> bool:
        """Decode needs cache_seqlens on the host: read once when prepared, but a plain
        `decode` call syncs every time, so it cannot be captured in a CUDA graph."""
        return self.prepare_decode is not None

    @property
    def modes(self) -> tuple:
        return tuple(m for m in MODES if getattr(self, m) is not None)

    def available(self, device: str | torch.device = "cuda") -> Availability:
        """Can this implementation run on `device` (a device type such as "cuda" or "cpu")?"""
        device_type = torch.device(device).type
        if device_type not in self.devices:
            return no(f"runs on {', '.join(self.devices)}, not {device_type}")
        return _cached_probe(self.name, device_type)

    def supports(self, mode: str, dtype: torch.dtype, head_dim: int, device_type: str = "cuda") -> Availability:
        if mode not in self.modes:
            return no(f"serves {', '.join(self.modes)}, not {mode}")
        if dtype not in self.dtypes:
            return no(f"dtypes {', '.join(_dtype_name(d) for d in self.dtypes)}, not {_dtype_name(dtype)}")
        if not self.head_dims(head_dim):
            return no(f"head_dim {self.head_dims_text}, not {head_dim}")
        return self.limits(device_type, dtype, head_dim) if self.limits else YES

    def serves(self, mode: str, q: torch.Tensor, k=None, v=None, causal: bool = False,
               scale: float = 1.0) -> Availability:
        """Can this implementation run `mode` for these (batch, seqlen, heads, head_dim) tensors:
        on q's device, dtype and head_dim, and, where k and v are given, by its input rules?"""
        device_type = q.device.type
        status = self.available(device_type)
        if status:
            status = self.supports(mode, q.dtype, q.shape[-1], device_type)
        if status and k is not None and self.input_rules:
            status = self.input_rules(q, k, v, causal, scale)
        return status


_REGISTRY: dict[str, Implementation] = {}


def register(impl: Implementation) -> Implementation:
    if impl.name in _REGISTRY:
        raise ValueError(f"implementation {impl.name!r} is already registered")
    _REGISTRY[impl.name] = impl
    return impl


def implementations() -> list[Implementation]:
    """All registered implementations, in registration order."""
    return list(_REGISTRY.values())


def get(name: str) -> Implementation:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"impl: unknown implementation {name!r}; known: {', '.join(_REGISTRY)}") from None


@functools.lru_cache(maxsize=None)
def _cached_probe(name: str, device_type: str) -> Availability:
    # Optional backends are detected once per process and device type.
    try:
        return _REGISTRY[name].probe(device_type)
    except Exception as exc:  # a probe that breaks means "not here", with the reason
        return no(f"probe failed: {type(exc).__name__}: {exc}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def triton_interpreting() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
