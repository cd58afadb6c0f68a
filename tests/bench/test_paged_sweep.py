"""Decode as servers run it: paged caches, 8-bit caches with descales, ragged lengths, in the sweep's
points, inputs, records and flags, and in the end-to-end decoder."""
import json
import math
from pathlib import Path

import pytest
import torch

from attnlab.bench import e2e
from attnlab.bench.model import Decoder, StaticDecoder
from attnlab.bench.point_call import check_cached, decode_inputs
from attnlab.bench.workloads import (DecodeCache, bytes_moved, cache_lengths, kv_dtype_name, parse_lengths,
                                     point_key, preset)
from attnlab.cli import main
from attnlab.kernels import registry
from attnlab.kernels.impls import naive
from attnlab.models import PRESETS, predicted_bytes
from attnlab.schema import point_defaults

SMALL = preset("cpu-small").override(batch=4)
FP8_PAGED_RAGGED = DecodeCache(page_size=64, kv_dtype="fp8_e4m3", lengths="ragged:uniform:0.25", lengths_seed=3)


def test_lengths_and_cache_dtypes_parse_to_one_spelling_and_refuse_naming_the_argument():
    assert parse_lengths("ragged") == "ragged:uniform:0.5" and parse_lengths("Equal") == "equal"
    assert parse_lengths("ragged:uniform:0.250") == "ragged:uniform:0.25"
    for bad in ("ragged:uniform:0", "ragged:uniform:1.5", "ragged:zipf:1", "uneven"):
        with pytest.raises(ValueError, match="^lengths: expected equal, ragged"):
            parse_lengths(bad)
    assert kv_dtype_name("fp8_e4m3") == "float8_e4m3fn" and kv_dtype_name(torch.float8_e5m2) == "float8_e5m2"
    assert kv_dtype_name("bf16") == "bfloat16"
    with pytest.raises(ValueError, match="^kv_dtype: expected fp8_e4m3"):
        kv_dtype_name("int4")
    with pytest.raises(ValueError, match="^page_size"):
        DecodeCache(page_size=-1)


def test_ragged_lengths_are_seeded_and_within_the_context():
    lengths = cache_lengths("ragged:uniform:0.25", 1000, 64, seed=3)
    assert lengths == cache_lengths("ragged:uniform:0.25", 1000, 64, seed=3) != cache_lengths("ragged", 1000, 64, 4)
    assert 250 <= min(lengths) < max(lengths) <= 1000
    assert cache_lengths("equal", 1000, 3) == [1000] * 3


def test_decode_bytes_count_the_real_lengths_in_the_caches_dtype_with_descales():
    point = SMALL.point("naive", "decode", 1024, FP8_PAGED_RAGGED)
    assert (point.page_size, point.kv_dtype, point.lengths_seed) == (64, "float8_e4m3fn", 3)
    q_and_out = 2 * 4 * 1 * 8 * 64 * 4                      # float32 queries and output
    keys = sum(point.cache_lengths())
    assert keys < 4 * 1024
    assert bytes_moved(point) == q_and_out + 2 * keys * 2 * 64 * 1 + 2 * 4 * 2 * 4
    assert SMALL.point("naive", "prefill", 1024, FP8_PAGED_RAGGED).kv_dtype == "float32"     # decode only


def test_older_records_take_a_contiguous_cache_of_their_dtype_with_equal_lengths():
    record = {"mode": "decode", "dtype": "bfloat16", "device": "cpu", "kernel": "naive", "seq_len": 512}
    defaults = point_defaults(record)
    assert (defaults["page_size"], defaults["kv_dtype"], defaults["lengths"], defaults["lengths_seed"]) == \
        (0, "bfloat16", "equal", 0)
    point = SMALL.point("naive", "decode", 512)
    older = {k: v for k, v in point.fields().items() if k not in ("page_size", "kv_dtype", "lengths", "lengths_seed")}
    assert point_key(older) == point.key()


