"""A Llama-shaped decoder from random weights, for end-to-end decode throughput.

The shapes (`ModelConfig`, the presets) and the memory model that plans its batches live in
the torch-free attnlab.models; this module holds the tensors and the code that runs them.

Nothing is downloaded: the weights are random, so the numbers say what the shapes cost,
not what a trained model outputs. Attention goes through attnlab.kernels (decode_attention
for decoding, attention for prefill) with the implementation chosen by name. The KV cache
is preallocated, one (batch, max_seqlen, kv_heads, head_dim) tensor per layer for K and for
V, or as servers keep it, pages (num_blocks, page_size, kv_heads, head_dim) in shuffled
physical order behind a block table, in the model's dtype or in 8 bits with a descale per
(sequence, kv head); it is written in place, so a decode step has static shapes and can be
captured in a CUDA graph where the attention implementation never reads the device from the host.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from attnlab.kernels import DECODE, PREFILL, Implementation, decode_attention, get, resolve
from attnlab.kernels import attention as attention_fn
from attnlab.bench.point_call import check_cached
from attnlab.models import PREFILL_CHUNK_TOKENS, Gemm, ModelConfig


# ---------------------------------------------------------------------------------------------
# Weights and cache.

@dataclass
class LayerWeights:
    """One block's weights; linear weights are (out_features, in_features) as in F.linear."""

    attn_norm: torch.Tensor      # (hidden,)
    qkv: torch.Tensor            # ((heads + 2 kv_heads) * head_dim, hidden): q, then k, then v
    out: torch.Tensor            # (hidden, heads * head_dim)
    mlp_norm: torch.Tensor       # (hidden,)
    gate_up: torch.Tensor        # (2 * intermediate, hidden): gate rows, then up rows
    down: torch.Tensor           # (hidden, intermediate)


@dataclass
class Weights:
    embed: torch.Tensor          # (vocab, hidden)
    layers: list = field(default_factory=list)
    norm: torch.Tensor = None    # (hidden,)
    lm_head: torch.Tensor = None  # (vocab, hidden); the embedding itself when tied

    def tensors(self) -> list:
        unique = {id(t): t for t in [self.embed, self.norm, self.lm_head]}
        for layer in self.layers:
            unique.update((id(t), t) for t in vars(layer).values())
        return list(unique.values())


def random_weights(config: ModelConfig, device, dtype: torch.dtype, seed: int = 0) -> Weights:
    """Random weights scaled by 1/sqrt(fan_in), so activations stay O(1) through any depth."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def linear(gemm: Gemm):
        return (torch.randn(gemm.out_features, gemm.in_features, generator=gen, device=device, dtype=dtype)
                .mul_(1 / math.sqrt(gemm.in_features)))

    def norm():  # near 1, but not 1, so a test notices a norm weight that is ignored
        return torch.randn(config.hidden, generator=gen, device=device, dtype=dtype).mul_(0.1).add_(1)

    qkv, out, gate_up, down = config.layer_gemms()
    embed = torch.randn(config.vocab, config.hidden, generator=gen, device=device, dtype=dtype)
    layers = [LayerWeights(norm(), linear(qkv), linear(out), norm(), linear(gate_up), linear(down))
              for _ in range(config.layers)]
    lm_head = embed if config.tied_embeddings else linear(config.lm_head_gemm())
    return Weights(embed, layers, norm(), lm_head)


# An 8-bit cache's descale: stored x descale is the value attended, so values up to about this many
# standard deviations of the random fill (and of the model's K and V, which stay O(1)) fit the format.
FP8_SPAN = 16.0


def fp8_descale(dtype: torch.dtype) -> float:
    """FP8_SPAN over the format's largest value, rounded to a power of two: every stored value
    times it is then exact in bf16 (and float32), as a kernel that dequantises in q's dtype reads it."""
    return 2.0 ** round(math.log2(FP8_SPAN / torch.finfo(dtype).max))
FILL_CHUNK_ELEMENTS = 1 << 24     # an 8-bit fill draws this many values at a time (64 MiB in float32)


