"""Decoder shapes and the memory a decode server needs for them: words bench and analysis share.

Torch-free on purpose: the analysis reads files on machines without torch, and the bench
plans its batches with the same numbers. Byte counts take the element size (`dtype_bytes`,
2 for bfloat16) rather than a dtype object. Tensors mentioned here are in the flash-attn
layout (batch, seqlen, heads, head_dim).

The memory model predicts what torch's allocator holds at the peak of a decode run: the
weights, the KV cache, a fixed workspace, and each sequence's transient activations, which
depend on how the attention implementation treats K and V (`AttentionMemory`, declared by
each implementation in the kernel registry) and on whether the step is captured in a CUDA
graph (a captured step keeps its activations in the graph's pool beside the eager pool).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class Gemm(NamedTuple):
    """One weight matrix a token is multiplied by: (..., in_features) -> (..., out_features)."""

    name: str
    in_features: int
    out_features: int

    @property
    def params(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-style decoder (RMSNorm, rotary embeddings, SwiGLU MLP, GQA)."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    tied_embeddings: bool = False
    window: int = 0             # a sliding window of this many keys per query (0: none)
    softcap: float = 0.0        # attention logits capped at softcap * tanh(s / softcap) (0: none)

    def __post_init__(self):
        for key in ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}: expected a positive integer, got {value!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"kv_heads: heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")

    def layer_gemms(self) -> tuple[Gemm, ...]:
        """The weight matrices one block multiplies every token by, in order: q, k and v fused,
        the output projection, the MLP's gate and up fused, and down."""
        return (Gemm("qkv", self.hidden, (self.heads + 2 * self.kv_heads) * self.head_dim),
                Gemm("out", self.heads * self.head_dim, self.hidden),
                Gemm("gate_up", self.hidden, 2 * self.intermediate),
                Gemm("down", self.intermediate, self.hidden))

    def lm_head_gemm(self) -> Gemm:
        """The projection to logits, a (vocab, hidden) weight: the embedding table when tied."""
        return Gemm("lm_head", self.hidden, self.vocab)

    def layer_params(self) -> int:
        return sum(g.params for g in self.layer_gemms()) + 2 * self.hidden   # two RMSNorm weights

    def param_count(self) -> int:
        embeddings = self.vocab * self.hidden
        lm_head = 0 if self.tied_embeddings else self.lm_head_gemm().params
        return embeddings + lm_head + self.layers * self.layer_params() + self.hidden   # final norm

    def streamed_param_count(self) -> int:
        """Weights a decode step reads: all but the embedding table, of which it gathers rows
        (when tied, the table is read whole as the lm_head)."""
        return self.param_count() - (0 if self.tied_embeddings else self.vocab * self.hidden)

    def weight_bytes(self, dtype_bytes: int) -> int:
        return self.param_count() * dtype_bytes

    def streamed_weight_bytes(self, dtype_bytes: int) -> int:
        return self.streamed_param_count() * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of one token across all layers (128 KiB for Llama-3 8B in bf16)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    def attention_flops_per_key(self) -> int:
        """FLOPs one query token spends per cached key over all layers (q k^T and p v)."""
        return 4 * self.layers * self.heads * self.head_dim


DEFAULT_MODEL = "llama3-8b"     # the served model the claim is about, and every command's default

PRESETS = {
    "llama3-8b": ModelConfig("llama3-8b", layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128,
                             intermediate=14336, vocab=128256),
    "llama3-70b": ModelConfig("llama3-70b", layers=80, hidden=8192, heads=64, kv_heads=8, head_dim=128,
                              intermediate=28672, vocab=128256),
    "llama3.2-1b": ModelConfig("llama3.2-1b", layers=16, hidden=2048, heads=32, kv_heads=8, head_dim=64,
                               intermediate=8192, vocab=128256, tied_embeddings=True),
    # Sliding-window attention over 4096 keys in every layer (Mistral 7B v0.1).
    "mistral-7b": ModelConfig("mistral-7b", layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128,
                              intermediate=14336, vocab=32000, rope_theta=10000.0, window=4096),
    # Logits capped at 50 (Gemma 2 9B); its 4096-key window on alternate layers is a workload option.
    "gemma2-9b": ModelConfig("gemma2-9b", layers=42, hidden=3584, heads=16, kv_heads=8, head_dim=256,
                             intermediate=14336, vocab=256000, rope_theta=10000.0, tied_embeddings=True,
                             softcap=50.0),
    # Small enough for a CPU and Triton's interpreter; head_dim 16 is the Triton kernels' minimum.
    "tiny": ModelConfig("tiny", layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16,
                        intermediate=128, vocab=512, rope_theta=10000.0),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"preset: unknown model preset {name!r}; known: {', '.join(PRESETS)}") from None


