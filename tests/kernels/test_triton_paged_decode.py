"""The Triton decodes (triton-decode and triton-decode-fused) over paged and FP8 caches, against
float64 attention over the dequantised, gathered cache, with FlashAttention's criterion: at most
twice naive's error in the same dtype (naive then reads the cache gathered and dequantised in q's
dtype, as a user without a paged kernel would).

On a CPU the kernels run in Triton's interpreter (tiles of 32 keys): pages of 16 span a tile two
to one, pages of 64 and 256 hold whole tiles. Physical pages are a random permutation of the
blocks, table entries past each sequence's pages are out of range and the pages' slots past each
length NaN, so a kernel that reads either fails. FP8 runs with fp16 q (the interpreter's bf16
dot is wrong).
"""
import pytest
import torch

import attnlab.kernels as K
from attnlab.kernels import registry, triton_decode, triton_decode_fused
from reference import assert_close_as_naive, decode_mask, random_qkv, reference

FP16, FP32 = torch.float16, torch.float32
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
KERNELS = {"triton-decode": triton_decode.decode, "triton-decode-fused": triton_decode_fused.decode}
LENGTHS = [0, 5, 100, 256]          # empty, under a tile, ragged, the whole table


def descales(batch, kv_heads, seed):
    """Float32 (batch, kv_heads) in [0.25, 2], one of them negative: a descale's sign must reach
    the scores and the output too."""
    g = torch.Generator().manual_seed(seed)
    d = 0.25 + 1.75 * torch.rand(batch, kv_heads, generator=g)
    d[-1, -1] *= -1
    return d


def quantised(cache, kv_dtype, descale):
    """(stored cache in kv_dtype, the values it stands for in float64): cache / descale rounded to
    FP8, and back times descale. None leaves the cache as it is."""
    if kv_dtype is None:
        return cache, cache.double()
    stored = (cache.double() / descale.double()[:, None, :, None]).to(kv_dtype)
    return stored, stored.double() * descale.double()[:, None, :, None]


def paged(cache, page_size, seed):
    """A contiguous (batch, max_seqlen, kv_heads, head_dim) cache in pages: (pages, block_table),
    pages (batch x blocks + 3, page_size, kv_heads, head_dim) in a random order (3 spare pages of
    NaN), the table int32 (batch, blocks)."""
    batch, max_seqlen = cache.shape[:2]
    blocks = max_seqlen // page_size
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(batch * blocks + 3, generator=g)
    pages = torch.full((batch * blocks + 3, page_size, *cache.shape[2:]), float("nan")).to(cache.dtype)
    table = order[:batch * blocks].reshape(batch, blocks).to(torch.int32)
    pages[table.flatten().long()] = cache.reshape(batch * blocks, page_size, *cache.shape[2:])
    return pages, table


