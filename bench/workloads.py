"""What one measured point is: shapes, and the work and memory those shapes imply.

A `Workload` is a named set of shapes (a preset, possibly with explicit overrides); a
`Point` is one (kernel, mode, seq_len) of it. The figures here (FLOPs, bytes moved,
predicted peak memory) come from the shapes alone, and for memory from what the kernel
declares of its working memory, so they are known before anything runs.
Tensors are in the flash-attn layout (batch, seqlen, heads, head_dim).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch

from attnlab import text as fmt
from attnlab import models
from attnlab.kernels.masks import Variant
from attnlab.models import AttentionMemory, attention_workspace_bytes, backward_workspace_bytes, gathered_cache_bytes
from attnlab.schema import DECODE, EQUAL_LENGTHS, PREFILL, KERNEL_MODES as MODES  # MODES: the kernel modes only
from attnlab.schema import BACKWARD, FWD_BWD

# What a sweep measures unless told otherwise: serving. The training modes (backward, fwd_bwd) on request.
DEFAULT_MODES = (PREFILL, DECODE)
from attnlab.visibility import band

DECODE_Q_LEN = 1

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16,
          "float32": torch.float32, "float64": torch.float64}
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16",
                  "fp32": "float32", "float": "float32", "fp64": "float64", "double": "float64"}

# What a decode cache may hold besides the queries' own dtype: 8-bit floats, read with a descale
# per (sequence, kv head) (FlashAttention-3's convention).
FP8_DTYPES = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
KV_DTYPES = {**DTYPES, **FP8_DTYPES}
_KV_DTYPE_ALIASES = {"fp8_e4m3": "float8_e4m3fn", "fp8_e4m3fn": "float8_e4m3fn", "e4m3": "float8_e4m3fn",
                     "float8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2", "e5m2": "float8_e5m2"}
RAGGED = "ragged"
# Bare `ragged`: each sequence's length drawn uniformly between half the point's context and all of it.
DEFAULT_RAGGED = "ragged:uniform:0.5"
RAGGED_FORMS = "equal, ragged (= ragged:uniform:0.5) or ragged:uniform:F (F a fraction in (0, 1])"

LONG_SEQ_LENS = tuple(1024 * 2 ** i for i in range(8))          # 1k .. 128k
CPU_SEQ_LENS = (256, 512, 1024, 2048)


@dataclass(frozen=True)
class Workload:
    """A named set of attention shapes.

    `batch` None means "batch x seq_len = tokens_per_batch" (the FlashAttention papers'
    convention), at least 1. `seq_lens` are the default context lengths, in tokens.
    The variants: `window` > 0 lets each query see at most that many keys (itself and those
    before it; as many after it too where not causal); `softcap` > 0 caps the logits; `docs` > 1
    packs that many equal documents into each prefill sequence (a varlen call).
    """

    name: str
    batch: Optional[int]
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    causal: bool
    seq_lens: tuple = LONG_SEQ_LENS
    tokens_per_batch: Optional[int] = None
    window: int = 0
    softcap: float = 0.0
    docs: int = 1

    def batch_for(self, seq_len: int) -> int:
        if self.batch is not None:
            return self.batch
        return max(1, self.tokens_per_batch // seq_len)

    def override(self, **values) -> "Workload":
        """This workload with explicit values replacing the preset's (None leaves one as is).

        A changed shape changes the name ("llama3-8b[batch=4]"), so records of a modified
        preset never pass for the preset itself.
        """
        changed = {k: v for k, v in values.items() if v is not None and getattr(self, k) != v}
        if "dtype" in changed:
            changed["dtype"] = dtype_name(changed["dtype"])
            if changed["dtype"] == self.dtype:
                del changed["dtype"]
        if not changed:
            return self
        shape_keys = [k for k in changed if k != "seq_lens"]
        name = self.name
        if shape_keys:
            name += "[" + ",".join(f"{k}={changed[k]}" for k in shape_keys) + "]"
        if "batch" in changed:
            changed["tokens_per_batch"] = None
        workload = dataclasses.replace(self, name=name, **changed)
        workload.validate()
        return workload

    def validate(self) -> None:
        for key in ("heads", "kv_heads", "head_dim"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}: expected a positive integer, got {value!r}")
        if self.batch is not None and (not isinstance(self.batch, int) or self.batch < 1):
            raise ValueError(f"batch: expected a positive integer, got {self.batch!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"kv_heads: heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        dtype_name(self.dtype)
        if not isinstance(self.window, int) or self.window < 0:
            raise ValueError(f"window: expected a number of keys >= 1, or 0 for none, got {self.window!r}")
        if not isinstance(self.softcap, (int, float)) or not 0 <= self.softcap < float("inf"):
            raise ValueError(f"softcap: expected a finite number >= 0 (0: none), got {self.softcap!r}")
        if not isinstance(self.docs, int) or self.docs < 1:
            raise ValueError(f"docs: expected a number of documents per sequence >= 1, got {self.docs!r}")

    def points(self, kernels, modes=DEFAULT_MODES, seq_lens=None,
               cache: Optional["DecodeCache"] = None) -> list["Point"]:
        """Every (seq_len, mode, kernel) point, shortest lengths first; `cache` lays out the
        decode points' KV cache (default: contiguous, the queries' dtype, equal lengths).

        Length-major order means a sweep cut short by its budget still has every kernel at
        the shorter lengths, rather than one kernel at every length.
        """
        return [self.point(kernel, mode, seq_len, cache)
                for seq_len in (seq_lens or self.seq_lens) for mode in modes for kernel in kernels]

    def point(self, kernel: str, mode: str, seq_len: int, cache: Optional["DecodeCache"] = None) -> "Point":
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len: expected a positive number of tokens, got {seq_len!r}")
        return Point(kernel=kernel, mode=mode, workload=self.name, batch=self.batch_for(seq_len),
                     heads=self.heads, kv_heads=self.kv_heads, head_dim=self.head_dim,
                     dtype=self.dtype, causal=self.causal, seq_len=seq_len,
                     q_len=DECODE_Q_LEN if mode == DECODE else seq_len, window=self.window,
                     softcap=float(self.softcap), docs=self.docs if mode == PREFILL else 1,
                     **(cache.point_fields() if cache is not None and mode == DECODE else {}))


def model_attention(model: str, batch: int = 1) -> Workload:
    """The attention of a served-model preset (attnlab.models) as a workload of the same name,
    its window and softcap included."""
    config = models.preset(model)
    return Workload(config.name, batch=batch, heads=config.heads, kv_heads=config.kv_heads,
                    head_dim=config.head_dim, dtype="bfloat16", causal=True, window=config.window,
                    softcap=config.softcap)


PRESETS = {
    # Llama-3 8B's attention, from its model shape: 32 query heads sharing 8 kv heads (GQA), head_dim 128.
    models.DEFAULT_MODEL: model_attention(models.DEFAULT_MODEL),
    # Long-context variants: a 4096-key sliding window; logits capped at 50.
    "mistral-7b": model_attention("mistral-7b"),
    "gemma2-9b": model_attention("gemma2-9b"),
    # The FlashAttention papers' benchmark: batch x seqlen = 16k tokens, 16 heads of 128, non-causal.
    "fa-paper": Workload("fa-paper", batch=None, heads=16, kv_heads=16, head_dim=128,
                         dtype="bfloat16", causal=False, tokens_per_batch=16384),
    # Small enough that a two-core machine sweeps it in about a minute; GQA kept on purpose.
    "cpu-small": Workload("cpu-small", batch=1, heads=8, kv_heads=2, head_dim=64,
                          dtype="float32", causal=True, seq_lens=CPU_SEQ_LENS),
}


def preset(name: str) -> Workload:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"workload: unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


def default_preset(device_type: str) -> str:
    return models.DEFAULT_MODEL if device_type == "cuda" else "cpu-small"


@dataclass(frozen=True)
class DecodeCache:
    """How a decode point's KV cache is laid out: `page_size` > 0 splits it into pages of that
    many tokens, placed in shuffled physical order behind a block table; `kv_dtype` is its
    element type (None: the queries' own; an 8-bit one is read with a descale per sequence and
    kv head); `lengths` says how long each sequence is ("equal": the point's context; a ragged
    spec, see `parse_lengths`: drawn from `lengths_seed`, at most the point's context)."""

    page_size: int = 0
    kv_dtype: Optional[str] = None
    lengths: str = EQUAL_LENGTHS
    lengths_seed: int = 0

    def __post_init__(self):
        if isinstance(self.page_size, bool) or not isinstance(self.page_size, int) or self.page_size < 0:
            raise ValueError(f"page_size: expected a number of tokens per page >= 1, or 0 for a contiguous cache, "
                             f"got {self.page_size!r}")
        if self.kv_dtype is not None:
            object.__setattr__(self, "kv_dtype", kv_dtype_name(self.kv_dtype))
        object.__setattr__(self, "lengths", parse_lengths(self.lengths))
        if isinstance(self.lengths_seed, bool) or not isinstance(self.lengths_seed, int) or self.lengths_seed < 0:
            raise ValueError(f"lengths_seed: expected a whole number >= 0, got {self.lengths_seed!r}")

    def point_fields(self) -> dict:
        fields = dict(page_size=self.page_size, lengths=self.lengths, lengths_seed=self.lengths_seed)
        return {**fields, "kv_dtype": self.kv_dtype} if self.kv_dtype else fields


@dataclass(frozen=True)
class Point:
    """One measured configuration. Prefill: q, k, v of seq_len tokens. Decode: q of q_len
    tokens over a KV cache of seq_len tokens per sequence (cache_seqlens = seq_len, or lengths
    drawn up to it where `lengths` is ragged), laid out as `DecodeCache` says (`page_size`,
    `kv_dtype`: "" stands for the queries' dtype and becomes it)."""

    kernel: str
    mode: str
    workload: str
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    causal: bool
    seq_len: int
    q_len: int
    window: int = 0
    softcap: float = 0.0
    docs: int = 1
    page_size: int = 0
    kv_dtype: str = ""
    lengths: str = EQUAL_LENGTHS
    lengths_seed: int = 0

    def __post_init__(self):
        if not self.kv_dtype:
            object.__setattr__(self, "kv_dtype", self.dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def kv_torch_dtype(self) -> torch.dtype:
        return KV_DTYPES[self.kv_dtype]

    @property
    def fp8_cache(self) -> bool:
        return self.kv_dtype in FP8_DTYPES

    def cache_lengths(self) -> list[int]:
        """Each sequence's cache length: seq_len for every one, or drawn as `lengths` says."""
        return cache_lengths(self.lengths, self.seq_len, self.batch, self.lengths_seed)

    @property
    def element_bytes(self) -> int:
        return self.torch_dtype.itemsize

    @property
    def seqlen_k(self) -> int:
        return self.seq_len

    @property
    def tokens_per_call(self) -> int:
        """Tokens one call produces: the whole prompt for prefill, q_len per sequence for decode."""
        return self.batch * self.q_len

    @property
    def variant(self) -> Variant:
        """The attention options of this point, as the API takes them (kernels/masks.py)."""
        return Variant(band(self.window, self.causal), self.softcap)

    def key(self) -> tuple:
        """What identifies a point across runs (resume compares these)."""
        return tuple(dataclasses.astuple(self))

    def fields(self) -> dict:
        return dataclasses.asdict(self)


def point_key(record: dict) -> tuple:
    """The `Point.key()` of a record, so files and plans can be compared; a record from before
    the variants has their defaults."""
    known = {"kv_dtype": record.get("kv_dtype") or record.get("dtype")}    # before kv_dtype: the record's dtype
    return tuple(known[f.name] if f.name in known else
                 record.get(f.name, f.default if f.default is not dataclasses.MISSING else None)
                 for f in dataclasses.fields(Point))


def visible_pairs(seqlen_q: int, seqlen_k: int, causal: bool, window=(-1, -1)) -> int:
    """(query, key) pairs the queries see by the rule of kernels/masks.py, counted exactly: row
    by row, each row's keys being one run from its window's left edge to its right edge."""
    left, right = window
    p = torch.arange(seqlen_q, dtype=torch.int64) + (seqlen_k - seqlen_q)
    lo = (p - left).clamp(min=0) if left >= 0 else torch.zeros_like(p)
    hi = torch.full_like(p, seqlen_k - 1)
    if causal:
        hi = torch.minimum(hi, p)
    if right >= 0:
        hi = torch.minimum(hi, p + right)
    return int((hi - lo + 1).clamp(min=0).sum())


def attended_pairs(point: Point) -> float:
    """Pairs charged for FLOPs. Prefill (and backward, fwd_bwd), per packed document of n tokens:
    half the square when causal (the papers' convention), the square when not, the exact band
    under a window. Decode: the exact count of keys its queries see."""
    window = point.variant.window
    if point.mode == DECODE:      # per sequence, on average over its real lengths
        lengths = point.cache_lengths()
        return sum(visible_pairs(point.q_len, n, True, window) for n in lengths) / len(lengths)
    if point.window:
        return sum(visible_pairs(n, n, point.causal, window) for n in doc_lengths(point.seq_len, point.docs))
    return sum(n * n / 2 if point.causal else n * n for n in doc_lengths(point.seq_len, point.docs))


def doc_lengths(seq_len: int, docs: int) -> list[int]:
    """`docs` documents as equal as whole tokens allow, packed into seq_len tokens."""
    base, extra = divmod(seq_len, docs)
    return [base + (i < extra) for i in range(docs)]


# FlashAttention's benchmarks count a backward as 2.5 forwards (five matmuls to the forward's
# two), forward and backward together as 3.5.
FLOPS_PER_FORWARD = {BACKWARD: 2.5, FWD_BWD: 3.5}


def flops(point: Point) -> float:
    """Forward FLOPs: 4 x batch x query heads x attended pairs x head_dim (QK^T and PV); a
    backward's or a forward and backward's, that times FLOPS_PER_FORWARD."""
    forward = 4.0 * point.batch * point.heads * attended_pairs(point) * point.head_dim
    return FLOPS_PER_FORWARD.get(point.mode, 1.0) * forward


def bytes_moved(point: Point) -> int:
    """Bytes a kernel must move at least: q, k, v read and the output written.

    Decode reads each sequence's cache up to its own length (cache_seqlens), or only the last
    `window` keys of it, in the cache's dtype (an 8-bit cache: a byte an element, and its
    descales, a float32 per sequence and kv head for K and for V).
    """
    if point.mode in (BACKWARD, FWD_BWD):
        return training_bytes(point)
    e = point.element_bytes
    q_and_out = 2 * point.batch * point.q_len * point.heads * point.head_dim * e
    if point.mode != DECODE:
        return q_and_out + 2 * point.batch * point.seqlen_k * point.kv_heads * point.head_dim * e
    keys = sum(min(n, point.window) if point.window else n for n in point.cache_lengths())
    kv = 2 * keys * point.kv_heads * point.head_dim * point.kv_torch_dtype.itemsize
    descales = 2 * point.batch * point.kv_heads * 4 if point.fp8_cache else 0
    return q_and_out + kv + descales


def training_bytes(point: Point) -> int:
    """Bytes a backward moves at least, as FlashAttention's IO analysis counts them: q, k, v, out
    and dout read with a float32 log-sum-exp per query row and head, dq, dk and dv written. Forward
    and backward adds the forward's: q, k and v read, out and the log-sum-exp written."""
    e = point.element_bytes
    q_sized = point.batch * point.q_len * point.heads * point.head_dim * e
    kv_sized = point.batch * point.seqlen_k * point.kv_heads * point.head_dim * e
    lse = 4 * point.batch * point.q_len * point.heads
    backward = 4 * q_sized + 4 * kv_sized + lse        # q, out, dout, dq; k, v, dk, dv
    return backward if point.mode == BACKWARD else backward + 2 * q_sized + 2 * kv_sized + lse


def cache_pages(point: Point) -> int:
    """Pages a paged decode cache holds: each sequence's length in whole pages (0 when contiguous)."""
    return sum(math.ceil(n / point.page_size) for n in point.cache_lengths()) if point.page_size else 0


def input_bytes(point: Point) -> int:
    """q, k, v (or the cache as allocated: every sequence's seq_len slots, or its pages), the
    output, and for decode cache_seqlens, the descales and the block table."""
    if point.mode in (BACKWARD, FWD_BWD):       # the forward's: the backward's own are its workspace
        return bytes_moved(dataclasses.replace(point, mode=PREFILL))
    if point.mode != DECODE:
        return bytes_moved(point)
    q_and_out = 2 * point.batch * point.q_len * point.heads * point.head_dim * point.element_bytes
    slots = cache_pages(point) * point.page_size if point.page_size else point.batch * point.seq_len
    cache = 2 * slots * point.kv_heads * point.head_dim * point.kv_torch_dtype.itemsize
    descales = 2 * point.batch * point.kv_heads * 4 if point.fp8_cache else 0
    table = 4 * point.batch * math.ceil(point.seq_len / point.page_size) if point.page_size else 0
    return q_and_out + cache + descales + table + 4 * point.batch


def predicted_peak_bytes(point: Point, attention: AttentionMemory) -> int:
    """Peak memory of one call, from the shapes: inputs and output plus the working memory the
    kernel declares (`attention`, from the registry's `attention_memory` for the device type):
    K and V copied per query head, an fp32 score matrix, fp32 copies of half inputs. A backward
    (alone or after its forward) adds what it keeps and computes (`backward_workspace_bytes`); a
    decode over a paged or 8-bit cache, the contiguous copy an implementation that gathers it makes."""
    workspace = backward_workspace_bytes if point.mode in (BACKWARD, FWD_BWD) else attention_workspace_bytes
    working = workspace(attention, batch=point.batch, heads=point.heads, kv_heads=point.kv_heads,
                        head_dim=point.head_dim, q_len=point.q_len, keys=point.seqlen_k,
                        dtype_bytes=point.element_bytes)
    gathered = gathered_cache_bytes(attention, batch=point.batch, kv_heads=point.kv_heads, head_dim=point.head_dim,
                                    keys=point.seqlen_k, dtype_bytes=point.element_bytes,
                                    paged=point.page_size > 0, fp8=point.fp8_cache) if point.mode == DECODE else 0
    return input_bytes(point) + working + gathered


def dtype_name(dtype) -> str:
    """Canonical dtype name ("bfloat16") from a name, an alias ("bf16") or a torch.dtype."""
    if isinstance(dtype, torch.dtype):
        text = str(dtype).removeprefix("torch.")
    else:
        text = str(dtype).strip().lower().removeprefix("torch.")
    text = _DTYPE_ALIASES.get(text, text)
    if text not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)} (or bf16, fp16, fp32), got {dtype!r}")
    return text


