"""Charts, one function each, that read alone: a title with the quantity, axes with units, and
a caption naming the device, dtype, workload shape and runs. Drawn on headless matplotlib
Figures (no pyplot state) in seaborn's style, saved as PNG and SVG.

Each chart function takes the records it draws (a DataFrame of result records) and returns a
Figure whose `drawn` attribute holds one row per point drawn: series, seq_len, y and its unit,
and the record behind it (run_id and point key), or an empty run_id for model and reference
lines. Lines and markers are drawn from those rows only, and `save` writes them as a CSV beside
the images, so anyone can check a chart against the data.

One point, one record: no series holds two rows at one length (ValueError naming them), so
nothing is averaged. A series is its kernel plus whatever tells its records apart from the
kernel's other records at the same length (device, dtype, shape, run). `render_all` picks the
records: the one standing for each point, or with `all_runs` every valid one, a series per run.
A ratio never divides two runs' records (two runs may be two cards), and a fitted curve that
misses its own points is not drawn; the CSV keeps a row without y for each, saying why. A
caption names each run with its card where the records carry `gpu_uuid` (`conditions.with_cards`).
"""
from __future__ import annotations

import hashlib
import io
import re
import textwrap
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from attnlab import text as fmt
from attnlab.analysis import _deps
from attnlab.analysis import roles as kernel_roles
from attnlab.analysis.claim import E2E_SETTINGS, calibration_cards, validation_brief
from attnlab.analysis.conditions import card_namer, named_run, record_cards, several_cards_note
from attnlab.analysis.fits import MIN_R2_TO_EXTRAPOLATE
from attnlab.analysis.roofline import match_gpu
from attnlab.analysis.select import POINT_KEY, SAME_POINT, WHOLE_NUMBER_FIELDS, describe, joined_key, point_labels
from attnlab.schema import BACKWARD, FWD_BWD, KERNEL_MODES, OK, OOM, PREFILL, QUADRATIC_MODES

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
FIGSIZE = (9.0, 5.4)
DPI = 110
GIB = 2**30
GREY = "#555555"
# The hues families are drawn in: a family's hue comes from its name (`family_hues`), its
# ablations are drawn in a lighter shade of it, and its kernels told apart by their markers.
FAMILY_HUES = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22",
               "#17becf", "#393b79", "#637939", "#8c6d31")
ABLATION_WHITE = 0.5        # how far an ablation's shade lies from its family's hue towards white
RATE_LABELS = {"tflops": ("Prefill compute rate", "TFLOP/s"), "gbps": ("Decode memory bandwidth", "GB/s")}
TRAINING_TITLES = {BACKWARD: "Backward compute rate", FWD_BWD: "Forward and backward compute rate"}
OTHER_COLORS = ("#e377c2", "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173")
# What a drawn row keeps of its record: the run and the point it measured.
RECORD_COLUMNS = ("run_id", *POINT_KEY)
# The CSV beside each chart; a chart may add columns after these (p10_ms, baseline_ms, ...).
CSV_COLUMNS = ("chart", "series", "kernel", "seq_len", "y", "y_unit", "y_from", "run_id",
               *(f for f in POINT_KEY if f not in ("kernel", "seq_len")), "note")
WHOLE_NUMBER_COLUMNS = ("seq_len", *WHOLE_NUMBER_FIELDS)


@dataclass
class Chart:
    """A saved chart: `files` maps a format ("png", "svg", and "csv" for what it draws) to its path."""

    name: str
    title: str
    caption: str
    files: dict = field(default_factory=dict)


# --- shared drawing pieces --------------------------------------------------------------------

def _sns():
    _deps.pyplot_free_matplotlib("drawing charts")
    return _deps.require("seaborn", "drawing charts")


def _pd():
    return _deps.pandas("drawing charts")


def _figure(title: str, caption: str, ncols: int = 1, legend_outside: bool = True):
    """A Figure with its title and caption placed; returns (figure, axes)."""
    from matplotlib.figure import Figure
    sns = _sns()
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.85):
        fig = Figure(figsize=(FIGSIZE[0] * (1 if ncols == 1 else 1.25), FIGSIZE[1]), dpi=DPI)
        axes = fig.subplots(1, ncols, squeeze=False)[0]
    fig.suptitle(_literal(title), fontsize=12, fontweight="bold", x=0.01, ha="left")
    fig.text(0.01, 0.015, "\n".join(textwrap.wrap(_literal(caption), 130)), fontsize=7.5, color="#333333",
             va="bottom", ha="left", gid="caption")
    right = 0.97 if not legend_outside else 0.76 if ncols == 1 else 0.82
    fig.subplots_adjust(left=0.09, right=right, top=0.9, bottom=0.25, wspace=0.28)
    return fig, axes


