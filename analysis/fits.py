"""How latency grows with context: one curve per kernel, mode and shape, fitted to the records
that stand for their points (one run's record per point, see `select`).

The model follows the physics of the mode. Decode reads the KV cache once per call, so
latency_ms(n) = a + b n (b: the marginal cost of a cached token). Prefill does n^2 work on top
of fixed and linear costs, so a + b n + c n^2. Coefficients are non-negative and fitted on
relative error, so 1k and 128k points count alike although their times differ a thousandfold.
Each fit records the evidence beside its model: the small-sample AIC (AICc) of both models.
The exponent is the log-log slope over the longer half of the lengths.

Intervals come from a bootstrap: at each length the standing record's repetitions are
resampled (or, where a record has fewer than three, the fit's relative residuals); where other
valid runs measured the length too, each draw first picks one of the runs, so the interval
covers the spread between runs as well as repetition noise. `ci_method` says which.

Extrapolation (256k, 1M) states a latency only where the kernel fits in memory: its records'
predicted memory (shapes make it a quadratic in n, fitted exactly) within the device's
capacity, and no length at or past one that ran out of memory.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from attnlab import text as fmt
from attnlab.analysis import _deps
from attnlab.analysis.roofline import match_gpu
from attnlab.analysis.rounds import as_rounds, center, resampled_centers, rounds_of, unstable_reason
from attnlab.analysis.select import POINT_KEY, joined_key, point_labels, recorded_memory, with_selection
from attnlab.schema import BACKWARD, DECODE, FWD_BWD, KERNEL_MODES, OK, OOM, PREFILL

FIT_MODES = KERNEL_MODES
MODELS = {"linear": 2, "quadratic": 3}                     # name -> number of coefficients
MODEL_OF_MODE = {DECODE: "linear", PREFILL: "quadratic", BACKWARD: "quadratic", FWD_BWD: "quadratic"}
WHY_MODEL = {DECODE: "decode reads the KV cache once per call: linear in context",
             PREFILL: "prefill does n^2 work besides fixed and linear costs: quadratic in context",
             BACKWARD: "the backward does 2.5x prefill's n^2 work besides fixed and linear costs: quadratic in "
                         "context",
             FWD_BWD: "forward and backward do 3.5x prefill's n^2 work besides fixed and linear costs: quadratic "
                        "in context"}
STRONG_EVIDENCE = 10.0     # an AICc difference beyond which the data clearly favour one model
GROUP_KEYS = ("kernel", "mode", "workload", "device")
# The rest of the point key: a curve's records share it and differ in length alone.
SHAPE_KEYS = tuple(f for f in POINT_KEY if f not in (*GROUP_KEYS, "seq_len"))
EXTRAPOLATE_SEQ_LENS = {"256k": 262_144, "1m": 1_048_576}
MIN_LENGTHS = 3            # three lengths at least, so a model is tested, not just drawn through
MIN_REPS_FOR_BOOTSTRAP = 3
MIN_R2_TO_EXTRAPOLATE = 0.9   # a curve that misses its own points says nothing beyond them
SELECTION = ("one record per point: of the valid records of a point, the one of best status (ok, then a "
             "failure, then skipped), then of the latest run; never a mean across runs")
CONTRACT_FIELDS = ("kernel", "mode", "workload", "device", "a_ms", "b_ms_per_token", "c_ms_per_token2",
                   "exponent", "exponent_ci", "r2", "n_points", "crossover_seq_len")


@dataclass
class Fit:
    """One curve. `r2` is that of log latency; `crossover_seq_len` is b/c, where c n^2
    overtakes b n (None for a linear model). `points`: the records fitted, one per length:
    {seq_len, run_id, median_ms, lo_ms, hi_ms, runs}, where runs counts the valid runs that
    measured the length and lo_ms, hi_ms is its 95% bootstrap interval."""

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
    model: str = "quadratic"
    model_reason: str = ""
    aicc: dict = field(default_factory=dict)
    points: list = field(default_factory=list)
    shape: dict = field(default_factory=dict)
    curve: str = ""          # the key its records share (`_curve_keys`), to tell which records it used
    unstable: list = field(default_factory=list)     # {seq_len, run_id, reason, left_out}: see _stable_rows

    def predict_ms(self, seq_len):
        n = np.asarray(seq_len, dtype=float)
        return self.a_ms + self.b_ms_per_token * n + self.c_ms_per_token2 * n * n

    def to_dict(self) -> dict:
        out = {name: getattr(self, name) for name in CONTRACT_FIELDS}
        out["exponent_ci"] = list(self.exponent_ci)
        out.update(dtype=self.dtype, shape=self.shape, model=self.model, model_reason=self.model_reason,
                   aicc=self.aicc, worst_miss=worst_miss(self), exponent_seq_lens=list(self.exponent_seq_lens),
                   ci_method=self.ci_method,
                   points=self.points, extrapolation=self.extrapolation)
        return _json_safe(out)


# --- the numbers --------------------------------------------------------------------------------

def fit_curve(seq_lens, latency_ms, model: str = "quadratic") -> tuple[float, float, float]:
    """(a, b, c) >= 0 minimising sum(((a + b n + c n^2) - y) / y)^2; c is 0 for "linear"."""
    nnls = _deps.require("scipy.optimize", "fitting curves").nnls
    n, y = np.asarray(seq_lens, dtype=float), np.asarray(latency_ms, dtype=float)
    design = np.column_stack([n**k for k in range(MODELS[model])])
    scale = design.max(axis=0)  # columns span 1 to 1e10: rescale so the solver sees comparable columns
    coef, _ = nnls(design / scale / y[:, None], np.ones_like(y))
    coef = [float(v) for v in coef / scale]
    return tuple(coef + [0.0] * (3 - len(coef)))


def fit_quadratic(seq_lens, latency_ms) -> tuple[float, float, float]:
    """(a, b, c) >= 0 of a + b n + c n^2, on relative error."""
    return fit_curve(seq_lens, latency_ms, "quadratic")


def aicc(seq_lens, latency_ms, model: str) -> float | None:
    """Small-sample AIC of `model` fitted on relative error; None with too few points."""
    n, y = np.asarray(seq_lens, dtype=float), np.asarray(latency_ms, dtype=float)
    a, b, c = fit_curve(n, y, model)
    k, m = MODELS[model], len(n)
    if m - k - 1 <= 0:
        return None
    rss = max(float((((a + b * n + c * n * n) - y) / y) ** 2 @ np.ones(m)), 1e-300)
    return m * math.log(rss / m) + 2 * k + 2 * k * (k + 1) / (m - k - 1)


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


def fit_group(seq_lens, reps, *, model: str = "quadratic", other_runs=None, n_boot: int = 2000,
              n_boot_extrapolate: int = 400, seed: int = 0, memory=None) -> dict:
    """Fit one curve. `seq_lens`: distinct lengths; `reps`: for each, the standing record's
    repeated times (ms), flat or round by round (a list of lists, analysis/rounds.py);
    `other_runs`: for each, the times of every other valid run that measured it, each as
    `reps` (may be empty); `memory(seq_len)`: (fits, note) for extrapolated lengths (see
    `memory_wall`). A point's time is the median of its rounds' medians. Returns the numeric
    fields of a Fit."""
    if model not in MODELS:
        raise ValueError(f"model: expected one of {', '.join(MODELS)}, got {model!r}")
    order = np.argsort(np.asarray(seq_lens, dtype=float))
    n = np.asarray(seq_lens, dtype=float)[order]
    others = other_runs or [[] for _ in order]
    runs = [[as_rounds(reps[i])] + [as_rounds(o) for o in others[i]] for i in order]
    y = np.array([center(r[0]) for r in runs])
    a, b, c = fit_curve(n, y, model)
    fitted = a + b * n + c * n * n
    upper = slice(len(n) // 2, None)
    samples, method = _bootstrap_medians(n, runs, fitted, y, n_boot, np.random.default_rng(seed))
    slopes = log_slope(n[upper], samples[:, upper])
    lo, hi = np.percentile(samples, [2.5, 97.5], axis=0)
    r2 = log_r2(y, fitted)
    misses = (f"the {model} model misses its own points (R^2 {r2:.2f} < {MIN_R2_TO_EXTRAPOLATE}), so it says "
              f"nothing beyond them") if not r2 >= MIN_R2_TO_EXTRAPOLATE else None
    return dict(a_ms=a, b_ms_per_token=b, c_ms_per_token2=c, exponent=float(log_slope(n[upper], y[upper])),
                exponent_ci=tuple(float(v) for v in np.percentile(slopes, [2.5, 97.5])),
                r2=r2, n_points=len(n), crossover_seq_len=_crossover(b, c),
                seq_lens=[int(v) for v in n], median_ms=[float(v) for v in y],
                exponent_seq_lens=(int(n[upper][0]), int(n[-1])), ci_method=method,
                point_intervals=[(float(l), float(h)) for l, h in zip(lo, hi)],
                extrapolation=_extrapolate(n, samples[:n_boot_extrapolate], (a, b, c), model, memory, misses))


def _bootstrap_medians(n, runs, fitted, y, n_boot, rng):
    """(n_boot, k) resampled medians. At each length a draw picks one of the runs that
    measured it, then resamples that run's rounds and their repetitions (where every standing
    record has enough of them; else it takes the run's median and a resampled relative
    residual)."""
    by_reps = all(_enough(r[0]) for r in runs)
    columns = []
    for measured in runs:
        pick = rng.integers(0, len(measured), size=n_boot)
        column = np.empty(n_boot)
        for j, rounds in enumerate(measured):
            chosen = pick == j
            if by_reps and _enough(rounds):
                column[chosen] = resampled_centers(rounds, int(chosen.sum()), rng)
            else:
                column[chosen] = center(rounds)
        columns.append(column)
    samples = np.column_stack(columns)
    if not by_reps:
        samples = samples * (y / fitted)[rng.integers(0, len(n), size=samples.shape)]
    method = "bootstrap over repetitions" if by_reps else "bootstrap over fit residuals"
    shared = [(int(length), len(measured)) for length, measured in zip(n, runs) if len(measured) > 1]
    if shared:
        method += " and between runs at " + ", ".join(f"{fmt.k(length)} ({count} runs)" for length, count in shared)
    return samples, method


def _enough(rounds: list) -> bool:
    return all(len(r) >= MIN_REPS_FOR_BOOTSTRAP for r in rounds)


def _extrapolate(n, samples, coef, model, memory, refused=None) -> list:
    """Latency at EXTRAPOLATE_SEQ_LENS with bootstrap intervals, where the kernel fits in
    memory and the model is not `refused` (a reason to state no latency at all)."""
    a, b, c = coef
    boots = np.array([fit_curve(n, row, model) for row in samples])
    out = []
    for label, target in EXTRAPOLATE_SEQ_LENS.items():
        fits, note = memory(target) if memory else (None, "no memory prediction")
        point = {"label": label, "seq_len": target, "fits_in_memory": fits, "memory": note,
                 "latency_ms": None, "lo_ms": None, "hi_ms": None, "refused": refused}
        if fits is not False and not refused:
            predicted = boots[:, 0] + boots[:, 1] * target + boots[:, 2] * float(target) ** 2
            lo, hi = np.percentile(predicted, [2.5, 97.5])
            point.update(latency_ms=a + b * target + c * float(target) ** 2, lo_ms=float(lo), hi_ms=float(hi))
        out.append(point)
    return out


def _crossover(b: float, c: float):
    if c <= 0:
        return None  # the fit has no quadratic term: it never overtakes
    return int(round(b / c))


# --- memory --------------------------------------------------------------------------------------

def memory_wall(rows, capacity_bytes):
    """A function seq_len -> (fits_in_memory, note) for one curve, from its valid records
    (`rows`, any status): a length at or past one that ran out of memory does not fit; else
    the records' predicted memory, extended as a quadratic in n, against `capacity_bytes`.
    fits_in_memory is None where neither says."""
    oom = rows.loc[rows["status"] == OOM, "seq_len"].dropna()
    first_oom = int(oom.min()) if len(oom) else None
    known = rows.dropna(subset=["predicted_mem_bytes"]).drop_duplicates("seq_len")
    known = known[known["predicted_mem_bytes"] > 0]
    degree = min(2, len(known) - 1)
    coef = (np.polyfit(known["seq_len"].astype(float), known["predicted_mem_bytes"].astype(float), degree)
            if degree >= 1 else None)

    def check(seq_len):
        if first_oom is not None and seq_len >= first_oom:
            return False, f"ran out of memory at {fmt.k(first_oom)}"
        if coef is None or not capacity_bytes:
            return None, "no memory prediction or device capacity in the records"
        predicted = float(np.polyval(coef, seq_len))
        verdict = predicted <= capacity_bytes
        return verdict, (f"predicted {predicted / 2**30:,.1f} GiB "
                         f"{'within' if verdict else 'beyond'} the device's {capacity_bytes / 2**30:,.1f} GiB")
    return check


def device_capacity(rows, environments=None) -> float | None:
    """Bytes of device memory: as the runs' environments recorded it, else the spec sheet's."""
    recorded = recorded_memory(environments, rows["run_id"])
    if recorded:
        return recorded
    spec = match_gpu(rows["device"].iloc[0]) if len(rows) else None
    return spec.memory_bytes if spec else None


# --- every curve ---------------------------------------------------------------------------------

def fit_all(results, *, environments=None, modes=FIT_MODES, n_boot: int = 2000, seed: int = 0) -> tuple[list, list]:
    """Fit every (kernel, mode, workload, device, shape) curve of standing ok records in `modes`.
    Returns (fits, skipped): skipped curves carry the reason they were not fitted."""
    if not len(results):
        return [], []
    results = with_selection(results)
    in_modes = results[results["mode"].isin(modes) & results["valid"]]
    if in_modes.empty:              # only calibration, end-to-end or ring records: no curve to fit
        return [], []
    in_modes = in_modes.assign(_curve=_curve_keys(in_modes))
    ok = in_modes[in_modes["status"] == OK]
    fits, skipped = [], []
    for curve, rows in ok[ok["excluded"] == ""].groupby("_curve", sort=True):
        first = rows.iloc[0]
        labels = {k: first[k] for k in (*GROUP_KEYS, "dtype")}
        if rows["seq_len"].nunique() < MIN_LENGTHS:
            skipped.append({**labels, "reason": f"{rows['seq_len'].nunique()} context length(s) with ok records; "
                                                f"a fit needs at least {MIN_LENGTHS}"})
            continue
        everything = in_modes[in_modes["_curve"] == curve]
        fit = _fit_curve_rows(rows, ok[ok["_curve"] == curve], everything, labels, environments, n_boot, seed)
        fit.curve = curve
        fits.append(fit)
    return fits, skipped


MIN_STABLE_POINTS = 3      # a curve keeps its unstable points where leaving them out would leave fewer


def _stable_rows(rows) -> tuple:
    """(rows to fit, unstable): the points whose time mixes states (`rounds.unstable_reason`) are
    left out where at least MIN_STABLE_POINTS others remain, else kept; either way named."""
    reasons = rows.apply(unstable_reason, axis=1) if len(rows) else rows.index.to_series(dtype=object)
    stable = reasons == ""
    left_out = bool(stable.sum() >= MIN_STABLE_POINTS and (~stable).any())
    unstable = [{"seq_len": int(r["seq_len"]), "run_id": r["run_id"], "reason": why, "left_out": left_out}
                for (_, r), why in zip(rows.iterrows(), reasons) if why]
    return (rows[stable] if left_out else rows), unstable


def _fit_curve_rows(standing, ok, everything, labels, environments, n_boot, seed) -> Fit:
    rows, unstable = _stable_rows(standing.sort_values("seq_len"))
    others = ok[ok["excluded"] != ""]
    other_runs = [[_times(r) for _, r in others[others["seq_len"] == n].iterrows()] for n in rows["seq_len"]]
    window = _window(rows)
    model = "linear" if window else MODEL_OF_MODE.get(labels["mode"], "quadratic")
    lengths, medians = rows["seq_len"].to_numpy(float), rows["median_ms"].to_numpy(float)
    memory = memory_wall(everything, device_capacity(everything, environments))
    numbers = fit_group(lengths, [_times(r) for _, r in rows.iterrows()], model=model, other_runs=other_runs,
                        n_boot=n_boot, seed=seed, memory=memory)
    intervals = numbers.pop("point_intervals")
    points = [{"seq_len": int(r["seq_len"]), "run_id": r["run_id"], "median_ms": float(r["median_ms"]),
               "lo_ms": lo, "hi_ms": hi, "runs": 1 + len(extra)}
              for (_, r), (lo, hi), extra in zip(rows.iterrows(), intervals, other_runs)]
    evidence = {name: aicc(lengths, medians, name) for name in MODELS}
    first = rows.iloc[0]
    lengthwise = first.get("q_len") == first["seq_len"]     # a prefill's q_len is its length: no curve has one
    shape = {k: _plain(first.get(k)) for k in SHAPE_KEYS if not (k == "q_len" and lengthwise)}
    return Fit(**labels, **numbers, model=model, model_reason=_model_reason(labels["mode"], model, evidence, window),
               aicc=evidence, points=points, shape=shape, unstable=unstable)


def _window(rows) -> int:
    """The sliding window the curve's records were measured with (0: none; records from before
    windows have no such field)."""
    if "window" not in rows:
        return 0
    windows = rows["window"].fillna(0)
    return int(windows.iloc[0]) if len(windows) and windows.iloc[0] > 0 else 0


def _model_reason(mode: str, model: str, evidence: dict, window: int = 0) -> str:
    why = WHY_MODEL.get(mode, "no physics for this mode: quadratic")
    if window:
        why = (f"a window of {window} keys: each query reads at most {window} keys, so the cost is linear in "
               f"context for prefill and flat for decode past the window")
    other = next(name for name in MODELS if name != model)
    mine, theirs = evidence[model], evidence[other]
    if mine is None or theirs is None:
        return f"{why}; too few lengths to compare with the {other} model"
    text = f"{why}; AICc {model} {mine:.1f}, {other} {theirs:.1f} (lower is better)"
    if theirs < mine - STRONG_EVIDENCE:
        text += f": the data favour the {other} model, so check these records for a fault"
    return text


def _times(row) -> list:
    """The record's repetitions round by round, or its median where it holds none."""
    rounds = [[t for t in r if t and t > 0] for r in rounds_of(row)]
    return rounds if all(rounds) else [[row["median_ms"]]]


