"""How latency grows with context: latency_ms(n) = a + b n + c n^2 and a power-law exponent.

The quadratic model is fitted with a, b, c >= 0 on relative error, so 1k and 128k points
count alike although their times differ a thousandfold. The exponent is the log-log slope
over the longer half of the lengths, where the asymptotic cost shows. Intervals come from a
bootstrap over the stored repetitions of each point (or over the fit's relative residuals
when a point has fewer than three), so they reflect measurement noise, not model error.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from attnlab.analysis import _deps

FIT_MODES = ("prefill", "decode")
GROUP_KEYS = ("kernel", "mode", "workload", "device")
EXTRAPOLATE_SEQ_LENS = {"256k": 262_144, "1m": 1_048_576}
MIN_LENGTHS = 3            # three coefficients need three lengths
MIN_REPS_FOR_BOOTSTRAP = 3
CONTRACT_FIELDS = ("kernel", "mode", "workload", "device", "a_ms", "b_ms_per_token", "c_ms_per_token2",
                   "exponent", "exponent_ci", "r2", "n_points", "crossover_seq_len")


@dataclass
class Fit:
    """One (kernel, mode, workload, device, dtype) curve. `r2` is that of log latency;
    `crossover_seq_len` is b/c, where c n^2 overtakes b n (None when c is 0)."""

    kernel: str
    mode: str
    workload: str
    device: str
    dtype: str
    a_ms: float
    b_ms_per_token: float
    c_ms_per_token2: float
    exponent: float
    exponent_ci: tuple
    r2: float
    n_points: int
    crossover_seq_len: int | None
    seq_lens: list = field(default_factory=list)
    median_ms: list = field(default_factory=list)
    exponent_seq_lens: tuple = ()
    ci_method: str = ""
    extrapolation: list = field(default_factory=list)

    def predict_ms(self, seq_len):
        n = np.asarray(seq_len, dtype=float)
        return self.a_ms + self.b_ms_per_token * n + self.c_ms_per_token2 * n * n

    def to_dict(self) -> dict:
        out = {name: getattr(self, name) for name in CONTRACT_FIELDS}
        out["exponent_ci"] = list(self.exponent_ci)
        out.update(dtype=self.dtype, exponent_seq_lens=list(self.exponent_seq_lens), ci_method=self.ci_method,
                   seq_lens=self.seq_lens, median_ms=self.median_ms, extrapolation=self.extrapolation)
        return _json_safe(out)


def fit_quadratic(seq_lens, latency_ms) -> tuple[float, float, float]:
    """(a, b, c) >= 0 minimising sum(((a + b n + c n^2) - y) / y)^2."""
    nnls = _deps.require("scipy.optimize", "fitting curves").nnls
    n, y = np.asarray(seq_lens, dtype=float), np.asarray(latency_ms, dtype=float)
    design = np.column_stack([np.ones_like(n), n, n * n])
    scale = design.max(axis=0)  # columns span 1 to 1e10: rescale so the solver sees comparable columns
    coef, _ = nnls(design / scale / y[:, None], np.ones_like(y))
    return tuple(float(v) for v in coef / scale)


def log_slope(seq_lens, latency_ms) -> np.ndarray:
    """Slope of log latency against log n; latency_ms may be (k,) or (samples, k)."""
    x = np.log(np.asarray(seq_lens, dtype=float))
    y = np.log(np.asarray(latency_ms, dtype=float))
    xc = x - x.mean()
    return (y - y.mean(axis=-1, keepdims=True)) @ xc / (xc @ xc)


def log_r2(observed, predicted) -> float:
    y, f = np.log(np.asarray(observed, float)), np.log(np.maximum(np.asarray(predicted, float), 1e-300))
    total = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - f) ** 2).sum()) / total if total > 0 else float("nan")


def fit_group(seq_lens, reps, *, n_boot: int = 2000, n_boot_extrapolate: int = 400, seed: int = 0) -> dict:
    """Fit one curve. `seq_lens`: distinct lengths; `reps`: for each, its repeated times (ms).
    Returns the numeric fields of a Fit."""
    n = np.asarray(seq_lens, dtype=float)
    order = np.argsort(n)
    n, reps = n[order], [np.asarray(reps[i], dtype=float) for i in order]
    y = np.array([np.median(r) for r in reps])
    a, b, c = fit_quadratic(n, y)
    fitted = a + b * n + c * n * n
    upper = slice(len(n) // 2, None)
    samples, method = _bootstrap_medians(n, reps, fitted, y, n_boot, np.random.default_rng(seed))
    slopes = log_slope(n[upper], samples[:, upper])
    return dict(a_ms=a, b_ms_per_token=b, c_ms_per_token2=c, exponent=float(log_slope(n[upper], y[upper])),
                exponent_ci=tuple(float(v) for v in np.percentile(slopes, [2.5, 97.5])),
                r2=log_r2(y, fitted), n_points=len(n), crossover_seq_len=_crossover(b, c),
                seq_lens=[int(v) for v in n], median_ms=[float(v) for v in y],
                exponent_seq_lens=(int(n[upper][0]), int(n[-1])), ci_method=method,
                extrapolation=_extrapolate(n, samples[:n_boot_extrapolate], (a, b, c)))


def _bootstrap_medians(n, reps, fitted, y, n_boot, rng):
    """(n_boot, k) resampled medians, by repetitions where every point has enough of them."""
    if all(len(r) >= MIN_REPS_FOR_BOOTSTRAP for r in reps):
        columns = [np.median(r[rng.integers(0, len(r), size=(n_boot, len(r)))], axis=1) for r in reps]
        return np.column_stack(columns), "bootstrap over repetitions"
    ratios = y / fitted
    return fitted * ratios[rng.integers(0, len(n), size=(n_boot, len(n)))], "bootstrap over fit residuals"


def _extrapolate(n, samples, coef) -> list:
    a, b, c = coef
    boots = np.array([fit_quadratic(n, row) for row in samples])
    out = []
    for label, target in EXTRAPOLATE_SEQ_LENS.items():
        predicted = boots[:, 0] + boots[:, 1] * target + boots[:, 2] * float(target) ** 2
        lo, hi = np.percentile(predicted, [2.5, 97.5])
        out.append({"label": label, "seq_len": target, "latency_ms": a + b * target + c * float(target) ** 2,
                    "lo_ms": float(lo), "hi_ms": float(hi)})
    return out


def _crossover(b: float, c: float):
    if c <= 0:
        return None  # the fit has no quadratic term: it never overtakes
    return int(round(b / c))


def fit_all(results, *, modes=FIT_MODES, n_boot: int = 2000, seed: int = 0) -> tuple[list, list]:
    """Fit every (kernel, mode, workload, device, dtype) group of ok records in `modes`.
    Returns (fits, skipped): skipped groups carry the reason they were not fitted."""
    if not len(results):
        return [], []
    usable = results[(results["status"] == "ok") & results["mode"].isin(modes)
                     & (results["seq_len"] > 0) & (results["median_ms"] > 0)]
    fits, skipped = [], []
    for key, group in usable.groupby([*GROUP_KEYS, "dtype"], sort=True):
        labels = dict(zip((*GROUP_KEYS, "dtype"), key))
        lengths, reps = _pool_repetitions(group)
        if len(lengths) < MIN_LENGTHS:
            skipped.append({**labels, "reason": f"{len(lengths)} context length(s) with ok records; "
                                                f"a fit needs at least {MIN_LENGTHS}"})
            continue
        fits.append(Fit(**labels, **fit_group(lengths, reps, n_boot=n_boot, seed=seed)))
    return fits, skipped


def _pool_repetitions(group) -> tuple[list, list]:
    """Per length, every stored repetition of every record (several runs pool together)."""
    lengths, reps = [], []
    for seq_len, rows in group.groupby("seq_len", sort=True):
        times = [t for row_times in rows["times_ms"] for t in row_times if t and t > 0]
        lengths.append(int(seq_len))
        reps.append(times if times else list(rows["median_ms"]))
    return lengths, reps


def fits_rows(fits) -> list[dict]:
    """Flat rows for CSV and tables: the contract fields, then dtype, interval ends and extrapolations."""
    rows = []
    for fit in fits:
        row = {}
        for name in CONTRACT_FIELDS:
            if name == "exponent_ci":  # a CSV cell holds one number
                row["exponent_ci_lo"], row["exponent_ci_hi"] = fit.exponent_ci
            else:
                row[name] = getattr(fit, name)
        row["dtype"] = fit.dtype
        for point in fit.extrapolation:
            row[f"latency_ms_{point['label']}"] = point["latency_ms"]
            row[f"latency_ms_{point['label']}_lo"] = point["lo_ms"]
            row[f"latency_ms_{point['label']}_hi"] = point["hi_ms"]
        rows.append(_json_safe(row))
    return rows


def write_fits(fits, out_dir, skipped=()) -> list[Path]:
    """Write DIR/fits.json ({"fits": [...], "skipped": [...]}) and DIR/fits.csv; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / "fits.json", out / "fits.csv"
    document = {"fits": [f.to_dict() for f in fits], "skipped": _json_safe(list(skipped))}
    json_path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    rows = fits_rows(fits)
    columns = list(rows[0]) if rows else [c for c in CONTRACT_FIELDS if c != "exponent_ci"] + [
        "exponent_ci_lo", "exponent_ci_hi"]
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return [json_path, csv_path]


def _json_safe(value):
    """NaN and infinities become None; numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
