"""Ring attention on 2 and 4 gloo ranks against float64 attention over the whole sequence, with
FlashAttention's criterion: each rank's shard has at most twice the error naive attention has in
the same dtype on the whole sequence, plus a small slack. One spawned world of 4 ranks runs every
case on its ring of 4 and on two rings of 2 (subgroups); the parent computes the references and
checks each case.
"""
import datetime
import os
import socket
import time
import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attnlab.distributed import ring_attention, ring_attention_with_stats, shard, unshard
from attnlab.distributed.ring import visible_block
from attnlab.kernels.impls import naive

SPAWN_TIMEOUT_S = 120
SPAWNS = pytest.mark.slow    # four processes importing torch: 10 to 20 s on two cores, once for the module
BATCH, HEAD_DIM = 2, 16


@dataclass(frozen=True)
class Case:
    layout: str
    causal: bool
    dtype: torch.dtype
    tokens_per_chunk: int    # awkward (odd) lengths, so the ranks' causal work is uneven in contiguous
    heads: int = 6
    kv_heads: int = 2        # GQA unless said
    impl: str = "naive"      # whose prefill_lse attends to each block

    @property
    def name(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return (f"{self.layout}-{'causal' if self.causal else 'full'}-{dtype}-h{self.heads}kv{self.kv_heads}"
                + ("" if self.impl == "naive" else f"-{self.impl}"))

    def seqlen(self, world: int) -> int:
        return self.tokens_per_chunk * world * (2 if self.layout == "zigzag" else 1)

    def inputs(self, world: int):
        """The whole sequence's q, k, v (batch, seqlen, heads, head_dim), the same on every rank."""
        g = torch.Generator().manual_seed(zlib.crc32(self.name.encode()) + world)   # same in every process
        make = lambda heads: torch.randn(BATCH, self.seqlen(world), heads, HEAD_DIM, generator=g).to(self.dtype)
        return make(self.heads), make(self.kv_heads), make(self.kv_heads)


CASES = [Case(layout, causal, dtype, chunk) for layout, chunk in (("contiguous", 13), ("zigzag", 7))
         for causal in (False, True) for dtype in (torch.float32, torch.float16)]
CASES.append(Case("zigzag", True, torch.float16, 7, impl="triton"))   # a kernel's own prefill_lse (interpreted here)
CASES.append(Case("zigzag", True, torch.float32, 5, heads=4, kv_heads=4))
WORLDS = (2, 4)
STATS_CASE = CASES[4]      # zigzag fp32: its length suits both layouts
assert STATS_CASE.layout == "zigzag" and STATS_CASE.dtype == torch.float32


# --- what each rank runs ------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Counted:
    """naive's prefill_lse, counting its calls: shows the local kernel is the one passed, and
    that invisible blocks are skipped."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        return naive.prefill_lse(*args)


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)   # the ranks share this machine's cores; more threads each only contend
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        # Rings of 2 are the pairs {0, 1} and {2, 3}: groups whose ranks are not the global ones.
        pairs = [dist.new_group([r, r + 1]) for r in range(0, world, 2)]
        results = {world: _ring_cases(None), 2: _ring_cases(pairs[rank // 2])}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _ring_cases(group):
    """Every case, the stats and the bad calls on one ring (group), as this rank saw them."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    results = {"outputs": {}, "errors": _bad_calls(rank, world, group)}
    for case in CASES:
        q, k, v = (shard(t, rank, world, case.layout) for t in case.inputs(world))
        results["outputs"][case.name] = ring_attention(q, k, v, causal=case.causal, layout=case.layout, group=group,
                                                       impl=case.impl)
    results["stats"], results["local_calls"] = _stats_run(rank, world, group)
    return results


def _stats_run(rank, world, group):
    calls = {}
    for layout in ("contiguous", "zigzag"):
        q, k, v = (shard(t, rank, world, layout) for t in STATS_CASE.inputs(world))
        counted = _Counted()
        _, stats = ring_attention_with_stats(q, k, v, causal=True, layout=layout, group=group,
                                             local_attention=counted)
        calls[layout] = counted.calls
    return stats, calls


def _bad_calls(rank, world, group):
    """Each bad call's error type and message, as every rank saw it."""
    q, k, v = (shard(t, rank, world, "zigzag") for t in CASES[-1].inputs(world))
    bad = {
        "layout": dict(layout="diagonal"),
        "odd_zigzag_shard": dict(q=q[:, :-1], k=k[:, :-1], v=v[:, :-1], layout="zigzag"),
        "kv_heads": dict(k=k[:, :, :3], v=v[:, :, :3]),
        "scale": dict(scale=-1.0),
        "shapes_differ": dict(q=q[:, :-2], k=k[:, :-2], v=v[:, :-2]) if rank == 1 else {},
        "one_rank_bad_layout": dict(layout="zig-zag") if rank == 0 else {},
        "causal_differs": dict(causal=rank == 0),
        "scale_differs": dict(scale=0.25 if rank == 0 else 0.5),
        "scale_differs_with_stats": dict(scale=0.25 if rank == 0 else 0.5, call=ring_attention_with_stats),
        "dtype_differs": dict(q=q.double(), k=k.double(), v=v.double()) if rank == 1 else {},
        "int_dtype": dict(q=q.int(), k=k.int(), v=v.int()),
        # the same scale, given explicitly on one rank and by default on the others: no error
        "scale_default_equals_given": dict(scale=HEAD_DIM ** -0.5) if rank == 0 else {},
    }
    errors = {}
    for name, change in bad.items():
        args = {"q": q, "k": k, "v": v, "group": group, **change}
        call = args.pop("call", ring_attention)
        try:
            call(args.pop("q"), args.pop("k"), args.pop("v"), **args)
            errors[name] = ("no error", "")
        except Exception as exc:  # the test checks the type
            errors[name] = (type(exc).__name__, str(exc))
    return errors


def _spawn(world, out_dir):
    """Run _worker on `world` ranks; kill them past SPAWN_TIMEOUT_S rather than hang the suite."""
    context = mp.spawn(_worker, args=(world, _free_port(), str(out_dir)), nprocs=world, join=False)
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"ring attention on {world} ranks did not finish in {SPAWN_TIMEOUT_S} s")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """What every rank of one 4-rank world saw: its rings of 4 and of 2 (spawning is the slow part)."""
    return _spawn(max(WORLDS), tmp_path_factory.mktemp("ring"))