def _context_axis(ax, seq_lens, log_y: bool = True) -> None:
    ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    ticks = _spaced(sorted({int(n) for n in seq_lens if n == n and n > 0}))
    if ticks:
        from matplotlib.ticker import NullLocator
        ax.set_xticks(ticks)
        ax.set_xticklabels([fmt.k(n) for n in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("context length (tokens)")


def _spaced(ticks: list, min_octaves: float = 0.25) -> list:
    """Ticks at least `min_octaves` apart, so labels such as 120k and 128k do not overlap."""
    kept = []
    for tick in ticks:
        if kept and np.log2(tick / kept[-1]) < min_octaves:
            kept.pop()       # the longer of two close lengths keeps the label
        kept.append(tick)
    return kept


def caption_of(fig) -> str:
    return next((t.get_text().replace("\n", " ").replace(r"\$", "$") for t in fig.texts if t.get_gid() == "caption"),
                "")


def _literal(text) -> str:
    """Text from records as a chart draws it, literally: each '$' escaped, so that a kernel named
    'a$b$' is not read as mathtext (which fails on symbols it does not know)."""
    return str(text).replace("$", r"\$")


def _plain_numbers(axis) -> None:
    """Log-axis labels as 0.5, 2, 10 rather than powers of ten, for ratios."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _legend_outside(ax) -> None:
    """The legend right of the axes; long labels (a run's id) wrap to fit the margin."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, [textwrap.fill(_literal(label), 24) for label in labels], loc="upper left",
                  bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)


def palette_for(records) -> dict:
    """{kernel: colour} for the kernels of `records` (result records with their role columns, or
    kernel names, each then its own family): its family's hue (`family_hues`), in a lighter
    shade for an ablation. The same in every chart of a report, as a report draws with one
    palette."""
    roles = kernel_roles.of_kernels(records)
    hues = family_hues({r.family for r in roles.values()})
    return {kernel: _lighter(hues[r.family]) if r.ablation_of else hues[r.family] for kernel, r in roles.items()}


def kernel_markers(records) -> dict:
    """{kernel: marker} for the kernels of `records`: from the kernel's name, and no two kernels
    drawn in one colour share a marker while markers remain."""
    palette = palette_for(records)
    markers = {}
    for colour in set(palette.values()):
        markers.update(_spread(sorted(k for k, c in palette.items() if c == colour), MARKERS))
    return markers


def family_hues(families) -> dict:
    """{family: hue}: each family's hue from its name, the next free one where a family earlier by
    name took it, so that families drawn together differ while hues remain."""
    return _spread(sorted(set(families)), FAMILY_HUES)


def _spread(names: list, choices) -> dict:
    """{name: choice}: each name's choice from its hash, moved on to the next one not yet taken
    by a name before it in `names` while any is free."""
    taken, chosen = set(), {}
    for name in names:
        start = int(hashlib.sha1(str(name).encode()).hexdigest(), 16) % len(choices)
        free = [choices[(start + i) % len(choices)] for i in range(len(choices))
                if choices[(start + i) % len(choices)] not in taken]
        chosen[name] = free[0] if free else choices[start]
        taken.add(chosen[name])
    return chosen


def _lighter(colour: str) -> str:
    from matplotlib.colors import to_hex, to_rgb
    return to_hex([c + (1 - c) * ABLATION_WHITE for c in to_rgb(colour)])


def markers_for(values) -> dict:
    """A marker for each device (or run)."""
    values = sorted({str(v) for v in values})
    return {v: MARKERS[i % len(MARKERS)] for i, v in enumerate(values)}


def caption_for(rows, extra: str = "") -> str:
    """Device, dtype, workload shape and runs of `rows`, in one line."""
    def values(column):
        present = [str(v) for v in rows[column].dropna().unique()] if column in rows else []
        return ", ".join(sorted(present)) or "?"

    def span(column):
        present = rows[column].dropna() if column in rows else []
        if not len(present):
            return "?"
        lo, hi = int(min(present)), int(max(present))
        return str(lo) if lo == hi else f"{lo} to {hi}"

    causal = {bool(v) for v in rows["causal"].dropna()} if "causal" in rows else set()
    mask = "causal" if causal == {True} else "non-causal" if causal == {False} else "causal and non-causal"
    shape = (f"batch {span('batch')}, {span('heads')} heads, {span('kv_heads')} kv heads, "
             f"head_dim {span('head_dim')}, {mask}")
    cards = record_cards(rows)      # each run named with its card, and a warning where they differ
    parts = [f"Device: {values('device')}", f"dtype: {values('dtype')}",
             f"workload {values('workload')} ({shape})",
             _joined(f"runs: {values('run_id')}", several_cards_note(sorted(set(cards.values()))))]
    return card_namer(cards)(" | ".join(parts + ([extra] if extra else [])))


# --- series and the rows a chart draws ---------------------------------------------------------

series_labels = point_labels     # a series is its kernel and what tells its records apart (select)


def _series(records, by_run, palette, markers) -> tuple:
    """(labels, fields, look, note) of a chart's records: labels and fields from `series_labels`;
    look(row) gives a drawn row's (colour, marker): colour by the kernel's family (`palette_for`),
    marker by run where runs are told apart, else by kernel; note says so in the caption when runs
    are drawn apart."""
    labels, fields = series_labels(records, records["kernel"], by_run)
    palette = palette or palette_for(records)
    if "run_id" in fields:    # runs drawn apart: the marker tells the run
        by, markers = "run_id", markers_for(records["run_id"])
    else:
        by, markers = "kernel", markers or kernel_markers(records)

    def look(row):
        return palette.get(row["kernel"], GREY), markers.get(str(row[by]), "o")
    return labels, fields, look, "one series per run, never averaged" if by == "run_id" else ""


def _record_points(records, series, y_from, unit: str, y=None, extra=()):
    """Drawn rows, one per record with a y: y is the record's `y_from` field, or `y` computed
    from it (then `y_from` says how); each row names the run and point it came from."""
    points = records.reindex(columns=list(RECORD_COLUMNS)).assign(
        series=series, y=records[y_from] if y is None else y, y_unit=unit, y_from=y_from)
    for column in extra:
        points[column] = records[column]
    return points.dropna(subset=["y"])


def _undrawn(series, unit: str, note: str, **fields):
    """A CSV row for something a chart does not draw, and why (`note`); it has no y."""
    return _pd().DataFrame([{"series": series, "seq_len": np.nan, "y": np.nan, "y_unit": unit, "run_id": "",
                             "note": note, **fields}])


def _line_points(series, seq_len, y, unit: str, **fields):
    """Drawn rows of a model or reference line: no record behind them, so run_id is empty.
    A horizontal line has no seq_len."""
    frame = _pd().DataFrame({"series": series, "seq_len": seq_len, "y": y, "y_unit": unit, "run_id": "", **fields})
    return frame.dropna(subset=["y"])


def _drawn(*parts):
    """A chart's drawn rows in CSV order; ValueError if a series holds two rows at one length."""
    pd = _pd()
    parts = [p for p in parts if len(p)]
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    extra = [c for c in frame.columns if c not in CSV_COLUMNS]
    frame = frame.reindex(columns=[*CSV_COLUMNS[1:], *extra])
    frame["run_id"] = frame["run_id"].fillna("")
    _refuse_stacked(frame.dropna(subset=["seq_len"]), ["series", "y_unit", "seq_len"], "a chart")
    return frame


def _refuse_stacked(rows, keys: list, what: str) -> None:
    """ValueError naming the rows if two share `keys`: drawing both at one x would stack or
    average two measurements of one point."""
    clash = rows[rows.duplicated(keys, keep=False)]
    if clash.empty:
        return
    first = clash.iloc[0]
    same = clash[(clash[keys].map(str) == first[keys].map(str)).all(axis=1)]
    where = ", ".join(f"{k} {_shown(first[k])}" for k in keys if not fmt.missing(first[k]))
    runs = ", ".join(str(r) or "(none)" for r in same["run_id"])
    raise ValueError(f"{what} holds {len(same)} rows at {where} (runs {runs}); a chart draws one record per "
                     f"point, never a mean: pass the records that stand for their points (excluded == '') or "
                     f"tell the runs apart (all_runs)")


def _shown(value) -> str:
    if isinstance(value, str):
        return repr(value)
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _attach(fig, drawn):
    fig.drawn = drawn
    return fig


def _plot_series(ax, points, look, legend: bool = True, **style) -> None:
    """One line per series of `points` (drawn rows), in the colour and marker `look` gives."""
    for label, series in points.sort_values("seq_len").groupby("series", sort=True):
        color, marker = look(series.iloc[0])
        ax.plot(series["seq_len"], series["y"], **{"color": color, "marker": marker, "ms": 5, "lw": 1.6, **style},
                label=label if legend else "_nolegend_")


def _horizontal_lines(ax, lines, x0, text, apart: float = 0.04) -> None:
    """Dashed reference lines (peaks, capacities) from drawn rows, each annotated with `text(row)`;
    lines within `apart` of one already labelled (two runs' 731 and 732) share its label."""
    labelled = []
    for _, row in lines.sort_values("y").iterrows():
        ax.axhline(row["y"], color=GREY, ls="--", lw=1)
        if any(abs(row["y"] / y - 1) < apart for y in labelled):
            continue
        labelled.append(row["y"])
        ax.annotate(_literal(text(row)), (x0, row["y"]), textcoords="offset points", xytext=(2, 3), fontsize=7,
                    color="#333333")


def _joined(*notes) -> str:
    return "; ".join(n for n in notes if n)


# --- the charts -------------------------------------------------------------------------------

def latency_chart(rows, fits=(), palette=None, markers=None, *, by_run: bool = False):
    """Median latency against context, log-log, bars p10 to p90, lines the fitted curves (decode
    a + b n, prefill a + b n + c n^2, as each fit's model says)."""
    ok = _ok(rows)
    mode, workload = _one(ok, "mode"), _one(ok, "workload")
    labels, fields, look, runs_note = _series(ok, by_run, palette, markers)
    points = _record_points(ok, labels, "median_ms", "ms", extra=("p10_ms", "p90_ms"))
    curves = _fit_points(ok, fits, fields)
    drawn = _drawn(points, curves)
    shown, unfit = curves.dropna(subset=["y"]), curves[curves["y"].isna()]
    lines = " / ".join(sorted(set(shown["note"]))) if len(shown) else ""
    fig, (ax,) = _figure(f"{mode.capitalize()} latency against context ({workload})", caption_for(ok, _joined(
        "points: median of the repetitions, bars p10 to p90", lines and f"lines: {lines} (coefficients >= 0)",
        _unfit_caption(unfit), runs_note)))
    _plot_series(ax, points, look, ls="none", ms=6)
    ax.vlines(points["seq_len"], points["p10_ms"], points["p90_ms"],
              colors=[look(row)[0] for _, row in points.iterrows()], lw=1.2)
    _plot_series(ax, shown, look, legend=False, marker="", lw=1.3, alpha=0.8)
    _context_axis(ax, ok["seq_len"])
    ax.set_ylabel("latency per call (ms)")
    _legend_outside(ax)
    return _attach(fig, drawn)


FIT_FORMULAS = {"linear": "fitted a + b*n", "quadratic": "fitted a + b*n + c*n^2"}


def _fit_points(ok, fits, fields):
    """The fitted curves of the records drawn, at 64 whole lengths across each fit's range; a
    curve is named as its records' series are, but for the run (a fit may span runs), and by the
    options that tell it from the kernel's other curves drawn (which may share no length). A fit
    that misses its own points (R^2 below MIN_R2_TO_EXTRAPOLATE) is no curve to draw: it gets
    one row without y whose note says why."""
    from attnlab.analysis.fits import fit_labels

    matched = [(fit, fitted) for fit in fits if len(fitted := _fitted_records(ok, fit))]
    _, apart = fit_labels([fit for fit, _ in matched])
    curves = []
    for fit, fitted in matched:
        first = fitted.iloc[0]
        named = [f for f in fields if f != "run_id"] + [f for f in apart if f not in fields]
        name = ", ".join([f"fit {fit.kernel}", *(describe(f, first.get(f)) for f in named)])
        where = {**first[["kernel", "device", "dtype", "mode", "workload"]].to_dict(), "r2": fit.r2}
        if not fit.r2 >= MIN_R2_TO_EXTRAPOLATE:
            curves.append(_undrawn(name, "ms", f"not drawn: the {fit.model} fit misses its own points (R^2 of log "
                                               f"latency {fit.r2:.2f} < {MIN_R2_TO_EXTRAPOLATE})", **where))
            continue
        n = np.unique(np.geomspace(min(fit.seq_lens), max(fit.seq_lens), 64).round())
        curves.append(_line_points(name, n, fit.predict_ms(n), "ms", **where,
                                   note=FIT_FORMULAS[getattr(fit, "model", "quadratic")]))
    pd = _pd()
    return pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=["series", "seq_len", "y", "note"])


def _unfit_caption(unfit) -> str:
    if unfit.empty:
        return ""
    names = ", ".join(f"{row['series']} (R^2 {row['r2']:.2f})" for _, row in unfit.iterrows())
    return f"no line where a fit misses its own points (R^2 of log latency below {MIN_R2_TO_EXTRAPOLATE}): {names}"


def _fitted_records(ok, fit):
    """The records of `ok` a fit describes: same kernel, mode, workload, device and dtype, and
    the same shape and options (q_len, window, ...) where the fit records them."""
    wanted = {"kernel": fit.kernel, "mode": fit.mode, "workload": fit.workload, "device": fit.device,
              "dtype": fit.dtype, **(getattr(fit, "shape", None) or {})}
    hit = np.ones(len(ok), dtype=bool)
    for column, value in wanted.items():
        if column not in ok:     # a table built by hand, without the newer point fields
            continue
        target = _plain(value)
        hit &= ok[column].map(lambda v, target=target: _plain(v) == target).to_numpy(dtype=bool)
    return ok[hit]


def _plain(value):
    """A value as comparable across a frame and a fit: numbers as float, missing as None."""
    if fmt.missing(value):
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    return float(value) if isinstance(value, (int, float, np.number)) else str(value)


def rate_chart(rows, roof, quantity: str, palette=None, markers=None, *, by_run: bool = False):
    """TFLOP/s (prefill) or GB/s (decode) against context, with each device's peak as a line."""
    ok = _ok(rows)
    workload = _one(ok, "workload")
    label = RATE_LABELS[quantity]
    labels, fields, look, runs_note = _series(ok, by_run, palette, markers)
    points = _record_points(ok, labels, quantity, label[1])
    peaks = _peak_points(roof, ok, label[1])
    drawn = _drawn(points, peaks)
    fig, (ax,) = _figure(f"{_rate_title(ok, label)} against context ({workload})", caption_for(
        ok, _joined(f"dashed lines: peak {_peak_text(peaks, label[1])}", runs_note)))
    _plot_series(ax, points, look)
    _horizontal_lines(ax, peaks, ok["seq_len"].min(),
                      lambda r: f"peak {r['y']:,.0f} {label[1]} ({r['note'].split(':')[0]})")
    _context_axis(ax, ok["seq_len"], log_y=False)
    ax.set_ylim(0, max([points["y"].max()] + list(peaks["y"])) * 1.12)
    ax.set_ylabel(f"{'compute' if quantity == 'tflops' else 'bandwidth'} ({label[1]})")
    _legend_outside(ax)
    return _attach(fig, drawn)


def _rate_title(ok, label: tuple) -> str:
    """The rate's name: a training mode's own where the rows are all of one, else the label's."""
    modes = set(ok["mode"])
    return TRAINING_TITLES[modes.pop()] if len(modes) == 1 and modes <= set(TRAINING_TITLES) else label[0]


MASK_CELLS = 64      # a mask is drawn as this many cells a side, as attention-gym draws them


def mask_chart(rows):
    """The attention mask of one workload's prefill, small: which keys each query sees at the
    longest length measured, on a grid of MASK_CELLS x MASK_CELLS cells (a cell is drawn seen
    when any pair in it is seen: the window and the documents scale with the cells)."""
    first = rows.iloc[0]
    seq_len = int(rows["seq_len"].max())
    causal, window, docs = bool(first["causal"]), _field(first, "window", 0), _field(first, "docs", 1)
    cells = min(MASK_CELLS, seq_len)
    seen, tokens = _mask_cells(seq_len, cells, causal, window, docs), seq_len / cells
    from matplotlib.figure import Figure
    fig = Figure(figsize=(3.2, 3.6), dpi=DPI)
    ax = fig.subplots()
    ax.imshow(seen, cmap="Greys", vmin=0, vmax=1.6, interpolation="nearest")
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_xlabel("key"), ax.set_ylabel("query")
    what = ", ".join(p for p in ("causal" if causal else "full", f"window {fmt.k(window)}" if window else "",
                                 f"{docs} documents" if docs > 1 else "") if p)
    fig.suptitle(f"mask: {what}", fontsize=9, fontweight="bold")
    caption = f"{fmt.k(seq_len)} tokens as {cells} x {cells} cells of {tokens:,.0f} tokens"
    fig.text(0.02, 0.02, caption, fontsize=6.5, color="#333333", gid="caption")
    query, key = np.nonzero(np.ones_like(seen))
    drawn = _pd().DataFrame({"series": "mask", "kernel": "", "seq_len": seq_len, "y": seen[query, key].astype(int),
                             "y_unit": "seen", "y_from": "the visibility rule (attnlab/visibility.py)", "run_id": "",
                             "mode": PREFILL, "workload": first["workload"], "query_cell": query, "key_cell": key})
    return _attach(fig, drawn)


def _field(row, name: str, default: int) -> int:
    value = row.get(name, default)
    return default if value is None or value != value else int(value)


def _mask_cells(seq_len: int, cells: int, causal: bool, window: int, docs: int):
    """Bool (cells, cells): a cell of query and key tokens is seen when any of its pairs is. On a
    square grid the pairs that decide it are the cells' corners (j - p spans a cell's corners)."""
    from attnlab.visibility import band, sees

    edges = np.floor(np.arange(cells + 1) * seq_len / cells).astype(int)
    first, last = edges[:-1], edges[1:] - 1
    seen = np.zeros((cells, cells), dtype=bool)
    for p in (first, last):
        for j in (first, last):
            seen |= sees(p[:, None], j[None, :], causal, band(window, causal))
    doc = lambda t: t * docs // seq_len      # documents of equal length, packed
    return seen & (doc(first)[:, None] <= doc(last)[None, :]) & (doc(first)[None, :] <= doc(last)[:, None])


def rate_bars(rows, roof, quantity: str, palette=None, markers=None, *, by_run: bool = False):
    """TFLOP/s or GB/s of each kernel at a workload's one context length, as bars beside the
    peak: a line through one point would show no trend."""
    ok = _ok(rows)
    workload, length = _one(ok, "workload"), fmt.k(ok["seq_len"].iloc[0])
    label = RATE_LABELS[quantity]
    labels, fields, look, runs_note = _series(ok, by_run, palette, markers)
    points = _record_points(ok, labels, quantity, label[1]).sort_values("series")
    peaks = _peak_points(roof, ok, label[1])
    drawn = _drawn(points, peaks)
    fig, (ax,) = _figure(f"{_rate_title(ok, label)} at {length} ({workload})", caption_for(
        ok, _joined(f"one context length ({length}); dashed lines: peak {_peak_text(peaks, label[1])}", runs_note)),
        legend_outside=False)
    colors = [look(row)[0] for _, row in points.iterrows()]
    bars = ax.bar(points["series"].map(_literal), points["y"], color=colors)
    ax.bar_label(bars, labels=[f"{y:,.0f}" for y in points["y"]], fontsize=8, padding=2)
    _horizontal_lines(ax, peaks, -0.45, lambda r: f"peak {r['y']:,.0f} {label[1]} ({r['note'].split(':')[0]})")
    ax.set_ylim(0, max([points["y"].max()] + list(peaks["y"])) * 1.15)
    ax.set_ylabel(f"{'compute' if quantity == 'tflops' else 'bandwidth'} ({label[1]})")
    ax.set_xlabel("implementation")
    return _attach(fig, drawn)


def _peak_text(peaks, unit: str) -> str:
    text = "; ".join(f"{r['device']}: {r['y']:,.0f} {unit}, {r['note']}" for _, r in peaks.iterrows())
    return text or "unknown for this device"


def speedup_chart(rows, baseline: str, palette=None, markers=None, chosen_automatically: bool = False, *,
                  by_run: bool = False):
    """Baseline median latency over each kernel's, per context; above 1 is faster. Each time is
    divided by the baseline's record of the same point among `rows`, if it is of the same run:
    never by another run's (another card, another state) nor by a mean of several. A record
    whose run has no baseline record there is not drawn; its CSV row says why."""
    ok = _ok(rows)
    mode, workload = _one(ok, "mode"), _one(ok, "workload")
    labels, fields, look, runs_note = _series(ok, by_run, palette, markers)
    joined = _with_baseline(ok.assign(series=labels), baseline)
    paired, unpaired = joined[joined["baseline_ms"].notna()], joined[joined["baseline_ms"].isna()]
    points = _record_points(paired, paired["series"], "baseline_ms / median_ms", "x",
                            y=paired["baseline_ms"] / paired["median_ms"],
                            extra=("median_ms", "baseline", "baseline_ms", "baseline_run_id"))
    drawn = _drawn(points, _unpaired_points(unpaired, ok, baseline))
    note = f"speedup = {baseline} median latency / kernel median latency, both from one run"
    note += " (baseline chosen automatically; pass --baseline to choose)" if chosen_automatically else ""
    fig, (ax,) = _figure(f"{mode.capitalize()} speedup over {baseline} ({workload})",
                         caption_for(ok, _joined(note, _unpaired_caption(unpaired, baseline), runs_note)))
    _plot_series(ax, drawn, look)      # a point not drawn breaks its series' line: nothing is implied there
    ax.axhline(1.0, color=GREY, ls="--", lw=1)
    _context_axis(ax, ok["seq_len"])
    _plain_numbers(ax.yaxis)
    ax.set_ylabel(_literal(f"speedup over {baseline} (x)"))
    _legend_outside(ax)
    return _attach(fig, drawn)


def _with_baseline(ok, baseline: str):
    """`ok` with the median_ms and run_id of the baseline's record of the same point
    (SAME_POINT) in the same run beside each record; NaN where `ok` holds none."""
    keys = [*(f for f in SAME_POINT if f in ok), "run_id"]
    base = ok[ok["kernel"] == baseline]
    _refuse_stacked(base, keys, f"baseline {baseline}")
    point = joined_key(ok, keys) if len(ok) else ok["run_id"]     # an empty frame's key is no Series
    times = _pd().DataFrame({"baseline_ms": base["median_ms"], "baseline_run_id": base["run_id"],
                             "_point": point[base.index]})
    joined = ok.assign(_point=point).merge(times, on="_point", how="left").drop(columns="_point")
    return joined.assign(baseline=baseline)


def _unpaired_points(unpaired, ok, baseline: str):
    """CSV rows without y for records that have no baseline record of their point in their own
    run, each naming the run of the baseline's record, if any, and whether it ran on another card."""
    columns = [*RECORD_COLUMNS, "series", "median_ms", "baseline"]
    if unpaired.empty:
        return unpaired.reindex(columns=columns)
    keys = [f for f in SAME_POINT if f in ok]
    base = ok[ok["kernel"] == baseline]
    runs_of_point = dict(zip(joined_key(base, keys), base["run_id"])) if len(base) else {}
    elsewhere = joined_key(unpaired, keys).map(runs_of_point)
    cards = record_cards(ok)

    def why(run, other) -> str:
        if fmt.missing(other):
            return f"not drawn: no {baseline} record of this point to divide by"
        card = cards.get(other)
        apart = ", another card" if card and cards.get(run) and card != cards.get(run) else ""
        return (f"not drawn: the {baseline} record of this point is of run {named_run(other, cards)}{apart}, not of "
                f"this record's run {named_run(run, cards)}; a speedup never divides two runs' times")
    notes = [why(run, other) for run, other in zip(unpaired["run_id"], elsewhere)]
    return unpaired.reindex(columns=columns).assign(y=np.nan, y_unit="x", y_from="baseline_ms / median_ms",
                                                    note=notes)


def _unpaired_caption(unpaired, baseline: str) -> str:
    if unpaired.empty:
        return ""
    where = "; ".join(f"{kernel} at {', '.join(fmt.k(n) for n in sorted(group['seq_len']))}"
                      for kernel, group in unpaired.groupby("kernel", sort=True))
    return f"not drawn, as the {baseline} record of the point is of another run (see the CSV): {where}"


def memory_chart(rows, palette=None, markers=None, *, by_run: bool = False):
    """Peak memory against context: measured (solid), predicted from shapes (dotted), points that
    ran out of memory (red x at their predicted peak) and the device's capacity."""
    mode, workload = _one(rows, "mode"), _one(rows, "workload")
    rows = rows.sort_values("seq_len")
    labels, fields, look, runs_note = _series(rows, by_run, palette, markers)
    ok, oom = _ok(rows), rows[rows["status"] == OOM]
    capacity = {d: s.memory_bytes for d in rows["device"].unique() if (s := match_gpu(d))}
    measured = _record_points(ok, "measured " + labels, "peak_mem_bytes / 2**30", "GiB", y=ok["peak_mem_bytes"] / GIB)
    predicted = _record_points(rows, "predicted " + labels, "predicted_mem_bytes / 2**30", "GiB",
                               y=rows["predicted_mem_bytes"] / GIB)
    oom_points = _oom_points(oom, labels, capacity)
    limits = _line_points("capacity", [np.nan] * len(capacity), [v / GIB for v in capacity.values()], "GiB",
                          device=list(capacity), note="device memory")
    drawn = _drawn(measured, predicted, oom_points, limits)
    oom_note = f"red x: out of memory ({len(oom)} point(s)), drawn at the predicted peak" if len(oom) else ""
    fig, (ax,) = _figure(f"{mode.capitalize()} peak memory against context ({workload})", caption_for(
        rows, _joined("solid: measured peak allocated; dotted: predicted from shapes", oom_note, runs_note)))
    _plot_series(ax, measured, look)
    _plot_series(ax, predicted, look, legend=False, ls=":", lw=1.2, marker="")
    if len(oom_points):
        ax.scatter(oom_points["seq_len"], oom_points["y"], marker="x", s=70, color="#d62728", zorder=4,
                   label="out of memory")
    _horizontal_lines(ax, limits, rows["seq_len"].min(), lambda r: f"{r['device']} memory {r['y']:.0f} GiB")
    _context_axis(ax, rows["seq_len"])
    ax.set_ylabel("peak memory (GiB)")
    _legend_outside(ax)
    return _attach(fig, drawn)


def _oom_points(oom, labels, capacity: dict):
    """Out-of-memory records at their predicted peak, or at the largest capacity where none is predicted."""
    fallback = max(capacity.values(), default=2**40)
    has_prediction = oom["predicted_mem_bytes"].notna()
    y_from = has_prediction.map({True: "predicted_mem_bytes / 2**30", False: "device memory (no prediction)"})
    return _record_points(oom, "out of memory " + labels, y_from, "GiB",
                          y=oom["predicted_mem_bytes"].fillna(fallback) / GIB, extra=("status",))


def power_chart(rows, palette=None, markers=None, *, by_run: bool = False):
    """Mean board power (bars to the maximum) and energy per token against context."""
    ok = _ok(rows)
    mode, workload = _one(ok, "mode"), _one(ok, "workload")
    labels, fields, look, runs_note = _series(ok, by_run, palette, markers)
    power = _record_points(ok, labels, "power_w_mean", "W", extra=("power_w_max",))
    energy = _record_points(ok, labels, "joules_per_token", "J/token")
    drawn = _drawn(power, energy)
    fig, (left, right) = _figure(f"{mode.capitalize()} power and energy per token ({workload})", caption_for(
        ok, _joined("left: mean power while the point ran, bars up to the maximum sample; right: energy per "
                    "processed token (prefill: batch x context tokens; decode: batch x new tokens)", runs_note)),
        ncols=2)
    _plot_series(left, power, look, legend=False)
    left.vlines(power["seq_len"], power["y"], power["power_w_max"],
                colors=[look(row)[0] for _, row in power.iterrows()], lw=1)
    _plot_series(right, energy, look)
    _context_axis(left, ok["seq_len"], log_y=False)
    _context_axis(right, ok["seq_len"])
    left.set_ylabel("power (W)")
    left.set_ylim(bottom=0)
    right.set_ylabel("energy per token (J)")
    _legend_outside(right)
    return _attach(fig, drawn)


CLAIM_MODEL_SERIES = (("tok_s_max_batch", "model, largest batch that fits"), ("tok_s_batch1", "model, batch 1"),
                      ("tok_s_with_prefill", "model, largest batch, prefill counted"))
# A what-if line's style, in the order the levers were asked for: none is solid, as the model's lines are.
WHAT_IF_STYLES = ("--", "-.", (0, (1, 1.5)), (0, (6, 1.5, 1, 1.5, 1, 1.5)), (0, (10, 3)), (0, (3, 1, 1, 1)))


def claim_chart(document: dict):
    """Output tokens/s against context: the serving model at the largest batch, at batch 1 and
    with prefill counted; the claim's two points; measured end-to-end points; and each what-if
    the document holds, at its own largest batch (series: the what-if's name)."""
    points = document["points"]
    n = [p["seq_len"] for p in points]
    calibrated = not document["assumptions"]["calibration"]["ideal"]
    claim = document["claim"]
    caption = (f"Model {document['model']} on {document['num_gpus']} x {document['gpu_config']['name']}, "
               f"{document['assumptions']['decode_tokens']} tokens decoded per sequence, "
               f"{_calibration_caption(document) if calibrated else 'ideal (spec bandwidth and FLOP/s)'}; "
               f"claim: {document['claim_source']}. Ratios {fmt.k(claim['short_ctx'])}/{fmt.k(claim['long_ctx'])}: "
               f"max batch "
               f"{fmt.ratio(document['ratio_max_batch'])}, batch 1 {fmt.ratio(document['ratio_batch1'])}, "
               f"with prefill {fmt.ratio(document['ratio_with_prefill'])}; numbers above the plot: the model's "
               f"largest batch at each context.{_what_if_caption(document)}")
    models = _claim_model_points(document, calibrated)
    claimed = _line_points("claim", [claim["short_ctx"], claim["long_ctx"]],
                           [claim["short_tok_s"], claim["long_tok_s"]], "tok/s", note=document["claim_source"])
    measured = _claim_measured_points(document["measured"])
    what_ifs = _claim_what_if_points(document)
    tested = _claim_lever_measured_points(document)
    calls = _claim_window_call_points(document)
    drawn = _drawn(models, what_ifs, claimed, measured, tested, calls)
    fig, axes = _figure("Output tokens/s against context: where the claimed drop comes from", caption,
                        ncols=2 if len(calls) else 1)
    if len(calls):      # room between the panels for the first one's legend
        fig.subplots_adjust(right=0.98, wspace=0.85)
    ax = axes[0]
    colors = _sns().color_palette("deep", 6)
    color_of = {label: colors[i] for i, (_, label) in enumerate(CLAIM_MODEL_SERIES)}
    for label, line in models.groupby("series", sort=False):
        ideal = label.startswith("ideal ")
        ax.plot(line["seq_len"], line["y"], color=color_of[label.removeprefix("ideal ")],
                **(dict(lw=1, ls=":", label="_nolegend_") if ideal else dict(marker="o", ms=4, lw=1.8, label=label)))
    _plot_what_ifs(ax, what_ifs)
    ax.scatter(claimed["seq_len"], claimed["y"], marker="*", s=220, color="#d62728", zorder=5,
               label="claim (Cartridges, Fig. 3)")
    for (label, group), color in zip(measured.groupby("series", sort=True), colors[3:] * 4):
        ax.scatter(group["seq_len"], group["y"], marker="D", s=36, color=color, zorder=4, label=label)
    _plot_lever_measured(ax, tested, document)
    if len(calls):
        _plot_window_calls(axes[1], calls, document)
    _context_axis(ax, n + [claim["short_ctx"], claim["long_ctx"]])
    _batch_axis(ax, points)
    ax.set_ylabel("output tokens/s (all sequences)")
    if calibrated:
        ax.plot([], [], ls=":", color=GREY, label="ideal model (dotted)")
    _legend_outside(ax)
    return _attach(fig, drawn)


def _calibration_caption(document: dict) -> str:
    """'calibrated on measurements of cards a, b (model error ...)': where the rates came from
    and how well the model meets points it saw and did not see."""
    cards = calibration_cards(document)
    text = "calibrated on measurements" + (f" of card(s) {', '.join(cards)}" if cards else "")
    brief = validation_brief(document.get("validation"))
    return f"{text} ({brief})" if brief else text


def _batch_axis(ax, points) -> None:
    """The model's largest batch at each context, on a top axis where it overlaps no point."""
    top = ax.secondary_xaxis("top")
    ticks = _spaced([p["seq_len"] for p in points])
    batch = {p["seq_len"]: p["max_batch"] for p in points}
    top.set_xticks(ticks, [str(batch[n]) for n in ticks], fontsize=7)
    from matplotlib.ticker import NullLocator
    top.xaxis.set_minor_locator(NullLocator())


def _claim_model_points(document: dict, calibrated: bool):
    """The model's lines (and, when calibrated, the ideal model's), one row per length; batch is
    the sequences the line assumes."""
    sets = [("", document["points"])]
    if calibrated and document.get("ideal_points"):
        sets.append(("ideal ", document["ideal_points"]))
    lines = []
    for prefix, points in sets:
        for key, label in CLAIM_MODEL_SERIES:
            batch = [1 if key == "tok_s_batch1" else p["max_batch"] for p in points]
            lines.append(_line_points(prefix + label, [p["seq_len"] for p in points],
                                      [p[key] or np.nan for p in points], "tok/s", batch=batch, y_from=key))
    return _pd().concat(lines, ignore_index=True)


def _what_if_caption(document: dict) -> str:
    levers = document.get("what_if") or []
    if not levers:
        return ""
    return (f" Broken lines: what if {', '.join(w['name'] for w in levers)}: the same model with another KV cache, "
            f"each at its own largest batch (what each changes: the CSV's note).")


def _claim_what_if_points(document: dict):
    """Each what-if's tokens/s at its largest batch, one row per length, its name the series."""
    lines = [_line_points(w["name"], [p["seq_len"] for p in w["points"]],
                          [p["tok_s_max_batch"] or np.nan for p in w["points"]], "tok/s",
                          batch=[p["max_batch"] for p in w["points"]], y_from="tok_s_max_batch", note=w["description"])
             for w in document.get("what_if") or []]
    pd = _pd()
    return pd.concat(lines, ignore_index=True) if lines else pd.DataFrame(columns=["series", "seq_len", "y"])


def _what_if_color(document: dict, name: str) -> str:
    """The colour of a what-if's line (`_plot_what_ifs` colours them in the document's order)."""
    names = [w["name"] for w in document.get("what_if") or []]
    return OTHER_COLORS[names.index(name) % len(OTHER_COLORS)]


def _claim_lever_measured_points(document: dict):
    """End-to-end points that test a what-if (an 8-bit cache for kv-fp8): tok_s at their batch,
    each series named after its lever, to sit on the lever's line."""
    pd, frames = _pd(), []
    for lever in document.get("what_if") or []:
        e2e = [p for p in lever.get("measured") or [] if p.get("tok_s") is not None]
        if not e2e:
            continue
        items = pd.DataFrame(e2e, columns=["seq_len", "tok_s", "batch", "mode", "kernel", "device", "run_id",
                                           *E2E_SETTINGS])
        base = f"measured, what if {lever['name']}: " + items["mode"].astype(str) + ", " + items["kernel"].astype(str)
        labels, _ = series_labels(items, base)
        frames.append(_record_points(items, labels, "tok_s", "tok/s").assign(what_if=lever["name"]))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["series", "seq_len", "y"])


