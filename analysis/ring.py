"""When ring attention hides its communication: an analytic model, from shapes and two rates.

A ring of W devices over n tokens gives each device n/W of them. Per step a device attends its
queries to one K/V block (4 x batch x heads x pairs x head_dim FLOPs, pairs up to (n/W)^2) while
it sends that block on (2 x batch x (n/W) x kv_heads x head_dim x dtype_bytes bytes). Compute
grows with (n/W)^2 and the transfer with n/W, so past some tokens per device the transfer hides.
The ring moves at its busiest device's pace, so a step's compute is the busiest device's:
- not causal: a full block at every step;
- causal, contiguous: the diagonal block at step 0 (n/W (n/W + 1) / 2 pairs), then a full block
  on some device at every later step (the others idle);
- causal, zigzag: every device half a block at every step (plus the diagonal's n/W/2 at step 0).
Over all steps and devices the causal pairs sum to n (n + 1) / 2 in both layouts.

With K = kv_heads x dtype_bytes x rate / (2 x heads x bandwidth) (batch and head_dim cancel), a
full step hides its transfer from K tokens per device, a half step from 2K, a diagonal step from
2K - 1. A kernel slower than `tflops` hides the transfer sooner, a link slower than `gbps` later.
Torch-free: this module reads shapes, never runs a kernel.
"""
from __future__ import annotations

import math

from attnlab.models import ModelConfig, preset

# Per direction, peak; a ring sends and receives at once, one direction each way. Sources:
# NVIDIA H100 SXM datasheet, NVLink 4 at 900 GB/s total = 450 GB/s each way (NCCL reaches less);
# PCIe Gen5 x16: 32 GT/s x 16 lanes / 8 = 64 GB/s each way (63 after 128b/130b encoding).
LINKS_GBPS = {"NVLink H100": 450.0, "PCIe Gen5 x16": 64.0}
# About the H100 SXM's measured dense bf16 matmul rate (DESIGN.md: 731 to 775 TFLOP/s), so an
# upper bound for attention kernels (cuDNN causal prefill at 16k: 583).
DEFAULT_TFLOPS = 700.0
LAYOUTS = ("contiguous", "zigzag")


def _model(model) -> ModelConfig:
    return model if isinstance(model, ModelConfig) else preset(model)


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return float(value)


def _check_layout(layout: str, tokens_per_device: int | None = None) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    if tokens_per_device is not None and layout == "zigzag" and tokens_per_device % 2:
        raise ValueError(f"tokens_per_device: the zigzag layout holds two equal chunks per device, so an even "
                         f"number, got {tokens_per_device}")


