"""A point measured in rounds: the sweep records one point once per round, interleaved with the
others (bench/sweep.py), and analysis reads the rounds of one run as one record of the point.

Why rounds: repetitions within one call of the timer share clocks, power state, co-tenants and
memory placement, so their spread understates how much the point's time varies (Kalibera and
Jones, ISMM 2013). Rounds, each with new inputs and warm-up, at another moment of the run, are
the level that varies; a point's time is the median of its rounds' medians, and its intervals
resample rounds, then repetitions within them.

Merging, per run and point: the ok rounds become one record with `round_times_ms` (each round's
repetitions), `round_medians_ms`, `rounds_measured`, `times_ms` (all repetitions), `median_ms`
(the median of the round medians), p10/p90 over all repetitions and the rates scaled to that
median. A round whose output was wrong leaves the point wrong in that run: its ok rounds are
left out, saying so. Rounds that failed otherwise, or were skipped, after ok ones are left out
beside the merged record.
"""
from __future__ import annotations

import math

import numpy as np

from attnlab.schema import OK, POINT_FIELDS, WRONG

RATE_FIELDS = ("tflops", "gbps", "tokens_per_s")     # per second of median_ms: rescaled with it
# A point is unstable where its rounds lie this far apart, or its time moved this much while it
# was measured, or the card's clocks or throttle reasons changed meanwhile: its time then mixes
# states, and the fits leave it out where the curve keeps enough points without it.
UNSTABLE_SPREAD = 1.25
UNSTABLE_DRIFT = 1.10


def merge_rounds(read: list) -> list:
    """(record, why it is left out or "") pairs after merging, from such pairs as read: the valid
    rounds of each point of each run merged as the module doc says; the rest pass as they are."""
    groups, out = {}, []
    for record, why in read:
        if not why and record.get("round") is not None:
            groups.setdefault(_group_key(record), []).append(record)
        else:
            out.append((record, why))
    for rounds in groups.values():
        out += _merged(sorted(rounds, key=lambda r: _round_index(r)))
    return out


def _group_key(record: dict) -> tuple:
    return (str(record.get("run_id")), str(record.get("source")),
            *(str(record.get(name)) for name in POINT_FIELDS))


def _round_index(record: dict) -> int:
    value = record.get("round")
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _merged(rounds: list) -> list:
    ok = [r for r in rounds if r.get("status") == OK and _times(r)]
    wrong = [r for r in rounds if r.get("status") == WRONG]
    rest = [r for r in rounds if r not in ok]
    if wrong:
        why = f"left out: round {_round_index(wrong[0])} of this run gave a wrong output"
        return [(r, "") for r in rest] + [(r, why) for r in ok]
    if not ok:
        return [(r, "") for r in rest]
    why = f"superseded by the {len(ok)} ok round(s) of this run"
    return [(_merge(ok), "")] + [(r, why) for r in rest]


def _merge(ok: list) -> dict:
    """One record of the ok rounds of a point (see the module doc)."""
    per_round = [_times(r) for r in ok]
    everything = [t for times in per_round for t in times]
    medians = [float(np.median(times)) for times in per_round]
    median = float(np.median(medians))
    merged = dict(ok[0])
    merged.update(round_times_ms=per_round, round_medians_ms=medians, rounds_measured=len(ok), times_ms=everything,
                  median_ms=median, p10_ms=float(np.percentile(everything, 10)),
                  p90_ms=float(np.percentile(everything, 90)), round=None)
    drifts = [r["drift"] for r in ok if isinstance(r.get("drift"), (int, float)) and r["drift"] > 0]
    merged.update(drift=max(drifts, key=lambda d: max(d, 1 / d)) if drifts else None,
                  clocks_changed=any(r.get("clocks_changed") is True for r in ok) or ok[0].get("clocks_changed"),
                  throttle_changed=any(r.get("throttle_changed") is True for r in ok) or ok[0].get("throttle_changed"))
    scale = (ok[0].get("median_ms") or median) / median
    for name in RATE_FIELDS:
        if isinstance(merged.get(name), (int, float)) and not isinstance(merged[name], bool):
            merged[name] = merged[name] * scale
    return merged