def _plot_lever_measured(ax, points, document: dict) -> None:
    for label, group in points.groupby("series", sort=True):
        ax.scatter(group["seq_len"], group["y"], marker="D", s=40, facecolor="white", zorder=6, linewidths=1.6,
                   edgecolor=_what_if_color(document, group["what_if"].iloc[0]), label=label)


def _claim_window_call_points(document: dict):
    """Decode calls measured with a window (window-W levers): per call ms, measured and as the
    model has it (the kernel's line without a window at the keys the window leaves)."""
    pd, frames = _pd(), []
    for lever in document.get("what_if") or []:
        calls = [p for p in lever.get("measured") or [] if p.get("measured_ms") is not None]
        groups = {}
        for p in calls:
            groups.setdefault((p["kernel"], p.get("batch")), []).append(p)
        for (kernel, batch), group in groups.items():
            name = f"what if {lever['name']}: {kernel}, batch {batch}"
            frames.append(_line_points(f"model, {name}", [p["seq_len"] for p in group],
                                       [p["model_ms"] for p in group], "ms per call", kernel=kernel,
                                       what_if=lever["name"], note=[p["basis"] for p in group]))
            frames.append(_line_points(f"measured, {name}", [p["seq_len"] for p in group],
                                       [p["measured_ms"] for p in group], "ms per call", kernel=kernel,
                                       what_if=lever["name"], run_id=[p["run_id"] for p in group],
                                       y_from="median_ms"))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["series", "seq_len", "y"])


