"""The end-to-end decoder on a CPU: logits against a float64 reference, the memory model,
the records it writes, and what happens on out-of-memory, errors and a spent budget."""
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from attnlab import kernels, models
from attnlab.bench import e2e, model as model_lib
from attnlab.bench.model import Decoder, StaticDecoder
from attnlab.models import largest_batch, predicted_bytes, sequence_bytes

TINY = models.preset("tiny")
DECODE_IMPLS = ("naive", "sdpa-math", "sdpa-flash", "triton-decode")
GiB = 2**30


def reference_logits(weights, config, tokens):
    """Plain float64 forward over whole sequences, no cache: tokens (batch, seqlen) -> logits
    (batch, seqlen, vocab). Rotary in the rotate-half convention; causal softmax attention."""
    d = torch.float64
    batch, seqlen = tokens.shape
    heads, kv_heads, head_dim = config.heads, config.kv_heads, config.head_dim
    half = head_dim // 2
    freqs = config.rope_theta ** (-torch.arange(half, dtype=d) / half)
    angles = torch.arange(seqlen, dtype=d)[:, None] * freqs
    cos, sin = angles.cos()[None, :, None], angles.sin()[None, :, None]

    def rotate(t):
        a, b = t[..., :half], t[..., half:]
        return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)

    def norm(t, g):
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + config.norm_eps) * g.to(d)

    future = torch.ones(seqlen, seqlen, dtype=torch.bool).triu(1)
    x = weights.embed.to(d)[tokens]
    for layer in weights.layers:
        qkv = norm(x, layer.attn_norm) @ layer.qkv.to(d).T
        q, k, v = qkv.split((heads * head_dim, kv_heads * head_dim, kv_heads * head_dim), dim=-1)
        q = rotate(q.reshape(batch, seqlen, heads, head_dim))
        k = rotate(k.reshape(batch, seqlen, kv_heads, head_dim)).repeat_interleave(heads // kv_heads, 2)
        v = v.reshape(batch, seqlen, kv_heads, head_dim).repeat_interleave(heads // kv_heads, 2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        probs = scores.masked_fill(future, float("-inf")).softmax(-1)
        x = x + torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, seqlen, -1) @ layer.out.to(d).T
        gate, up = (norm(x, layer.mlp_norm) @ layer.gate_up.to(d).T).chunk(2, dim=-1)
        x = x + (F.silu(gate) * up) @ layer.down.to(d).T
    return norm(x, weights.norm) @ weights.lm_head.to(d).T


def _available_on_cpu(name):
    try:
        impl = kernels.get(name)
    except ValueError:
        return False
    return bool(impl.available("cpu")) and bool(impl.supports("decode", torch.float32, TINY.head_dim, "cpu"))


@pytest.mark.parametrize("impl", DECODE_IMPLS)
def test_tiny_decoder_matches_float64_reference(impl):
    if not _available_on_cpu(impl):
        pytest.skip(f"{impl} does not decode on this CPU")
    model = Decoder(TINY, "cpu", torch.float32, seed=3)
    batch, prompt, steps = 2, 37, 4
    tokens = torch.randint(0, TINY.vocab, (batch, prompt), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache(batch, prompt + steps)
    prefill_impl = model_lib.resolve_prefill(torch.empty(1, 1, TINY.heads, TINY.head_dim), impl)
    first = model.prefill(tokens, cache, impl=prefill_impl)
    decoder = StaticDecoder(model, cache, impl)
    decoder.reset(prompt, first.argmax(-1))
    seen, logits = [tokens, first.argmax(-1)[:, None]], [first]
    for _ in range(steps - 1):
        logits.append(decoder.step().clone())
        seen.append(decoder.tokens.clone()[:, None])
    assert decoder.attention.name == impl
    reference = reference_logits(model.weights, TINY, torch.cat(seen, dim=1))[:, prompt - 1:prompt - 1 + steps]
    got = torch.stack(logits, dim=1).double()
    assert got.shape == reference.shape == (batch, steps, TINY.vocab)
    tolerance = 1e-4 * reference.abs().max().item()
    assert (got - reference).abs().max().item() <= tolerance
    # Distinct logits per step: the decoder really advanced (a stale cache would not).
    assert (got[:, 1:] - got[:, :-1]).abs().max().item() > 100 * tolerance


def test_chunked_prefill_equals_whole_prefill():
    model = Decoder(TINY, "cpu", torch.float32, seed=4)
    tokens = torch.randint(0, TINY.vocab, (3, 29), generator=torch.Generator().manual_seed(2))
    whole, chunked = model.new_cache(3, 32), model.new_cache(3, 32)
    expected = model.prefill(tokens, whole, impl="sdpa-math")
    # 10-token chunks: one sequence at a time, its positions in three bottom-right causal pieces.
    got = model.prefill(tokens, chunked, impl="sdpa-math", chunk_tokens=10)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.data, whole.data, atol=1e-5, rtol=1e-5)
    assert whole.data[:, :, :, 29:].abs().max() == 0 < whole.data[:, :, :, 28].abs().max()


def test_weights_match_the_parameter_count_of_the_shapes():
    llama = models.preset("llama3-8b")
    assert llama.param_count() == 8_030_261_248
    assert llama.kv_bytes_per_token(dtype_bytes=2) == 128 * 1024
    assert models.preset("llama3.2-1b").param_count() == 1_235_814_400
    for config in (TINY, dataclasses.replace(TINY, tied_embeddings=True)):
        weights = model_lib.random_weights(config, "cpu", torch.float32)
        assert sum(t.numel() for t in weights.tensors()) == config.param_count()
        first = weights.layers[0]
        shapes = [tuple(getattr(first, g.name).shape) for g in config.layer_gemms()]
        assert shapes == [(g.out_features, g.in_features) for g in config.layer_gemms()]
    with pytest.raises(ValueError, match="preset"):
        models.preset("llama9")


# A split-KV kernel captured in a CUDA graph, in bf16: what e2e plans for triton-decode on a GPU.
TRITON_DECODE = dict(attention=models.AttentionMemory(), dtype_bytes=2, graph=True)


@pytest.mark.parametrize("seq_len,budget_gib,expected", [
    (1024, 78, (300, 600)),      # an H100 80GB with weights resident: several hundred
    (131072, 78, (3, 3)),        # 16 GiB of KV per sequence: three
    (131072, 30, (0, 0)),        # 15 GiB of weights leave less than one sequence
    (1024, 14, (0, 0)),          # not even the weights
])
def test_largest_batch_is_the_memory_models_edge(seq_len, budget_gib, expected):
    llama = models.preset("llama3-8b")
    budget = int(budget_gib * GiB)
    batch = largest_batch(llama, seq_len, 128, budget, **TRITON_DECODE)
    assert expected[0] <= batch <= expected[1]
    assert predicted_bytes(llama, batch + 1, seq_len, 128, **TRITON_DECODE) > budget
    if batch:
        assert predicted_bytes(llama, batch, seq_len, 128, **TRITON_DECODE) <= budget
        # Nearly all of a sequence's bytes are its KV cache for seq_len + the new tokens.
        kv = (seq_len + 128) * llama.kv_bytes_per_token(dtype_bytes=2)
        assert kv <= sequence_bytes(llama, seq_len, 128, **TRITON_DECODE) < 1.02 * kv


def test_memory_model_charges_expanded_kv_and_prefill():
    llama, budget = models.preset("llama3-8b"), 78 * GiB
    naive, triton = (kernels.get(name).attention_memory("cuda") for name in ("naive", "triton"))
    split_kv = largest_batch(llama, 32768, 128, budget, **TRITON_DECODE)
    expanded = largest_batch(llama, 32768, 128, budget, **{**TRITON_DECODE, "attention": naive})
    with_prefill = largest_batch(llama, 32768, 128, budget, **TRITON_DECODE, prefill_attention=triton)
    assert expanded < split_kv and with_prefill <= split_kv
    # naive's prefill score matrix at 128k cannot fit beside anything.
    assert largest_batch(llama, 131072, 128, budget, **TRITON_DECODE, prefill_attention=naive) == 0


def _options(**overrides):
    base = dict(model="tiny", kernel="naive", seq_lens=(32, 64), batch=2, decode_tokens=4,
                warmup_steps=1, device="cpu", dtype="float32")
    return e2e.E2EOptions(**{**base, **overrides})


def test_records_follow_the_sweep_schema(tmp_path):
    from attnlab.bench import records

    rows = list(e2e.run(_options()))
    path = tmp_path / "e2e.jsonl"
    with records.RecordWriter(path) as writer:
        for row in rows:
            writer.write(row)
    back = [r for r in records.read_records(path) if r.get("schema") == records.SCHEMA]
    assert len(back) == 2
    for row in back:
        assert set(records.FIELDS) <= set(row)
        assert row["schema"] == records.SCHEMA and row["status"] == "ok", row["reason"]
        assert row["mode"] == e2e.MODE_DECODE and row["workload"] == row["model"] == "tiny"
        assert row["kernel"] == "naive" and row["q_len"] == 1 and row["causal"] is True
        assert len(row["times_ms"]) == row["decode_tokens"] == 4
        assert row["tokens_per_s"] == pytest.approx(row["batch"] * 4 / (sum(row["times_ms"]) / 1e3))
        assert row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
        assert row["cuda_graph"] is False and row["flops"] > 0 and row["bytes"] > 0
        assert row["mem_budget_bytes"] is None     # a fixed batch is not planned
    assert [r["seq_len"] for r in back] == [32, 64]
    json.dumps(back)


def test_prefill_is_timed_and_counted(tmp_path):
    (row,) = e2e.run(_options(seq_lens=(48,), with_prefill=True, kernel="triton-decode"))
    assert row["status"] == "ok", row["reason"]
    assert row["mode"] == e2e.MODE_PREFILL_DECODE
    assert row["kernel"] == "triton-decode" and row["prefill_kernel"] != "triton-decode"
    assert row["prefill_ms"] > 0
    assert row["tokens_per_s"] < row["decode_tokens_per_s"]


# naive on a CPU in float32: what the CPU runs below plan for (never captured in a graph).
NAIVE_ON_CPU = dict(attention=kernels.get("naive").attention_memory("cpu"), dtype_bytes=4, graph=False)


def test_largest_batch_is_planned_from_a_budget():
    budget = predicted_bytes(TINY, 5, 32, 4, **NAIVE_ON_CPU) + 10
    (row,) = e2e.run(_options(seq_lens=(32,), batch=None, mem_budget_bytes=budget))
    assert row["status"] == "ok" and row["batch"] == 5 and row["mem_budget_bytes"] == budget
    assert row["predicted_mem_bytes"] == predicted_bytes(TINY, 5, 32, 4, **NAIVE_ON_CPU)
    assert row["attention_expands_kv"] is True and row["attention_fp32_scores"] is True
    assert row["cuda_graph"] is False


def _failing_cache(limit):
    """A new_cache that runs out of memory when limit(batch, max_seqlen) says so."""
    original = Decoder.new_cache

    def new_cache(self, batch, max_seqlen):
        if limit(batch, max_seqlen):
            raise torch.OutOfMemoryError(f"out of memory: batch {batch}, max_seqlen {max_seqlen}")
        return original(self, batch, max_seqlen)
    return new_cache


def test_out_of_memory_shrinks_the_planned_batch(monkeypatch):
    monkeypatch.setattr(Decoder, "new_cache", _failing_cache(lambda batch, _: batch > 3))
    budget = predicted_bytes(TINY, 12, 32, 4, **NAIVE_ON_CPU)
    (row,) = e2e.run(_options(seq_lens=(32,), batch=None, mem_budget_bytes=budget))
    assert row["status"] == "ok" and row["batch"] == 3


def test_out_of_memory_at_one_length_is_recorded_and_the_run_goes_on(monkeypatch):
    monkeypatch.setattr(Decoder, "new_cache", _failing_cache(lambda _, max_seqlen: max_seqlen > 100))
    rows = list(e2e.run(_options(seq_lens=(32, 128, 48))))
    assert [r["status"] for r in rows] == ["ok", "oom", "ok"]
    assert "out of memory" in rows[1]["reason"] and rows[1]["tokens_per_s"] is None
    assert rows[1]["batch"] == 2    # a fixed batch is not shrunk


def test_an_error_is_recorded_and_a_spent_budget_skips(monkeypatch):
    def broken(*args):
        raise RuntimeError("kernel exploded")
    monkeypatch.setattr(e2e, "time_decode", broken)
    ticks = iter(range(100))
    rows = list(e2e.run(_options(seq_lens=(32, 64, 96), budget_s=2.5), clock=lambda: next(ticks)))
    assert [r["status"] for r in rows] == ["error", "error", "skipped"]
    assert "kernel exploded" in rows[0]["reason"] and "budget" in rows[2]["reason"]


def test_a_decoder_on_wrong_attention_is_recorded_wrong_and_not_timed():
    from attnlab.kernels import registry
    from attnlab.kernels.impls import naive

    registry.register_kernel("test-wrong-decode", decode=lambda q, k, v, lens, scale: naive.decode(q, k, v, lens, scale)
                             * 1.5, description="test only", dtypes=(torch.float32,), devices=("cpu",))
    try:
        (wrong,) = e2e.run(_options(seq_lens=(32,), kernel="test-wrong-decode"))
    finally:
        registry.unregister("test-wrong-decode")
    assert wrong["status"] == "wrong" and wrong["reason"].startswith("wrong output: test-wrong-decode: max error")
    assert wrong["check_error"] > wrong["check_bound"] > 0 and wrong["tokens_per_s"] is None
    assert wrong["check_rows"] > 0
    (right,) = e2e.run(_options(seq_lens=(32,)))
    assert right["status"] == "ok"


def test_static_decoder_guards_its_cache_and_stays_eager_on_cpu():
    model = Decoder(TINY, "cpu", torch.float32)
    decoder = StaticDecoder(model, model.new_cache(1, 4), "naive")
    assert decoder.capture(2) is False and "CUDA" in decoder.graph_reason
    decoder.reset(2)
    decoder.step(), decoder.step()
    with pytest.raises(ValueError, match="cache is full"):
        decoder.step()
    with pytest.raises(ValueError, match="seq_len"):
        decoder.reset(4)


def test_options_name_the_bad_argument():
    with pytest.raises(ValueError, match="decode_tokens"):
        _options(decode_tokens=0).resolved()
    with pytest.raises(ValueError, match="impl"):
        list(e2e.run(_options(kernel="no-such-kernel")))
    assert _options(model=None, batch=None, dtype=None).resolved().batch == e2e.CPU_BATCH


def test_cli_writes_environment_and_records(tmp_path, capsys):
    from attnlab.cli import e2e as cli_e2e
    from attnlab.cli import main

    assert list(cli_e2e.parse_seq_lens("1k, 2k,100")) == [1024, 2048, 100]
    out = tmp_path / "run.jsonl"
    assert main(["e2e", "--device", "cpu", "--kernels", "sdpa-math", "--seq-lens", "16,32",
                 "--decode-tokens", "3", "--batch", "2", "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["schema"] == "attnlab.environment/1"
    assert [r["seq_len"] for r in lines[1:]] == [16, 32]
    assert all(r["kernel"] == "sdpa-math" and r["status"] == "ok" for r in lines[1:])
    assert "tok/s" in capsys.readouterr().out


def test_cli_measures_each_kernel_in_turn_into_one_file(tmp_path, capsys, monkeypatch):
    from attnlab.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["e2e", "--device", "cpu", "--kernels", "naive,sdpa-math", "--seq-lens", "16,32",
                 "--decode-tokens", "2", "--batch", "1", "--warmup-steps", "0"]) == 0
    out = tmp_path / "e2e-tiny.jsonl"      # several kernels: the file is named by the model alone
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    environments = [r for r in lines if r["schema"] == "attnlab.environment/1"]
    records = [r for r in lines if r["schema"] != "attnlab.environment/1"]
    assert len(environments) == 1
    assert [(r["kernel"], r["seq_len"]) for r in records] == [("naive", 16), ("naive", 32),
                                                              ("sdpa-math", 16), ("sdpa-math", 32)]
    assert len({r["run_id"] for r in records}) == 1 and all(r["status"] == "ok" for r in records)
    printed = capsys.readouterr().out
    assert "tiny / naive on" in printed and "tiny / sdpa-math on" in printed


def test_cli_names_a_single_kernels_file_by_model_and_kernel(tmp_path, monkeypatch):
    from attnlab.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["e2e", "--device", "cpu", "--model", "tiny", "--kernels", "naive", "--seq-lens", "16",
                 "--decode-tokens", "1", "--batch", "1", "--warmup-steps", "0"]) == 0
    assert [p.name for p in tmp_path.glob("*.jsonl")] == ["e2e-tiny-naive.jsonl"]


def test_cli_refuses_an_unknown_kernel_before_writing(tmp_path, capsys):
    from attnlab.cli import main

    out = tmp_path / "run.jsonl"
    assert main(["e2e", "--device", "cpu", "--kernels", "naive,no-such-kernel", "--seq-lens", "16",
                 "--out", str(out)]) == 2
    assert "no-such-kernel" in capsys.readouterr().err and not out.exists()


def test_a_spent_budget_skips_every_kernels_lengths(tmp_path):
    from attnlab.cli import main

    out = tmp_path / "run.jsonl"
    assert main(["e2e", "--device", "cpu", "--kernels", "naive,sdpa-math", "--seq-lens", "16,32",
                 "--decode-tokens", "1", "--batch", "1", "--budget-s", "0", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()][1:]
    assert [r["status"] for r in records] == ["skipped"] * 4


def test_e2e_help_names_model_and_kernels(capsys):
    from attnlab.cli import main

    with pytest.raises(SystemExit):
        main(["e2e", "--help"])
    text = capsys.readouterr().out
    assert "--model" in text and "--kernels" in text and "--prefill-kernel" in text
    assert "--preset" not in text and "--attention" not in text and "--prefill-attention" not in text


# --- on a GPU ----------------------------------------------------------------------------------

def _graph_and_eager_logits(impl, steps=3):
    """Logits of the same steps from a captured decoder and an eager one over equal caches."""
    model = Decoder(TINY, "cuda", torch.bfloat16, seed=5)
    results = []
    for graph in (True, False):
        cache = model.new_cache(3, 64 + steps)
        cache.fill_random(seed=7)
        decoder = StaticDecoder(model, cache, impl)
        if graph:
            decoder.capture(64, warmup_steps=2)
        decoder.reset(64, torch.tensor([1, 2, 3], device="cuda"))
        results.append((decoder, torch.stack([decoder.step().float().clone() for _ in range(steps)])))
    return results


@pytest.mark.gpu
def test_triton_decode_is_captured_and_replays_like_eager():
    (graphed, graph_logits), (eager, eager_logits) = _graph_and_eager_logits("triton-decode")
    assert graphed.cuda_graph and not eager.cuda_graph
    torch.testing.assert_close(graph_logits, eager_logits, atol=5e-2, rtol=2e-2)
    assert int(graphed.lengths[0]) == 64 + 3


@pytest.mark.gpu
def test_host_syncing_implementations_stay_eager_and_say_why():
    model = Decoder(TINY, "cuda", torch.bfloat16)
    decoder = StaticDecoder(model, model.new_cache(2, 40), "sdpa-math")
    assert decoder.capture(32) is False and "host" in decoder.graph_reason


@pytest.mark.gpu
def test_e2e_on_a_gpu_plans_fills_and_captures():
    rows = list(e2e.run(e2e.E2EOptions(model="tiny", kernel="triton-decode", seq_lens=(1024, 4096),
                                       decode_tokens=8, device="cuda", mem_budget_bytes=512 * 2**20)))
    for row in rows:
        assert row["status"] == "ok", row["reason"]
        assert row["cuda_graph"] is True and row["batch"] >= 1
        assert row["peak_mem_bytes"] <= row["predicted_mem_bytes"]
    assert rows[0]["batch"] > rows[1]["batch"]


@pytest.mark.parametrize("flag,value", [("--batch", "0"), ("--decode-tokens", "-3"), ("--budget-s", "-1")])
def test_e2e_rejects_bad_numbers_by_name(flag, value, capsys):
    from attnlab.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["e2e", flag, value])
    assert exit_info.value.code == 2 and flag in capsys.readouterr().err