def _times(record: dict) -> list:
    times = record.get("times_ms")
    return [float(t) for t in times] if isinstance(times, list) and times else []


def unstable_reason(row) -> str:
    """Why a record's time is not of one state ("" where it is): see UNSTABLE_SPREAD."""
    reasons = []
    rounds = rounds_of(row) if _has_times(row) else []
    if len(rounds) > 1 and spread(rounds) > UNSTABLE_SPREAD:
        reasons.append(f"rounds x{spread(rounds):.2f} apart")
    drift = _number(row.get("drift"))
    if drift and max(drift, 1 / drift) > UNSTABLE_DRIFT:
        reasons.append(f"drift x{drift:.2f} within a round")
    for field, text in (("clocks_changed", "SM clock changed"), ("throttle_changed", "throttle reasons changed")):
        if row.get(field) is True:
            reasons.append(text)
    return ", ".join(reasons)


def _has_times(row) -> bool:
    times = row.get("times_ms")
    return isinstance(times, (list, tuple)) and len(times) > 0


def _number(value):
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


def rounds_of(row) -> list:
    """A record's repetitions round by round: its `round_times_ms` where merged, else one round."""
    rounds = row.get("round_times_ms") if hasattr(row, "get") else None
    if isinstance(rounds, (list, tuple)) and rounds and all(len(r) for r in rounds):
        return [np.asarray(r, dtype=float) for r in rounds]
    return [np.asarray(row["times_ms"], dtype=float)]


def as_rounds(times) -> list:
    """Times flat (one round) or round by round, as a list of arrays."""
    times = list(times)
    if times and all(isinstance(t, (list, tuple, np.ndarray)) for t in times):
        return [np.asarray(t, dtype=float) for t in times]
    return [np.asarray(times, dtype=float)]


def round_medians(rounds: list) -> np.ndarray:
    return np.array([np.median(r) for r in rounds])


def center(rounds: list) -> float:
    """The point's time: the median of its rounds' medians."""
    return float(np.median(round_medians(rounds)))


def spread(rounds: list) -> float:
    """How far apart the rounds are, as a ratio >= 1: slowest round median over fastest; with one
    round, p90 over p10 of its repetitions (what a single round can say of its own noise)."""
    if len(rounds) > 1:
        medians = round_medians(rounds)
        return float(medians.max() / medians.min())
    p10, p90 = np.percentile(rounds[0], [10, 90])
    return float(p90 / p10) if p10 > 0 else math.inf


def resampled_centers(rounds: list, draws: int, rng) -> np.ndarray:
    """`draws` bootstrap resamples of `center`: the rounds resampled with replacement, and each
    round's repetitions within it."""
    per_round = np.stack([resampled_medians(r, draws, rng) for r in rounds])   # (rounds, draws)
    if len(rounds) == 1:
        return per_round[0]
    picks = rng.integers(0, len(rounds), size=(len(rounds), draws))
    return np.median(np.take_along_axis(per_round, picks, axis=0), axis=0)


def resampled_medians(times, draws: int, rng) -> np.ndarray:
    """The medians of `draws` bootstrap resamples of `times`, without building the resamples.

    A resample of n draws with replacement is the sorted times at ranks ceil(n U) for n
    uniforms U, and the middle order statistics of n uniforms have known laws: the k-th is
    Beta(k, n + 1 - k), and the next one lies above it as the least of the n - k others. So
    each median costs two Beta draws: O(n log n + draws) time and O(n) memory, however many
    repetitions a record holds (a resample matrix of 2000 x 850k times would need 14 GB)."""
    x = np.sort(np.asarray(times, dtype=float))
    n = len(x)
    k = (n + 1) // 2                                   # the (lower) middle rank, from 1
    lower = rng.beta(k, n + 1 - k, size=draws)
    if n % 2:
        return x[_rank(lower, n)]
    upper = lower + (1 - lower) * rng.beta(1, n - k, size=draws)
    return (x[_rank(lower, n)] + x[_rank(upper, n)]) / 2


def _rank(u, n: int) -> np.ndarray:
    """0-based index of the sorted value a uniform u in (0, 1) draws: ceil(n u) - 1."""
    return np.clip(np.ceil(u * n).astype(np.int64), 1, n) - 1
