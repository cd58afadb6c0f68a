"""Ring attention: context parallelism over the sequence, one shard of it per rank.

Each rank holds its shard of the queries, keys and values along seqlen, in the flash-attn layout
(batch, seqlen, heads, head_dim). K and V travel around the ring, one block per step, the next
block's transfer (torch.distributed point-to-point) overlapped with attention over the block in
hand; each step's partial output is merged into the running one by its log-sum-exp, so after W
steps every rank holds exactly its shard of full attention.

Causal attention over the whole sequence (square: global seqlen_q == seqlen_k): a query at global
position gq sees a key at gk iff gk <= gq. How the sequence is cut decides how evenly that work
falls on the ranks:
- "contiguous": rank r holds tokens [r n/W, (r+1) n/W). Rank r computes r full blocks and one
  diagonal block, rank 0 a diagonal only: the ring runs at the pace of the last rank.
- "zigzag": the sequence is cut into 2W chunks and rank r holds chunks r and 2W-1-r; every rank
  computes half a block at every step.
`shard` and `unshard` place tokens the way the ring expects them.
"""
from __future__ import annotations

import math
import struct
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from attnlab.kernels.impls import naive

LAYOUTS = ("contiguous", "zigzag")


# --- placing tokens ----------------------------------------------------------------------------

def _chunks_per_rank(layout: str) -> int:
    return 2 if layout == "zigzag" else 1


def _chunks_of(rank: int, world: int, layout: str) -> tuple:
    """Which of the sequence's chunks (W of them, or 2W for zigzag) a rank holds, in order."""
    return (rank, 2 * world - 1 - rank) if layout == "zigzag" else (rank,)


def _check_layout(layout) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")


def shard(x: torch.Tensor, rank: int, world: int, layout: str = "contiguous") -> torch.Tensor:
    """Rank `rank`'s shard of x along dim 1 (seqlen in the (batch, seqlen, heads, head_dim) layout)."""
    _check_layout(layout)
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world: expected a positive number of ranks, got {world!r}")
    if not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank: expected 0 <= rank < world ({world}), got {rank!r}")
    pieces = world * _chunks_per_rank(layout)
    if x.dim() < 2 or x.shape[1] % pieces:
        raise ValueError(f"x: seqlen (dim 1) must be divisible by {pieces} ({_chunks_per_rank(layout)} x world) "
                         f"for the {layout} layout, got shape {tuple(x.shape)}")
    chunks = x.chunk(pieces, dim=1)
    return torch.cat([chunks[i] for i in _chunks_of(rank, world, layout)], dim=1)


def unshard(shards, layout: str = "contiguous") -> torch.Tensor:
    """The whole sequence from every rank's shard (a list in rank order), along dim 1."""
    _check_layout(layout)
    shards = list(shards)
    if not shards:
        raise ValueError("shards: expected one tensor per rank, got none")
    per_rank = _chunks_per_rank(layout)
    if any(s.shape != shards[0].shape for s in shards) or shards[0].dim() < 2 or shards[0].shape[1] % per_rank:
        raise ValueError(f"shards: expected equal shapes with seqlen (dim 1) divisible by {per_rank} for the "
                         f"{layout} layout, got {[tuple(s.shape) for s in shards]}")
    world = len(shards)
    placed = [None] * (world * per_rank)
    for rank, part in enumerate(shards):
        for chunk, piece in zip(_chunks_of(rank, world, layout), part.chunk(per_rank, dim=1)):
            placed[chunk] = piece
    return torch.cat(placed, dim=1)


# --- which part of a block a step computes ------------------------------------------------------

@dataclass(frozen=True)
class Block:
    """The visible part of (this rank's queries) x (a key shard): query rows and key columns as
    slices of the shards, and whether it is the diagonal (causal within it)."""

    rows: slice
    cols: slice
    causal: bool


ALL = slice(None)


