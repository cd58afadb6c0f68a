"""Are a backward's gradients right, at any length? dq on sampled query rows, and dk and dv on
sampled key rows of one or two sampled kv heads, against float64 computed for those rows only,
so every backward point timed can be checked as rowcheck checks a forward.

dq of a query row needs only that row's scores. dk and dv of a key row sum over every query that
sees it, so each sampled kv head's query heads (its GQA group) are recomputed over all query
rows, a chunk of rows at a time within rowcheck's scores budget: each chunk's full rows give
their softmax (the log-sum-exp) and delta = rowsum(dout * out), and only the sampled key columns
are kept. The pass criterion is rowcheck's: each gradient's error against float64 at most twice
that of the same rows computed the plain way in the input dtype (matmuls in that dtype, softmax
in float32), plus a small slack.

Tensors are in the flash-attn layout: q and dout (batch, seqlen_q, heads, head_dim), k and v
(batch, seqlen_k, kv_heads, head_dim); dk and dv are summed over each kv head's group.
"""
from __future__ import annotations

import math

import torch

from attnlab.kernels.masks import FULL, capped
from attnlab.kernels.rowcheck import (SCORES_BUDGET, RowCheck, _error, _sequences, _verdict, _wrong_output,
                                      check_prefill, sample_rows)
from attnlab.visibility import sees

KV_HEADS_CHECKED = 2       # kv heads whose dk and dv are checked, drawn from the seed
GRADIENTS = ("dq", "dk", "dv")


def check_backward(q, k, v, dout, grads_out, *, causal: bool, scale: float, window=FULL, softcap: float = 0.0,
                   seed: int = 0, out=None) -> RowCheck:
    """`grads_out` = (dq, dk, dv) of attention(q, k, v, ...) for the output gradient `dout`,
    against float64 on sampled rows of sampled sequences, and with `out` the forward's output
    too (rowcheck.check_prefill); a failure names the tensor at fault."""
    shape = dict(causal=causal, scale=scale, window=window, softcap=softcap)
    forward = {} if out is None else {"out": check_prefill(out, q, k, v, seed=seed, **shape)}
    wrong = _wrong_gradients(grads_out, q, k, v)
    if wrong:
        return combine({**forward, "gradients": wrong})
    dq, dk, dv = grads_out
    rows_q = torch.tensor(sample_rows(q.shape[1], seed), dtype=torch.long, device=q.device)
    rows_k = torch.tensor(sample_rows(k.shape[1], seed + 1), dtype=torch.long, device=q.device)
    kv_heads = sampled_kv_heads(k.shape[2], seed)
    compared = {name: [] for name in GRADIENTS}
    for b in _sequences(q.shape[0]):
        inputs = (q[b], k[b], v[b], dout[b])
        ref_q = query_grads(*inputs, rows_q, dtype=torch.float64, **shape)
        plain_q = query_grads(*inputs, rows_q, dtype=q.dtype, **shape)
        ref_k, ref_v = key_grads(*inputs, rows_k, kv_heads, dtype=torch.float64, **shape)
        plain_k, plain_v = key_grads(*inputs, rows_k, kv_heads, dtype=q.dtype, **shape)
        got = {"dq": dq[b, rows_q], "dk": dk[b][rows_k][:, kv_heads], "dv": dv[b][rows_k][:, kv_heads]}
        for name, ref, plain in (("dq", ref_q, plain_q), ("dk", ref_k, plain_k), ("dv", ref_v, plain_v)):
            compared[name].append((_error(got[name], ref), _error(plain, ref), ref.shape[0]))
    return combine({**forward, **{name: _verdict(found, q.dtype) for name, found in compared.items()}})


def combine(verdicts: dict) -> RowCheck:
    """One verdict from several named ones (an output and its gradients): the first that fails,
    its name leading its reason (where that reason does not already name it); else the one
    nearest its bound. Rows are summed."""
    rows = sum(v.rows for v in verdicts.values())
    for name, verdict in verdicts.items():
        if not verdict.ok:
            why = verdict.reason if verdict.reason.startswith(GRADIENTS) else f"{name}: {verdict.describe()}"
            return RowCheck(verdict.error, verdict.bound, rows, reason=why)
    nearest = max(verdicts.values(), key=lambda v: v.error / v.bound if v.bound else math.inf)
    return RowCheck(nearest.error, nearest.bound, rows)


def sampled_kv_heads(kv_heads: int, seed: int = 0) -> list[int]:
    """Up to KV_HEADS_CHECKED distinct kv heads, drawn from `seed`, sorted."""
    gen = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(kv_heads, generator=gen)[:KV_HEADS_CHECKED].tolist())


def _wrong_gradients(grads_out, q, k, v) -> RowCheck | None:
    """A verdict where the gradients are not three tensors shaped as q, k and v."""
    if not isinstance(grads_out, (tuple, list)) or len(grads_out) != 3:
        what = f"{len(grads_out)} values" if isinstance(grads_out, (tuple, list)) else type(grads_out).__name__
        return RowCheck(math.inf, 0.0, reason=f"returned {what}, expected (dq, dk, dv)")
    for name, grad, like in zip(GRADIENTS, grads_out, (q, k, v)):
        wrong = _wrong_output(grad, like)
        if wrong:
            return RowCheck(math.inf, 0.0, reason=f"{name}: {wrong.reason}")
    return None