@pytest.fixture(params=WORLDS, ids=[f"world{w}" for w in WORLDS])
def ring_run(request, spawned):
    """(world, rings): each ring a list of its ranks' results, in group rank order."""
    world = request.param
    results = [r[world] for r in spawned]
    return world, [results[i:i + world] for i in range(0, len(results), world)]


# --- the checks -----------------------------------------------------------------------------------

def reference(q, k, v, causal):
    """Float64 attention over the whole sequence, from the definition: gk <= gq when causal."""
    q, k, v = (t.double() for t in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(groups, dim=2) for t in (k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    if causal:
        n = q.shape[1]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), v)


def max_error(out, ref) -> float:
    return (out.double() - ref).abs().max().item()


@SPAWNS
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_ring_matches_float64_on_every_rank(ring_run, case):
    world, rings = ring_run
    q, k, v = case.inputs(world)
    ref = reference(q, k, v, case.causal)
    naive_err = max_error(naive.prefill(q, k, v, case.causal, HEAD_DIM ** -0.5), ref)
    bound = 2 * naive_err + max(torch.finfo(case.dtype).eps / 8, 1e-6)
    for ring, ranks in enumerate(rings):
        for rank, result in enumerate(ranks):
            out = result["outputs"][case.name]
            assert out.dtype == case.dtype and out.shape == shard(q, rank, world, case.layout).shape
            err = max_error(out, shard(ref, rank, world, case.layout))
            assert err <= bound, f"ring {ring}, rank {rank} of {world}: error {err:.3g} > 2 x naive {naive_err:.3g}"
        assert max_error(unshard([r["outputs"][case.name] for r in ranks], case.layout), ref) <= bound


@SPAWNS
def test_stats_count_the_blocks_sent(ring_run):
    world, rings = ring_run
    case = STATS_CASE
    block_bytes = 2 * BATCH * (case.seqlen(world) // world) * case.kv_heads * HEAD_DIM * 4
    for result in sum(rings, []):
        stats = result["stats"]
        assert stats.sent_bytes == [block_bytes] * (world - 1) + [0]
        assert stats.total_sent_bytes == (world - 1) * block_bytes
        assert len(stats.compute_s) == len(stats.wait_s) == world
        assert min(stats.compute_s + stats.wait_s) >= 0


@SPAWNS
def test_invisible_blocks_are_skipped_and_the_local_kernel_is_the_one_passed(ring_run):
    world, rings = ring_run
    for ranks in rings:
        for rank, result in enumerate(ranks):
            assert result["local_calls"] == {"contiguous": rank + 1, "zigzag": world}


EXPECTED_ERRORS = {
    "layout": ("ValueError", "layout: expected one of contiguous, zigzag, got 'diagonal'"),
    "odd_zigzag_shard": ("ValueError", "q: seqlen (dim 1) of a shard must be a positive multiple of 2"),
    "kv_heads": ("ValueError", "k: expected (batch"),
    "scale": ("ValueError", "scale: expected a finite number > 0"),
    "shapes_differ": ("ValueError", "q, k, v: every rank must pass shards of the same shapes"),
    "causal_differs": ("ValueError", "layout, causal: every rank must pass the same"),
    "scale_differs": ("ValueError", "scale: every rank must use the same (None means 1/sqrt(head_dim)); "
                                    "rank 0 used 0.25, rank 1 0.5"),
    "scale_differs_with_stats": ("ValueError", "scale: every rank must use the same"),
    "dtype_differs": ("ValueError", "q, k, v: every rank must pass the same dtype; rank 0 passed torch.float32, "
                                    "rank 1 torch.float64"),
    "int_dtype": ("ValueError", "q: expected a dtype of torch.float64, torch.float32, torch.float16, torch.bfloat16, "
                                "got torch.int32"),
    "scale_default_equals_given": ("no error", ""),
}


@SPAWNS
@pytest.mark.parametrize("name", sorted(EXPECTED_ERRORS))
def test_bad_arguments_are_named_on_every_rank(ring_run, name):
    _, rings = ring_run
    kind, start = EXPECTED_ERRORS[name]
    for result in sum(rings, []):
        got = result["errors"][name]
        assert got[0] == kind and got[1].startswith(start), got


@SPAWNS
def test_a_rank_with_bad_arguments_stops_every_rank(ring_run):
    """Rank 0 alone passes a bad layout: it names the argument, and the others raise too rather
    than wait for it in the ring."""
    _, rings = ring_run
    for ranks in rings:
        assert ranks[0]["errors"]["one_rank_bad_layout"][1].startswith("layout:")
        for result in ranks[1:]:
            assert result["errors"]["one_rank_bad_layout"] == (
                "ValueError", "q, k, v: rank(s) [0] of the group passed invalid arguments (their error says which)")


def test_an_uninitialised_group_is_named():
    if dist.is_initialized():
        pytest.skip("this process already has a default group")
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="^group: torch.distributed is not initialised"):
        ring_attention(q, q, q)