# ---------------------------------------------------------------------------------------------
# Memory model: what a decode point needs, from the shapes alone.

FIXED_WORKSPACE_BYTES = 256 * 2**20   # cuBLAS workspace, split-KV partials, allocator rounding
PREFILL_CHUNK_TOKENS = 8192          # tokens per prefill chunk: bounds its activations at 128k


@dataclass(frozen=True)
class AttentionMemory:
    """What one attention call allocates beyond its inputs and output, as an implementation
    declares it for a device type (the kernel registry's `attention_memory`).

    `expands_kv`: K and V are copied out once per query head (GQA expanded), by the
    implementation or by the backend it calls. `fp32_scores`: the (batch, heads, q_len, keys)
    score matrix is materialised, in fp32. `fp32_inputs`: half-precision q, k and v are
    upcast to fp32 first (torch's math backend). `gathers_cache`: a paged or 8-bit KV cache is
    first copied into a contiguous one in q's dtype (an 8-bit one through float32), as an
    implementation without a paged kernel reads it. All False: K and V are streamed in place.
    """

    expands_kv: bool = False
    fp32_scores: bool = False
    fp32_inputs: bool = False
    gathers_cache: bool = False


def attention_workspace_bytes(attention: AttentionMemory, *, batch: int, heads: int, kv_heads: int,
                              head_dim: int, q_len: int, keys: int, dtype_bytes: int) -> int:
    """Transient bytes of one call: queries (batch, q_len, heads, head_dim) over `keys` keys of
    (batch, keys, kv_heads, head_dim) K and V, beyond those inputs and the output."""
    rows = batch * heads * q_len
    total = 0
    upcast = attention.fp32_inputs and dtype_bytes < 4
    if upcast:
        total += 4 * (rows * head_dim + 2 * batch * kv_heads * keys * head_dim)
    if attention.expands_kv:    # copies of the upcast K and V where they were upcast
        total += 2 * batch * heads * keys * head_dim * (4 if upcast else dtype_bytes)
    if attention.fp32_scores:
        # fp32 scores, their masked copy and the probabilities live together, the probabilities
        # also in the input dtype, and a boolean mask per (sequence, query, key).
        total += rows * keys * (3 * 4 + dtype_bytes) + batch * q_len * keys
    else:
        total += rows * 4                                      # a log-sum-exp per query row
    return total


def gathered_cache_bytes(attention: AttentionMemory, *, batch: int, kv_heads: int, head_dim: int, keys: int,
                         dtype_bytes: int, paged: bool, fp8: bool) -> int:
    """Transient bytes of gathering a decode's cache, where the implementation gathers it and the
    cache is paged or 8-bit: K and V copied contiguous in q's dtype, and while an 8-bit one is
    dequantised, one of them in float32 too."""
    if not attention.gathers_cache or not (paged or fp8):
        return 0
    elements = batch * keys * kv_heads * head_dim
    return 2 * elements * dtype_bytes + (elements * 4 if fp8 else 0)


