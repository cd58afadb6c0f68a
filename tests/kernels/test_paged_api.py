"""Paged and FP8 decode caches through the public API (flash-attn's conventions): every
registered implementation that declares them, on tiny caches with shuffled pages, ragged
lengths, GQA, windows and softcap, against float64 of the dequantised gathered cache; those
that do not declare them are refused by name; every validation error names its argument."""
import math
from typing import NamedTuple, Optional

import pytest
import torch

import attnlab.kernels as K
from attnlab.kernels import registry
from attnlab.kernels.paged import FP8_DTYPES, dequantise, gather_pages
from attnlab.kernels.rowcheck import check_decode
from reference import assert_close_as_naive, decode_mask, reference

E4M3, E5M2 = FP8_DTYPES
HEAD_DIM = 32


class PagedCase(NamedTuple):
    page_size: int              # 0: a contiguous cache
    lengths: tuple
    q_len: int
    heads: int
    kv_heads: int
    kv_dtype: Optional[torch.dtype] = None     # None: q's dtype
    window: tuple = (-1, -1)
    softcap: float = 0.0


# Lengths from 0 to the table's whole reach (max_blocks_per_seq x page_size), GQA, MQA and MHA.
CASES = {
    "p16-gqa": PagedCase(16, (0, 37, 64), 1, 4, 2),
    "p16-q3-e5m2-window": PagedCase(16, (48, 3, 17), 3, 8, 2, E5M2, window=(10, -1)),
    "p64-q3-e4m3-softcap-mqa": PagedCase(64, (128, 65, 0), 3, 4, 1, E4M3, softcap=2.0),
    "p256-e4m3": PagedCase(256, (1, 256, 200), 1, 4, 4, E4M3),
    "p256-q3-window-softcap": PagedCase(256, (257, 0), 3, 6, 2, window=(40, -1), softcap=3.0),
    "contiguous-e5m2": PagedCase(0, (9, 0, 70), 3, 4, 2, E5M2),
}
DTYPES = (torch.float16, torch.float32)     # the Triton interpreter's tl.dot is wrong in bf16