class KVCache:
    """K and V for every layer in one allocation. Contiguous (page_size 0): layer l's K is
    (batch, max_seqlen, kv_heads, head_dim). Paged: (num_blocks, page_size, kv_heads, head_dim),
    each sequence owning ceil(max_seqlen / page_size) pages in shuffled physical order, found
    through `block_table` (batch, pages per sequence) int32. In an 8-bit `dtype` each (layer,
    K or V, sequence, kv head) has a float32 descale, all `fp8_descale(dtype)`."""

    def __init__(self, config: ModelConfig, batch: int, max_seqlen: int, device, dtype: torch.dtype,
                 page_size: int = 0, seed: int = 0):
        self.batch, self.max_seqlen, self.page_size = batch, max_seqlen, page_size
        rows, slots = batch, max_seqlen
        self.block_table = None
        if page_size:
            pages = math.ceil(max_seqlen / page_size)
            rows, slots = batch * pages, page_size
            gen = torch.Generator().manual_seed(seed)
            self.block_table = torch.randperm(rows, generator=gen).view(batch, pages).to(device, torch.int32)
        # Zeros, not empty: slots past a sequence's length must be finite, since an implementation
        # that multiplies them by zero probability would turn garbage NaN into NaN output.
        self.data = torch.zeros(config.layers, 2, rows, slots, config.kv_heads, config.head_dim,
                                device=device, dtype=dtype)
        self.descale = None
        if self.fp8:
            self.descale = torch.full((config.layers, 2, batch, config.kv_heads), fp8_descale(dtype), device=device,
                                      dtype=torch.float32)

    @property
    def fp8(self) -> bool:
        return self.data.element_size() == 1

    def k(self, layer: int) -> torch.Tensor:
        return self.data[layer, 0]

    def v(self, layer: int) -> torch.Tensor:
        return self.data[layer, 1]

    def options(self, layer: int) -> dict:
        """decode_attention's cache keywords for `layer`: block_table, k_descale and v_descale
        where the cache has them."""
        found = {"block_table": self.block_table}
        if self.descale is not None:
            found.update(k_descale=self.descale[layer, 0], v_descale=self.descale[layer, 1])
        return {name: t for name, t in found.items() if t is not None}

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one new token per sequence: k and v (batch, 1, kv_heads, head_dim) at `positions`
        (batch,) long, on the device, without reading it on the host (a CUDA graph replays this)."""
        if self.page_size:
            rows = self.block_table.gather(1, (positions // self.page_size)[:, None])[:, 0].long()
            slots = positions % self.page_size
        else:
            rows, slots = torch.arange(self.batch, device=positions.device), positions
        for kind, values in enumerate((k, v)):
            self.data[layer, kind][rows, slots] = self._stored(values[:, 0], layer, kind)

    def _stored(self, values: torch.Tensor, layer: int, kind: int) -> torch.Tensor:
        """values (batch, kv_heads, head_dim) as the cache holds them: divided by their descale and
        held to the format's range where it is 8-bit."""
        if not self.fp8:
            return values
        largest = torch.finfo(self.data.dtype).max
        scaled = values.float() / self.descale[layer, kind][:, :, None]
        return scaled.clamp(-largest, largest).to(self.data.dtype)

    @property
    def nbytes(self) -> int:
        extra = [t for t in (self.descale, self.block_table) if t is not None]
        return sum(t.numel() * t.element_size() for t in (self.data, *extra))

    def fill_random(self, seed: int = 0) -> None:
        """Random K/V (standard normal), one in-place pass per layer: cheap even at 60 GiB. An 8-bit
        cache draws the values in chunks and stores them over its descale."""
        gen = torch.Generator(device=self.data.device).manual_seed(seed)
        if not self.fp8:
            for layer in self.data:
                layer.normal_(generator=gen)
            return
        descale, largest = fp8_descale(self.data.dtype), torch.finfo(self.data.dtype).max
        flat = self.data.view(-1, self.data.shape[-1])
        step = max(1, FILL_CHUNK_ELEMENTS // flat.shape[1])
        for first in range(0, flat.shape[0], step):
            chunk = flat[first:first + step]
            values = torch.randn(chunk.shape, generator=gen, device=chunk.device) / descale
            chunk.copy_(values.clamp(-largest, largest).to(chunk.dtype))


# ---------------------------------------------------------------------------------------------
# The decoder.

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rope_tables(config: ModelConfig, max_positions: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, float32 (max_positions, head_dim / 2), for the rotate-half convention."""
    half = config.head_dim // 2
    inv_freq = config.rope_theta ** (-torch.arange(half, dtype=torch.float64, device=device) / half)
    angles = torch.arange(max_positions, dtype=torch.float64, device=device)[:, None] * inv_freq
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (batch, seqlen, heads, head_dim); cos, sin (batch, seqlen, head_dim / 2); math in fp32."""
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


class Decoder:
    """A Llama-shaped decoder with random weights; `prefill` and `StaticDecoder` run it."""

    def __init__(self, config: ModelConfig, device="cpu", dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                 kv_dtype: torch.dtype | None = None, page_size: int = 0):
        self.config, self.device, self.dtype = config, torch.device(device), dtype
        self.kv_dtype, self.page_size = kv_dtype or dtype, page_size     # how its caches are kept
        self.weights = random_weights(config, self.device, dtype, seed)
        self.scale = 1.0 / math.sqrt(config.head_dim)

    def new_cache(self, batch: int, max_seqlen: int) -> KVCache:
        return KVCache(self.config, batch, max_seqlen, self.device, self.kv_dtype, page_size=self.page_size)

    def rope(self, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_tables(self.config, max_positions, self.device)

    def project_qkv(self, layer: LayerWeights, x: torch.Tensor, cos, sin):
        """x (batch, seqlen, hidden) -> q (batch, seqlen, heads, head_dim), k, v (..., kv_heads, head_dim)."""
        c = self.config
        h = rms_norm(x, layer.attn_norm, c.norm_eps)
        qkv = F.linear(h, layer.qkv).unflatten(-1, (c.heads + 2 * c.kv_heads, c.head_dim))
        q, k, v = qkv.split((c.heads, c.kv_heads, c.kv_heads), dim=2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def finish_block(self, layer: LayerWeights, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Output projection and residual, then the SwiGLU MLP and its residual."""
        x = x + F.linear(attn.flatten(-2), layer.out)
        gate, up = F.linear(rms_norm(x, layer.mlp_norm, self.config.norm_eps), layer.gate_up).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, layer.down)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(rms_norm(x, self.weights.norm, self.config.norm_eps), self.weights.lm_head)

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, cache: KVCache, *, impl: str = "auto",
                chunk_tokens: int = PREFILL_CHUNK_TOKENS, first_row: int = 0) -> torch.Tensor:
        """Run tokens (batch, seqlen) through the model, writing K/V to cache rows
        [first_row, first_row + batch), positions [0, seqlen).

        Works in chunks of at most chunk_tokens tokens (whole sequences while they fit, else
        one sequence's positions), so activations stay bounded at 128k. Each chunk attends to
        the cache up to its end through attnlab.kernels.attention with bottom-right causal
        masking. Returns the last position's logits (batch, vocab).
        """
        batch, seqlen = tokens.shape
        if cache.page_size or cache.fp8:
            raise ValueError("cache: prefill fills a contiguous cache in the model's dtype; a paged or 8-bit one is "
                             "filled with random values (fill_random)")
        if seqlen > cache.max_seqlen or not 0 <= first_row <= cache.batch - batch:
            raise ValueError(f"tokens: shape {tuple(tokens.shape)} from row {first_row} does not fit a "
                             f"cache of batch {cache.batch}, max_seqlen {cache.max_seqlen}")
        cos, sin = self.rope(seqlen)
        seqs = max(1, chunk_tokens // max(seqlen, 1))
        span = min(seqlen, max(1, chunk_tokens))
        last = []
        for b0 in range(0, batch, seqs):
            b1 = min(batch, b0 + seqs)
            for s0 in range(0, seqlen, span):
                out = self._prefill_chunk(tokens[b0:b1, s0:s0 + span], cache, first_row + b0, s0,
                                          cos, sin, impl)
            last.append(out)
        return torch.cat(last)

    def _prefill_chunk(self, tokens, cache: KVCache, b0: int, s0: int, cos, sin, impl: str):
        b1, s1 = b0 + tokens.shape[0], s0 + tokens.shape[1]
        x = F.embedding(tokens, self.weights.embed)
        c, s = cos[s0:s1].expand(tokens.shape[0], -1, -1), sin[s0:s1].expand(tokens.shape[0], -1, -1)
        for i, layer in enumerate(self.weights.layers):
            q, k, v = self.project_qkv(layer, x, c, s)
            k_cache, v_cache = cache.k(i)[b0:b1], cache.v(i)[b0:b1]
            k_cache[:, s0:s1], v_cache[:, s0:s1] = k, v
            attn = attention_fn(q, k_cache[:, :s1], v_cache[:, :s1], causal=True, scale=self.scale, impl=impl)
            x = self.finish_block(layer, x, attn)
        return self.logits(x[:, -1])


def why_not_captured(attention: Implementation, device: torch.device) -> str:
    """Why a decode step attending with this implementation cannot be captured as a CUDA graph
    on device; "" where it can (capture may still fail, and says so in `graph_reason`)."""
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if attention.decode_reads_lengths_on_host:
        return f"{attention.name} reads cache lengths on the host"
    return ""


class StaticDecoder:
    """Greedy decoding with static buffers: one step feeds its argmax token to the next.

    tokens (batch,) and lengths (batch,) int32 live on the device and are updated in place, so
    a step launches the same work at the same addresses every time and `capture()` can record
    it as a CUDA graph. The first step goes through decode_attention with all its
    checks, and its first layer's attention is checked against float64 (`WrongOutput` where it
    fails); later steps call the implementation it resolved directly, since shapes never change
    and the host counts lengths against max_seqlen itself.
    """

    def __init__(self, model: Decoder, cache: KVCache, attention: str = "auto"):
        self.model, self.cache = model, cache
        c = model.config
        probe = torch.empty(cache.batch, 1, c.heads, c.head_dim, device=model.device, dtype=model.dtype)
        self.attention = resolve(attention, DECODE, probe, page_size=cache.page_size, kv_dtype=cache.data.dtype)
        # Every layer's call has one shape: one workspace serves them all, one after another.
        self.workspace = dict(workspace={}) if self.attention.decode_workspace else {}
        self.tokens = torch.zeros(cache.batch, dtype=torch.long, device=model.device)
        self.lengths = torch.zeros(cache.batch, dtype=torch.int32, device=model.device)
        self.cos, self.sin = model.rope(cache.max_seqlen)
        self.graph, self.graph_reason = None, "not captured"
        self.length = 0          # the host's copy of every sequence's length
        self._checked = False
        self._logits = None

    @property
    def cuda_graph(self) -> bool:
        return self.graph is not None

    def reset(self, seq_len: int, tokens: torch.Tensor | None = None) -> None:
        """Every sequence holds seq_len cached tokens; the next input token is `tokens` (or 0)."""
        if not 0 <= seq_len < self.cache.max_seqlen:
            raise ValueError(f"seq_len: expected 0 to {self.cache.max_seqlen - 1} (max_seqlen - 1), got {seq_len}")
        self.lengths.fill_(seq_len)
        self.tokens.copy_(tokens if tokens is not None else torch.zeros_like(self.tokens))
        self.length = seq_len

    def step(self) -> torch.Tensor:
        """Decode one token per sequence; returns this step's logits (batch, vocab)."""
        if self.length + 1 > self.cache.max_seqlen:
            raise ValueError(f"step: the cache is full (max_seqlen {self.cache.max_seqlen})")
        if self.graph is not None:
            self.graph.replay()
        else:
            self._logits = self._forward()
        self.length += 1
        return self._logits

    def capture(self, seq_len: int, warmup_steps: int = 2) -> bool:
        """Record one step as a CUDA graph where the implementation allows; else stay eager.

        Warm-up steps (compilation, autotuning) run from seq_len each, so they never run past
        the cache; the decoder is left reset to seq_len. `graph_reason` says why no graph.
        """
        self.reset(seq_len)
        reason = why_not_captured(self.attention, self.model.device)
        if reason:
            self.graph_reason = reason
            return False
        for _ in range(max(1, warmup_steps)):
            self.reset(seq_len)
            self.step()
        self.reset(seq_len)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward()
        torch.cuda.current_stream().wait_stream(side)
        self.reset(seq_len)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                logits = self._forward()
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:
            self.graph_reason = f"capture failed: {str(exc).splitlines()[0][:200]}"
            return False
        self.graph, self._logits, self.graph_reason = graph, logits, ""
        return True

    @torch.no_grad()
    def _forward(self) -> torch.Tensor:
        model, cache = self.model, self.cache
        positions = self.lengths.long()
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]
        lengths_after = self.lengths + 1
        x = F.embedding(self.tokens, model.weights.embed)[:, None]          # (batch, 1, hidden)
        for i, layer in enumerate(model.weights.layers):
            q, k, v = model.project_qkv(layer, x, cos, sin)
            cache.write(i, positions, k, v)
            attn = self._attend(q, i, lengths_after)
            x = model.finish_block(layer, x, attn)
        self._checked = True
        logits = model.logits(x[:, 0])
        self.tokens.copy_(logits.argmax(dim=-1))
        self.lengths.add_(1)
        return logits

    def _attend(self, q, layer: int, lengths):
        k_cache, v_cache, options = self.cache.k(layer), self.cache.v(layer), self.cache.options(layer)
        if not self._checked:
            out = decode_attention(q, k_cache, v_cache, lengths, scale=self.model.scale, impl=self.attention.name,
                                   **options)
            inputs = dict(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=lengths, **options)
            verdict = check_cached(out, inputs, scale=self.model.scale)
            if not verdict.ok:     # a decoder on wrong attention measures no model's speed
                raise WrongOutput(self.attention.name, verdict)
            return out
        return self.attention.decode(q, k_cache, v_cache, lengths, self.model.scale, **options, **self.workspace)


class WrongOutput(ValueError):
    """The attention of a decoder's first step failed its check against float64 (kernels/rowcheck.py)."""

    def __init__(self, kernel: str, verdict):
        super().__init__(f"wrong output: {kernel}: {verdict.describe()}")
        self.verdict = verdict


def resolve_prefill(probe: torch.Tensor, attention: str) -> str:
    """The prefill implementation to pair with a decode one, for queries like probe (batch, seqlen,
    heads, head_dim): itself where it serves prefill, else the prefill partner it declares
    (`register_kernel(prefill_partner=...)`) where that runs here, else the fastest here ("auto")."""
    partner = get(attention).prefill_partner if attention != "auto" else ""
    for name in (attention, partner):
        if not name:
            continue
        try:
            return resolve(name, PREFILL, probe).name
        except ValueError:
            pass
    return resolve("auto", PREFILL, probe).name
