"""An analytic serving model that explains "10,000 output tokens/s at 1k of context, 130 at 128k".

The claim (Cartridges, arXiv 2506.06266, Fig. 3 and App. A.3) measures Llama-3 8B on one
H100 with SGLang: decode only, the largest batch that fits in memory, 128 tokens decoded per
sequence. The model separates three effects as context n grows:
  1. the KV cache fills memory, so the largest batch falls roughly as 1/n;
  2. each decode step streams the weights plus every cached token, a read linear in n;
  3. prefill, which the claim leaves out, costs FLOPs quadratic in n.
A decode step is bound by memory: time = bytes / bandwidth, or FLOPs / peak if larger.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field, replace

from attnlab.analysis import _deps
from attnlab.analysis import text as fmt
from attnlab.analysis.roofline import GPU_SPECS, GpuSpec, gpu_spec, match_gpu

CLAIM = {"short_ctx": 1024, "short_tok_s": 10000, "long_ctx": 131072, "long_tok_s": 130}
CLAIM_SOURCE = ("Cartridges (arXiv 2506.06266), Fig. 3 and App. A.3: Llama-3 8B, one H100, SGLang, "
                "decode only, largest batch that fits, 128 tokens decoded per sequence")
DEFAULT_SEQ_LENS = tuple(1024 * 2**i for i in range(8))  # 1k .. 128k
E2E_MODES = ("e2e-decode", "e2e-prefill-decode")


@dataclass(frozen=True)
class ModelConfig:
    """A decoder's shape. `params` counts every weight; untied input embeddings are gathered
    row by row, not streamed, so a decode step reads `streamed_params` of them."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    params: float
    dtype_bytes: int = 2
    tied_embeddings: bool = False

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes  # K and V, every layer

    @property
    def weights_bytes(self) -> float:
        return self.params * self.dtype_bytes

    @property
    def streamed_params(self) -> float:
        return self.params - (0 if self.tied_embeddings else self.vocab * self.hidden)

    def attention_flops_per_key(self) -> float:
        """FLOPs one query token spends per cached key over all layers (q k^T and p v)."""
        return 4.0 * self.layers * self.heads * self.head_dim


MODEL_PRESETS = {
    "llama3-8b": ModelConfig("llama3-8b", 32, 4096, 32, 8, 128, 14336, 128256, 8.03e9),
    "llama3-70b": ModelConfig("llama3-70b", 80, 8192, 64, 8, 128, 28672, 128256, 70.55e9),
    "llama3.2-1b": ModelConfig("llama3.2-1b", 16, 2048, 32, 8, 64, 8192, 128256, 1.24e9, tied_embeddings=True),
}


def model_config(model) -> ModelConfig:
    if isinstance(model, ModelConfig):
        return model
    if model not in MODEL_PRESETS:
        raise ValueError(f"model: {model!r} is not a preset; expected one of {', '.join(MODEL_PRESETS)}")
    return MODEL_PRESETS[model]


@dataclass(frozen=True)
class Calibration:
    """Fractions of the spec peaks the serving stack reaches, and a fixed cost per decode step.
    1, 1, 1, 0 is the ideal machine. `sources` says where each number came from."""

    weights_bw_efficiency: float = 1.0
    kv_bw_efficiency: float = 1.0
    compute_efficiency: float = 1.0
    overhead_ms: float = 0.0
    sources: tuple = ()

    @property
    def is_ideal(self) -> bool:
        return (self.weights_bw_efficiency, self.kv_bw_efficiency, self.compute_efficiency,
                self.overhead_ms) == (1.0, 1.0, 1.0, 0.0)