def kv_dtype_name(dtype) -> str:
    """Canonical cache dtype name: a `dtype_name`, or "float8_e4m3fn" / "float8_e5m2" (also from
    fp8_e4m3, fp8_e5m2, e4m3, e5m2 or a torch.dtype)."""
    text = str(dtype).strip().lower().removeprefix("torch.")
    text = _KV_DTYPE_ALIASES.get(text, text)
    if text in FP8_DTYPES:
        return text
    try:
        return dtype_name(text)
    except ValueError:
        raise ValueError(f"kv_dtype: expected fp8_e4m3, fp8_e5m2 or one of {', '.join(DTYPES)}, got {dtype!r}") \
            from None


def parse_lengths(text) -> str:
    """The canonical spec of a decode cache's lengths: "equal", or "ragged:uniform:F" (bare
    "ragged" is DEFAULT_RAGGED): each sequence's length drawn uniformly from ceil(F x seq_len) to
    seq_len. ValueError naming `lengths` otherwise."""
    spec = str(text).strip().lower()
    if spec in (EQUAL_LENGTHS, RAGGED):
        return EQUAL_LENGTHS if spec == EQUAL_LENGTHS else DEFAULT_RAGGED
    parts = spec.split(":")
    try:
        fraction = float(parts[2]) if len(parts) == 3 and parts[:2] == [RAGGED, "uniform"] else math.nan
    except ValueError:
        fraction = math.nan
    if not 0 < fraction <= 1:
        raise ValueError(f"lengths: expected {RAGGED_FORMS}, got {text!r}")
    return f"{RAGGED}:uniform:{fraction:g}"


def cache_lengths(spec: str, seq_len: int, batch: int, seed: int = 0) -> list[int]:
    """`batch` cache lengths for a context of seq_len under `spec` (`parse_lengths`), drawn from
    `seed` where ragged: the same spec, context, batch and seed give the same lengths anywhere."""
    spec = parse_lengths(spec)
    if spec == EQUAL_LENGTHS:
        return [seq_len] * batch
    shortest = max(1, math.ceil(float(spec.rsplit(":", 1)[1]) * seq_len))
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(shortest, seq_len + 1, (batch,), generator=gen).tolist()


def lengths_summary(lengths) -> dict:
    """min, median (the lower middle one) and max of a cache's lengths, for a record."""
    ordered = sorted(lengths)
    return {"lengths_min": ordered[0], "lengths_median": ordered[(len(ordered) - 1) // 2],
            "lengths_max": ordered[-1]}


# Names bench/sweep.py and benchmarks/conftest.py import from here; the parser and the label are attnlab.text's.
parse_seq_lens = fmt.parse_seq_lens
seq_len_label = fmt.k