def visible_block(rank: int, source: int, world: int, seqlen: int, causal: bool, layout: str):
    """The Block that rank's queries see of source's keys (shards of `seqlen` tokens each), or
    None when they see none. Within a shard tokens are in global order, so the diagonal pair
    (source == rank) is plain causal attention on the shard in either layout."""
    if not causal:
        return Block(ALL, ALL, False)
    if source == rank:
        return Block(ALL, ALL, True)
    if layout == "contiguous":
        return Block(ALL, ALL, False) if source < rank else None
    half = seqlen // 2
    if source < rank:
        # Key chunk `source` precedes both query chunks; key chunk 2W-1-source follows both.
        return Block(ALL, slice(0, half), False)
    # Key chunks source and 2W-1-source both precede query chunk 2W-1-rank and follow chunk rank.
    return Block(slice(half, None), ALL, False)


# --- the ring ---------------------------------------------------------------------------------

@dataclass
class RingStats:
    """What one ring_attention call spent per step on this rank: seconds in the local attention,
    seconds then waiting for the next K/V block (the communication compute did not hide), and
    bytes sent. A GPU's attention is timed to its completion (synchronised)."""

    compute_s: list = field(default_factory=list)
    wait_s: list = field(default_factory=list)
    sent_bytes: list = field(default_factory=list)

    @property
    def total_compute_s(self) -> float:
        return sum(self.compute_s)

    @property
    def total_wait_s(self) -> float:
        return sum(self.wait_s)

    @property
    def total_sent_bytes(self) -> int:
        return sum(self.sent_bytes)


def ring_attention(q, k, v, *, causal=False, scale=None, layout="contiguous", group=None,
                   impl: str = "naive") -> torch.Tensor:
    """This rank's shard of attention over the whole sequence. Every rank of `group` (default: the
    whole world) calls it with its shards of one problem: q (B, Sq, H, D) and k, v (B, Sq, KVH, D),
    H a multiple of KVH, cut as `layout` says (see `shard`). `causal` over global positions,
    `scale` 1/sqrt(D) by default. Shapes, dtype, layout, causal and the scale in use must agree
    across the ranks: where they do not, every rank raises the same ValueError naming the argument
    before any block travels. `impl`: the registered implementation whose `prefill_lse` attends to
    each block (one that declares none, or cannot run these inputs, is refused by name). Returns
    (B, Sq, H, D) in q's dtype."""
    # Untimed: without a synchronisation per step, a GPU's next launches queue behind the current ones.
    out, _ = _ring(q, k, v, causal, scale, layout, group, _local_attention(impl, q), timed=False)
    return out


def ring_attention_with_stats(q, k, v, *, causal=False, scale=None, layout="contiguous", group=None,
                              local_attention=None, impl: str = "naive"):
    """ring_attention's output and a RingStats. `local_attention(q, k, v, causal, scale)` -> (out,
    lse (B, H, Sq), -inf where a row sees no key) attends to one block; by default `impl`'s
    prefill_lse (naive's)."""
    local_attention = local_attention or _local_attention(impl, q)
    return _ring(q, k, v, causal, scale, layout, group, local_attention, timed=True)


def _local_attention(impl: str, q):
    """The prefill_lse of the registered implementation `impl`, where it declares one and runs q
    here; ValueError naming impl otherwise (q itself is left to the argument check)."""
    if impl == "naive":
        return naive.prefill_lse
    from attnlab import kernels

    found = kernels.get(impl)       # ValueError naming impl if unknown
    if found.prefill_lse is None:
        raise ValueError(f"impl: {impl!r} declares no prefill_lse (out and each row's log-sum-exp), by which ring "
                         f"attention merges its blocks")
    if isinstance(q, torch.Tensor) and q.dim() == 4:
        status = found.available(q.device.type)
        if status:
            status = found.supports("prefill", q.dtype, q.shape[-1], q.device.type)
        if not status:
            raise ValueError(f"impl: {impl!r} cannot attend these blocks: {status.reason}")
    return found.prefill_lse