def test_paged_inputs_shuffle_pages_and_read_back_the_values_their_descales_scale():
    point = SMALL.point("naive", "decode", 512, FP8_PAGED_RAGGED)
    inputs = decode_inputs(point, "cpu")
    table, lengths = inputs["block_table"], inputs["cache_seqlens"].tolist()
    pages = [math.ceil(n / 64) for n in lengths]
    assert inputs["k_cache"].shape == (sum(pages), 64, 2, 64) and inputs["k_cache"].dtype == torch.float8_e4m3fn
    used = torch.cat([table[b, :n] for b, n in enumerate(pages)])
    assert sorted(used.tolist()) == list(range(sum(pages))) and used.tolist() != sorted(used.tolist())
    assert inputs["k_descale"].shape == (4, 2) and inputs["k_descale"].unique().numel() == 8
    first = table[1, :pages[1]].long()
    k = inputs["k_cache"][first].flatten(0, 1)[None, :lengths[1]].float() * inputs["k_descale"][1][None, None, :, None]
    # The descales use the format's range (448 for e4m3) over the whole cache, this length's share of it nearly.
    stored = k.abs().amax(dim=(0, 1, 3)).div(inputs["k_descale"][1])
    assert (stored <= 448 * (1 + 1e-6)).all() and (stored > 448 / 4).all()


def _attend(inputs, descale=True, pages=True):
    """decode over `inputs` by way of naive, optionally ignoring the descales or the block table."""
    table = inputs["block_table"]
    if not pages:
        table = torch.arange(table.numel(), dtype=torch.int32).view(table.shape) % inputs["k_cache"].shape[0]
    scales = dict(k_descale=inputs["k_descale"], v_descale=inputs["v_descale"]) if descale else {}
    return naive.decode(inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["cache_seqlens"], 64 ** -0.5,
                        block_table=table, **scales)


@pytest.mark.slow
def test_the_check_reads_pages_and_descales_so_a_kernel_that_ignores_either_is_wrong():
    inputs = decode_inputs(SMALL.point("naive", "decode", 256, FP8_PAGED_RAGGED), "cpu")
    assert check_cached(_attend(inputs), inputs, scale=64 ** -0.5).ok
    assert not check_cached(_attend(inputs, descale=False), inputs, scale=64 ** -0.5).ok
    assert not check_cached(_attend(inputs, pages=False), inputs, scale=64 ** -0.5).ok


def _records(path):
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("mode") == "decode"]


@pytest.mark.slow
def test_sweep_writes_paged_fp8_ragged_records_checked_against_float64(tmp_path):
    out = tmp_path / "pg.jsonl"
    assert main(["sweep", "--modes", "decode", "--page-size", "64", "--kv-dtype", "fp8_e4m3", "--lengths",
                 "ragged:uniform:0.25", "--lengths-seed", "3", "--workload", "cpu-small", "--batch", "4", "--device",
                 "cpu", "--kernels", "naive", "--seq-lens", "256,512", "--rounds", "1", "--out", str(out)]) == 0
    records = _records(out)
    assert [r["status"] for r in records] == ["ok", "ok"]
    for r in records:
        point = SMALL.point("naive", "decode", r["seq_len"], FP8_PAGED_RAGGED)
        assert (r["page_size"], r["kv_dtype"], r["lengths"], r["lengths_seed"]) == \
            (64, "float8_e4m3fn", "ragged:uniform:0.25", 3)
        lengths = sorted(point.cache_lengths())
        assert (r["lengths_min"], r["lengths_median"], r["lengths_max"]) == (lengths[0], lengths[1], lengths[-1])
        assert r["pages"] == sum(math.ceil(n / 64) for n in lengths) and r["bytes"] == bytes_moved(point)
        assert r["check_error"] <= r["check_bound"] and r["check_rows"] > 0
    pytest.importorskip("pandas")
    from attnlab.analysis.load import load
    rows = load(out).results
    assert set(rows["kv_dtype"]) == {"float8_e4m3fn"} and set(rows["page_size"]) == {64}


def test_a_kernel_that_ignores_the_descales_is_recorded_wrong(tmp_path, monkeypatch):
    def no_descale(q, k_cache, v_cache, cache_seqlens, scale, k_descale=None, v_descale=None, **options):
        return naive.decode(q, k_cache, v_cache, cache_seqlens, scale, **options)
    registry.register_kernel("test-no-descale", decode=no_descale, description="test only", dtypes=(torch.float32,),
                             devices=("cpu",), paged=True, kv_dtypes=(torch.float8_e4m3fn,))
    try:
        out = tmp_path / "wrong.jsonl"
        main(["sweep", "--modes", "decode", "--kv-dtype", "fp8_e4m3", "--page-size", "16", "--device", "cpu",
              "--workload", "cpu-small", "--kernels", "test-no-descale", "--seq-lens", "256", "--rounds", "1",
              "--out", str(out)])
        (record,) = _records(out)
        assert record["status"] == "wrong" and "wrong output" in record["reason"]
    finally:
        registry.unregister("test-no-descale")