def query_grads(q, k, v, dout, rows, *, causal, scale, window, softcap, dtype) -> torch.Tensor:
    """dq of the query rows `rows` of one sequence, every head: q and dout (seqlen_q, heads,
    head_dim), k and v (seqlen_k, kv_heads, head_dim) -> (rows, heads, head_dim), matmuls in
    `dtype`, softmax in float32 or wider; heads a few at a time within the scores budget."""
    heads, groups = q.shape[1], q.shape[1] // k.shape[1]
    mask = _mask(rows, q.shape[0], k.shape[0], causal, window)
    per_chunk = max(1, SCORES_BUDGET // max(1, rows.numel() * k.shape[0], 2 * k.shape[0] * k.shape[-1]))
    dq = torch.empty((rows.numel(), *q.shape[1:]), dtype=dtype, device=q.device)
    for h0 in range(0, heads, per_chunk):
        h = torch.arange(h0, min(heads, h0 + per_chunk), device=q.device)
        qh, doh = q[rows][:, h].to(dtype), dout[rows][:, h].to(dtype)
        kh, vh = k[:, h // groups].to(dtype), v[:, h // groups].to(dtype)
        probs, dscores = _probs_and_dscores(qh, kh, vh, doh, mask, scale, softcap, dtype)
        dq[:, h] = torch.einsum("hrn,nhd->rhd", dscores.to(dtype), kh) * scale
    return dq


def key_grads(q, k, v, dout, rows, kv_heads, *, causal, scale, window, softcap, dtype) -> tuple:
    """dk and dv of the key rows `rows` of one sequence for the kv heads `kv_heads`, each summed
    over its query heads and over every query row: (rows, len(kv_heads), head_dim) each, in
    `dtype`. Query rows a chunk at a time, full rows of scores each within the scores budget;
    as a plain computation would, each query head's sum is accumulated in float32 or wider and
    rounded to `dtype` once, then summed over the group in `dtype`."""
    groups, seqlen_q, seqlen_k = q.shape[1] // k.shape[1], q.shape[0], k.shape[0]
    heads = torch.tensor([g * groups + i for g in kv_heads for i in range(groups)], device=q.device)
    kh, vh = k[:, heads // groups].to(dtype), v[:, heads // groups].to(dtype)     # (seqlen_k, heads, d)
    chunk = max(1, SCORES_BUDGET // max(1, heads.numel() * seqlen_k))
    accumulate = torch.promote_types(dtype, torch.float32)
    dk = torch.zeros((rows.numel(), heads.numel(), k.shape[-1]), dtype=accumulate, device=q.device)
    dv = torch.zeros_like(dk)
    for r0 in range(0, seqlen_q, chunk):
        r = torch.arange(r0, min(seqlen_q, r0 + chunk), device=q.device)
        qh, doh = q[r][:, heads].to(dtype), dout[r][:, heads].to(dtype)
        mask = _mask(r, seqlen_q, seqlen_k, causal, window)
        probs, dscores = _probs_and_dscores(qh, kh, vh, doh, mask, scale, softcap, dtype, columns=rows)
        dv += torch.einsum("hrn,rhd->nhd", probs.to(dtype), doh)
        dk += torch.einsum("hrn,rhd->nhd", dscores.to(dtype), qh) * scale
    # Each kv head's gradient is the sum over its group of query heads.
    summed = lambda t: t.to(dtype).unflatten(1, (len(kv_heads), groups)).sum(2)
    return summed(dk), summed(dv)


def _mask(rows, seqlen_q, seqlen_k, causal, window) -> torch.Tensor:
    """Bool (rows, seqlen_k): the keys each of these query rows sees (bottom-right aligned)."""
    keys = torch.arange(seqlen_k, device=rows.device)
    return sees((rows + seqlen_k - seqlen_q)[:, None], keys[None, :], causal, window)


def _probs_and_dscores(qh, kh, vh, doh, mask, scale, softcap, dtype, columns=None) -> tuple:
    """Probabilities P and score gradients dS, (heads, rows, keys), of the rows of qh and doh
    (rows, heads, d) over kh and vh (keys, heads, d), in float32 or wider. dS = P (dP - delta)
    with dP = dout V^T and delta the row sum of P dP (= dout . out), times the cap's slope
    1 - tanh^2 where capped. `columns`: keep only these keys (rows still softmaxed over all)."""
    softmax_dtype = torch.promote_types(dtype, torch.float32)
    raw = torch.einsum("rhd,nhd->hrn", qh, kh).to(softmax_dtype) * scale
    probs = torch.softmax(capped(raw, softcap).masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
    out = torch.einsum("hrn,nhd->rhd", probs.to(dtype), vh)
    delta = (doh * out).sum(-1, dtype=softmax_dtype).transpose(0, 1)[..., None]      # (heads, rows, 1)
    if columns is not None:
        raw, probs, vh = raw[..., columns], probs[..., columns], vh[columns]
    dprobs = torch.einsum("rhd,nhd->hrn", doh, vh).to(softmax_dtype)
    dscores = probs * (dprobs - delta)
    if softcap > 0:
        dscores = dscores * (1 - torch.tanh(raw / softcap) ** 2)
    return probs, dscores