# --- single-process pieces ----------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_visible_blocks_cover_exactly_the_causal_pairs(layout, world):
    """The union over steps of the blocks a rank computes is exactly the pairs gk <= gq, each once."""
    seqlen = 6 * world
    positions = torch.arange(seqlen)[None]
    for rank in range(world):
        gq = shard(positions, rank, world, layout)[0]
        covered = torch.zeros(len(gq), seqlen, dtype=torch.int64)
        for source in range(world):
            gk = shard(positions, source, world, layout)[0]
            block = visible_block(rank, source, world, len(gq), True, layout)
            if block is None:
                continue
            seen = torch.ones(len(gq), len(gk), dtype=torch.bool)
            seen = seen.tril() if block.causal else seen
            part = torch.zeros_like(seen)
            part[block.rows, block.cols] = seen[block.rows, block.cols]
            covered[:, gk] += part.long()
        assert torch.equal(covered, (torch.arange(seqlen)[None, :] <= gq[:, None]).long()), (rank, world)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_shard_unshard_round_trip(layout):
    x = torch.arange(2 * 24 * 3).reshape(2, 24, 3)
    for world in (1, 2, 3, 4):
        shards = [shard(x, r, world, layout) for r in range(world)]
        assert torch.equal(unshard(shards, layout), x)
    assert shard(x, 1, 3, "zigzag")[0, :, 0].div(3, rounding_mode="floor").tolist() == [4, 5, 6, 7, 16, 17, 18, 19]


@pytest.mark.parametrize("call, message", [
    (lambda x: shard(x, 0, 4, "zigzag"), r"^x: seqlen \(dim 1\) must be divisible by 8 \(2 x world\)"),
    (lambda x: shard(x, 0, 7), r"^x: seqlen \(dim 1\) must be divisible by 7"),
    (lambda x: shard(x, 2, 2), r"^rank: expected 0 <= rank < world \(2\), got 2"),
    (lambda x: shard(x, 0, 0), r"^world: expected a positive number"),
    (lambda x: shard(x, 0, 2, "ring"), r"^layout: expected one of contiguous, zigzag, got 'ring'"),
    (lambda x: unshard([x, x[:, :2]]), r"^shards: expected equal shapes"),
    (lambda x: unshard([]), r"^shards: expected one tensor per rank"),
])
def test_shard_errors_name_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.zeros(1, 12, 2, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal, seqlen_q, seqlen_k", [(False, 7, 11), (True, 11, 11), (True, 5, 3)])
def test_prefill_lse_against_float64_logsumexp(dtype, causal, seqlen_q, seqlen_k):
    g = torch.Generator().manual_seed(seqlen_q * 100 + seqlen_k)
    q, k, v = (torch.randn(2, s, h, 16, generator=g).to(dtype) for s, h in ((seqlen_q, 4), (seqlen_k, 2),
                                                                                 (seqlen_k, 2)))
    scale = 16 ** -0.5
    out, lse = naive.prefill_lse(q, k, v, causal, scale)
    assert torch.equal(out, naive.prefill(q, k, v, causal, scale))
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, seqlen_q)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double().repeat_interleave(2, dim=2)) * scale
    if causal:   # bottom-right: query i sits at i + seqlen_k - seqlen_q
        offset = seqlen_k - seqlen_q
        scores = scores.masked_fill(torch.ones(seqlen_q, seqlen_k, dtype=torch.bool).triu(1 + offset), float("-inf"))
    expected = torch.logsumexp(scores, dim=-1)
    blind = expected == float("-inf")
    assert torch.equal(lse == float("-inf"), blind) and (blind.any() == (seqlen_q > seqlen_k))
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2     # fp16 scores carry fp16 rounding
    assert (lse.double() - expected)[~blind].abs().max().item() < tolerance