def backward_workspace_bytes(attention: AttentionMemory, *, batch: int, heads: int, kv_heads: int, head_dim: int,
                             q_len: int, keys: int, dtype_bytes: int) -> int:
    """Bytes a backward holds at its peak beyond q, k, v and the forward's output, for queries
    (batch, q_len, heads, head_dim) over `keys` keys: dout, dq, dk and dv; a float32 delta
    (rowsum(dout * out)) per query row; what the forward's working memory kept for the backward
    (`attention_workspace_bytes`: a log-sum-exp per row where fused; under autograd through a
    quadratic forward the scores, probabilities and mask, K and V expanded, upcast inputs); and
    what the backward adds to those: dP in the input dtype with its float32 copy and dS in float32,
    the expanded K and V's gradients, the upcast inputs' gradients."""
    rows = batch * heads * q_len
    kv = 2 * batch * kv_heads * keys * head_dim
    total = (2 * rows * head_dim + kv) * dtype_bytes + 4 * rows      # dout and dq, dk and dv; delta
    total += attention_workspace_bytes(attention, batch=batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                                       q_len=q_len, keys=keys, dtype_bytes=dtype_bytes)
    upcast = attention.fp32_inputs and dtype_bytes < 4
    if attention.fp32_scores:
        total += rows * keys * (2 * 4 + dtype_bytes)
    if attention.expands_kv:
        total += 2 * batch * heads * keys * head_dim * (4 if upcast else dtype_bytes)
    if upcast:
        total += 4 * (rows * head_dim + kv)
    return total


def _dense_bytes_per_token(config: ModelConfig, dtype_bytes: int) -> int:
    """Transient bytes of one token through a block, attention aside: hidden-size vectors,
    q/k/v with fp32 rotary copies, the MLP's intermediates."""
    qkv = (config.heads + 2 * config.kv_heads) * config.head_dim
    return 6 * config.hidden * dtype_bytes + qkv * (dtype_bytes + 3 * 4) + 4 * config.intermediate * dtype_bytes


def activation_bytes_per_sequence(config: ModelConfig, max_seqlen: int, *, attention: AttentionMemory,
                                  dtype_bytes: int, graph: bool) -> int:
    """Transient bytes one sequence adds to a decode step over a cache of max_seqlen positions:
    counted twice when the step is captured in a CUDA graph (the eager warm-up's pool and the
    graph's own pool), once when it runs eagerly."""
    dense = _dense_bytes_per_token(config, dtype_bytes)
    logits = config.vocab * (dtype_bytes + 4)
    attend = attention_workspace_bytes(attention, batch=1, heads=config.heads, kv_heads=config.kv_heads,
                                       head_dim=config.head_dim, q_len=1, keys=max_seqlen,
                                       dtype_bytes=dtype_bytes)
    return (2 if graph else 1) * (dense + logits + attend)


def sequence_bytes(config: ModelConfig, seq_len: int, decode_tokens: int, *, attention: AttentionMemory,
                   dtype_bytes: int, graph: bool, kv_dtype_bytes: int | None = None, paged: bool = False) -> int:
    """KV cache for seq_len + decode_tokens tokens plus this sequence's share of the activations.
    `kv_dtype_bytes`: the cache's element size where it differs from the activations' (1 for an
    8-bit cache); with `paged` the cache is in pages: both count the copy of one layer's cache an
    implementation that gathers it makes (`gathered_cache_bytes`)."""
    max_seqlen = seq_len + decode_tokens
    gathered = gathered_cache_bytes(attention, batch=1, kv_heads=config.kv_heads, head_dim=config.head_dim,
                                    keys=max_seqlen, dtype_bytes=dtype_bytes, paged=paged, fp8=kv_dtype_bytes == 1)
    return (max_seqlen * config.kv_bytes_per_token(kv_dtype_bytes or dtype_bytes) + gathered
            + activation_bytes_per_sequence(config, max_seqlen, attention=attention, dtype_bytes=dtype_bytes,
                                            graph=graph))