@dataclass(frozen=True)
class ServingModel:
    """Llama-style decoding on `num_gpus` GPUs (ideal tensor parallelism: memory, bandwidth and
    FLOP/s add up). `mem_fraction` of device memory holds the weights and the KV cache, the
    rest is the runtime's (activations, CUDA graphs); each sequence also caches `decode_tokens`."""

    model: ModelConfig
    gpu: GpuSpec
    num_gpus: int = 1
    decode_tokens: int = 128
    mem_fraction: float = 0.9
    calibration: Calibration = field(default_factory=Calibration)

    def __post_init__(self):
        if not 0 < self.mem_fraction <= 1:
            raise ValueError(f"mem_fraction: expected a fraction in (0, 1], got {self.mem_fraction}")
        if int(self.decode_tokens) < 1:
            raise ValueError(f"decode_tokens: expected at least 1, got {self.decode_tokens}")
        if int(self.num_gpus) < 1:
            raise ValueError(f"num_gpus: expected at least 1, got {self.num_gpus}")

    @property
    def bandwidth_bytes_s(self) -> float:
        return self.gpu.bandwidth_gbps * 1e9 * self.num_gpus

    @property
    def peak_flops(self) -> float:
        return self.gpu.bf16_tflops * 1e12 * self.num_gpus

    @property
    def kv_budget_bytes(self) -> float:
        return self.gpu.memory_bytes * self.num_gpus * self.mem_fraction - self.model.weights_bytes

    def max_batch(self, seq_len: int) -> int:
        """Sequences of `seq_len` context (plus the decoded tokens) whose KV cache fits."""
        per_sequence = (seq_len + self.decode_tokens) * self.model.kv_bytes_per_token
        return max(0, int(self.kv_budget_bytes // per_sequence))

    def decode_step(self, seq_len: int, batch: int) -> dict:
        """Time of one decode step for `batch` sequences at `seq_len` (averaged over the decoded
        tokens), with the bytes, FLOPs and the part each term takes, in ms."""
        cal, m = self.calibration, self.model
        context = seq_len + self.decode_tokens / 2
        weights_bytes = m.streamed_params * m.dtype_bytes
        kv_bytes = batch * context * m.kv_bytes_per_token
        flops = batch * (2 * m.streamed_params + m.attention_flops_per_key() * context)
        weights_ms = 1e3 * weights_bytes / (self.bandwidth_bytes_s * cal.weights_bw_efficiency)
        kv_ms = 1e3 * kv_bytes / (self.bandwidth_bytes_s * cal.kv_bw_efficiency)
        compute_ms = 1e3 * flops / (self.peak_flops * cal.compute_efficiency)
        return {"step_ms": max(weights_ms + kv_ms, compute_ms) + cal.overhead_ms, "weights_ms": weights_ms,
                "kv_ms": kv_ms, "compute_ms": compute_ms, "bytes": weights_bytes + kv_bytes, "flops": flops}

    def prefill_ms(self, seq_len: int, batch: int) -> float:
        """Prefill of `batch` prompts of `seq_len` tokens: linear matmul FLOPs plus causal
        attention, n^2 / 2 query-key pairs per head and layer; compute-bound."""
        m = self.model
        flops = batch * (2 * m.streamed_params * seq_len + m.attention_flops_per_key() * seq_len**2 / 2)
        return 1e3 * flops / (self.peak_flops * self.calibration.compute_efficiency)

    def point(self, seq_len: int) -> dict:
        """The contract fields for one context length, and the terms behind them."""
        batch = self.max_batch(seq_len)
        one = self.decode_step(seq_len, 1)
        # Where not one sequence fits, nothing is served: every rate is 0.
        point = {"seq_len": int(seq_len), "max_batch": batch, "tok_s_max_batch": 0.0,
                 "tok_s_batch1": 1e3 / one["step_ms"] if batch else 0.0, "tok_s_with_prefill": 0.0,
                 "step_ms_batch1": one["step_ms"], "step_ms_max_batch": None, "prefill_ms_max_batch": None,
                 "kv_share_of_step_max_batch": None}
        if batch:
            step = self.decode_step(seq_len, batch)
            prefill_ms = self.prefill_ms(seq_len, batch)
            decode_ms = self.decode_tokens * step["step_ms"]
            point.update(tok_s_max_batch=1e3 * batch / step["step_ms"], step_ms_max_batch=step["step_ms"],
                         tok_s_with_prefill=1e3 * batch * self.decode_tokens / (prefill_ms + decode_ms),
                         prefill_ms_max_batch=prefill_ms,
                         kv_share_of_step_max_batch=step["kv_ms"] / (step["weights_ms"] + step["kv_ms"]))
        return point


def _ratio(short: float, long: float):
    return short / long if long else None


def explain_claim(serving: ServingModel, seq_lens=DEFAULT_SEQ_LENS, measured=(), ideal: ServingModel | None = None,
                  model_name: str | None = None, gpu_name: str | None = None) -> dict:
    """The `attnlab claim --json` document: model points for `seq_lens`, the three ratios
    (short over long context, at the claim's two lengths) and an explanation in words.
    `measured`: points from end-to-end records (see `measured_points`); `ideal`: the
    uncalibrated model, reported beside a calibrated one."""
    seq_lens = sorted({int(n) for n in seq_lens})
    if not seq_lens or seq_lens[0] < 1:
        raise ValueError(f"seq_lens: expected positive context lengths, got {seq_lens}")
    short, long = serving.point(CLAIM["short_ctx"]), serving.point(CLAIM["long_ctx"])
    ratios = {f"ratio_{k}": _ratio(short[f"tok_s_{k}"], long[f"tok_s_{k}"])
              for k in ("max_batch", "batch1", "with_prefill")}
    m = serving.model
    document = {
        "model": model_name or m.name, "gpu": gpu_name or serving.gpu.key, "num_gpus": serving.num_gpus,
        "claim": dict(CLAIM), "claim_source": CLAIM_SOURCE,
        "points": [serving.point(n) for n in seq_lens], **ratios,
        "factors": _factors(short, long),
        "kv_bytes_per_token": m.kv_bytes_per_token, "weights_bytes": m.weights_bytes,
        "kv_budget_bytes": serving.kv_budget_bytes,
        "assumptions": {"decode_tokens": serving.decode_tokens, "mem_fraction": serving.mem_fraction,
                        "step_time": "max(bytes / bandwidth, FLOPs / peak) + overhead",
                        "calibration": _calibration_dict(serving.calibration)},
        "model_config": asdict(m), "gpu_config": asdict(serving.gpu),
        "measured": list(measured), "measured_ratios": measured_ratios(measured),
    }
    if ideal is not None and not serving.calibration.is_ideal:
        document["ideal_points"] = [ideal.point(n) for n in seq_lens]
    document["explanation"] = _explanation(serving, short, long, document)
    return document


def _factors(short: dict, long: dict) -> dict:
    """The max-batch ratio as (batch falls) x (step time grows)."""
    batch = _ratio(short["max_batch"], long["max_batch"])
    step = (long["step_ms_max_batch"] / short["step_ms_max_batch"]
            if long["step_ms_max_batch"] and short["step_ms_max_batch"] else None)
    return {"max_batch_short": short["max_batch"], "max_batch_long": long["max_batch"], "batch_falls": batch,
            "step_time_grows": step, "step_ms_batch1_short": short["step_ms_batch1"],
            "step_ms_batch1_long": long["step_ms_batch1"]}


def _calibration_dict(cal: Calibration) -> dict:
    out = asdict(cal)
    out["sources"] = list(cal.sources)
    out["ideal"] = cal.is_ideal
    return out


def _explanation(serving: ServingModel, short: dict, long: dict, doc: dict) -> str:
    m, f = serving.model, doc["factors"]
    s, l = fmt.k(CLAIM["short_ctx"]), fmt.k(CLAIM["long_ctx"])
    claimed = CLAIM["short_tok_s"] / CLAIM["long_tok_s"]
    kind = ("ideal: spec peaks, no per-step overhead, an upper bound" if serving.calibration.is_ideal
            else "calibrated on measurements")
    usable_gib = (serving.kv_budget_bytes + m.weights_bytes) / 2**30
    parts = [f"{m.name} on {serving.num_gpus} x {serving.gpu.name}, {kind}. KV cache: "
             f"{m.kv_bytes_per_token / 1024:.0f} KiB per token; the weights ({m.weights_bytes / 2**30:.1f} GiB) "
             f"leave {max(0.0, serving.kv_budget_bytes) / 2**30:.1f} of {usable_gib:.1f} GiB for it."]
    if not long["max_batch"]:
        parts.append(f"Not even one sequence of {l} fits beside the weights, so the model serves nothing "
                     f"at {l}; use more GPUs (num_gpus) or a smaller model.")
        return " ".join(parts)
    parts += [
        f"(1) The KV cache fills memory: the largest batch falls from {f['max_batch_short']} at {s} to "
        f"{f['max_batch_long']} at {l} ({f['batch_falls']:.0f}x).",
        f"(2) Each decode step streams the weights plus every cached token; at the largest batch memory is "
        f"full of KV at both lengths, so the step time changes only {f['step_time_grows']:.2f}x. Together: "
        f"{short['tok_s_max_batch']:,.0f} -> {long['tok_s_max_batch']:,.0f} tokens/s, "
        f"{doc['ratio_max_batch']:.0f}x, against the claim's {CLAIM['short_tok_s']:,} -> "
        f"{CLAIM['long_tok_s']} ({claimed:.0f}x).",
        f"(3) At batch 1 only the linear KV read is left: {short['tok_s_batch1']:,.0f} -> "
        f"{long['tok_s_batch1']:,.0f} tokens/s, {doc['ratio_batch1']:.1f}x.",
        f"(4) Attention's quadratic cost is in prefill, which the claim leaves out; counting the prefill of "
        f"the context at the largest batch, the drop would be {doc['ratio_with_prefill']:.0f}x.",
        "So the drop is mostly batch size lost to KV memory, not the quadratic cost of attention.",
    ]
    return " ".join(parts)


# --- measurements -----------------------------------------------------------------------------

def measured_points(results, serving: ServingModel) -> tuple[list, list]:
    """End-to-end records (modes e2e-decode, e2e-prefill-decode) for this model and GPU, as
    points {seq_len, batch, tok_s, step_ms, mode, kernel, device, run_id}; and notes on what
    was left out and why."""
    rows = results[results["mode"].isin(E2E_MODES) & (results["status"] == "ok")]
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
                           "kernel": row["kernel"], "device": row["device"], "run_id": row["run_id"]})
    notes = [f"left out {count} end-to-end record(s): {why}" for why, count in left_out.items()]
    return sorted(points, key=lambda p: (p["mode"], p["kernel"], p["seq_len"])), notes


