"""What one measured point is: shapes, and the work and memory those shapes imply.

A `Workload` is a named set of shapes (a preset, possibly with explicit overrides); a
`Point` is one (kernel, mode, seq_len) of it. The figures here (FLOPs, bytes moved,
predicted peak memory) come from the shapes alone, and for memory from what the kernel
declares of its working memory, so they are known before anything runs.
Tensors are in the flash-attn layout (batch, seqlen, heads, head_dim).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from attnlab import text as fmt
from attnlab import models
from attnlab.kernels.masks import Variant
from attnlab.models import AttentionMemory, attention_workspace_bytes
from attnlab.schema import DECODE, PREFILL, KERNEL_MODES as MODES  # MODES here: the kernel modes only
from attnlab.visibility import band

DECODE_Q_LEN = 1

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16,
          "float32": torch.float32, "float64": torch.float64}
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16",
                  "fp32": "float32", "float": "float32", "fp64": "float64", "double": "float64"}

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

    def points(self, kernels, modes=MODES, seq_lens=None) -> list["Point"]:
        """Every (seq_len, mode, kernel) point, shortest lengths first.

        Length-major order means a sweep cut short by its budget still has every kernel at
        the shorter lengths, rather than one kernel at every length.
        """
        return [self.point(kernel, mode, seq_len)
                for seq_len in (seq_lens or self.seq_lens) for mode in modes for kernel in kernels]

    def point(self, kernel: str, mode: str, seq_len: int) -> "Point":
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len: expected a positive number of tokens, got {seq_len!r}")
        return Point(kernel=kernel, mode=mode, workload=self.name, batch=self.batch_for(seq_len),
                     heads=self.heads, kv_heads=self.kv_heads, head_dim=self.head_dim,
                     dtype=self.dtype, causal=self.causal, seq_len=seq_len,
                     q_len=DECODE_Q_LEN if mode == DECODE else seq_len, window=self.window,
                     softcap=float(self.softcap), docs=self.docs if mode == PREFILL else 1)


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
class Point:
    """One measured configuration. Prefill: q, k, v of seq_len tokens. Decode: q of q_len
    tokens over a KV cache of seq_len tokens per sequence (cache_seqlens = seq_len)."""

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

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

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
    return tuple(record.get(f.name, f.default if f.default is not dataclasses.MISSING else None)
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
    """Pairs charged for FLOPs. Prefill, per packed document of n tokens: half the square when
    causal (the papers' convention), the square when not, the exact band under a window. Decode:
    the exact count of keys its queries see."""
    window = point.variant.window
    if point.mode != PREFILL:
        return visible_pairs(point.q_len, point.seq_len, True, window)
    if point.window:
        return sum(visible_pairs(n, n, point.causal, window) for n in doc_lengths(point.seq_len, point.docs))
    return sum(n * n / 2 if point.causal else n * n for n in doc_lengths(point.seq_len, point.docs))


def doc_lengths(seq_len: int, docs: int) -> list[int]:
    """`docs` documents as equal as whole tokens allow, packed into seq_len tokens."""
    base, extra = divmod(seq_len, docs)
    return [base + (i < extra) for i in range(docs)]


def flops(point: Point) -> float:
    """Forward FLOPs: 4 x batch x query heads x attended pairs x head_dim (QK^T and PV)."""
    return 4.0 * point.batch * point.heads * attended_pairs(point) * point.head_dim


def bytes_moved(point: Point) -> int:
    """Bytes a kernel must move at least: q, k, v read and the output written.

    Decode reads the cache up to cache_seqlens (= seq_len), which here is all of it, or only
    the last `window` keys of it.
    """
    e = point.element_bytes
    q_and_out = 2 * point.batch * point.q_len * point.heads * point.head_dim * e
    keys = min(point.seqlen_k, point.window) if point.mode == DECODE and point.window else point.seqlen_k
    kv = 2 * point.batch * keys * point.kv_heads * point.head_dim * e
    return q_and_out + kv


def input_bytes(point: Point) -> int:
    """q, k, v (or the cache), the output, and cache_seqlens for decode."""
    lens = 4 * point.batch if point.mode == DECODE else 0
    return bytes_moved(point) + lens


def predicted_peak_bytes(point: Point, attention: AttentionMemory) -> int:
    """Peak memory of one call, from the shapes: inputs and output plus the working memory the
    kernel declares (`attention`, from the registry's `attention_memory` for the device type):
    K and V copied per query head, an fp32 score matrix, fp32 copies of half inputs."""
    working = attention_workspace_bytes(attention, batch=point.batch, heads=point.heads,
                                        kv_heads=point.kv_heads, head_dim=point.head_dim, q_len=point.q_len,
                                        keys=point.seqlen_k, dtype_bytes=point.element_bytes)
    return input_bytes(point) + working


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


# Names bench/sweep.py and benchmarks/conftest.py import from here; the parser and the label are attnlab.text's.
parse_seq_lens = fmt.parse_seq_lens
seq_len_label = fmt.k