def _plot_window_calls(ax, calls, document: dict) -> None:
    """Decode call times against context under a window: measured (diamonds) on the model's line,
    in the colour of the lever's line."""
    for label, group in calls.groupby("series", sort=True):
        color = _what_if_color(document, group["what_if"].iloc[0])
        if label.startswith("model, "):
            ax.plot(group["seq_len"], group["y"], color=color, ls="--", lw=1.6, label=label)
        else:
            ax.scatter(group["seq_len"], group["y"], marker="D", s=36, color=color, zorder=4, label=label)
    _context_axis(ax, calls["seq_len"].tolist(), log_y=False)
    ax.set_ylim(0, 1.15 * calls["y"].max())
    ax.set_ylabel("decode ms per call (one layer)")
    ax.set_title("windowed decode: measured against the model", fontsize=9)
    ax.legend(fontsize=6, loc="best")


def _plot_what_ifs(ax, lines) -> None:
    for i, (name, line) in enumerate(lines.groupby("series", sort=False)):
        ax.plot(line["seq_len"], line["y"], color=OTHER_COLORS[i % len(OTHER_COLORS)],
                ls=WHAT_IF_STYLES[i % len(WHAT_IF_STYLES)], lw=1.8, label=f"what if: {name}")


def _claim_measured_points(measured: list):
    """End-to-end points as the claim document lists them: y is tok_s, run_id the item's."""
    items = _pd().DataFrame(measured, columns=["seq_len", "tok_s", "batch", "mode", "kernel", "device", "run_id",
                                               *E2E_SETTINGS])
    base = "measured " + items["mode"].astype(str) + ", " + items["kernel"].astype(str)
    labels, _ = series_labels(items, base)
    return _record_points(items, labels, "tok_s", "tok/s")


