"""The NaN rules of attnlab's own kernels, as checks a test runs on any device.

A NaN in q, or in a key or value a row sees, makes that whole row NaN, never a silent finite
value; a NaN in a key a row cannot see (hidden by causality), or anything in a cache past a
sequence's length, leaves the row exactly as it was; a row that sees no key is zeros.
Tensors are in the (batch, seqlen, heads, head_dim) layout.
"""
import torch

from reference import decode_mask, random_qkv, visible_keys

NAN = float("nan")


def with_nan(t, position):
    """A copy of t with every value at sequence position `position` NaN."""
    t = t.clone()
    t[:, position] = NAN
    return t


def assert_rows(out, clean, nan_rows, kept_rows, what):
    """nan_rows and kept_rows: bool (batch, seqlen_q). The first are NaN in every head and
    element, the second equal the clean output."""
    assert torch.isnan(out[nan_rows]).all(), f"{what}: a row that sees a NaN is not NaN"
    assert torch.equal(out[kept_rows], clean[kept_rows]), f"{what}: a row that sees no NaN changed"


def check_prefill(run, device="cpu", dtype=torch.float32, seqlen_q=45, seqlen_k=40):
    """run(q, k, v) -> causal attention. With seqlen_q > seqlen_k the first rows see no key."""
    q, k, v = random_qkv(1, seqlen_q, seqlen_k, 2, 1, 32, dtype, device=device)
    sees = visible_keys(seqlen_q, seqlen_k, True)[None].to(device)         # (1, seqlen_q, seqlen_k)
    blind = ~sees.any(-1)
    rows = torch.arange(seqlen_q, device=device)[None]
    clean = run(q, k, v)
    assert torch.equal(clean[blind], torch.zeros_like(clean[blind]))
    row, key = seqlen_q - 3, seqlen_k // 2
    assert_rows(run(with_nan(q, row), k, v), clean, rows == row, rows != row, "NaN in a query")
    assert_rows(run(with_nan(q, 0), k, v), clean, rows < 0, rows >= 0, "NaN in a query that sees no key")
    assert_rows(run(q, with_nan(k, key), v), clean, sees[..., key], ~sees[..., key], "NaN in a key")
    # Every row that sees a key sees key 0; a row that sees none stays zeros beside its NaN.
    assert_rows(run(q, k, with_nan(v, 0)), clean, ~blind, blind, "NaN in the first value")


def check_decode(run, device="cpu", dtype=torch.float32, lengths=(40, 0, 17, 2), max_seqlen=64, q_len=3):
    """run(q, k_cache, v_cache, cache_seqlens) -> decode attention. A length under q_len leaves
    rows that see no key."""
    q, k, v = random_qkv(len(lengths), q_len, max_seqlen, 4, 2, 32, dtype, device=device)
    cache_seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    sees = decode_mask(cache_seqlens.cpu(), q_len, max_seqlen).to(device)  # (batch, q_len, max_seqlen)
    blind, everywhere = ~sees.any(-1), torch.ones_like(sees[..., 0])
    clean = run(q, k, v, cache_seqlens)
    past = torch.arange(max_seqlen, device=device)[None] >= cache_seqlens[:, None].long()
    garbage = lambda t: t.masked_fill(past[:, :, None, None], NAN)
    assert_rows(run(q, garbage(k), garbage(v), cache_seqlens), clean, ~everywhere, everywhere,
                "NaN past each length")
    one_row = torch.zeros_like(everywhere)
    one_row[0, 1] = True
    poisoned_q = q.clone()
    poisoned_q[0, 1] = NAN
    assert_rows(run(poisoned_q, k, v, cache_seqlens), clean, one_row, ~one_row, "NaN in a query")
    key = lengths[0] - 2  # the first sequence's last query rows see it, its first does not
    assert_rows(run(q, with_nan(k, key), v, cache_seqlens), clean, sees[..., key], ~sees[..., key],
                "NaN in a key")
    assert_rows(run(q, k, with_nan(v, 0), cache_seqlens), clean, ~blind, blind, "NaN in the first value")