def make_inputs(case: PagedCase, dtype, seed=0) -> dict:
    """The API's keywords for a case: pages shuffled, NaN in every slot no length reaches, and
    out-of-range garbage in every table entry no length uses (never to be read)."""
    gen = torch.Generator().manual_seed(seed)
    b, longest = len(case.lengths), max(case.lengths)
    page = case.page_size or longest
    per_seq = max(1, math.ceil(longest / page))
    num_blocks = b * per_seq + 2
    table = torch.randperm(num_blocks, generator=gen)[:b * per_seq].view(b, per_seq).int()
    written = torch.zeros(num_blocks, page, dtype=torch.bool)
    for row, n in enumerate(case.lengths):
        used = math.ceil(n / page)
        for s in range(n):
            written[table[row, s // page], s % page] = True
        table[row, used:] = torch.tensor([-7, num_blocks + 3] * per_seq)[:per_seq - used].int()
    caches = [torch.randn(num_blocks, page, case.kv_heads, HEAD_DIM, generator=gen)
              .masked_fill(~written[..., None, None], float("nan")) for _ in range(2)]
    if not case.page_size:          # contiguous: the same pages laid out one sequence after another
        caches = [gather_pages(c, table.clamp(0, num_blocks - 1), longest) for c in caches]
        for c in caches:
            for row, n in enumerate(case.lengths):
                c[row, n:] = float("nan")
    q_scale = 3.0 if case.softcap else 1.0
    inputs = dict(q=torch.randn(b, case.q_len, case.heads, HEAD_DIM, generator=gen).to(dtype) * q_scale,
                  k_cache=caches[0].to(case.kv_dtype or dtype), v_cache=caches[1].to(case.kv_dtype or dtype),
                  cache_seqlens=torch.tensor(case.lengths, dtype=torch.int32))
    if case.page_size:
        inputs["block_table"] = table
    if case.kv_dtype is not None:
        inputs["k_descale"] = torch.rand(b, case.kv_heads, generator=gen) + 0.5
        inputs["v_descale"] = torch.rand(b, case.kv_heads, generator=gen) + 0.5
    return inputs


def attended_float64(inputs: dict, max_seqlen: int) -> tuple:
    """(k, v) as attended, float64 (batch, max_seqlen, kv_heads, head_dim), gathered slot by slot
    from the definition; zeros past each length."""
    lengths = inputs["cache_seqlens"].tolist()
    out = []
    for name, descale_name in (("k_cache", "k_descale"), ("v_cache", "v_descale")):
        cache, table, descale = inputs[name], inputs.get("block_table"), inputs.get(descale_name)
        full = torch.zeros(len(lengths), max_seqlen, *cache.shape[2:], dtype=torch.float64)
        for b, n in enumerate(lengths):
            for s in range(n):
                stored = cache[b, s] if table is None else cache[table[b, s // cache.shape[1]], s % cache.shape[1]]
                full[b, s] = stored.double() * (1.0 if descale is None else descale[b].double()[:, None])
        out.append(full)
    return tuple(out)


def declaring(what) -> list:
    """Registered decodes that run here and declare `what` (paged or kv_dtypes), as params; an
    ablation is marked slow, as in the contract tests."""
    return [pytest.param(i.name, marks=[pytest.mark.slow] if i.ablation_of else [])
            for i in K.implementations() if "decode" in i.modes and i.available("cpu") and what(i)]


PAGED_OR_FP8 = declaring(lambda i: i.paged is not None or i.kv_dtypes)


def _params():
    """(impl, case, dtype): an emulated kernel (the Triton interpreter) in fp16 only unless slow ones run."""
    for impl in PAGED_OR_FP8:
        emulated = "cpu" in K.get(impl.values[0]).emulated_on
        for name in CASES:
            for dtype in DTYPES:
                slow = emulated and dtype == torch.float32
                yield pytest.param(impl.values[0], name, dtype, marks=[*impl.marks, *([pytest.mark.slow] * slow)],
                                   id=f"{impl.values[0]}-{name}-{str(dtype).removeprefix('torch.')}")


@pytest.mark.parametrize("impl,case_name,dtype", list(_params()))
def test_paged_and_fp8_decode_matches_float64(impl, case_name, dtype):
    case = CASES[case_name]
    inputs = make_inputs(case, dtype)
    status = K.get(impl).supports("decode", dtype, HEAD_DIM, "cpu")
    status = status and K.get(impl).takes(K.Variant(case.window, case.softcap), False, "decode")
    if not status:
        pytest.skip(f"{impl}: {status.reason}")
    paged = case.page_size
    refused = K.get(impl).takes_cache(dtype, paged, case.kv_dtype)
    options = dict(window=case.window, softcap=case.softcap)
    if not refused:     # declared, but not this page size or cache dtype: refused by name
        with pytest.raises(ValueError, match=rf"^{refused.argument}: {impl!r}"):
            K.decode_attention(**inputs, impl=impl, **options)
        return
    max_seqlen = inputs["block_table"].shape[1] * paged if paged else inputs["k_cache"].shape[1]
    k64, v64 = attended_float64(inputs, max_seqlen)
    mask = decode_mask(inputs["cache_seqlens"], case.q_len, max_seqlen, case.window)
    ref = reference(inputs["q"], k64, v64, mask, softcap=case.softcap)
    plain = K.decode_attention(inputs["q"], k64.to(dtype), v64.to(dtype), inputs["cache_seqlens"], impl="naive",
                               **options)
    given = {name: t.clone() for name, t in inputs.items()}
    out = K.decode_attention(**given, impl=impl, **options)
    assert_close_as_naive(out, plain, ref, f"{impl} {case_name} {dtype}")
    assert (out[inputs["cache_seqlens"] == 0] == 0).all(), "a sequence of length 0 must give zeros"
    for name, t in inputs.items():      # bit for bit: NaN in unwritten slots included
        assert torch.equal(given[name].view(torch.uint8), t.view(torch.uint8)), f"{impl} changed its input {name}"


@pytest.mark.parametrize("impl", declaring(lambda i: i.paged is None))
def test_a_decode_without_pages_refuses_a_block_table_by_name(impl):
    inputs = make_inputs(CASES["p16-gqa"], torch.float16)
    with pytest.raises(ValueError, match=rf"^block_table: {impl!r} takes contiguous caches only"):
        K.decode_attention(**inputs, impl=impl)


@pytest.mark.parametrize("impl", declaring(lambda i: not i.kv_dtypes))
def test_a_decode_without_fp8_refuses_an_fp8_cache_by_name(impl):
    inputs = make_inputs(CASES["contiguous-e5m2"], torch.float16)
    with pytest.raises(ValueError, match=rf"^k_cache: {impl!r} takes caches in float16"):
        K.decode_attention(**inputs, impl=impl)


@pytest.fixture
def pages_of_16():
    """A decode that takes pages of 16 tokens only, ranked first on the CPU."""
    naive = K.get("naive")
    impl = K.register_kernel("test-pages16", decode=naive.decode, devices=("cpu",), dtypes=naive.dtypes,
                             speed_rank=0, paged=(16,), kv_dtypes=("float8_e5m2",))
    yield impl
    registry.unregister(impl.name)


def test_page_sizes_and_cache_dtypes_are_declared_refused_by_name_and_auto_moves_on(pages_of_16):
    assert pages_of_16.paged_text == "16" and pages_of_16.kv_dtypes == (E5M2,)
    sixteen, sixty_four = make_inputs(CASES["p16-gqa"], torch.float16), make_inputs(CASES["p256-e4m3"], torch.float16)
    assert K.resolve("auto", "decode", sixteen["q"], sixteen["k_cache"], sixteen["v_cache"], page_size=16).name == \
        "test-pages16"
    assert K.resolve("auto", "decode", sixty_four["q"], page_size=256).name != "test-pages16"
    assert K.resolve("auto", "decode", sixteen["q"], page_size=16, kv_dtype=E4M3).name != "test-pages16"
    with pytest.raises(ValueError, match=r"^k_cache: 'test-pages16' takes pages of 16 tokens, not 256"):
        K.decode_attention(**sixty_four, impl="test-pages16")
    fp8 = dict(sixteen, k_cache=sixteen["k_cache"].to(E4M3), v_cache=sixteen["v_cache"].to(E4M3))
    with pytest.raises(ValueError, match=r"^k_cache: 'test-pages16' takes caches in float16, float8_e5m2"):
        K.decode_attention(**fp8, impl="test-pages16")
    K.decode_attention(**sixty_four)        # auto: another implementation takes it


@pytest.mark.parametrize("argument,value", [("paged", "16"), ("paged", (0,)), ("kv_dtypes", ("float9",))])
def test_registration_names_a_bad_declaration(argument, value):
    with pytest.raises(ValueError, match=rf"^{argument}:"):
        K.register_kernel("test-bad-declaration", decode=K.get("naive").decode, devices=("cpu",),
                          dtypes=(torch.float16,), **{argument: value})
    assert "test-bad-declaration" not in [i.name for i in K.implementations()]


def _valid():
    """Paged fp16 inputs: two sequences over six pages of 16 slots; the second uses one page."""
    gen = torch.Generator().manual_seed(1)
    return dict(q=torch.randn(2, 1, 4, HEAD_DIM, generator=gen).half(),
                k_cache=torch.randn(6, 16, 2, HEAD_DIM, generator=gen).half(),
                v_cache=torch.randn(6, 16, 2, HEAD_DIM, generator=gen).half(),
                cache_seqlens=torch.tensor([20, 5], dtype=torch.int32),
                block_table=torch.tensor([[3, 0], [5, 99]], dtype=torch.int32))


def _fp8(**changes):
    valid = _valid()
    return {**valid, "k_cache": valid["k_cache"].to(E4M3), "v_cache": valid["v_cache"].to(E4M3), **changes}


def _with(**changes):
    return dict(_valid(), **changes)


BAD = [
    ("block_table", TypeError, _with(block_table=[[3, 0], [5, 1]])),
    ("block_table", TypeError, _with(block_table=torch.tensor([[3, 0], [5, 1]]))),                 # int64
    ("block_table", ValueError, _with(block_table=torch.tensor([3, 0], dtype=torch.int32))),       # 1-D
    ("block_table", ValueError, _with(block_table=torch.zeros(3, 2, dtype=torch.int32))),          # batch 3
    ("block_table", ValueError, _with(block_table=torch.zeros(2, 2, dtype=torch.int32, device="meta"))),
    ("block_table", ValueError, _with(block_table=torch.tensor([[3, 6], [5, 1]], dtype=torch.int32))),   # used, 6
    ("block_table", ValueError, _with(block_table=torch.tensor([[3, 0], [-1, 1]], dtype=torch.int32))),  # used, -1
    ("block_table", ValueError, _with(cache_seqlens=torch.tensor([33, 5], dtype=torch.int32))),    # 2 x 16 < 33
    ("cache_seqlens", ValueError, _with(cache_seqlens=torch.tensor([-1, 5], dtype=torch.int32))),
    ("k_cache", ValueError, _with(k_cache=torch.zeros(6, 16, 2 * HEAD_DIM).half())),               # 3-D
    ("k_cache", ValueError, _with(k_cache=torch.zeros(6, 0, 2, HEAD_DIM).half(),
                                  v_cache=torch.zeros(6, 0, 2, HEAD_DIM).half())),                 # page size 0
    ("k_cache", ValueError, _with(k_cache=torch.zeros(6, 16, 3, HEAD_DIM).half(),
                                  v_cache=torch.zeros(6, 16, 3, HEAD_DIM).half())),                # 4 % 3 heads
    ("k_cache", ValueError, _with(k_cache=torch.zeros(6, 16, 2, 16).half(), v_cache=torch.zeros(6, 16, 2, 16).half())),
    ("k_cache", TypeError, _with(k_cache=torch.zeros(6, 16, 2, HEAD_DIM), v_cache=torch.zeros(6, 16, 2, HEAD_DIM))),
    ("k_cache", TypeError, _with(k_cache=torch.zeros(6, 16, 2, HEAD_DIM, dtype=torch.int8))),
    ("v_cache", ValueError, _with(v_cache=torch.zeros(5, 16, 2, HEAD_DIM).half())),
    ("v_cache", TypeError, _fp8(v_cache=torch.zeros(6, 16, 2, HEAD_DIM).to(E5M2))),                # e5m2 beside e4m3
    ("k_cache", ValueError, _fp8(k_cache=torch.zeros(3, 16, 2, HEAD_DIM).to(E4M3),
                                 v_cache=torch.zeros(3, 16, 2, HEAD_DIM).to(E4M3), block_table=None)),  # batch 3
    ("q", TypeError, _fp8(q=torch.zeros(2, 1, 4, HEAD_DIM).to(E4M3))),                              # fp8 q
    ("q", TypeError, _fp8(q=torch.zeros(2, 1, 4, HEAD_DIM, dtype=torch.float64))),                  # fp64 over fp8
    ("k_descale", ValueError, _with(k_descale=torch.ones(2, 2))),                                  # not an FP8 cache
    ("v_descale", ValueError, _with(v_descale=torch.ones(2, 2))),
    ("k_descale", TypeError, _fp8(k_descale=[[1.0, 1.0], [1.0, 1.0]])),
    ("k_descale", TypeError, _fp8(k_descale=torch.ones(2, 2, dtype=torch.float16))),
    ("k_descale", ValueError, _fp8(k_descale=torch.ones(2))),
    ("v_descale", ValueError, _fp8(v_descale=torch.ones(2, 4))),                                   # heads, not kv heads
    ("v_descale", ValueError, _fp8(v_descale=torch.ones(2, 2, device="meta"))),
    ("impl", ValueError, _with(impl="flash-attn")),                                                 # cuda only
]


@pytest.mark.parametrize("argument,error,kwargs", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_every_paged_and_fp8_error_names_its_argument(argument, error, kwargs):
    with pytest.raises(error, match=rf"^{argument}:"):
        K.decode_attention(**kwargs)
    with pytest.raises(error, match=rf"^{argument}:"):
        K.prepare_decode(**kwargs)


def test_table_entries_no_length_uses_are_never_checked_or_read():
    inputs = _valid()                                     # block_table[1, 1] = 99, past length 5's one page
    out = K.decode_attention(**inputs, impl="naive")
    expected = K.decode_attention(inputs["q"], gather_pages(inputs["k_cache"], inputs["block_table"], 32),
                                  gather_pages(inputs["v_cache"], inputs["block_table"], 32),
                                  inputs["cache_seqlens"], impl="naive")
    assert torch.equal(out, expected)


def test_the_table_and_descales_are_read_as_given_at_each_call():
    inputs = _fp8(k_descale=torch.ones(2, 2), v_descale=torch.ones(4, 2)[::2])     # a strided view
    inputs["block_table"] = inputs["block_table"].t().contiguous().t()             # column-major
    call = K.prepare_decode(**inputs, impl="naive")
    before = call()
    inputs["v_descale"].mul_(2.0)        # in place, as a caller rescales: the same call sees it
    assert torch.allclose(call().float(), 2 * before.float(), rtol=1e-3)


def test_gather_pages_and_dequantise():
    cache = torch.arange(4 * 2 * 1 * 1, dtype=torch.float32).view(4, 2, 1, 1)     # page p holds 2p, 2p + 1
    table = torch.tensor([[2, 0], [3, -5]], dtype=torch.int32)                   # -5: past every length
    assert gather_pages(cache, table, 3)[..., 0, 0].tolist() == [[4, 5, 0], [6, 7, 0]]
    assert gather_pages(cache, table, 0).shape == (2, 0, 1, 1)
    stored = torch.tensor([1.5, -2.0]).to(E4M3).view(1, 2, 1, 1).expand(2, 2, 1, 1)
    descale = torch.tensor([[2.0], [0.25]])
    assert dequantise(stored, descale, torch.float16)[..., 0, 0].tolist() == [[3.0, -4.0], [0.375, -0.5]]
    assert dequantise(stored, None, torch.float32).dtype == torch.float32


def test_rowcheck_reads_pages_and_descales():
    inputs = make_inputs(CASES["p64-q3-e4m3-softcap-mqa"], torch.float16)
    right = K.decode_attention(**inputs, softcap=2.0, impl="naive")
    scale = HEAD_DIM ** -0.5
    assert check_decode(right, **inputs, scale=scale, softcap=2.0).ok
    no_descale = K.decode_attention(**dict(inputs, k_descale=None, v_descale=None), softcap=2.0, impl="naive")
    assert not check_decode(no_descale, **inputs, scale=scale, softcap=2.0).ok


def test_the_selfcheck_holds_paged_and_fp8_cases():
    from attnlab.kernels.selfcheck import cases

    paged = [case for case in cases("cpu", torch.float16) if case.page_size]
    verdicts = [case.judge(case.call("sdpa-math", case.inputs)) for case in paged]
    assert len(paged) == 2 and {case.kv_dtype for case in paged} == {None, E4M3}
    assert all(v.ok for v in verdicts), [v.describe() for v in verdicts]