def _ring(q, k, v, causal, scale, layout, group, local_attention, timed: bool):
    """The ring; `timed` waits for a GPU after each step's attention so compute_s is its run time."""
    scale = _check_arguments(q, k, v, causal, scale, layout, group)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    send_to, recv_from = _peer(group, (rank + 1) % world), _peer(group, (rank - 1) % world)
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    out = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=acc_dtype, device=q.device)
    block, spare = torch.stack((k, v)).contiguous(), None    # one buffer: one send and one receive a step
    stats = RingStats()
    for step in range(world):
        last = step == world - 1
        if not last:
            spare = torch.empty_like(block) if spare is None else spare
            pending = dist.batch_isend_irecv([dist.P2POp(dist.isend, block, send_to, group),
                                              dist.P2POp(dist.irecv, spare, recv_from, group)])
        started = time.perf_counter()
        seen = visible_block(rank, (rank - step) % world, world, q.shape[1], causal, layout)
        if seen is not None:
            _attend_block(q, block, seen, scale, local_attention, out, lse)
        if timed:
            _wait_for_device(q.device)
        stats.compute_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        if not last:
            for request in pending:
                request.wait()
            block, spare = spare, block    # the block just sent is free to receive the next one
        stats.wait_s.append(time.perf_counter() - started)
        stats.sent_bytes.append(0 if last else block.numel() * block.element_size())
    return out.to(q.dtype), stats


def _attend_block(q, kv, seen: Block, scale, local_attention, out, lse) -> None:
    """Attention of q's rows in `seen` over kv's columns in `seen`, merged into out and lse."""
    part, part_lse = local_attention(q[:, seen.rows], kv[0][:, seen.cols], kv[1][:, seen.cols], seen.causal, scale)
    rows_out, rows_lse = out[:, seen.rows], lse[:, :, seen.rows]
    merged = torch.logaddexp(rows_lse, part_lse.to(lse.dtype))
    rows_out.mul_(_share(rows_lse, merged)).add_(part.to(out.dtype) * _share(part_lse.to(lse.dtype), merged))
    rows_lse.copy_(merged)


def _share(part_lse, merged):
    """The weight exp(part - merged) of a partial result, (B, Sq, H, 1) to scale its rows; 0 where
    no key is seen yet (-inf - -inf would be NaN)."""
    weight = torch.exp(part_lse - merged).masked_fill(merged == float("-inf"), 0.0)
    return weight.transpose(1, 2).unsqueeze(-1)


def _wait_for_device(device) -> None:
    # Time a GPU's attention to its end, not to its launch.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peer(group, group_rank: int) -> int:
    """The global rank P2POp expects for a rank of `group`."""
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


# --- checking the arguments ---------------------------------------------------------------------