def prefill_workspace_bytes(config: ModelConfig, seq_len: int, *, attention: AttentionMemory, dtype_bytes: int,
                            chunk_tokens: int = PREFILL_CHUNK_TOKENS) -> int:
    """Transient bytes of one prefill chunk (bench.model.Decoder.prefill), the cache excluded:
    whole sequences while they fit in chunk_tokens, else one sequence's span of them."""
    sequences = max(1, chunk_tokens // max(seq_len, 1))
    dense = chunk_tokens * _dense_bytes_per_token(config, dtype_bytes)
    logits = sequences * config.vocab * dtype_bytes
    attend = attention_workspace_bytes(attention, batch=sequences, heads=config.heads, kv_heads=config.kv_heads,
                                       head_dim=config.head_dim, q_len=min(chunk_tokens, seq_len), keys=seq_len,
                                       dtype_bytes=dtype_bytes)
    return dense + logits + attend


def predicted_bytes(config: ModelConfig, batch: int, seq_len: int, decode_tokens: int, *,
                    attention: AttentionMemory, dtype_bytes: int, graph: bool,
                    prefill_attention: AttentionMemory | None = None, kv_dtype_bytes: int | None = None,
                    paged: bool = False) -> int:
    """Weights + batch x per-sequence bytes + a fixed workspace + rotary tables, and the prefill
    workspace when prefill_attention describes the implementation that fills the cache.
    `kv_dtype_bytes` and `paged` as for `sequence_bytes`."""
    rope = 2 * (seq_len + decode_tokens) * (config.head_dim // 2) * 4
    prefill = 0
    if prefill_attention is not None:
        prefill = prefill_workspace_bytes(config, seq_len, attention=prefill_attention, dtype_bytes=dtype_bytes)
    per_sequence = sequence_bytes(config, seq_len, decode_tokens, attention=attention, dtype_bytes=dtype_bytes,
                                  graph=graph, kv_dtype_bytes=kv_dtype_bytes, paged=paged)
    return config.weight_bytes(dtype_bytes) + FIXED_WORKSPACE_BYTES + rope + prefill + batch * per_sequence


def largest_batch(config: ModelConfig, seq_len: int, decode_tokens: int, budget_bytes: int, *,
                  attention: AttentionMemory, dtype_bytes: int, graph: bool,
                  prefill_attention: AttentionMemory | None = None, kv_dtype_bytes: int | None = None,
                  paged: bool = False) -> int:
    """The largest batch whose `predicted_bytes` fits in budget_bytes (weights included); 0 if none."""
    terms = dict(attention=attention, dtype_bytes=dtype_bytes, graph=graph, kv_dtype_bytes=kv_dtype_bytes,
                 paged=paged)
    fixed = predicted_bytes(config, 0, seq_len, decode_tokens, prefill_attention=prefill_attention, **terms)
    return max(0, (budget_bytes - fixed) // sequence_bytes(config, seq_len, decode_tokens, **terms))


# ---------------------------------------------------------------------------------------------
# The planner's budget: how much of a device the memory model may fill.

# Memory a CUDA process holds outside torch's allocator: the CUDA context, cuBLAS and the
# loaded kernel modules. Derived from the H100 80GB runs in profiles/h100-80gb-hbm3/2026-11-27
# (gpu_memory_bytes 85017493504 in the environment line of each e2e-*.jsonl): the planner saw
# free + allocated = total - this, less planner_reserve_bytes(total), and each batch it chose
# fitted while one more would not. In e2e-triton-decode.jsonl (batches 431, 229, 118, 60, 30,
# 15, 7, 3 from 1k to 128k) that bounds it between 663.4 and 769.0 MiB, the 2k and 1k points
# being the tightest; in e2e-sdpa-flash.jsonl (346, 24, 3 at 1k, 16k, 128k, planned with K and V
# expanded and a graph pool assumed) between 536.4 and 718.3 MiB. 690 MiB is the middle of what
# both allow, and reproduces every one of those batches.
CUDA_CONTEXT_BYTES = 690 * 2**20


def planner_reserve_bytes(total_bytes: int) -> int:
    """Memory the planner leaves unplanned on a device of total_bytes: the CUDA context's growth
    after planning (cuBLAS handles, Triton modules) and the allocator's fragmentation."""
    return 2**30 + total_bytes // 100


def planner_budget_bytes(free_bytes: int, allocated_bytes: int, total_bytes: int) -> int:
    """The bytes `largest_batch` may plan for, weights included: what the device has free plus
    what this process's allocator already holds (the weights), less the reserve."""
    return free_bytes + allocated_bytes - planner_reserve_bytes(total_bytes)


def budget_from_total(total_bytes: int) -> int:
    """The planner's budget on an otherwise empty device of total_bytes, for a model that knows
    only the card's memory: the CUDA context (CUDA_CONTEXT_BYTES) is all that is not free."""
    return planner_budget_bytes(total_bytes - CUDA_CONTEXT_BYTES, 0, total_bytes)