def _curve_keys(rows):
    """One key per curve: the point key without the length (prefill's q_len is the length)."""
    q_len = rows.reindex(columns=["q_len"])["q_len"]
    return joined_key(rows.assign(q_len=q_len.where(q_len != rows["seq_len"], -1)), (*GROUP_KEYS, *SHAPE_KEYS))


def _plain(value):
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None if fmt.missing(value) else value


def fit_labels(fits) -> tuple[list, list]:
    """(labels, fields): each fit's kernel and the options that tell its curve from the kernel's
    others of the same mode, workload, device and dtype ('naive, q len 4'), and which fields
    those are."""
    if not fits:
        return [], []
    pd = _deps.pandas("labelling fits")
    frame = pd.DataFrame([{**f.shape, **{k: getattr(f, k) for k in (*GROUP_KEYS, "dtype")}, "seq_len": 0}
                          for f in fits])
    labels, fields = point_labels(frame, frame["kernel"], within=(*GROUP_KEYS[1:], "dtype"))
    return list(labels), fields


def worst_miss(fit: Fit) -> float:
    """The largest relative gap between the curve and one of its points."""
    n, y = np.asarray(fit.seq_lens, float), np.asarray(fit.median_ms, float)
    return float(np.max(np.abs(fit.predict_ms(n) / y - 1))) if len(n) else float("nan")


