"""End to end: output tokens/s of a Llama-shaped decoder against context length.

For each context length: the largest batch that fits (from the shapes and the cache's real
bytes per token, confirmed by allocating, shrunk on out-of-memory) or a fixed one, a KV cache
of seq_len + decode_tokens positions per sequence (contiguous, or in pages of `page_size`
tokens; in the model's dtype or 8-bit with descales, `kv_dtype`) filled with random values
(or, contiguous and in the model's dtype, by a timed prefill), warm-up and CUDA
graph capture, then `decode_tokens` greedy decode steps timed one by one. One record per
length, in the sweep's format (bench/records.py), with mode `e2e-decode` or
`e2e-prefill-decode`. An out-of-memory or an error at one length becomes that length's
record and the run goes on.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from attnlab import kernels, models
from attnlab.bench.device import check_device, hand_back_cache, peak_memory_bytes, reset_peak_memory, synchronize
from attnlab.bench.model import Decoder, StaticDecoder, WrongOutput, resolve_prefill, why_not_captured
from attnlab.bench.nvml import NvmlSampler
from attnlab.bench.outcomes import first_line, wrong_fields
from attnlab.bench.records import device_name, new_record, new_run_id
from attnlab.bench.timer import Timing
from attnlab.bench.workloads import CPU_SEQ_LENS, KV_DTYPES, LONG_SEQ_LENS, kv_dtype_name
from attnlab.schema import EQUAL_LENGTHS, E2E_DECODE as MODE_DECODE, E2E_PREFILL_DECODE as MODE_PREFILL_DECODE
from attnlab.schema import ERROR, OK, OOM, SKIPPED

DEFAULT_SEQ_LENS = LONG_SEQ_LENS            # 1k .. 128k, as the sweep
CPU_BATCH = 4            # on a CPU memory is not what the experiment studies: a small fixed batch
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class E2EOptions:
    """What `run` measures. None means: chosen for the device (see `resolved`)."""

    model: str | None = None                  # attnlab.models preset: llama3-8b on CUDA, tiny on a CPU
    kernel: str = "auto"                      # decode implementation, by registry name
    prefill_kernel: str = "auto"              # used when `kernel` serves no prefill
    seq_lens: Sequence[int] | None = None
    batch: int | None = None                  # fixed batch; None: the largest that fits
    decode_tokens: int = 128
    warmup_steps: int = 3
    with_prefill: bool = False
    device: str | None = None                 # cuda if present, else cpu
    dtype: str | None = None                  # bfloat16 on CUDA, float32 on a CPU
    kv_dtype: str | None = None               # the cache's: dtype, or float8_e4m3fn / float8_e5m2 (fp8_e4m3, ...)
    page_size: int = 0                        # tokens per page of a paged cache; 0: contiguous
    budget_s: float | None = None             # stop starting lengths once spent
    mem_budget_bytes: int | None = None       # plan within this instead of free device memory
    cuda_graph: bool = True
    seed: int = 0
    nvml_csv: str | None = None               # raw NVML samples go here, where NVML runs
    run_id: str = field(default_factory=new_run_id)

    def resolved(self) -> "E2EOptions":
        """A copy with every None filled in for the device, and the arguments checked."""
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        cpu = check_device(device).type == "cpu"
        out = E2EOptions(**{**vars(self), "device": device})
        out.model = self.model or ("tiny" if cpu else models.DEFAULT_MODEL)
        out.seq_lens = tuple(self.seq_lens or (CPU_SEQ_LENS if cpu else DEFAULT_SEQ_LENS))
        out.dtype = self.dtype or ("float32" if cpu else "bfloat16")
        out.kv_dtype = kv_dtype_name(self.kv_dtype) if self.kv_dtype else out.dtype
        if out.batch is None and cpu and self.mem_budget_bytes is None:
            out.batch = CPU_BATCH
        _check(out)
        return out


def _check(o: E2EOptions) -> None:
    models.preset(o.model)
    if o.dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {o.dtype!r}")
    if not o.seq_lens or any(not isinstance(n, int) or n < 1 for n in o.seq_lens):
        raise ValueError(f"seq_lens: expected positive token counts, got {o.seq_lens!r}")
    if o.batch is not None and o.batch < 1:
        raise ValueError(f"batch: expected at least 1, got {o.batch}")
    if o.decode_tokens < 1:
        raise ValueError(f"decode_tokens: expected at least 1, got {o.decode_tokens}")
    if o.warmup_steps < 0:
        raise ValueError(f"warmup_steps: expected 0 or more, got {o.warmup_steps}")
    if isinstance(o.page_size, bool) or not isinstance(o.page_size, int) or o.page_size < 0:
        raise ValueError(f"page_size: expected a number of tokens per page >= 1, or 0 for a contiguous cache, "
                         f"got {o.page_size!r}")
    if o.with_prefill and (o.page_size or o.kv_dtype != o.dtype):
        raise ValueError("with_prefill: the prefill fills a contiguous cache in the model's dtype; a paged or "
                         f"{o.kv_dtype} cache is filled with random values (drop with_prefill)")


def cache_positions(o: E2EOptions, seq_len: int) -> int:
    """Positions each sequence's cache holds: seq_len + decode_tokens, in whole pages where paged."""
    positions = seq_len + o.decode_tokens
    return -(-positions // o.page_size) * o.page_size if o.page_size else positions


def run(options: E2EOptions, *, clock: Callable[[], float] = time.monotonic) -> Iterator[dict]:
    """Yield one record per context length, in order, as each finishes."""
    o = options.resolved()
    started = clock()
    config = models.preset(o.model)
    decode_name, prefill_name = implementation_names(o)      # an unknown name fails before allocating
    try:
        model = Decoder(config, o.device, DTYPES[o.dtype], seed=o.seed, kv_dtype=KV_DTYPES[o.kv_dtype],
                        page_size=o.page_size)
    except torch.OutOfMemoryError as exc:
        reason = f"the weights ({config.weight_bytes(DTYPES[o.dtype].itemsize)} bytes) do not fit: {first_line(exc)}"
        for seq_len in o.seq_lens:
            yield _record(o, config, seq_len, kernel=decode_name, status=OOM, reason=reason)
        return
    for seq_len in o.seq_lens:
        if o.budget_s is not None and clock() - started >= o.budget_s:
            yield _record(o, config, seq_len, kernel=decode_name, status=SKIPPED,
                          reason=f"budget of {o.budget_s:g} s spent")
            continue
        yield measure_point(model, seq_len, o, decode_name, prefill_name)


def implementation_names(options: E2EOptions) -> tuple[str, str | None]:
    """The decode implementation `kernel` names here ("auto": the fastest), and the prefill one
    (None without with_prefill): `prefill_kernel`, or the decode one where it serves prefill."""
    o = options.resolved()
    c = models.preset(o.model)
    probe = torch.empty(1, 1, c.heads, c.head_dim, device=o.device, dtype=DTYPES[o.dtype])
    decode = kernels.resolve(o.kernel, kernels.DECODE, probe, page_size=o.page_size,
                             kv_dtype=KV_DTYPES[o.kv_dtype]).name
    if not o.with_prefill:
        return decode, None
    if o.prefill_kernel != "auto":
        return decode, kernels.resolve(o.prefill_kernel, kernels.PREFILL, probe).name
    return decode, resolve_prefill(probe, o.kernel)


def measure_point(model: Decoder, seq_len: int, o: E2EOptions, decode_name: str, prefill_name: str) -> dict:
    """One context length: plan, allocate (shrinking on OOM), time; always returns a record.

    The record says what its predicted_mem_bytes assumed: the budget planned within
    (mem_budget_bytes, None for a fixed batch), the decode implementation's declared memory
    (attention_expands_kv, ...) and whether the step was captured in a CUDA graph (cuda_graph)."""
    config = model.config
    terms = memory_terms(model, o, decode_name, prefill_name)
    budget = plan_budget_bytes(model, o)
    planned = cache_positions(o, seq_len) - seq_len       # the decoded tokens, and a last page's slack
    batch = o.batch or models.largest_batch(config, seq_len, planned, budget, **terms)
    base = dict(kernel=decode_name, prefill_kernel=prefill_name, mem_budget_bytes=budget, **assumed_fields(terms))
    predicted = models.predicted_bytes(config, max(batch, 1), seq_len, planned, **terms)
    if batch < 1:
        return _record(o, config, seq_len, **base, batch=0, status=OOM, predicted_mem_bytes=predicted,
                       reason=f"predicted not to fit one sequence: {predicted} bytes needed for batch 1")
    reset_peak_memory(model.device)
    outcome = None
    try:
        outcome = _measure(model, seq_len, batch, o, decode_name, prefill_name)
    except torch.OutOfMemoryError as exc:
        failure = dict(status=OOM, reason=first_line(exc))
    except WrongOutput as exc:
        failure = {**wrong_fields(exc.verdict), "reason": str(exc)}     # the reason names the kernel
    except Exception as exc:  # one length failing must not end the run
        failure = dict(status=ERROR, reason=f"{type(exc).__name__}: {first_line(exc)}")
    peak = peak_memory_bytes(model.device)
    hand_back_cache(model.device)     # after the except blocks, so the failed frames are gone
    if outcome is None:
        return _record(o, config, seq_len, **base, batch=batch, predicted_mem_bytes=predicted,
                       peak_mem_bytes=peak, **failure)
    terms["graph"] = outcome["cuda_graph"]     # a capture that failed leaves the eager pool alone
    predicted = models.predicted_bytes(config, outcome["batch"], seq_len, planned, **terms)
    return _record(o, config, seq_len, **{**base, **outcome}, predicted_mem_bytes=predicted,
                   peak_mem_bytes=peak, status=OK)


def memory_terms(model: Decoder, o: E2EOptions, decode_name: str, prefill_name: str | None) -> dict:
    """The memory model's keyword arguments for this run (see attnlab.models.predicted_bytes):
    the memory the decode and prefill implementations declare on this device, and whether the
    decode step will be captured in a CUDA graph."""
    device_type = model.device.type
    decode = kernels.get(decode_name)
    prefill = kernels.get(prefill_name).attention_memory(device_type) if prefill_name else None
    return dict(attention=decode.attention_memory(device_type), dtype_bytes=model.dtype.itemsize,
                graph=o.cuda_graph and not why_not_captured(decode, model.device), prefill_attention=prefill,
                kv_dtype_bytes=model.kv_dtype.itemsize, paged=o.page_size > 0)


def assumed_fields(terms: dict) -> dict:
    """Record fields naming what a prediction assumed of the decode step."""
    traits = dataclasses.asdict(terms["attention"])
    return {**{f"attention_{name}": value for name, value in traits.items()}, "cuda_graph": terms["graph"]}


def plan_budget_bytes(model: Decoder, o: E2EOptions) -> int | None:
    """The bytes the batch is planned within: mem_budget_bytes, else what the device allows;
    None for a fixed batch, which is not planned."""
    if o.batch is not None:
        return None
    return o.mem_budget_bytes if o.mem_budget_bytes is not None else device_budget_bytes(model)


def device_budget_bytes(model: Decoder) -> int:
    """Memory this process may use for the model, weights included: free device memory plus
    what the allocator holds, less the planner's reserve (attnlab.models.planner_reserve_bytes)."""
    if model.device.type != "cuda":
        raise ValueError("mem_budget_bytes: needed on a CPU when batch is not fixed")
    hand_back_cache(model.device)
    free, total = torch.cuda.mem_get_info(model.device)
    return models.planner_budget_bytes(free, torch.cuda.memory_allocated(model.device), total)


def _measure(model: Decoder, seq_len: int, batch: int, o: E2EOptions, decode_name: str,
             prefill_name: str) -> dict:
    decoder, batch = fit(model, seq_len, batch, o, decode_name, shrink=o.batch is None)
    fields = dict(batch=batch, cuda_graph=decoder.cuda_graph, cuda_graph_reason=decoder.graph_reason or None)
    first_tokens, prefill = None, None
    if o.with_prefill:
        with _sampler(model.device, o, decode_name, seq_len, "prefill") as sampler:
            with sampler.energy_window():
                prefill_s, first_tokens = time_prefill(model, decoder.cache, seq_len, prefill_name, o.seed)
        prefill = dict(seconds=prefill_s, energy_j=sampler.summary()["energy_j"])
    decoder.reset(seq_len, first_tokens)
    with _sampler(model.device, o, decode_name, seq_len, "decode") as sampler:
        with sampler.energy_window():
            times_ms, decode_s = time_decode(decoder, o.decode_tokens)
    fields.update(_decode_figures(model, seq_len, batch, o, times_ms, decode_s))
    fields.update(_power_fields(sampler.summary(), o.decode_tokens, batch * o.decode_tokens, prefill))
    if prefill:
        fields["prefill_ms"] = prefill["seconds"] * 1e3
        fields["tokens_per_s"] = batch * o.decode_tokens / (decode_s + prefill["seconds"])
    return fields


def fit(model: Decoder, seq_len: int, batch: int, o: E2EOptions, decode_name: str,
        shrink: bool) -> tuple[StaticDecoder, int]:
    """Allocate, fill, warm up and capture at `batch`; on out-of-memory retry smaller if allowed."""
    while True:
        try:
            return prepare(model, seq_len, batch, o, decode_name), batch
        except torch.OutOfMemoryError:
            if not shrink or batch == 1:
                raise
        hand_back_cache(model.device)   # outside the except block: the failed attempt's tensors are free
        batch = max(1, min(batch - 1, batch * 9 // 10))


def prepare(model: Decoder, seq_len: int, batch: int, o: E2EOptions, decode_name: str) -> StaticDecoder:
    """A decoder over a random-filled cache of seq_len + decode_tokens positions, warmed up and,
    where the implementation allows and o.cuda_graph is set, captured as a CUDA graph."""
    cache = model.new_cache(batch, seq_len + o.decode_tokens)
    cache.fill_random(seed=o.seed)
    decoder = StaticDecoder(model, cache, decode_name)
    decoder.reset(seq_len)
    if o.cuda_graph:
        decoder.capture(seq_len, warmup_steps=max(1, o.warmup_steps))
    else:
        decoder.graph_reason = "disabled"
    # Eager: compile and tune here. Graph: the first replays pay one-off costs here too.
    for _ in range(max(1, o.warmup_steps)):
        decoder.reset(seq_len)
        decoder.step()
    synchronize(model.device)
    return decoder


def time_prefill(model: Decoder, cache, seq_len: int, impl: str, seed: int) -> tuple[float, torch.Tensor]:
    """Seconds to prefill every sequence with random tokens, after a warm-up on the first one
    (kernel compilation and autotuning stay out of the timing); returns the next tokens too."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    tokens = torch.randint(0, model.config.vocab, (cache.batch, seq_len), generator=gen, device=model.device)
    model.prefill(tokens[:1], cache, impl=impl)
    synchronize(model.device)
    start = time.perf_counter()
    logits = model.prefill(tokens, cache, impl=impl)
    synchronize(model.device)
    return time.perf_counter() - start, logits.argmax(dim=-1)


def time_decode(decoder: StaticDecoder, steps: int) -> tuple[list, float]:
    """Per-step milliseconds (CUDA events on a GPU, perf_counter on a CPU) and total seconds."""
    if decoder.model.device.type == "cuda":
        return _time_cuda(decoder, steps)
    return _time_host(decoder, steps)


def _time_cuda(decoder: StaticDecoder, steps: int) -> tuple[list, float]:
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    torch.cuda.synchronize()
    events[0].record()
    for i in range(steps):
        decoder.step()
        events[i + 1].record()
    torch.cuda.synchronize()
    times = [a.elapsed_time(b) for a, b in zip(events, events[1:])]
    return times, events[0].elapsed_time(events[-1]) / 1e3


def _time_host(decoder: StaticDecoder, steps: int) -> tuple[list, float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        decoder.step()
        times.append((time.perf_counter() - start) * 1e3)
    return times, sum(times) / 1e3


def _decode_figures(model: Decoder, seq_len: int, batch: int, o: E2EOptions, times_ms: list,
                    decode_s: float) -> dict:
    """Latency percentiles and per-step work: weight matmuls plus attention over the cache,
    at the mean cache length of the decoded steps."""
    c, e = model.config, model.dtype.itemsize
    context = seq_len + (o.decode_tokens + 1) / 2
    flops = batch * (2 * c.streamed_param_count() + c.attention_flops_per_key() * context)
    descales = 2 * c.layers * batch * c.kv_heads * 4 if model.kv_dtype.itemsize == 1 else 0
    moved = (c.streamed_weight_bytes(e) + batch * context * c.kv_bytes_per_token(model.kv_dtype.itemsize)
             + descales)
    timing = Timing.from_times(times_ms, warmup_reps=o.warmup_steps).as_fields()
    median_s = timing["median_ms"] * 1e-3
    return dict(**timing, flops=int(flops), bytes=int(moved), tflops=flops / median_s / 1e12,
                gbps=moved / median_s / 1e9, decode_s=decode_s,
                decode_tokens_per_s=batch * o.decode_tokens / decode_s,
                tokens_per_s=batch * o.decode_tokens / decode_s)


def _record(o: E2EOptions, config, seq_len: int, **fields) -> dict:
    dtype_bytes = DTYPES[o.dtype].itemsize
    fields.setdefault("kernel", o.kernel)
    return new_record(
        run_id=o.run_id, mode=_mode(o),
        workload=o.model, model=o.model, heads=config.heads, kv_heads=config.kv_heads,
        head_dim=config.head_dim, dtype=o.dtype, causal=True, seq_len=seq_len, q_len=1,
        decode_tokens=o.decode_tokens, device=device_name(o.device),
        page_size=o.page_size, kv_dtype=o.kv_dtype, lengths=EQUAL_LENGTHS, lengths_seed=0,
        model_params=config.param_count(), weight_bytes=config.weight_bytes(dtype_bytes),
        kv_bytes_per_token=config.kv_bytes_per_token(KV_DTYPES[o.kv_dtype].itemsize), **{"cuda_graph": False, **fields})


def _mode(o: E2EOptions) -> str:
    return MODE_PREFILL_DECODE if o.with_prefill else MODE_DECODE


# NVML: power and energy over the timed windows, through the sweep's sampler.

def _sampler(device: torch.device, o: E2EOptions, kernel: str, seq_len: int, phase: str) -> NvmlSampler:
    label = {"run_id": o.run_id, "point": f"{_mode(o)}/{o.model}/{kernel}/{seq_len}/{phase}"}
    return NvmlSampler(device, csv_path=o.nvml_csv, label=label)


def _power_fields(summary: dict, steps: int, tokens: int, prefill: dict | None) -> dict:
    """Power over the decode window; energy per step (the record's "call") and per output token.

    With a prefill, joules_per_token also counts the prefill's energy, as tokens_per_s counts
    its time. The decode window lasts decode_tokens steps: usually seconds on a large model, so
    the energy counter's 100 ms resolution matters little (energy_window_s says how long)."""
    energy = summary.get("energy_j")
    total = energy
    if prefill is not None:
        total = None if energy is None or prefill["energy_j"] is None else energy + prefill["energy_j"]
    fields = {key: summary.get(key) for key in ("power_w_mean", "power_w_max", "power_source", "energy_source",
                                                "energy_window_s", "sm_clock_mhz_mean", "temperature_c_max",
                                                "throttle_reasons", "nvml_reason")}
    fields.update(energy_j=None if energy is None else energy / steps, decode_energy_j=energy,
                  joules_per_token=None if total is None else total / tokens)
    if prefill is not None:
        fields["prefill_energy_j"] = prefill["energy_j"]
    return fields
