"""An analytic serving model that explains "10,000 output tokens/s at 1k of context, 130 at 120k".

The claim (Cartridges, arXiv 2506.06266, Fig. 3 and App. A.3) measures Llama-3 8B on one
H100 with SGLang: decode only, the largest batch that fits in memory, 128 tokens decoded per
sequence, from 1k to 120k of context (a 77x drop). The model separates three effects as
context n grows:
  1. the KV cache fills memory, so the largest batch falls roughly as 1/n (planned as the
     end-to-end decoder plans it: attnlab.models, the same reserve and workspace);
  2. each decode step streams the weights plus every cached token, a read linear in n;
  3. prefill, which the claim leaves out, costs attention time quadratic in n.

A decode step is the sum of its operations, run one after another: each weight GEMM takes
max(weight bytes / bandwidth, FLOPs / compute rate); attention reads the KV cache at the
decode kernel's marginal bandwidth; a fixed overhead covers the rest (norms, rotary, launches).
Calibrated on records, every rate stays within what the GPU was measured to do, and the
document says which records (length, run, card) set each parameter. A model fitted to the
end-to-end points it is then compared with proves little, so `model_validation` also gives its
error on points it did not see: each point left out of the fit in turn, and no end-to-end
calibration at all.

What-ifs (`WhatIf`, `parse_what_if`): the levers the talk behind the claim names, each a change
to what a sequence keeps in its KV cache (`KvCache`: an 8-bit cache, a sliding window, a
trained cartridge in place of the context, no context at all), run through this same model.
Each lever sits beside the measurements that test it, with the model's error at each, and is
drawn wherever the records hold such measurements, asked for or not: kv-fp8 beside end-to-end
runs with an 8-bit cache (left out of the claim's own curve and its calibration, so the lever
meets them out of sample), window-W beside decode calls with a window of W keys.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field, replace

from attnlab import models
from attnlab import text as fmt
from attnlab.analysis import _deps
from attnlab.analysis.conditions import named_run, run_cards
from attnlab.analysis.roofline import GPU_SPECS, GpuSpec, gpu_spec, match_gpu
from attnlab.analysis.select import recorded_memory, standing_ok
from attnlab.models import DEFAULT_MODEL, AttentionMemory, ModelConfig
from attnlab.schema import CALIBRATION, DECODE, E2E_DECODE, E2E_MODES, E2E_PREFILL_DECODE, PREFILL

CLAIM = {"short_ctx": 1024, "short_tok_s": 10000, "long_ctx": 122880, "long_tok_s": 130}
CLAIM_SOURCE = ("Cartridges (arXiv 2506.06266), Fig. 3 and App. A.3: Llama-3 8B, one H100, SGLang, "
                "decode only, largest batch that fits, 128 tokens decoded per sequence, 1k to 120k of context")
DEFAULT_SEQ_LENS = tuple(sorted({1024 * 2**i for i in range(8)} | {CLAIM["long_ctx"]}))  # 1k .. 128k and 120k
DTYPE_BYTES = 2                                   # bf16 weights and cache
MODEL_PRESETS = {k: v for k, v in models.PRESETS.items() if k != "tiny"}
STREAMING = AttentionMemory()                     # a decode kernel that reads K and V in place
WHAT_IF_FORMS = ("kv-fp8, window-W, cartridge-C or weights (W and C positive token counts, k for x1024: "
                 "window-4096, window-4k, cartridge-2k)")
_SIZED_WHAT_IF = re.compile(r"(window|cartridge)-([1-9][0-9]*)(k?)")
# What an end-to-end point was measured with besides its model and context (point fields too).
E2E_SETTINGS = ("decode_tokens", "prefill_kernel", "kv_dtype", "page_size")
# Bytes per cached element of each cache dtype a record may name (a record without one: the claim's bf16).
KV_DTYPE_BYTES = {"float8_e4m3fn": 1, "float8_e5m2": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "bfloat16": 2, "bf16": 2,
                  "float16": 2, "fp16": 2, "half": 2, "float32": 4, "fp32": 4, "float64": 8, "fp64": 8}


def model_config(model) -> ModelConfig:
    if isinstance(model, ModelConfig):
        return model
    if model not in MODEL_PRESETS:
        raise ValueError(f"model: {model!r} is not a preset; expected one of {', '.join(MODEL_PRESETS)}")
    return MODEL_PRESETS[model]


@dataclass(frozen=True)
class Calibration:
    """Fractions of the spec peaks the serving stack reaches, a fixed cost per decode step,
    and, where a prefill was measured, its attention time per layer and sequence as
    a + b n + c n^2 ms (`prefill_attention`, empty: counted from FLOPs). 1, 1, 1, 0 is the
    ideal machine. `sources` says where each number came from, in words; `provenance`, for
    each parameter set from records, which records (kernel, mode, length, run, card)."""

    weights_bw_efficiency: float = 1.0
    kv_bw_efficiency: float = 1.0
    compute_efficiency: float = 1.0
    overhead_ms: float = 0.0
    prefill_attention: tuple = ()
    sources: tuple = ()
    provenance: tuple = ()

    @property
    def is_ideal(self) -> bool:
        return (self.weights_bw_efficiency, self.kv_bw_efficiency, self.compute_efficiency,
                self.overhead_ms, self.prefill_attention) == (1.0, 1.0, 1.0, 0.0, ())


@dataclass(frozen=True)
class KvCache:
    """What each sequence keeps cached: K and V in `dtype_bytes` per element, at most `window`
    tokens (a sliding window; 0: no cap), and `stand_in` tokens in place of the context whatever
    its length (None: the context itself). The default is the claim's: bf16, every token of the
    context and every decoded token."""

    dtype_bytes: int = DTYPE_BYTES
    window: int = 0
    stand_in: int | None = None

    def context(self, seq_len: int) -> int:
        return seq_len if self.stand_in is None else self.stand_in

    def planned_context(self, seq_len: int, decode_tokens: int) -> int:
        """Context tokens the planner reserves beside the decoded ones: a window holds at most
        `window` in all. (Its rotary table is then planned for the cached positions only: at
        128k, 64 MiB less than the positions need, once for the batch, an eighth of a 4k sequence.)"""
        n = self.context(seq_len)
        return min(n, self.window - decode_tokens) if self.window else n

    def mean_keys(self, seq_len: int, decode_tokens: int) -> float:
        """Cached tokens a decode step reads, averaged over the decoded tokens."""
        n, d, w = self.context(seq_len), decode_tokens, self.window
        if not w or n + d <= w:
            return n + d / 2
        if n >= w:
            return float(w)
        filling = w - n       # steps that read n .. w keys before the window is full
        return (filling * (n + w) / 2 + (d - filling) * w) / d


@dataclass(frozen=True)
class ServingModel:
    """Llama-style decoding on `num_gpus` GPUs (ideal tensor parallelism: memory, bandwidth and
    FLOP/s add up), each of `memory_bytes` (the spec's when not given), planned as the
    end-to-end decoder plans its batch; each sequence also caches `decode_tokens`, as `kv` says."""

    model: ModelConfig
    gpu: GpuSpec
    num_gpus: int = 1
    decode_tokens: int = 128
    calibration: Calibration = field(default_factory=Calibration)
    memory_bytes: float | None = None
    kv: KvCache = field(default_factory=KvCache)

    def __post_init__(self):
        if int(self.decode_tokens) < 1:
            raise ValueError(f"decode_tokens: expected at least 1, got {self.decode_tokens}")
        if int(self.num_gpus) < 1:
            raise ValueError(f"num_gpus: expected at least 1, got {self.num_gpus}")
        if self.kv.window and self.kv.window < self.decode_tokens:
            raise ValueError(f"kv: a window of {self.kv.window} tokens is shorter than the {self.decode_tokens} "
                             f"decoded per sequence; expected at least {self.decode_tokens}")

    @property
    def bandwidth_bytes_s(self) -> float:
        return self.gpu.bandwidth_gbps * 1e9 * self.num_gpus

    @property
    def peak_flops(self) -> float:
        return self.gpu.bf16_tflops * 1e12 * self.num_gpus

    @property
    def budget_bytes(self) -> int:
        """What the planner may fill, weights included, on all GPUs together."""
        per_gpu = int(self.memory_bytes or self.gpu.memory_bytes)
        return self.num_gpus * models.budget_from_total(per_gpu)

    @property
    def kv_budget_bytes(self) -> int:
        return self.budget_bytes - self.model.weight_bytes(DTYPE_BYTES)

    def max_batch(self, seq_len: int) -> int:
        """Sequences of `seq_len` context (plus the decoded tokens) that the planner fits."""
        context = self.kv.planned_context(seq_len, self.decode_tokens)
        return int(models.largest_batch(self.model, context, self.decode_tokens, self.budget_bytes,
                                        attention=STREAMING, dtype_bytes=DTYPE_BYTES, graph=True,
                                        kv_dtype_bytes=self.kv.dtype_bytes))

    def decode_step(self, seq_len: int, batch: int) -> dict:
        """One decode step for `batch` sequences at `seq_len` (averaged over the decoded tokens):
        `step_ms`, the time of each operation in `ops_ms`, and the bytes, FLOPs and the memory
        and compute parts behind them."""
        cal, m = self.calibration, self.model
        weights_bw = self.bandwidth_bytes_s * cal.weights_bw_efficiency
        compute = self.peak_flops * cal.compute_efficiency
        context = self.kv.mean_keys(seq_len, self.decode_tokens)
        gemms = [(g, m.layers) for g in m.layer_gemms()] + [(m.lm_head_gemm(), 1)]
        ops, weights_ms, compute_ms, compute_bound = {}, 0.0, 0.0, []
        for gemm, count in gemms:
            read_ms = 1e3 * count * gemm.params * DTYPE_BYTES / weights_bw
            math_ms = 1e3 * count * 2 * batch * gemm.params / compute
            ops[gemm.name] = max(read_ms, math_ms)
            weights_ms, compute_ms = weights_ms + read_ms, compute_ms + math_ms
            compute_bound += [gemm.name] if math_ms > read_ms else []
        kv_bytes = batch * context * m.kv_bytes_per_token(self.kv.dtype_bytes)
        ops["attention"] = 1e3 * kv_bytes / (self.bandwidth_bytes_s * cal.kv_bw_efficiency)
        ops["overhead"] = cal.overhead_ms
        return {"step_ms": sum(ops.values()), "ops_ms": ops, "weights_ms": weights_ms, "compute_ms": compute_ms,
                "kv_ms": ops["attention"], "bytes": m.streamed_weight_bytes(DTYPE_BYTES) + kv_bytes,
                "flops": batch * (2 * m.streamed_param_count() + m.attention_flops_per_key() * context),
                "compute_bound": compute_bound}

    def prefill_ms(self, seq_len: int, batch: int) -> float:
        """Prefill of `batch` prompts of `seq_len` tokens: the GEMMs at the compute rate, and
        attention from the measured prefill curve (per layer and sequence) where calibrated,
        else its causal FLOPs (n^2 / 2 query-key pairs per head and layer) at the compute rate."""
        m, cal = self.model, self.calibration
        compute = self.peak_flops * cal.compute_efficiency
        gemm_params = sum(g.params for g in m.layer_gemms()) * m.layers
        gemm_ms = 1e3 * batch * (2 * gemm_params * seq_len + 2 * m.lm_head_gemm().params) / compute
        if cal.prefill_attention:
            a, b, c = cal.prefill_attention
            return gemm_ms + batch * m.layers * (a + b * seq_len + c * seq_len**2)
        return gemm_ms + 1e3 * batch * m.attention_flops_per_key() * seq_len**2 / 2 / compute

    def tok_s(self, seq_len: int, batch: int, with_prefill: bool = False) -> float:
        """Output tokens/s of `batch` sequences at `seq_len`, decoding `decode_tokens` each."""
        decode_ms = self.decode_tokens * self.decode_step(seq_len, batch)["step_ms"]
        prefill_ms = self.prefill_ms(seq_len, batch) if with_prefill else 0.0
        return 1e3 * batch * self.decode_tokens / (decode_ms + prefill_ms) if batch else 0.0

    def point(self, seq_len: int) -> dict:
        """The contract fields for one context length, and the terms behind them."""
        batch = self.max_batch(seq_len)
        one = self.decode_step(seq_len, 1)
        # Where not one sequence fits, nothing is served: every rate is 0.
        point = {"seq_len": int(seq_len), "max_batch": batch, "tok_s_max_batch": 0.0,
                 "tok_s_batch1": self.tok_s(seq_len, 1) if batch else 0.0, "tok_s_with_prefill": 0.0,
                 "step_ms_batch1": one["step_ms"], "step_ms_max_batch": None, "prefill_ms_max_batch": None,
                 "kv_share_of_step_max_batch": None, "ops_ms_max_batch": None, "compute_bound_max_batch": None}
        if batch:
            step = self.decode_step(seq_len, batch)
            point.update(tok_s_max_batch=self.tok_s(seq_len, batch), step_ms_max_batch=step["step_ms"],
                         tok_s_with_prefill=self.tok_s(seq_len, batch, with_prefill=True),
                         prefill_ms_max_batch=self.prefill_ms(seq_len, batch),
                         kv_share_of_step_max_batch=step["kv_ms"] / step["step_ms"],
                         ops_ms_max_batch=step["ops_ms"], compute_bound_max_batch=step["compute_bound"])
        return point


def _ratio(short: float, long: float):
    return short / long if long else None


# --- what-ifs -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class WhatIf:
    """A lever on the claim: the same serving model with `kv` in place of the claim's cache."""

    name: str
    description: str
    kv: KvCache

    def applied(self, serving: ServingModel) -> ServingModel:
        try:
            return replace(serving, kv=self.kv)
        except ValueError as exc:       # said in the terms of the lever that was asked for
            raise ValueError(f"what_if: {self.name}: {str(exc).removeprefix('kv: ')}") from None

    def points(self, serving: ServingModel, seq_lens) -> list:
        """The main curve's fields at each length, and the tokens each sequence caches. Prefill
        is left out (None): each lever changes what is prefilled, and the claim is decode only."""
        model = self.applied(serving)
        cached = {n: model.kv.planned_context(n, model.decode_tokens) + model.decode_tokens for n in seq_lens}
        return [{**model.point(n), "tok_s_with_prefill": None, "prefill_ms_max_batch": None,
                 "kv_tokens_per_sequence": cached[n]} for n in seq_lens]


def what_if_named(name: str) -> WhatIf:
    """The lever `name` names: kv-fp8, window-W, cartridge-C or weights (W, C in tokens, k for
    x1024); ValueError naming what_if and the accepted forms otherwise."""
    if name == "kv-fp8":
        return WhatIf(name, "K and V cached in 8 bits: half the bytes per cached token, so about twice the "
                            "batch, and attention reads half the bytes", KvCache(dtype_bytes=1))
    if name == "weights":
        return WhatIf(name, "the knowledge is in the weights and the context is only the prompt: each sequence "
                            "caches only the tokens it decodes", KvCache(stand_in=0))
    match = _SIZED_WHAT_IF.fullmatch(name)
    if not match:
        raise ValueError(f"what_if: {name!r} is not a what-if; expected {WHAT_IF_FORMS}")
    tokens = int(match.group(2)) * (1024 if match.group(3) else 1)
    if match.group(1) == "window":
        return WhatIf(name, f"a sliding window: each sequence caches at most its last {tokens:,} tokens, so the "
                            f"cache and attention's reads stop growing past them", KvCache(window=tokens))
    return WhatIf(name, f"a trained cache of {tokens:,} tokens stands in for the context: each sequence caches "
                        f"those and the tokens it decodes, whatever the context's length", KvCache(stand_in=tokens))


def parse_what_if(text) -> tuple:
    """'kv-fp8,window-4k' -> its levers (`WhatIf`), in the order given, each once."""
    levers = [what_if_named(part.strip()) for part in str(text).split(",")]
    return tuple({lever.name: lever for lever in levers}.values())


# --- the document ------------------------------------------------------------------------------

def explain_claim(serving: ServingModel, seq_lens=DEFAULT_SEQ_LENS, measured=(), ideal: ServingModel | None = None,
                  model_name: str | None = None, gpu_name: str | None = None, what_if=(), tested=None) -> dict:
    """The `attnlab claim --json` document: model points for `seq_lens`, the three ratios
    (short over long context, at the claim's two lengths), the paper's, attnlab's measured and
    the model's ratios side by side, and an explanation in words. `measured`: points from
    end-to-end records (see `measured_points`); `ideal`: the uncalibrated model; `what_if`:
    levers (`WhatIf`) whose curves the same model draws at `seq_lens`; `tested`: {KvCache: the
    measured points that test the lever of that cache} (`split_by_cache`, `window_measurements`),
    set beside the lever with the model's error at each."""
    seq_lens = sorted({int(n) for n in seq_lens})
    if not seq_lens or seq_lens[0] < 1:
        raise ValueError(f"seq_lens: expected positive context lengths, got {seq_lens}")
    levers = [(lever, lever.points(serving, seq_lens)) for lever in what_if]    # a bad lever fails first
    short, long = serving.point(CLAIM["short_ctx"]), serving.point(CLAIM["long_ctx"])
    ratios = {f"ratio_{k}": _ratio(short[f"tok_s_{k}"], long[f"tok_s_{k}"])
              for k in ("max_batch", "batch1", "with_prefill")}
    m = serving.model
    measured = [_with_model(p, serving) for p in measured]
    document = {
        "model": model_name or m.name, "gpu": gpu_name or serving.gpu.key, "num_gpus": serving.num_gpus,
        "claim": dict(CLAIM), "claim_source": CLAIM_SOURCE,
        "points": [serving.point(n) for n in seq_lens], **ratios,
        "factors": _factors(short, long),
        "kv_bytes_per_token": m.kv_bytes_per_token(DTYPE_BYTES), "weights_bytes": m.weight_bytes(DTYPE_BYTES),
        "memory_budget_bytes": serving.budget_bytes, "kv_budget_bytes": serving.kv_budget_bytes,
        "assumptions": {"decode_tokens": serving.decode_tokens,
                        "memory": "the end-to-end planner's budget (attnlab.models): device memory less the CUDA "
                                  "context, a reserve of 1 GiB + 1%, the weights, a fixed workspace and each "
                                  "sequence's activations",
                        "step_time": "sum over a step's operations: each GEMM max(weight bytes / bandwidth, FLOPs / "
                                     "compute rate), attention KV bytes / the decode kernel's marginal bandwidth, "
                                     "plus a fixed overhead",
                        "calibration": _calibration_dict(serving.calibration)},
        "model_config": asdict(m), "gpu_config": asdict(serving.gpu),
        "measured": measured, "measured_ratios": measured_ratios(measured),
    }
    document["ratios_side_by_side"] = _side_by_side(serving, document)
    if ideal is not None and not serving.calibration.is_ideal:
        document["ideal_points"] = [ideal.point(n) for n in seq_lens]
    document["validation"] = model_validation(serving)
    document["explanation"] = _explanation(serving, short, long, document)
    document["what_if"] = [_what_if_entry(lever, points, serving, (tested or {}).get(lever.kv, []))
                           for lever, points in levers]
    return document


def _what_if_entry(lever: WhatIf, points: list, serving: ServingModel, tested: list) -> dict:
    """A lever's curve, and beside it the points that test it, each with the model's error."""
    measured = [_lever_point(p, lever, serving) for p in tested]
    errors = [p for p in measured if p.get("model_error") is not None]
    worst = max(errors, key=lambda p: abs(p["model_error"]), default=None)
    return {"name": lever.name, "description": lever.description, "kv_cache": asdict(lever.kv),
            "kv_bytes_per_token": serving.model.kv_bytes_per_token(lever.kv.dtype_bytes),
            "prefill": "left out: the claim is decode only, and each lever changes what is prefilled",
            "points": points, "measured": measured,
            "measured_error_worst": None if worst is None else {k: worst.get(k) for k in (
                "model_error", "seq_len", "kernel", "mode", "run_id", "card")}}


def _lever_point(point: dict, lever: WhatIf, serving: ServingModel) -> dict:
    """An end-to-end point beside the lever's model at its batch and context (`_with_model`), with
    the batch the lever's planner would choose there; a decode call already holds its model time."""
    if point["mode"] not in E2E_MODES:
        return point
    model = lever.applied(serving)
    return {**_with_model(point, model), "model_max_batch": model.max_batch(point["seq_len"])}


def _with_model(point: dict, serving: ServingModel) -> dict:
    """A measured point with the model at its batch and context: `model_tok_s`, `model_error`
    (measured over model, less 1). A kernel with its own calibrated KV bandwidth uses it."""
    kv = point.get("kv_bw_efficiency")
    point = {k: v for k, v in point.items() if k != "kv_bw_efficiency"}
    if not point.get("batch"):
        return {**point, "model_tok_s": None, "model_error": None}
    model = replace(serving, calibration=replace(serving.calibration, kv_bw_efficiency=kv)) if kv else serving
    tok_s = model.tok_s(point["seq_len"], point["batch"], with_prefill=point["mode"] == E2E_PREFILL_DECODE)
    return {**point, "model_tok_s": tok_s, "model_error": point["tok_s"] / tok_s - 1 if tok_s else None}


def _factors(short: dict, long: dict) -> dict:
    """The max-batch ratio as (batch falls) x (step time grows)."""
    batch = _ratio(short["max_batch"], long["max_batch"])
    step = (long["step_ms_max_batch"] / short["step_ms_max_batch"]
            if long["step_ms_max_batch"] and short["step_ms_max_batch"] else None)
    return {"max_batch_short": short["max_batch"], "max_batch_long": long["max_batch"], "batch_falls": batch,
            "step_time_grows": step, "step_ms_batch1_short": short["step_ms_batch1"],
            "step_ms_batch1_long": long["step_ms_batch1"]}


def _side_by_side(serving: ServingModel, doc: dict) -> list:
    """The paper's ratio, attnlab's measured ones and the model's, each at its own lengths."""
    claim = doc["claim"]
    rows = [{"what": "paper", "short_ctx": claim["short_ctx"], "long_ctx": claim["long_ctx"],
             "ratio": claim["short_tok_s"] / claim["long_tok_s"],
             "how": "SGLang serving Llama-3 8B's real weights on one H100 (Cartridges, App. A.3)"},
            {"what": "model", "short_ctx": claim["short_ctx"], "long_ctx": claim["long_ctx"],
             "ratio": doc["ratio_max_batch"], "how": "this model at its planned largest batch"}]
    for m in doc["measured_ratios"]:
        if m["mode"] != E2E_DECODE:
            continue
        short = serving.tok_s(m["short_ctx"], m["short_batch"]) if m.get("short_batch") else None
        long = serving.tok_s(m["long_ctx"], m["long_batch"]) if m.get("long_batch") else None
        run = {"kernel": m["kernel"], "run_id": m["run_id"], "card": m["card"], "short_ctx": m["short_ctx"],
               "long_ctx": m["long_ctx"]}
        rows.append({"what": "attnlab measured", **run, "ratio": m["ratio"],
                     "how": "attnlab's decoder, random weights of the same shapes, at the batches its planner chose"})
        rows.append({"what": "model at the measured batches", **run,
                     "ratio": _ratio(short, long) if short and long else None,
                     "how": "this model at the batch and context of each measured point"})
    return rows


def _calibration_dict(cal: Calibration) -> dict:
    out = asdict(cal)
    out["sources"] = list(cal.sources)
    out["provenance"] = list(cal.provenance)
    out["prefill_attention"] = list(cal.prefill_attention)
    out["ideal"] = cal.is_ideal
    return out


def _explanation(serving: ServingModel, short: dict, long: dict, doc: dict) -> str:
    m, f = serving.model, doc["factors"]
    s, l = fmt.k(CLAIM["short_ctx"]), fmt.k(CLAIM["long_ctx"])
    claimed = CLAIM["short_tok_s"] / CLAIM["long_tok_s"]
    kind = ("ideal: spec peaks, no per-step overhead, an upper bound" if serving.calibration.is_ideal
            else "calibrated on measurements")
    parts = [f"{m.name} on {serving.num_gpus} x {serving.gpu.name}, {kind}. KV cache: "
             f"{m.kv_bytes_per_token(DTYPE_BYTES) / 1024:.0f} KiB per token; the weights "
             f"({m.weight_bytes(DTYPE_BYTES) / 2**30:.1f} GiB) leave {max(0, serving.kv_budget_bytes) / 2**30:.1f} "
             f"of the planner's {serving.budget_bytes / 2**30:.1f} GiB for it."]
    if not long["max_batch"]:
        parts.append(f"Not even one sequence of {l} fits beside the weights, so the model serves nothing "
                     f"at {l}; use more GPUs (num_gpus) or a smaller model.")
        return " ".join(parts)
    parts += [
        f"(1) The KV cache fills memory: the largest batch falls from {f['max_batch_short']} at {s} to "
        f"{f['max_batch_long']} at {l} ({f['batch_falls']:.0f}x).",
        f"(2) Each decode step runs the GEMMs and streams every cached token; at the largest batch memory is "
        f"full of KV at both lengths, so the step time changes only {f['step_time_grows']:.2f}x "
        f"({short['step_ms_max_batch']:.1f} -> {long['step_ms_max_batch']:.1f} ms; attention "
        f"{100 * short['kv_share_of_step_max_batch']:.0f}% and {100 * long['kv_share_of_step_max_batch']:.0f}% of it"
        f"{_compute_bound_text(short, s)}). Together: {short['tok_s_max_batch']:,.0f} -> "
        f"{long['tok_s_max_batch']:,.0f} tokens/s, {doc['ratio_max_batch']:.0f}x, against the claim's "
        f"{CLAIM['short_tok_s']:,} -> {CLAIM['long_tok_s']} ({claimed:.0f}x).",
        f"(3) At batch 1 only the linear KV read grows: {short['tok_s_batch1']:,.0f} -> "
        f"{long['tok_s_batch1']:,.0f} tokens/s, {doc['ratio_batch1']:.1f}x.",
        f"(4) Attention's quadratic cost is in prefill, which the claim leaves out; counting the prefill of "
        f"the context at the largest batch, the drop would be {doc['ratio_with_prefill']:.0f}x.",
        "So the drop is mostly batch size lost to KV memory, not the quadratic cost of attention.",
        f"Against the paper, point by point: the model gives {_versus_paper(short['tok_s_max_batch'], 'short')} "
        f"at {s} and {_versus_paper(long['tok_s_max_batch'], 'long')} at {l}, so the ratios part at the "
        f"{_where_ratios_part(short, long)} end.",
    ]
    parts += _measured_sentences(doc)
    return " ".join(parts)


def _versus_paper(tok_s: float, end: str) -> str:
    claimed = CLAIM[f"{end}_tok_s"]
    gap = 100 * (tok_s / claimed - 1)
    return f"{tok_s:,.0f} tokens/s ({abs(gap):.0f}% {'above' if gap >= 0 else 'below'} the paper's {claimed:,})"


def _where_ratios_part(short: dict, long: dict) -> str:
    gaps = {end: abs(point["tok_s_max_batch"] / CLAIM[f"{end}_tok_s"] - 1)
            for end, point in (("short", short), ("long", long))}
    return "short" if gaps["short"] >= gaps["long"] else "long"


def _compute_bound_text(point: dict, label: str) -> str:
    bound = point.get("compute_bound_max_batch") or []
    return f"; at {label} the {', '.join(bound)} GEMMs are compute-bound" if bound else ""


def _measured_sentences(doc: dict) -> list:
    out = []
    by_run = {}
    for row in doc["ratios_side_by_side"]:
        by_run.setdefault((row.get("kernel"), row.get("run_id")), {})[row["what"]] = row
    for (kernel, run_id), rows in by_run.items():
        measured, modelled = rows.get("attnlab measured"), rows.get("model at the measured batches")
        if not measured:
            continue
        mine = [p for p in doc["measured"] if (p["kernel"], p["run_id"], p["mode"]) == (kernel, run_id, E2E_DECODE)]
        errors = [abs(p["model_error"]) for p in mine if p.get("model_error") is not None]
        run = named_run(run_id, {run_id: measured.get("card")})
        text = (f"Measured with {kernel} in run {run}, attnlab's decoder with random weights: "
                f"{measured['ratio']:.0f}x from {fmt.k(measured['short_ctx'])} to {fmt.k(measured['long_ctx'])}, at "
                f"the batches its planner chose ({_batch_at(mine, measured['short_ctx'])} and "
                f"{_batch_at(mine, measured['long_ctx'])})")
        if modelled and modelled["ratio"]:
            text += f"; the model at those batches gives {modelled['ratio']:.0f}x"
        if errors:
            text += f", and is within {100 * max(errors):.0f}% of each measured point"
            validation = doc.get("validation") or {}
            if validation.get("kernel") == kernel and run_id in validation["runs"]:
                text += " in sample: it was fitted to them (out of sample, see the model error below)"
        if any(p.get("cuda_graph") is False for p in mine):
            text += ("; this kernel ran without a CUDA graph, so its per-step overhead is not the one the model "
                     "was calibrated with")
        out.append(text + ".")
    return out


def _batch_at(points: list, seq_len: int):
    return next((p["batch"] for p in points if p["seq_len"] == seq_len), "?")


# --- measurements -----------------------------------------------------------------------------

def measured_points(results, serving: ServingModel, cards=None) -> tuple[list, list]:
    """Standing end-to-end records (modes e2e-decode, e2e-prefill-decode) for this model and
    GPU, as points {seq_len, batch, tok_s, step_ms, mode, kernel, device, run_id, card} (card:
    from `cards`, {run_id: card}); and notes on what was left out and why."""
    cards = cards or {}
    ok = standing_ok(results)
    rows = ok[ok["mode"].isin(E2E_MODES)]
    points, left_out = [], Counter()
    for _, row in rows.iterrows():
        named = next((row[k] for k in ("model", "preset") if k in row and isinstance(row[k], str)), None)
        spec = match_gpu(row["device"])
        tok_s, step_ms, batch = row["tokens_per_s"], row["median_ms"], row["batch"]
        if not (tok_s > 0) and step_ms > 0 and batch > 0:
            tok_s = 1e3 * batch / step_ms
        if named and named != serving.model.name:
            left_out[f"model {named}, not {serving.model.name}"] += 1
        elif spec is None or spec.key != serving.gpu.key:
            left_out[f"measured on {row['device']}, not {serving.gpu.name}"] += 1
        elif not (tok_s > 0):
            left_out["no tokens_per_s or median_ms"] += 1
        else:
            points.append({"seq_len": int(row["seq_len"]), "batch": _int_or_none(batch), "tok_s": float(tok_s),
                           "step_ms": float(step_ms) if step_ms > 0 else None, "mode": row["mode"],
                           "kernel": row["kernel"], "device": row["device"], "run_id": row["run_id"],
                           "card": cards.get(row["run_id"]), "cuda_graph": _flag(row.get("cuda_graph")),
                           **{name: _setting(row.get(name)) for name in E2E_SETTINGS}})
    notes = [f"left out {count} end-to-end record(s): {why}" for why, count in left_out.items()]
    return sorted(points, key=lambda p: (p["mode"], p["kernel"], p["seq_len"])), notes


def _flag(value):
    return None if fmt.missing(value) else bool(value)


def _setting(value):
    """An end-to-end setting as JSON holds it: a whole number as an integer, missing as None."""
    if fmt.missing(value):
        return None
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _int_or_none(value):
    return int(value) if value == value and value is not None else None


def measured_ratios(points) -> list:
    """Short over long tokens/s per (mode, kernel, run, settings), between its shortest and
    longest context: points of two runs (two cards, perhaps) or measured with other settings
    (tokens decoded, prefill kernel) are not one curve."""
    groups = {}
    for p in points:
        key = (p["mode"], p["kernel"], str(p["run_id"]), *(str(p.get(s)) for s in E2E_SETTINGS))
        groups.setdefault(key, []).append(p)
    out = []
    for key, group in sorted(groups.items()):
        first, last = min(group, key=lambda p: p["seq_len"]), max(group, key=lambda p: p["seq_len"])
        if last["seq_len"] > first["seq_len"]:
            out.append({"mode": first["mode"], "kernel": first["kernel"], "run_id": first["run_id"],
                        "card": first.get("card"), "short_ctx": first["seq_len"], "long_ctx": last["seq_len"],
                        "short_batch": first["batch"], "long_batch": last["batch"],
                        "ratio": first["tok_s"] / last["tok_s"], **{s: first.get(s) for s in E2E_SETTINGS}})
    return out


def kv_bytes(kv_dtype) -> int | None:
    """Bytes per cached element of a record's kv_dtype: the claim's bf16 where it names none,
    None for a name this model does not know."""
    return DTYPE_BYTES if fmt.missing(kv_dtype) else KV_DTYPE_BYTES.get(str(kv_dtype).lower().removeprefix("torch."))


def split_by_cache(points: list) -> tuple[list, dict, list]:
    """End-to-end points split by what they cached: (the claim's own, in bf16; {KvCache: points}
    with an 8-bit cache, which test the kv-fp8 lever; notes on the rest, left out)."""
    own, fp8, other = [], [], Counter()
    for p in points:
        size = kv_bytes(p.get("kv_dtype"))
        (own if size == DTYPE_BYTES else fp8 if size == 1 else []).append(p)
        if size not in (DTYPE_BYTES, 1):
            other[p.get("kv_dtype")] += 1
    notes = [f"left out {count} end-to-end record(s) with a {dtype} cache: neither the claim's bf16 nor a lever's"
             for dtype, count in other.items()]
    if fp8:
        notes.append(f"{len(fp8)} end-to-end record(s) with an 8-bit cache stand beside the kv-fp8 what-if, not the "
                     f"claim's curve, and no calibration uses them")
    return own, ({what_if_named("kv-fp8").kv: fp8} if fp8 else {}), notes


def tested_levers(tested: dict, asked: list) -> list:
    """Levers the measurements test that none asked for already draws: kv-fp8, window-W."""
    have = {lever.kv for lever in asked}
    return [what_if_named("kv-fp8" if kv.dtype_bytes == 1 else f"window-{kv.window}")
            for kv, points in tested.items() if points and kv not in have]


def window_measurements(results, serving: ServingModel, fits, kv_share: dict, cards=None) -> dict:
    """{KvCache(window=W): points} from the standing decode calls on this GPU measured with a
    window of W keys, of the model's kv heads and head size, in bf16: each with its time beside
    the model's for it, the kernel's own decode line without a window (its linear fit of the same
    shape and cache, a + b n) at the min(n, W) keys the window leaves; where the kernel has no
    such line, the KV read alone at its calibrated share of the bandwidth (`kv_share`, else the
    model's), which leaves out every fixed cost."""
    ok = standing_ok(results)
    if "window" not in ok:
        return {}
    m, cards = serving.model, cards or {}
    rows = ok[(ok["mode"] == DECODE) & (ok["window"].fillna(0) > 0) & (ok["kv_heads"] == m.kv_heads)
              & (ok["head_dim"] == m.head_dim) & (_gpu_keys(ok) == serving.gpu.key)]
    found = {}
    for _, row in rows.iterrows():
        if kv_bytes(row.get("kv_dtype")) != DTYPE_BYTES or not row["median_ms"] > 0:
            continue
        window, n = int(row["window"]), int(row["seq_len"])
        keys = min(n, window)
        fit = _unwindowed_fit(fits, row, serving.gpu.key)
        if fit is not None:
            model_ms = float(fit.predict_ms(keys))
            basis = f"{fit.kernel}'s decode line without a window ({fit.workload}, R^2 {fit.r2:.3f}) at {keys:,} keys"
        else:
            share = kv_share.get(row["kernel"]) or serving.calibration.kv_bw_efficiency
            model_ms = 1e3 * float(row["bytes"]) / (serving.gpu.bandwidth_gbps * 1e9 * share)
            basis = (f"the KV read alone at {100 * share:.0f}% of {serving.gpu.bandwidth_gbps:,.0f} GB/s, no fixed "
                     f"cost ({row['kernel']} has no decode line without a window of this shape)")
        found.setdefault(KvCache(window=window), []).append({
            "mode": DECODE, "kernel": row["kernel"], "seq_len": n, "window": window, "keys": keys,
            "batch": _int_or_none(row["batch"]), "measured_ms": float(row["median_ms"]), "model_ms": model_ms,
            "model_error": float(row["median_ms"]) / model_ms - 1 if model_ms > 0 else None, "basis": basis,
            "device": row["device"], "run_id": row["run_id"], "card": cards.get(row["run_id"])})
    return {kv: sorted(points, key=lambda p: (p["kernel"], p["seq_len"])) for kv, points in found.items()}


def _unwindowed_fit(fits, row, gpu_key: str):
    """The linear decode fit of row's kernel on this GPU whose curve differs from row's point only
    in having no window (and its workload's name); None without one."""
    for fit in fits or ():
        if (fit.kernel, fit.mode, fit.model) != (row["kernel"], DECODE, "linear") or fit.shape.get("window"):
            continue
        if getattr(match_gpu(fit.device), "key", None) != gpu_key or fit.dtype != row["dtype"]:
            continue
        if all(_same(value, row.get(key)) for key, value in fit.shape.items() if key != "window"):
            return fit
    return None


def _same(a, b) -> bool:
    return (fmt.missing(a) and fmt.missing(b)) or (not fmt.missing(a) and not fmt.missing(b) and a == b)


# --- calibration --------------------------------------------------------------------------------

def calibrate(results, serving: ServingModel, points=(), fits=(), cards=None) -> tuple[Calibration, dict, list]:
    """Rates from standing records on this GPU, each within what the GPU was measured to do:
    weights stream at the measured device copy; KV at the marginal bandwidth of the decode
    kernel the end-to-end runs used (the slope b of its linear fit), at most the copy's; the
    GEMMs' compute rate (at most the measured matmul's) and a fixed per-step overhead fitted
    to that kernel's e2e-decode step times; prefill attention from the fastest prefill curve of
    the model's attention shape. Returns the calibration, each e2e kernel's own KV efficiency
    and notes; whatever has no data stays ideal. The calibration's `provenance` says which
    records (length, run and, from `cards` {run_id: card}, card) set each parameter."""
    on_gpu = standing_ok(results)
    on_gpu = on_gpu[_gpu_keys(on_gpu) == serving.gpu.key]
    if on_gpu.empty:
        return Calibration(), {}, [f"none of the results was measured on {serving.gpu.name}: the model stays ideal"]
    fits = [f for f in fits if getattr(match_gpu(f.device), "key", None) == serving.gpu.key]
    cards, spec = cards or {}, serving.gpu
    values, sources, provenance, notes = {}, [], [], []
    copy, matmul = _best(on_gpu, "copy", "gbps"), _best(on_gpu, "matmul", "tflops")
    copy_gbps = copy["gbps"] if copy is not None else None
    if copy is not None:
        values["weights_bw_efficiency"] = min(1.0, copy_gbps / spec.bandwidth_gbps)
        sources.append(f"weights: streamed at the measured device copy, {copy_gbps:,.0f} of "
                       f"{spec.bandwidth_gbps:,.0f} GB/s")
        provenance.append(_provenance(_picked(values, "weights_bw_efficiency"), "the fastest device copy "
                                      "calibration record", [_record_point(copy)], cards))
    kv_by_kernel = _kv_efficiencies(on_gpu, fits, serving, copy_gbps)
    steps = [p for p in points if p["mode"] == E2E_DECODE and p["batch"] and p["step_ms"]]
    kernel = _model_kernel(steps, kv_by_kernel)
    if kernel:
        values["kv_bw_efficiency"], why, fit = kv_by_kernel[kernel]
        sources.append(why)
        provenance.append(_provenance(_picked(values, "kv_bw_efficiency"), f"the slope b of {kernel}'s linear "
                                      "decode fit", _fit_points(fit), cards))
    else:
        notes.append("no linear decode fit of the model's attention shape on this GPU: the KV read stays ideal")
    compute_cap = min(1.0, matmul["tflops"] / spec.bf16_tflops) if matmul is not None else 1.0
    mine = [p for p in steps if p["kernel"] == kernel] if kernel else steps
    if mine:
        base = replace(serving, calibration=Calibration(**values))
        values.update(_fit_compute_and_overhead(mine, base, compute_cap))
        sources.append(f"GEMM compute: {100 * values['compute_efficiency']:.0f}% of {spec.bf16_tflops:.0f} "
                       f"TFLOP/s (at most the measured matmul's {100 * compute_cap:.0f}%) and a per-step overhead of "
                       f"{values['overhead_ms']:.2f} ms, fitted to {len(mine)} e2e-decode step time(s) of "
                       f"{mine[0]['kernel']}")
        provenance.append(_e2e_provenance(values, mine, compute_cap, matmul, serving, cards))
    else:
        values["compute_efficiency"] = compute_cap
        if matmul is not None:
            sources.append(f"compute: measured matmul {matmul['tflops']:.0f} of {spec.bf16_tflops:.0f} TFLOP/s")
            provenance.append(_provenance(_picked(values, "compute_efficiency"), "the fastest bf16 matmul "
                                          "calibration record", [_record_point(matmul)], cards))
        notes.append("no e2e-decode records with batch and step time on this GPU: no per-step overhead")
    prefill = _prefill_attention(fits, serving.model)
    if prefill:
        values["prefill_attention"], why, fit = prefill
        sources.append(why)
        provenance.append(_provenance(_picked(values, "prefill_attention"), f"{fit.kernel}'s quadratic prefill "
                                      "fit", _fit_points(fit), cards))
    calibration = Calibration(**values, sources=tuple(sources), provenance=tuple(provenance))
    return calibration, {k: v[0] for k, v in kv_by_kernel.items()}, notes


def _best(rows, kind: str, column: str):
    """The calibration record of `kind` (copy, matmul) with the highest `column`, or None."""
    found = rows[(rows["mode"] == CALIBRATION) & rows["kernel"].str.contains(kind) & (rows[column] > 0)]
    return found.loc[found[column].idxmax()] if len(found) else None


def _record_point(row) -> dict:
    return {"kernel": row["kernel"], "mode": row["mode"], "seq_len": _int_or_none(row["seq_len"]),
            "run_id": row["run_id"]}


def _fit_points(fit) -> list:
    return [{"kernel": fit.kernel, "mode": fit.mode, "seq_len": p["seq_len"], "run_id": p["run_id"]}
            for p in fit.points]


def _provenance(parameters: dict, fitted_to: str, points: list, cards: dict, **extra) -> dict:
    """Which records set `parameters` ({name: value}): each point with its run and card, and the
    runs and cards they span (two cards of one GPU model differ in speed)."""
    points = [{**p, "card": cards.get(p["run_id"])} for p in points]
    return {"parameters": parameters, "fitted_to": fitted_to, "points": points,
            "runs": sorted({p["run_id"] for p in points}), "cards": sorted({p["card"] for p in points if p["card"]}),
            **extra}


def _picked(values: dict, *names) -> dict:
    """{name: value} of `names` in `values`, as JSON holds them (a tuple as a list)."""
    return {name: list(values[name]) if isinstance(values[name], tuple) else values[name] for name in names}


def _e2e_provenance(values: dict, points: list, compute_cap: float, matmul, serving: ServingModel,
                    cards: dict) -> dict:
    """The provenance of the compute efficiency and overhead: the e2e-decode points they were
    fitted to, the matmul record that bounds the efficiency, and the lengths where it binds (a
    GEMM compute-bound at the point's batch: elsewhere the efficiency changes nothing)."""
    model = replace(serving, calibration=Calibration(**values))
    binds = [p["seq_len"] for p in points if model.decode_step(p["seq_len"], p["batch"])["compute_bound"]]
    fitted = [{"kernel": p["kernel"], "mode": p["mode"], "seq_len": p["seq_len"], "batch": p["batch"],
               "step_ms": p["step_ms"], "tok_s": p["tok_s"], "run_id": p["run_id"]} for p in points]
    bound = _provenance({"compute_efficiency_at_most": compute_cap},
                        "the fastest bf16 matmul calibration record" if matmul is not None else "the spec",
                        [_record_point(matmul)] if matmul is not None else [], cards)
    return _provenance(_picked(values, "compute_efficiency", "overhead_ms"), f"the e2e-decode step times of "
                       f"{points[0]['kernel']}, on relative error", fitted, cards,
                       compute_efficiency_at_most=bound, compute_efficiency_binds_at=binds)


def _kv_efficiencies(on_gpu, fits, serving: ServingModel, copy_gbps) -> dict:
    """{kernel: (share of spec bandwidth, source, fit)} from each linear decode fit of the
    model's attention shape: bytes per cached token (from its records) over the slope b."""
    out, m = {}, serving.model
    for fit in fits:
        if fit.mode != DECODE or fit.model != "linear" or fit.b_ms_per_token <= 0 or not _claims_cache(fit.shape):
            continue
        if (fit.shape.get("kv_heads"), fit.shape.get("head_dim")) != (m.kv_heads, m.head_dim):
            continue
        rows = on_gpu[(on_gpu["mode"] == DECODE) & (on_gpu["kernel"] == fit.kernel)
                      & (on_gpu["workload"] == fit.workload) & (on_gpu["bytes"] > 0)]
        rows = rows[[_claims_cache(row) for _, row in rows.iterrows()]]
        per_token = _slope(rows["seq_len"], rows["bytes"])
        if not per_token:
            continue
        gbps = per_token / (fit.b_ms_per_token * 1e-3) / 1e9
        capped = min(gbps, copy_gbps) if copy_gbps else gbps
        share = min(1.0, capped / serving.gpu.bandwidth_gbps)
        out[fit.kernel] = (share, f"KV read: {fit.kernel}'s decode fit (R^2 {fit.r2:.3f}) costs "
                                  f"{fit.b_ms_per_token * 1e6:.3g} ns per cached token of {per_token:,.0f} bytes: "
                                  f"{gbps:,.0f} GB/s"
                                  + (f", held to the measured copy's {copy_gbps:,.0f}" if capped < gbps else "")
                                  + f", {100 * share:.0f}% of {serving.gpu.bandwidth_gbps:,.0f}", fit)
    return out


def _claims_cache(shape) -> bool:
    """Whether a curve's shape (or a record) is the claim's cache: bf16, contiguous, every sequence
    as long as the context, no window; older records lack these fields and were all of it."""
    return (kv_bytes(shape.get("kv_dtype")) == DTYPE_BYTES and not _number(shape.get("page_size"))
            and not _number(shape.get("window")) and (fmt.missing(shape.get("lengths")) or shape.get("lengths") == "equal"))


def _number(value) -> float:
    return 0.0 if fmt.missing(value) else float(value)


def _slope(x, y):
    """Least-squares slope of y against x, or None with fewer than two distinct x."""
    import numpy as np
    if x.nunique() < 2:
        return None
    return float(np.polyfit(x.astype(float), y.astype(float), 1)[0])


def _model_kernel(steps: list, kv_by_kernel: dict):
    """The decode kernel the model stands for: the one with the most e2e-decode points and a
    decode fit, else the fastest-reading fitted kernel."""
    counts = Counter(p["kernel"] for p in steps if p["kernel"] in kv_by_kernel)
    if counts:
        return counts.most_common(1)[0][0]
    return max(kv_by_kernel, key=lambda k: kv_by_kernel[k][0]) if kv_by_kernel else None


def _fit_compute_and_overhead(points: list, serving: ServingModel, compute_cap: float) -> dict:
    """The GEMM compute efficiency (at most `compute_cap`) and overhead (at least 0) that fit
    the measured step times best on relative error. For a given efficiency the best overhead
    has a closed form; the efficiency is a bounded one-dimensional search."""
    import numpy as np
    bounded = _deps.require("scipy.optimize", "calibrating the claim model").minimize_scalar
    measured = np.array([p["step_ms"] for p in points])
    weights = 1 / measured**2

    def solve(efficiency):
        model = replace(serving, calibration=replace(serving.calibration, compute_efficiency=efficiency,
                                                     overhead_ms=0.0))
        base = np.array([model.decode_step(p["seq_len"], p["batch"])["step_ms"] for p in points])
        overhead = max(0.0, float(((measured - base) * weights).sum() / weights.sum()))
        return overhead, float((((base + overhead) - measured) / measured) ** 2 @ np.ones(len(points)))

    best = bounded(lambda e: solve(e)[1], bounds=(0.02, compute_cap), method="bounded")
    efficiency = min(compute_cap, float(best.x))
    return {"compute_efficiency": efficiency, "overhead_ms": solve(efficiency)[0]}


def _prefill_attention(fits, model: ModelConfig):
    """(a, b, c) ms per layer and sequence from the fastest quadratic prefill fit of the
    model's attention shape (batch 1, causal), its source and the fit; None without one."""
    matching = [f for f in fits if f.mode == PREFILL and f.model == "quadratic" and f.shape.get("causal")
                and f.shape.get("batch") == 1
                and (f.shape.get("heads"), f.shape.get("kv_heads"), f.shape.get("head_dim"))
                == (model.heads, model.kv_heads, model.head_dim)]
    if not matching:
        return None
    longest = CLAIM["long_ctx"]
    fastest = min(matching, key=lambda f: float(f.predict_ms(longest)))
    return ((fastest.a_ms, fastest.b_ms_per_token, fastest.c_ms_per_token2),
            f"prefill attention: {fastest.kernel}'s prefill fit, {float(fastest.predict_ms(longest)):,.0f} ms per "
            f"layer and sequence at {fmt.k(longest)}", fastest)


# --- how well the model meets what it was fitted to ----------------------------------------------

VALIDATION_KINDS = ("in_sample", "leave_one_out", "uncalibrated")


def model_validation(serving: ServingModel) -> dict | None:
    """The calibrated model's error (measured tok/s over model tok/s, less 1) on the e2e-decode
    points its compute efficiency and overhead were fitted to: in sample (fitted with every
    point), leave-one-out (refitted without the point it predicts) and uncalibrated (fitted to
    no e2e point: the kernel and calibration records alone, compute at the measured matmul's
    share, no overhead). None where no e2e point calibrated the model."""
    cal = serving.calibration
    fitted = next((item for item in cal.provenance if "overhead_ms" in item["parameters"]), None)
    if fitted is None:
        return None
    points, cap = fitted["points"], fitted["compute_efficiency_at_most"]["parameters"]["compute_efficiency_at_most"]
    uncalibrated = replace(serving, calibration=replace(cal, compute_efficiency=cap, overhead_ms=0.0))
    rows = []
    for i, point in enumerate(points):
        rest = points[:i] + points[i + 1:]
        refit = _fit_compute_and_overhead(rest, serving, cap) if rest else None
        left_out = replace(serving, calibration=replace(cal, **refit)) if refit else None
        rows.append({**point, "in_sample_error": _error(serving, point),
                     "leave_one_out_error": _error(left_out, point) if left_out else None,
                     "uncalibrated_error": _error(uncalibrated, point)})
    return {"kernel": points[0]["kernel"], "error": "measured tok/s / model tok/s - 1",
            "uncalibrated_model": f"compute at the measured matmul's {100 * cap:.0f}% of the spec, no per-step "
                                  f"overhead; weights, KV read and batch as calibrated",
            "points": rows, "runs": fitted["runs"], "cards": fitted["cards"],
            "worst": {kind: _worst(rows, f"{kind}_error") for kind in VALIDATION_KINDS}}


def _error(model: ServingModel, point: dict) -> float:
    return float(point["tok_s"] / model.tok_s(point["seq_len"], point["batch"]) - 1)


def _worst(rows: list, key: str) -> dict | None:
    """{error, seq_len, run_id, card} of the row whose `key` is largest in size, or None."""
    known = [row for row in rows if row[key] is not None]
    if not known:
        return None
    row = max(known, key=lambda r: abs(r[key]))
    return {"error": row[key], "seq_len": row["seq_len"], "run_id": row["run_id"], "card": row.get("card")}


def _worst_text(validation: dict, kind: str, where: bool = True) -> str:
    """'at most 5.3% (at 128k)': the largest error of one kind, in size."""
    worst = validation["worst"][kind]
    if not worst:
        return "not known"
    return f"at most {100 * abs(worst['error']):.1f}%" + (f" (at {fmt.k(worst['seq_len'])})" if where else "")


def validation_brief(validation: dict | None) -> str:
    """The three errors in a clause, for a caption or a summary; '' without a validation."""
    if not validation:
        return ""
    errors = [f"{_worst_text(validation, kind, where=False).removeprefix('at most ')} {label}" for kind, label in
              (("in_sample", "in sample"), ("leave_one_out", "leave-one-out"), ("uncalibrated", "uncalibrated"))]
    return (f"model error on the {len(validation['points'])} {validation['kernel']} e2e-decode points it was "
            f"fitted to, at most: {', '.join(errors)}")


def calibration_cards(document: dict) -> list:
    """The cards (short) of every record the document's calibration was taken from."""
    items = document["assumptions"]["calibration"].get("provenance") or []
    nested = [item.get("compute_efficiency_at_most") or {} for item in items]
    return sorted({card for item in items + nested for card in item.get("cards", [])})


def validation_text(validation: dict | None) -> str:
    """One sentence: the in-sample error beside the two out-of-sample ones, each named."""
    if not validation:
        return ""
    cards = {p["run_id"]: p.get("card") for p in validation["points"]}
    runs = ", ".join(named_run(run, cards) for run in validation["runs"])
    return (f"Model error (measured over model, less 1) on the {len(validation['points'])} e2e-decode point(s) of "
            f"{validation['kernel']} from run {runs} that its compute efficiency and per-step overhead were fitted "
            f"to: in sample {_worst_text(validation, 'in_sample')}; out of sample "
            f"{_worst_text(validation, 'leave_one_out')} refitted without each point in turn (leave-one-out), and "
            f"{_worst_text(validation, 'uncalibrated')} with no end-to-end calibration "
            f"({validation['uncalibrated_model']}).")


def build_claim(model=DEFAULT_MODEL, gpu="h100-sxm", *, seq_lens=DEFAULT_SEQ_LENS, num_gpus: int = 1,
                decode_tokens: int = 128, calibration: Calibration | None = None, results=None, fits=None,
                environments=None, what_if=()) -> tuple[dict, list]:
    """The claim document for a model and GPU (presets or configs). With `results` (a loaded
    DataFrame) the model is calibrated on them, with `fits` (of the same records) too, and
    measured points sit beside it. `what_if`: levers (`WhatIf`, or names `what_if` parses)
    drawn by the same model, calibrated alike, and beside each the measurements that test it;
    a lever the results test is drawn whether asked for or not (`tested_levers`). Returns
    (document, notes)."""
    config, spec = model_config(model), gpu_spec(gpu)
    ideal = ServingModel(config, spec, num_gpus=num_gpus, decode_tokens=decode_tokens)
    serving, points, notes, tested = ideal, [], [], {}
    if calibration is not None:
        serving = replace(ideal, calibration=calibration)
    elif results is not None and len(results):
        if fits is None:
            from attnlab.analysis.fits import fit_all
            fits, _ = fit_all(results, environments=environments, n_boot=50)
        on_gpu = results.loc[_gpu_keys(results) == spec.key, "run_id"]
        ideal = replace(ideal, memory_bytes=recorded_memory(environments, on_gpu))
        cards = run_cards(environments)
        points, notes = measured_points(results, ideal, cards)
        points, by_cache, cache_notes = split_by_cache(points)
        contiguous = [p for p in points if not p.get("page_size")]     # paged runs are compared, not fitted
        calibration, kv_by_kernel, cal_notes = calibrate(results, ideal, contiguous, fits, cards)
        notes += cache_notes + cal_notes
        points = [{**p, "kv_bw_efficiency": kv_by_kernel.get(p["kernel"])} for p in points]
        serving = replace(ideal, calibration=calibration)
        tested = {kv: [{**p, "kv_bw_efficiency": kv_by_kernel.get(p["kernel"])} for p in found]
                  for kv, found in by_cache.items()}
        tested.update(window_measurements(results, serving, fits, kv_by_kernel, cards))
    name = model if isinstance(model, str) else config.name
    gpu_key = gpu if isinstance(gpu, str) and gpu in GPU_SPECS else spec.key
    levers = [lever if isinstance(lever, WhatIf) else what_if_named(lever) for lever in what_if]
    levers += tested_levers(tested, levers)
    return explain_claim(serving, seq_lens, points, ideal=ideal, model_name=name, gpu_name=gpu_key,
                         what_if=levers, tested=tested), notes


def infer_gpu(results):
    """The GPU preset key most records name, or None (a CPU run, an unknown device)."""
    if results is None or not len(results):
        return None
    keys = _gpu_keys(results).dropna()
    return keys.value_counts().index[0] if len(keys) else None


def _gpu_keys(results):
    """Each record's GPU preset key (None where its device is unknown)."""
    return results["device"].map(lambda d: getattr(match_gpu(d), "key", None))