def step_pairs(tokens_per_device: int, world: int, causal: bool = False, layout: str = "contiguous") -> list:
    """Per step, the (query, key) pairs the busiest device attends (the ring's pace)."""
    _check_layout(layout, tokens_per_device)
    n, full = tokens_per_device, tokens_per_device ** 2
    if not causal:
        return [full] * world
    if layout == "contiguous":
        return [n * (n + 1) // 2] + [full] * (world - 1)
    return [full // 2 + n // 2] + [full // 2] * (world - 1)


def block_bytes(model, tokens_per_device: int, batch: int = 1, dtype_bytes: int = 2) -> int:
    """Bytes of one K/V block: what a device sends per step."""
    m = _model(model)
    return 2 * batch * tokens_per_device * m.kv_heads * m.head_dim * dtype_bytes


def step_flops(model, tokens_per_device: int, world: int, *, causal: bool = False, layout: str = "contiguous",
               batch: int = 1) -> list:
    """Per step, the busiest device's attention FLOPs for one layer (q k^T and p v)."""
    m = _model(model)
    return [4 * batch * m.heads * pairs * m.head_dim for pairs in step_pairs(tokens_per_device, world, causal, layout)]


def step_times(model, seq_len: int, world: int, tflops: float, gbps: float, *, causal: bool = False,
               layout: str = "contiguous", batch: int = 1, dtype_bytes: int = 2) -> list:
    """Per step (compute_s, transfer_s) of one layer's attention; the last step sends nothing."""
    rate, bandwidth = _positive("tflops", tflops) * 1e12, _positive("gbps", gbps) * 1e9
    if seq_len % world:
        raise ValueError(f"seq_len: expected a multiple of world ({world}), got {seq_len}")
    n = seq_len // world
    transfer_s = block_bytes(model, n, batch, dtype_bytes) / bandwidth
    flops = step_flops(model, n, world, causal=causal, layout=layout, batch=batch)
    return [(f / rate, transfer_s if step < world - 1 else 0.0) for step, f in enumerate(flops)]


def hiding_constant(model, tflops: float, gbps: float, dtype_bytes: int = 2) -> float:
    """K: the tokens per device from which a full step's compute covers its transfer."""
    m = _model(model)
    return m.kv_heads * dtype_bytes * _positive("tflops", tflops) * 1e12 / (2 * m.heads * _positive("gbps", gbps) * 1e9)


def min_tokens_per_device(model, tflops: float, gbps: float, *, world: int = 8, causal: bool = False,
                          layout: str = "contiguous", dtype_bytes: int = 2) -> int:
    """The fewest tokens per device at which every step that sends a block computes at least as
    long as the block takes to send (even for zigzag)."""
    _check_layout(layout)
    if world < 2:
        return 0        # nothing travels
    k = hiding_constant(model, tflops, gbps, dtype_bytes)
    if not causal:
        need = k
    elif layout == "contiguous":
        need = max(2 * k - 1, k)                      # the diagonal step 0 binds
    else:
        need = 2 * k if world > 2 else 2 * k - 1      # half steps bind, once there is one that sends
    tokens = max(math.ceil(need - 1e-9), 1)           # the margin absorbs rounding of an exact product
    return tokens + tokens % 2 if layout == "zigzag" else tokens


# --- the chart -----------------------------------------------------------------------------------

def step_table(model="llama3-8b", *, world: int = 8, tflops: float = DEFAULT_TFLOPS, links=None,
               seq_lens=None, batch: int = 1, dtype_bytes: int = 2):
    """A DataFrame of one steady step's times in ms against context (power-of-two lengths, 4k to
    1M): compute for a full block (not causal; causal contiguous's busiest device) and half a
    block (causal zigzag), and each link's transfer with the context (tokens) from which it hides
    behind each (min_tokens_per_device x world)."""
    from attnlab.analysis import _deps
    pd = _deps.pandas("the ring attention model's table")
    links = LINKS_GBPS if links is None else links
    m = _model(model)
    hides_from = {name: [world * min_tokens_per_device(m, tflops, gbps, world=world, causal=causal, layout=layout,
                                                       dtype_bytes=dtype_bytes)
                         for causal, layout in ((False, "contiguous"), (True, "zigzag"))]
                  for name, gbps in links.items()}
    rows = []
    for seq_len in seq_lens or [2**p for p in range(12, 21)]:
        n = seq_len // world
        full_ms = step_flops(m, n, 1, batch=batch)[0] / (_positive("tflops", tflops) * 1e12) * 1e3
        rows += [("compute: full block", seq_len, n, full_ms, "", None, None, None),
                 ("compute: half block (causal zigzag)", seq_len, n, full_ms / 2, "", None, None, None)]
        rows += [(f"transfer: {name}", seq_len, n, block_bytes(m, n, batch, dtype_bytes) / (gbps * 1e9) * 1e3, name,
                  gbps, *hides_from[name]) for name, gbps in links.items()]
    columns = ["series", "seq_len", "tokens_per_device", "y", "link", "gbps", "hides_full_from", "hides_zigzag_from"]
    table = pd.DataFrame(rows, columns=columns).astype({"hides_full_from": "Int64", "hides_zigzag_from": "Int64"})
    return table.assign(y_unit="ms", workload=m.name, batch=batch, heads=m.heads, kv_heads=m.kv_heads,
                        head_dim=m.head_dim, note=f"{world} devices, {tflops:g} TFLOP/s, {dtype_bytes} bytes/element")


def ring_chart(table):
    """Per-step compute and transfer time against context, log-log: where a line of compute lies
    above a link's line, that link's transfer hides behind the step's attention."""
    from attnlab.analysis import charts
    first = table.iloc[0]
    columns = ["link", "gbps", "hides_full_from", "hides_zigzag_from"]
    caption = (f"Ring attention model, {first['workload']} (heads {first['heads']}, kv_heads {first['kv_heads']}, "
               f"head_dim {first['head_dim']}), batch {first['batch']}, {first['note']}; one layer, one step; "
               "links at peak per direction; the transfer hides behind a full block / a zigzag half block from: "
               + ", ".join(f"{link} ({gbps:g} GB/s) {full:,.0f} / {half:,.0f} tokens" for link, gbps, full, half in
                           table[columns].dropna().drop_duplicates().values))
    fig, (ax,) = charts._figure("Ring attention: a step's compute against its K/V transfer", caption)
    for series, line in table.groupby("series", sort=False):
        is_transfer = bool(line["link"].iloc[0])
        ax.plot(line["seq_len"], line["y"], marker="o", ms=3, lw=1.6, ls="--" if is_transfer else "-", label=series)
    charts._context_axis(ax, table["seq_len"])
    ax.set_ylabel("time per step (ms)")
    charts._legend_outside(ax)
    drawn = charts._drawn(table.assign(run_id=""))
    return charts._attach(fig, drawn)