# The dtypes a ring attends in (naive's prefill_lse accumulates them in float32 or float64), by
# their code in the comparison across ranks.
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _check_arguments(q, k, v, causal, scale, layout, group) -> float:
    """Raise on every rank if any rank's arguments are wrong: a rank that raised alone would leave
    the others waiting for it in the ring. So each rank checks its own, then all compare, in one
    all-gather: shapes, layout, causal, dtype and the scale in use. Returns that scale."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("group: torch.distributed is not initialised; call torch.distributed.init_process_group "
                           "first (gloo on CPUs, nccl on GPUs)")
    problem = _local_problem(q, k, v, causal, scale, layout)
    in_use = (q.shape[-1] ** -0.5 if scale is None else float(scale)) if not problem else 0.0
    device = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
    mine = torch.tensor([int(not problem), *_shape(q), *_shape(k), *_shape(v), _layout_code(layout), int(bool(causal)),
                         _dtype_code(q), _float_bits(in_use)], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    if problem:
        raise ValueError(problem)
    failed = [r for r, row in enumerate(every) if not row[0]]
    if failed:
        raise ValueError(f"q, k, v: rank(s) {failed} of the group passed invalid arguments (their error says which)")
    _check_same_everywhere(every)
    return in_use


def _local_problem(q, k, v, causal, scale, layout) -> str:
    """What is wrong with this rank's arguments, or ''."""
    if layout not in LAYOUTS:
        return f"layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}"
    if not isinstance(causal, bool):
        return f"causal: expected True or False, got {causal!r}"
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale) or scale <= 0):
        return f"scale: expected a finite number > 0 or None (1/sqrt(head_dim)), got {scale!r}"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            return f"{name}: expected a 4-D tensor (batch, seqlen, heads, head_dim), got {_described(t)}"
    if q.dtype not in DTYPES:
        return f"q: expected a dtype of {', '.join(map(str, DTYPES))}, got {q.dtype}"
    if k.shape != v.shape or k.dtype != v.dtype or k.device != v.device:
        return f"v: expected k's shape, dtype and device {_described(k)}, got {_described(v)}"
    if k.dtype != q.dtype or k.device != q.device:
        return f"k: expected q's dtype and device ({q.dtype}, {q.device}), got ({k.dtype}, {k.device})"
    b, n, h, d = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (b, n, d) or h % k.shape[2]:
        return (f"k: expected (batch {b}, seqlen {n}, kv_heads dividing heads {h}, head_dim {d}) as q's shard "
                f"(the ring's problem is square, every rank's shards the same length), got {tuple(k.shape)}")
    if n == 0 or n % _chunks_per_rank(layout):
        return f"q: seqlen (dim 1) of a shard must be a positive multiple of {_chunks_per_rank(layout)} for the " \
               f"{layout} layout (two chunks per rank), got {n}"
    return ""


def _described(t) -> str:
    return f"tensor {tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, torch.Tensor) else repr(t)


def _shape(t) -> tuple:
    return tuple(t.shape) if isinstance(t, torch.Tensor) and t.dim() == 4 else (0, 0, 0, 0)


def _layout_code(layout) -> int:
    return LAYOUTS.index(layout) if layout in LAYOUTS else -1


def _dtype_code(t) -> int:
    return DTYPES.index(t.dtype) if isinstance(t, torch.Tensor) and t.dtype in DTYPES else -1


def _float_bits(x: float) -> int:
    """A float64's bits as an int64: the scale travels in the all-gather's int64 tensor exactly."""
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _bits_float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


# Where each field sits in the row every rank contributes (after the ok flag in column 0).
_SHAPES, _OPTIONS, _DTYPE, _SCALE = slice(1, 13), slice(13, 15), 15, 16


def _check_same_everywhere(every) -> None:
    """Every rank holds shards of one problem: the same shapes, layout, causal flag, dtype and scale."""
    first = every[0].tolist()
    for rank, row in enumerate(every[1:], start=1):
        row = row.tolist()
        if row[_SHAPES] != first[_SHAPES]:
            raise ValueError(f"q, k, v: every rank must pass shards of the same shapes; rank 0 passed q, k, v "
                             f"{_shapes(first)}, rank {rank} {_shapes(row)}")
        if row[_OPTIONS] != first[_OPTIONS]:
            raise ValueError(f"layout, causal: every rank must pass the same; rank 0 passed {_options(first)}, "
                             f"rank {rank} {_options(row)}")
        if row[_DTYPE] != first[_DTYPE]:
            raise ValueError(f"q, k, v: every rank must pass the same dtype; rank 0 passed {DTYPES[first[_DTYPE]]}, "
                             f"rank {rank} {DTYPES[row[_DTYPE]]}")
        if row[_SCALE] != first[_SCALE]:
            raise ValueError(f"scale: every rank must use the same (None means 1/sqrt(head_dim)); rank 0 used "
                             f"{_bits_float(first[_SCALE])!r}, rank {rank} {_bits_float(row[_SCALE])!r}")


def _shapes(row) -> str:
    return ", ".join(str(tuple(row[i:i + 4])) for i in (1, 5, 9))


def _options(row) -> str:
    return f"layout {LAYOUTS[row[13]]!r}, causal {bool(row[14])}"