@pytest.mark.parametrize("flags, named", [
    (["--page-size", "-3"], "--page-size"), (["--kv-dtype", "int4"], "--kv-dtype"),
    (["--lengths", "ragged:uniform:2"], "--lengths"), (["--modes", "prefill", "--page-size", "16"], "--page-size"),
    (["--modes", "prefill", "--lengths", "ragged"], "--lengths"),
])
def test_cache_flags_are_refused_naming_the_flag(flags, named, tmp_path, capsys):
    try:
        code = main(["sweep", "--device", "cpu", "--kernels", "naive", *flags, "--out", str(tmp_path / "x.jsonl")])
    except SystemExit as exc:
        code = exc.code
    assert code == 2 and named in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


def test_a_paged_decoder_decodes_as_the_contiguous_one_does():
    """From empty caches, the same steps give the same logits whether K and V live in pages of 4
    tokens in shuffled order or in one contiguous cache: each write lands where the table says."""
    tiny = PRESETS["tiny"]
    logits = {}
    for page_size in (0, 4):
        model = Decoder(tiny, "cpu", torch.float32, seed=2, page_size=page_size)
        decoder = StaticDecoder(model, model.new_cache(2, 9), "naive")
        decoder.reset(0)
        logits[page_size] = torch.stack([decoder.step().clone() for _ in range(6)])
        assert (decoder.cache.block_table is None) == (page_size == 0)
    torch.testing.assert_close(logits[4], logits[0], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_e2e_with_an_fp8_paged_cache_records_its_cache_and_plans_with_its_bytes(tmp_path):
    # triton-decode reads pages and 8-bit values in the kernel; naive gathers them into a float32 copy.
    tiny, attention = PRESETS["tiny"], registry.get("triton-decode").attention_memory("cpu")
    budget = predicted_bytes(tiny, 6, 48, 4, attention=attention, dtype_bytes=4, graph=False)
    options = dict(model="tiny", device="cpu", seq_lens=(48,), decode_tokens=4, warmup_steps=1,
                   cuda_graph=False, mem_budget_bytes=budget)
    plain = next(e2e.run(e2e.E2EOptions(**options, kernel="triton-decode")))
    (record,) = e2e.run(e2e.E2EOptions(**options, kernel="triton-decode", kv_dtype="fp8_e4m3", page_size=16))
    (gathered,) = e2e.run(e2e.E2EOptions(**options, kernel="naive", kv_dtype="fp8_e4m3", page_size=16))
    assert plain["status"] == record["status"] == gathered["status"] == "ok"
    assert (record["kv_dtype"], record["page_size"], record["kv_bytes_per_token"]) == \
        ("float8_e4m3fn", 16, plain["kv_bytes_per_token"] // 4)
    assert record["batch"] > plain["batch"] == 6     # a byte per cached element, not four
    assert gathered["batch"] < record["batch"] and gathered["attention_gathers_cache"]
    with pytest.raises(ValueError, match="^with_prefill"):
        e2e.E2EOptions(**options, kv_dtype="fp8_e4m3", with_prefill=True).resolved()


def test_the_decode_suite_measures_pages_fp8_ragged_lengths_and_the_served_model_with_fp8(tmp_path):
    import shlex

    from attnlab.cli import build_parser
    from attnlab.kernels import get
    from paths import ROOT
    from test_suites import dry_run

    steps = dry_run("decode_suite.sh", tmp_path)
    args = {name: build_parser().parse_args(shlex.split(command)[3:]) for name, command in steps.items()
            if command.startswith("python3 -m attnlab sweep ") or command.startswith("python3 -m attnlab e2e ")}
    for parsed in args.values():
        assert not Path(parsed.out).is_relative_to(ROOT)
        for kernel in parsed.kernels:
            get(kernel)
    assert {args[f"paged-{n}"].page_size for n in (16, 64, 256)} == {16, 64, 256}
    assert args["paged-contiguous"].page_size is None
    assert args["fp8"].kv_dtype == "float8_e4m3fn" and args["fp8-bf16"].kv_dtype is None
    assert args["fp8"].seq_lens == args["fp8-bf16"].seq_lens and 131072 in args["fp8"].seq_lens
    assert args["ragged"].lengths == "ragged:uniform:0.25" and args["ragged-equal"].lengths is None
    assert (args["e2e-fp8"].kv_dtype, args["e2e-fp8"].seq_lens) == ("float8_e4m3fn", [1024, 122880])
    assert args["e2e-bf16"].kv_dtype is None and args["e2e-bf16"].seq_lens == [1024, 122880]