def _int_or_none(value):
    return int(value) if value == value and value is not None else None


def measured_ratios(points) -> list:
    """Short over long tokens/s per (mode, kernel), between its shortest and longest context."""
    groups = {}
    for p in points:
        groups.setdefault((p["mode"], p["kernel"]), []).append(p)
    out = []
    for (mode, kernel), group in sorted(groups.items()):
        first, last = min(group, key=lambda p: p["seq_len"]), max(group, key=lambda p: p["seq_len"])
        if last["seq_len"] > first["seq_len"]:
            out.append({"mode": mode, "kernel": kernel, "short_ctx": first["seq_len"], "long_ctx": last["seq_len"],
                        "ratio": first["tok_s"] / last["tok_s"]})
    return out


def calibrate(results, serving: ServingModel, points=()) -> tuple[Calibration, list]:
    """Efficiencies from measurements on this GPU: compute from the run's matmul calibration;
    KV bandwidth from decode-kernel records (the kernel the end-to-end runs used, else the
    best); weights bandwidth from e2e-decode step times. Returns the calibration and notes;
    whatever has no data stays ideal."""
    on_gpu = results[_gpu_keys(results) == serving.gpu.key]
    on_gpu = on_gpu[on_gpu["status"] == "ok"]
    if on_gpu.empty:
        return Calibration(), [f"none of the results was measured on {serving.gpu.name}: the model stays ideal"]
    sources, notes, values = [], [], {}
    matmul = on_gpu[(on_gpu["mode"] == "calibration") & on_gpu["kernel"].str.startswith("matmul")]["tflops"].dropna()
    if len(matmul):
        values["compute_efficiency"] = min(1.0, float(matmul.max()) / serving.gpu.bf16_tflops)
        sources.append(f"compute: measured matmul {matmul.max():.0f} of {serving.gpu.bf16_tflops:.0f} TFLOP/s")
    e2e_kernels = {p["kernel"] for p in points if p["mode"] == "e2e-decode"}
    kv = _kv_efficiency(on_gpu[on_gpu["mode"] == "decode"], serving.gpu, e2e_kernels)
    if kv:
        values["kv_bw_efficiency"] = kv[0]
        sources.append(kv[1])
    steps = [p for p in points if p["mode"] == "e2e-decode" and p["batch"] and p["step_ms"]]
    if steps:
        values.update(_fit_step_times(steps, replace(serving, calibration=Calibration(**values)), shared=not kv))
        calibrated = replace(serving, calibration=Calibration(**values))
        worst = max(abs(calibrated.decode_step(p["seq_len"], p["batch"])["step_ms"] / p["step_ms"] - 1) for p in steps)
        what = "weights bandwidth" if kv else "weights and KV bandwidth"
        sources.append(f"{what}: {100 * values['weights_bw_efficiency']:.0f}% fitted to {len(steps)} "
                       f"e2e-decode step time(s); the model is within {100 * worst:.1f}% of each")
    else:
        notes.append("no e2e-decode records with batch and step time on this GPU: the weights read stays ideal")
    return Calibration(**values, sources=tuple(sources)), notes