def poison_past_lengths(pages, table, lengths, page_size):
    """NaN in every slot past each sequence's length, and an entry far out of range in the table
    past its last page: both must go unread."""
    past = torch.zeros(pages.shape[:2], dtype=torch.bool)
    slots = torch.arange(table.shape[1] * page_size).reshape(-1, page_size)
    for b, n in enumerate(lengths):
        past[table[b].long()] |= slots >= n
    pages, table = pages.clone(), table.clone()
    if pages.dtype in (E4M3, E5M2):
        pages.view(torch.uint8)[past] = 0x7F        # NaN in both FP8 formats
    else:
        pages[past] = float("nan")
    for b, n in enumerate(lengths):
        table[b, -(-n // page_size):] = 1 << 30
    return pages, table


def check(kernel, lengths=LENGTHS, max_seqlen=256, page_size=64, kv_dtype=None, q_len=1, heads=4, kv_heads=2,
          head_dim=32, dtype=FP16, window=(-1, -1), softcap=0.0, num_splits=None, seed=0, api=False):
    """One call of `kernel` (a KERNELS name) against float64; page_size 0: a contiguous cache."""
    q, k, v = random_qkv(len(lengths), q_len, max_seqlen, heads, kv_heads, head_dim, dtype, seed=seed)
    fp8 = kv_dtype is not None
    kd, vd = (descales(len(lengths), kv_heads, seed + s) for s in (1, 2)) if fp8 else (None, None)
    k_stored, k_values = quantised(k, kv_dtype, kd)
    v_stored, v_values = quantised(v, kv_dtype, vd)
    lens = torch.tensor(lengths, dtype=torch.int32)
    caches = dict(k_descale=kd, v_descale=vd) if fp8 else {}
    if page_size:
        k_pages, table = paged(k_stored, page_size, seed)
        v_pages, _ = paged(v_stored, page_size, seed)
        if not api:
            (k_pages, _), (v_pages, table) = (poison_past_lengths(p, table, lengths, page_size)
                                              for p in (k_pages, v_pages))
        k_stored, v_stored = k_pages, v_pages
        caches["block_table"] = table
    options = dict(window=window, softcap=softcap)
    if api:
        out = K.decode_attention(q, k_stored, v_stored, lens, impl=kernel, **caches, **options)
    else:
        out = KERNELS[kernel](q, k_stored, v_stored, lens, head_dim ** -0.5, num_splits=num_splits, **caches,
                              **options)
    mask = decode_mask(lens, q_len, max_seqlen, window)
    ref = reference(q, k_values, v_values, mask, head_dim ** -0.5, softcap)
    naive = K.decode_attention(q, k_values.to(dtype), v_values.to(dtype), lens, impl="naive", **options)
    what = (f"{kernel} pages of {page_size} {kv_dtype} lens {lengths} q_len {q_len} {heads}/{kv_heads} heads "
            f"window={window} softcap={softcap} splits={num_splits} {dtype}")
    assert out.shape == q.shape and out.dtype == dtype
    assert_close_as_naive(out, naive, ref, what)
    blind = ~mask.any(-1)
    assert torch.equal(out[blind], torch.zeros_like(out[blind])), f"{what}: a row that sees no key is not 0"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("page_size,q_len", [(16, 1), (64, 4), (256, 1)])
def test_paged_caches_in_shuffled_pages(kernel, page_size, q_len):
    check(kernel, page_size=page_size, q_len=q_len)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kv_dtype,page_size", [(E4M3, 64), (E5M2, 16), (E4M3, 0)])
def test_fp8_caches_with_a_descale_per_kv_head(kernel, kv_dtype, page_size):
    check(kernel, page_size=page_size, kv_dtype=kv_dtype, q_len=4, heads=8, kv_heads=2)


@pytest.mark.parametrize("kernel,window,softcap,kv_dtype,page_size", [
    ("triton-decode", (40, -1), 0.0, None, 16),
    ("triton-decode-fused", (40, -1), 3.0, E4M3, 64),
    ("triton-decode", (-1, -1), 5.0, E5M2, 256),
])
def test_windows_and_softcap_over_pages(kernel, window, softcap, kv_dtype, page_size):
    check(kernel, page_size=page_size, kv_dtype=kv_dtype, q_len=4, window=window, softcap=softcap)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("page_size", [16, 64])
def test_pages_give_the_contiguous_answer_bit_for_bit(kernel, page_size):
    # The same tiles in the same order, read through the table: the same arithmetic.
    q, k, v = random_qkv(3, 4, 128, 4, 2, 32, FP16, seed=3)
    lens = torch.tensor([128, 9, 70], dtype=torch.int32)
    run = KERNELS[kernel]
    contiguous = run(q, k, v, lens, 32 ** -0.5, num_splits=3)
    (k_pages, table), (v_pages, _) = paged(k, page_size, 3), paged(v, page_size, 3)
    assert torch.equal(run(q, k_pages, v_pages, lens, 32 ** -0.5, num_splits=3, block_table=table), contiguous)


@pytest.mark.parametrize("kernel", KERNELS)
def test_through_the_public_api(kernel):
    check(kernel, lengths=[256, 0, 77], page_size=64, kv_dtype=E4M3, q_len=1, api=True)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("num_splits", [1, 3, 7])
@pytest.mark.parametrize("page_size", [16, 32, 128])
def test_split_counts_over_pages(kernel, num_splits, page_size):
    check(kernel, lengths=[256, 1, 130, 0, 200], page_size=page_size, kv_dtype=E5M2, q_len=3, heads=6, kv_heads=3,
          head_dim=48, dtype=FP32, num_splits=num_splits)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("window,softcap", [((0, -1), 0.0), ((31, 0), 2.0), ((300, -1), 0.0)])
def test_more_windows_over_fp8_pages(kernel, window, softcap):
    check(kernel, page_size=32, kv_dtype=E4M3, q_len=4, window=window, softcap=softcap, dtype=FP32)


@pytest.mark.parametrize("kernel,written", [("triton-decode", [4, 1]), ("triton-decode-fused", [2, 1])])
def test_a_short_sequence_writes_and_merges_only_the_splits_that_hold_its_keys(kernel, written):
    # 4 splits of the grid. In the interpreter's tiles of 32 the sequence of 20 keys fills one
    # split, and the one of 256 all 4 (2 in the fused kernel, whose splits read 4 tiles at least).
    # Splits past a sequence's keys never write a partial result and the merge never reads one:
    # NaN planted there stays, and does not reach the output.
    q, k, v = random_qkv(2, 1, 256, 4, 2, 32, FP16)
    lens = torch.tensor([256, 20], dtype=torch.int32)
    workspace = {}
    lse = triton_decode.scratch(workspace, (2, 2, 4, 2), torch.float32, q.device)
    lse.fill_(float("nan"))
    out = KERNELS[kernel](q, k, v, lens, 32 ** -0.5, num_splits=4, workspace=workspace)
    assert not torch.isnan(out).any()
    for b, n in enumerate(written):
        assert not torch.isnan(lse[b, :, :n]).any() and torch.isnan(lse[b, :, n:]).all(), (b, lse[b])


def test_the_fused_kernel_keeps_its_counters_at_zero_between_calls():
    q, k, v = random_qkv(3, 2, 130, 8, 2, 32, FP16)
    lens = torch.tensor([130, 0, 61], dtype=torch.int32)
    workspace = {}
    first = triton_decode_fused.decode(q, k, v, lens, 32 ** -0.5, num_splits=5, workspace=workspace)
    counters = triton_decode.scratch(workspace, (3 * 2,), torch.int32, q.device, zeros=True)
    assert len(workspace) == 3 and torch.equal(counters, torch.zeros_like(counters))   # counters, lse, out parts
    assert torch.equal(first, triton_decode_fused.decode(q, k, v, lens, 32 ** -0.5, num_splits=5, workspace=workspace))
    assert len(workspace) == 3      # the second call made nothing new


def test_a_prepared_decode_owns_one_workspace_for_all_its_calls():
    seen = []

    def decode(q, k_cache, v_cache, cache_seqlens, scale, workspace):
        seen.append(workspace)
        return q.new_zeros(q.shape)
    K.register_kernel("workspace-probe", decode=decode, devices="cpu", dtypes="float16", decode_workspace=True)
    try:
        q, k, v = random_qkv(2, 1, 64, 4, 2, 32, FP16)
        lens = torch.tensor([64, 17], dtype=torch.int32)
        first, second = (K.prepare_decode(q, k, v, lens, impl="workspace-probe") for _ in range(2))
        first(), first(), second()
    finally:
        registry.unregister("workspace-probe")
    assert seen[0] is seen[1] and seen[2] is not seen[0] and seen[0] == {}


@pytest.mark.parametrize("kv_dtype,nan_bits", [(E4M3, 0x7F), (E5M2, 0x7E)])
def test_a_stored_fp8_nan_reaches_the_rows_that_see_it(kv_dtype, nan_bits):
    # Triton's interpreter reads these bytes as finite numbers; the kernel puts them right.
    q, k, v = random_qkv(2, 2, 64, 2, 1, 32, FP16)
    k8, v8 = k.to(kv_dtype), v.to(kv_dtype)
    v8.view(torch.uint8)[0, 10, 0] = nan_bits        # a value both rows of sequence 0 see
    k8.view(torch.uint8)[1, 40, 0, 0] = nan_bits     # sequence 1's last key: its last row sees it, its first not
    lens = torch.tensor([30, 41], dtype=torch.int32)
    out = triton_decode.decode(q, k8, v8, lens, 32 ** -0.5)
    assert torch.isnan(out[0]).all()
    assert torch.isnan(out[1, 1, :, 0]).all() and not torch.isnan(out[1, 0]).any()


def test_pages_and_caches_the_kernels_cannot_read_are_refused():
    q, k, v = random_qkv(1, 1, 48, 2, 1, 32, FP16)
    table = torch.zeros(1, 2, dtype=torch.int32)
    lens = torch.tensor([40], dtype=torch.int32)
    with pytest.raises(ValueError, match="k_cache: page size"):
        triton_decode.decode(q, k[:, :24], v[:, :24], lens, 1.0, block_table=table)
    with pytest.raises(TypeError, match="k_cache: dtype"):
        triton_decode.decode(q, k.float(), v.float(), lens, 1.0)
    with pytest.raises(ValueError, match="k_descale"):
        triton_decode.decode(q, k, v, lens, 1.0, k_descale=torch.ones(1, 1))