def extrapolated_text(point: dict, interval: bool = True) -> str:
    """An extrapolation as a table cell: its latency (and interval), or why it has none."""
    if point["fits_in_memory"] is False:
        return f"does not fit ({point['memory']})"
    if point.get("refused"):
        return f"none: {point['refused']}"
    text = fmt.num(point["latency_ms"])
    return f"{text} [{fmt.num(point['lo_ms'])}, {fmt.num(point['hi_ms'])}]" if interval else text


# --- what was left out ---------------------------------------------------------------------------

def left_out(results, fits, modes=FIT_MODES) -> list:
    """Every record the analysis did not use, with why: records left out at loading (invalid,
    retracted, superseded), and records of the fitted modes that are no fit's point (a
    failed status, a curve with too few lengths). Each: file, line, run_id, kernel, mode,
    workload, seq_len, status and reason."""
    results = with_selection(results)
    used = {(f.curve, p["run_id"], p["seq_len"]) for f in fits for p in f.points}
    curves = _curve_keys(results) if len(results) else []
    out = []
    for (_, row), curve in zip(results.iterrows(), curves):
        key = (curve, row["run_id"], None if fmt.missing(row["seq_len"]) else int(row["seq_len"]))
        reason = row["excluded"]
        if not reason and row["mode"] in modes and key not in used:
            reason = (f"status {row['status']}: {row['reason']}" if row["status"] != OK
                      else f"its curve has under {MIN_LENGTHS} context lengths, so it was not fitted")
        if reason:
            out.append({"file": row["source"], "line": _plain(row.get("source_line")), "run_id": row["run_id"],
                        "kernel": row["kernel"], "mode": row["mode"], "workload": row["workload"],
                        "seq_len": key[-1], "status": row["status"], "reason": reason})
    return out


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
        row.update(fit.shape, model=fit.model)
        for point in fit.extrapolation:
            row[f"fits_in_memory_{point['label']}"] = point["fits_in_memory"]
            row[f"latency_ms_{point['label']}"] = point["latency_ms"]
            row[f"latency_ms_{point['label']}_lo"] = point["lo_ms"]
            row[f"latency_ms_{point['label']}_hi"] = point["hi_ms"]
        rows.append(_json_safe(row))
    return rows


def write_fits(fits, out_dir, skipped=(), excluded=()) -> list[Path]:
    """Write DIR/fits.json ({"fits", "skipped", "excluded"}: curves, curves not fitted and
    records left out, see `left_out`) and DIR/fits.csv; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / "fits.json", out / "fits.csv"
    document = {"selection": SELECTION, "fits": [f.to_dict() for f in fits], "skipped": _json_safe(list(skipped)),
                "excluded": _json_safe(list(excluded))}
    json_path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    rows = fits_rows(fits)
    # Curves differ in their shape's fields (a decode curve's q_len, a window): every row's, in order.
    columns = list(dict.fromkeys(c for row in rows for c in row)) if rows else [
        c for c in CONTRACT_FIELDS if c != "exponent_ci"] + ["exponent_ci_lo", "exponent_ci_hi"]
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