def _ok(rows):
    return rows[(rows["status"] == OK) & (rows["median_ms"] > 0)].sort_values("seq_len")


def _one(rows, column: str) -> str:
    values = sorted({str(v) for v in rows[column].dropna()})
    return "/".join(values) if values else "?"


def _peak_points(roof, rows, unit: str):
    """Drawn rows of the peaks the records in `rows` are judged against (their runs, devices,
    mode and dtype), from the roofline rows; one per (device, peak)."""
    if roof is None or roof.empty:
        return _line_points("peak", [], [], unit)
    mine = roof[roof["mode"].isin(rows["mode"].unique()) & roof["device"].isin(rows["device"].unique())]
    for column in ("run_id", "dtype"):
        if column in roof:
            mine = mine[mine[column].isin(rows[column].unique())]
    mine = mine.dropna(subset=["peak"]).drop_duplicates(["device", "peak"])
    return _line_points("peak", [np.nan] * len(mine), mine["peak"].astype(float).tolist(), unit,
                        device=mine["device"].tolist(), note=mine["peak_source"].tolist())


# --- saving -----------------------------------------------------------------------------------

def save(fig, path_stem, formats=("png", "svg")) -> dict:
    """Write the figure as PATH_STEM.png / .svg and, for a chart of this module, the rows it
    draws as PATH_STEM.csv (its `chart` column is the file's stem); returns {kind: path}."""
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    files = {}
    for kind in formats:
        path = stem.parent / f"{stem.name}.{kind}"
        if kind == "svg":
            path.write_text(svg_text(fig), encoding="utf-8")
        else:
            with _missing_glyphs_unsaid():
                fig.savefig(path, format=kind, dpi=DPI)
        files[kind] = path
    drawn = getattr(fig, "drawn", None)
    if drawn is not None:
        files["csv"] = stem.parent / f"{stem.name}.csv"
        _whole_numbers(drawn.assign(chart=stem.name)).reindex(
            columns=["chart", *drawn.columns]).to_csv(files["csv"], index=False)
    return files