def _kv_efficiency(decode, gpu: GpuSpec, prefer: set):
    """(median share of bandwidth over the longer half of lengths, source) for one kernel."""
    decode = decode[decode["gbps"] > 0]
    if decode.empty:
        return None
    shares = {}
    for kernel, rows in decode.groupby("kernel"):
        lengths = sorted(rows["seq_len"].unique())
        upper = rows[rows["seq_len"] >= lengths[len(lengths) // 2]]
        shares[kernel] = float((upper["gbps"] / gpu.bandwidth_gbps).median())
    chosen = [k for k in shares if k in prefer] or list(shares)
    kernel = max(chosen, key=shares.get)
    share = min(1.0, shares[kernel])
    return share, f"KV bandwidth: decode kernel {kernel} reached {100 * share:.0f}% of {gpu.bandwidth_gbps:.0f} GB/s"


def _fit_step_times(points: list, serving: ServingModel, shared: bool) -> dict:
    """The weights-read efficiency (<= 1) that best fits measured step times on relative error,
    the KV term keeping its efficiency. A weights read and a fixed per-step cost are both
    constant per step, so step times cannot tell them apart: the efficiency absorbs both.
    `shared`: no KV efficiency is known, so one efficiency scales both reads."""
    import numpy as np
    bounded = _deps.require("scipy.optimize", "calibrating the claim model").minimize_scalar
    steps = [replace(serving, calibration=Calibration(kv_bw_efficiency=serving.calibration.kv_bw_efficiency))
             .decode_step(p["seq_len"], p["batch"]) for p in points]
    weights_ms = np.array([s["weights_ms"] for s in steps])
    kv_ms = np.array([s["kv_ms"] for s in steps])
    measured = np.array([p["step_ms"] for p in points])
    if shared:
        kv_ms = kv_ms * serving.calibration.kv_bw_efficiency  # back to the ideal time, scaled with the weights

    def loss(efficiency):
        scale = 1.0 / efficiency
        predicted = weights_ms * scale + kv_ms * (scale if shared else 1.0)
        return float((((predicted - measured) / measured) ** 2).sum())

    efficiency = float(bounded(loss, bounds=(1e-3, 1.0), method="bounded").x)
    return {"weights_bw_efficiency": efficiency, **({"kv_bw_efficiency": efficiency} if shared else {})}


def build_claim(model="llama3-8b", gpu="h100-sxm", *, seq_lens=DEFAULT_SEQ_LENS, num_gpus: int = 1,
                decode_tokens: int = 128, mem_fraction: float = 0.9, calibration: Calibration | None = None,
                results=None) -> tuple[dict, list]:
    """The claim document for a model and GPU (presets or configs). With `results` (a loaded
    DataFrame), the model is calibrated on them and measured points sit beside it.
    Returns (document, notes)."""
    config, spec = model_config(model), gpu_spec(gpu)
    ideal = ServingModel(config, spec, num_gpus=num_gpus, decode_tokens=decode_tokens, mem_fraction=mem_fraction)
    serving, points, notes = ideal, [], []
    if calibration is not None:
        serving = replace(ideal, calibration=calibration)
    elif results is not None and len(results):
        points, notes = measured_points(results, ideal)
        calibration, cal_notes = calibrate(results, ideal, points)
        notes += cal_notes
        serving = replace(ideal, calibration=calibration)
    name = model if isinstance(model, str) else config.name
    gpu_key = gpu if isinstance(gpu, str) and gpu in GPU_SPECS else spec.key
    return explain_claim(serving, seq_lens, points, ideal=ideal, model_name=name, gpu_name=gpu_key), notes


def infer_gpu(results):
    """The GPU preset key most records name, or None (a CPU run, an unknown device)."""
    if results is None or not len(results):
        return None
    keys = _gpu_keys(results).dropna()
    return keys.value_counts().index[0] if len(keys) else None


def _gpu_keys(results):
    """Each record's GPU preset key (None where its device is unknown)."""
    return results["device"].map(lambda d: getattr(match_gpu(d), "key", None))
