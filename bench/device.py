"""The device a measurement runs on: checking it, waiting for it, and its memory.

Every helper takes a CPU as well as a CUDA device; what only a GPU has (a queue to wait for,
an allocator's cache and peak counter) is then skipped, or None. A device's name in records
is `records.device_name`.
"""
from __future__ import annotations

import gc
from typing import Optional

import torch

from attnlab.bench.records import parse_device


def check_device(device) -> torch.device:
    """`device` (cpu, cuda or cuda:N) as a torch.device this machine has; ValueError naming
    `device` and what torch sees where it has not."""
    text = parse_device(str(device))
    device = torch.device(text)
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"device: {text!r} asked for, but torch sees no CUDA device")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        here = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        raise ValueError(f"device: {text!r} asked for, but torch sees {count} CUDA device"
                         f"{'s' if count > 1 else ''} ({here})")
    return device


def synchronize(device) -> None:
    """Wait for the work queued on a GPU; nothing on a CPU, whose calls return when done."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_bytes(device) -> Optional[int]:
    """Bytes a new point may allocate: free device memory plus what torch's cache holds
    unused; on a CPU the kernel's MemAvailable (None where unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def release_memory(device) -> None:
    """After a failure (an out-of-memory error above all): collect what the failed call left,
    hand a GPU's cached blocks back and restart its peak counter, so the next point starts clean."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    reset_peak_memory(device)


def hand_back_cache(device) -> None:
    """Collect garbage and hand a GPU's cached blocks back, so that the next plan sees them as
    free; the peak counter stands. Nothing on a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def reset_peak_memory(device) -> None:
    """Restart a GPU's count of the most memory allocated at once; nothing on a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device) -> Optional[int]:
    """The most bytes torch held allocated on a GPU at once since the last reset; None on a CPU."""
    device = torch.device(device)
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