def svg_text(fig, **options) -> str:
    """The figure as an SVG document that is valid XML whatever text the records gave its labels
    (a NUL in a kernel's name is replaced; matplotlib writes it as it is)."""
    buffer = io.StringIO()
    with _missing_glyphs_unsaid():
        fig.savefig(buffer, format="svg", dpi=DPI, **options)
    return fmt.xml_safe(buffer.getvalue())


@contextmanager
def _missing_glyphs_unsaid():
    """No warning of characters the font lacks: a record's text may hold any, and the chart
    shows each as a box, which says as much."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font", category=UserWarning)
        yield


def _whole_numbers(frame):
    """Lengths and shape fields as integers (4096, not 4096.0), where they are whole (and fit
    an integer column: a file may hold 1e30)."""
    pd = _pd()
    for column in (c for c in WHOLE_NUMBER_COLUMNS if c in frame):
        values = pd.to_numeric(frame[column], errors="coerce")
        present = values.dropna()
        if present.mod(1).eq(0).all() and present.abs().lt(2**63).all():
            frame[column] = values.round().astype("Int64")
    return frame


def _slug(*parts) -> str:
    """A file name from parts: each kept as it is where it is already safe, else made safe and
    tagged with a hash of the original, so that "w a" and "w-a" never share a file."""
    return "_".join(_safe(str(p)) for p in parts if p)


def _safe(text: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9.-]+", "-", text).strip("-.") or "x"
    return safe if safe == text else f"{safe}-{hashlib.sha1(text.encode()).hexdigest()[:6]}"


def pick_baseline(ok, baseline=None) -> tuple:
    """(baseline, chosen automatically?) among the kernels of `ok` (ok records, with their role
    columns): the requested kernel, else one whose records say it is a baseline (what one would
    otherwise use): the one measured at the most points, then the fastest (least time summed
    over the lengths all of those share), then the first by name; with none, the first kernel
    by name."""
    kernels = set(ok["kernel"])
    if baseline:
        if baseline not in kernels:
            raise ValueError(f"baseline: {baseline!r} has no ok records; kernels present: {', '.join(sorted(kernels))}")
        return baseline, False
    roles = kernel_roles.of_kernels(ok)
    candidates = ok[ok["kernel"].isin([k for k in kernels if roles[k].baseline])]
    if candidates.empty:
        return (sorted(kernels)[0], True) if kernels else (None, True)
    points = candidates.groupby("kernel").size()
    most = candidates[candidates["kernel"].isin(points[points == points.max()].index)]
    lengths = most.groupby("seq_len")["kernel"].nunique()
    shared = most[most["seq_len"].isin(lengths[lengths == most["kernel"].nunique()].index)]
    time = shared.groupby("kernel")["median_ms"].sum()
    return min(sorted(set(most["kernel"])), key=lambda k: time.get(k, float("inf"))), True


def records_to_draw(results, all_runs: bool = False):
    """The records charts draw: by default the one standing for each point (`excluded` == "";
    every record where the column is absent); with `all_runs`, every valid record."""
    if all_runs:
        return results[results["valid"].fillna(True).astype(bool)] if "valid" in results else results
    return results[results["excluded"].fillna("").astype(str) == ""] if "excluded" in results else results


def render_all(results, out_dir, *, fits=(), roof=None, claim=None, baseline=None, formats=("png", "svg"),
               all_runs: bool = False) -> tuple[list, list]:
    """Draw every chart the data allows into `out_dir`, each with a CSV of what it draws;
    returns (charts, skipped) where skipped lists what could not be drawn and why. Records as
    `records_to_draw` picks them; with `all_runs` each run is its own series. A workload
    measured in several dtypes gets a chart per dtype."""
    rows = records_to_draw(results, all_runs)
    renderer = _Renderer(Path(out_dir), formats, fits, roof, baseline, all_runs, palette_for(rows), kernel_markers(rows))
    charted = rows[rows["mode"].isin(KERNEL_MODES)]
    for (mode, workload), group in charted.groupby(["mode", "workload"]):
        several_dtypes = group["dtype"].nunique() > 1
        for dtype, records in group.groupby("dtype"):
            renderer.group(records, mode, workload, dtype if several_dtypes else "")
        if mode == PREFILL:
            renderer.emit(_slug("mask", "", workload, ""), mask_chart(group), f"mask, {workload}")
    if claim is not None:
        renderer.emit("claim", claim_chart(claim), "claim")
    return renderer.charts, renderer.skipped


@dataclass
class _Renderer:
    """What render_all draws with, and what it has drawn and skipped so far."""

    out: Path
    formats: tuple
    fits: tuple
    roof: object
    baseline: str | None
    by_run: bool
    palette: dict
    markers: dict
    charts: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    def emit(self, name: str, fig, title: str) -> None:
        self.charts.append(Chart(name, title, caption_of(fig), save(fig, self.out / name, self.formats)))

    def group(self, rows, mode: str, workload: str, dtype: str) -> None:
        """The charts of one (mode, workload) group of records, or of one of its dtypes (`dtype`
        is "" unless the workload holds several)."""
        where = " ".join(p for p in (mode, workload, dtype) if p)
        style = dict(palette=self.palette, markers=self.markers, by_run=self.by_run)

        def draw(kind: str, fig, what: str = "", named_by_mode: bool = True) -> None:
            name = _slug(kind, mode if named_by_mode else "", workload, dtype)
            self.emit(name, fig, f"{mode} {what or kind}, {where.removeprefix(mode + ' ')}")

        ok = _ok(rows)
        quantity = "tflops" if mode in QUADRATIC_MODES else "gbps"
        by_mode = mode in (BACKWARD, FWD_BWD)      # prefill's rate chart is named by its unit alone: theirs by mode
        if ok["seq_len"].nunique() == 1 and ok[quantity].notna().any():
            draw(quantity, rate_bars(rows, self.roof, quantity, **style), named_by_mode=by_mode)
            return      # one length: no curve to draw; the head-to-head table holds the times
        if ok.empty:
            self.skipped.append(f"{where}: no ok records, so no latency or rate chart")
        else:
            draw("latency", latency_chart(rows, self.fits, **style))
            if ok[quantity].notna().any():
                draw(quantity, rate_chart(rows, self.roof, quantity, **style), named_by_mode=by_mode)
            self.speedup(rows, ok, where, draw, style)
            if ok["power_w_mean"].notna().any() or ok["joules_per_token"].notna().any():
                draw("power", power_chart(rows, **style))
            else:
                self.skipped.append(f"{where}: no power or energy readings (NVML absent?)")
        if rows["peak_mem_bytes"].notna().any() or rows["predicted_mem_bytes"].notna().any():
            draw("memory", memory_chart(rows, **style))

    def speedup(self, rows, ok, where: str, draw, style: dict) -> None:
        kernels = set(ok["kernel"])
        if self.baseline and self.baseline not in kernels:
            self.skipped.append(f"{where}: baseline {self.baseline} has no ok records here, so no speedup chart")
            return
        chosen, auto = pick_baseline(ok, self.baseline)
        if len(kernels) < 2:
            self.skipped.append(f"{where}: one kernel only, so no speedup chart")
            return
        draw("speedup", speedup_chart(rows, chosen, chosen_automatically=auto, **style), f"speedup over {chosen}")
