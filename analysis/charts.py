"""Charts, one function each, that read alone: a title with the quantity, axes with units, and
a caption naming the device, dtype, workload shape and runs. Drawn with seaborn on headless
matplotlib Figures (no pyplot state), saved as PNG and SVG.

Each chart function takes the rows it draws (a DataFrame of result records) and returns a
Figure; `render_all` picks the rows, names the files and reports what it could not draw.
"""
from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from attnlab.analysis import _deps
from attnlab.analysis import text as fmt
from attnlab.analysis.roofline import match_gpu

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
FIGSIZE = (9.0, 5.4)
DPI = 110


@dataclass
class Chart:
    """A saved chart: `files` maps a format ("png", "svg") to its path."""

    name: str
    title: str
    caption: str
    files: dict = field(default_factory=dict)


# --- shared drawing pieces --------------------------------------------------------------------

def _sns():
    _deps.pyplot_free_matplotlib("drawing charts")
    return _deps.require("seaborn", "drawing charts")


def _figure(title: str, caption: str, ncols: int = 1, legend_outside: bool = True):
    """A Figure with its title and caption placed; returns (figure, axes)."""
    from matplotlib.figure import Figure
    sns = _sns()
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.85):
        fig = Figure(figsize=(FIGSIZE[0] * (1 if ncols == 1 else 1.25), FIGSIZE[1]), dpi=DPI)
        axes = fig.subplots(1, ncols, squeeze=False)[0]
    fig.suptitle(title, fontsize=12, fontweight="bold", x=0.01, ha="left")
    fig.text(0.01, 0.015, "\n".join(textwrap.wrap(caption, 130)), fontsize=7.5, color="#333333",
             va="bottom", ha="left", gid="caption")
    right = 0.97 if not legend_outside else 0.76 if ncols == 1 else 0.82
    fig.subplots_adjust(left=0.09, right=right, top=0.9, bottom=0.25, wspace=0.28)
    return fig, axes


def _context_axis(ax, seq_lens, log_y: bool = True) -> None:
    ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    ticks = sorted({int(n) for n in seq_lens if n == n and n > 0})
    if ticks:
        from matplotlib.ticker import NullLocator
        ax.set_xticks(ticks)
        ax.set_xticklabels([fmt.k(n) for n in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("context length (tokens)")


def caption_of(fig) -> str:
    return next((t.get_text().replace("\n", " ") for t in fig.texts if t.get_gid() == "caption"), "")


def _add_legend_entries(ax, handles, labels) -> None:
    """Append entries to the legend seaborn drew (or start one)."""
    legend = ax.get_legend()
    old_handles = list(legend.legend_handles) if legend else []
    old_labels = [t.get_text() for t in legend.get_texts()] if legend else []
    ax.legend(old_handles + list(handles), old_labels + list(labels))


def _plain_numbers(axis) -> None:
    """Log-axis labels as 0.5, 2, 10 rather than powers of ten, for ratios."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _legend_outside(ax) -> None:
    legend = ax.get_legend()
    if legend is not None:
        _sns().move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", title_fontsize="small",
                           frameon=False)


def palette_for(kernels) -> dict:
    """The same colour for a kernel in every chart."""
    kernels = sorted(set(kernels))
    return dict(zip(kernels, _sns().color_palette("tab10", max(len(kernels), 1))))


def markers_for(devices) -> dict:
    devices = sorted(set(devices))
    return {d: MARKERS[i % len(MARKERS)] for i, d in enumerate(devices)}


def _styles(rows, palette, markers) -> tuple:
    """The colours and markers given, else ones for the kernels and devices in `rows`."""
    return palette or palette_for(rows["kernel"]), markers or markers_for(rows["device"])


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
    parts = [f"Device: {values('device')}", f"dtype: {values('dtype')}",
             f"workload {values('workload')} ({shape})", f"runs: {values('run_id')}"]
    return " | ".join(parts + ([extra] if extra else []))


# --- the charts -------------------------------------------------------------------------------

def latency_chart(rows, fits=(), palette=None, markers=None):
    """Median latency against context, log-log, bars p10 to p90, lines the fitted a + b n + c n^2."""
    ok = _ok(rows)
    mode, workload = _one(ok, "mode"), _one(ok, "workload")
    fig, (ax,) = _figure(f"{mode.capitalize()} latency against context ({workload})", caption_for(
        ok, "points: median of the repetitions, bars p10 to p90; lines: fitted a + b*n + c*n^2 (a, b, c >= 0)"))
    palette, markers = _styles(ok, palette, markers)
    _sns().scatterplot(data=ok, x="seq_len", y="median_ms", hue="kernel", style="device", palette=palette,
                       markers=markers, s=45, ax=ax, zorder=3)
    ax.vlines(ok["seq_len"], ok["p10_ms"], ok["p90_ms"], colors=[palette[k] for k in ok["kernel"]], lw=1.2)
    for fit in fits:
        if fit.mode == mode and fit.workload == workload and fit.kernel in palette:
            n = np.geomspace(min(fit.seq_lens), max(fit.seq_lens), 64)
            ax.plot(n, fit.predict_ms(n), color=palette[fit.kernel], lw=1.3, alpha=0.8)
    _context_axis(ax, ok["seq_len"])
    ax.set_ylabel("latency per call (ms)")
    _legend_outside(ax)
    return fig


def rate_chart(rows, roof, quantity: str, palette=None, markers=None):
    """TFLOP/s (prefill) or GB/s (decode) against context, with each device's peak as a line."""
    ok = _ok(rows)
    workload = _one(ok, "workload")
    label = {"tflops": ("Prefill compute rate", "TFLOP/s"), "gbps": ("Decode memory bandwidth", "GB/s")}[quantity]
    peaks = _peaks(roof, ok)
    peak_text = "; ".join(f"{device}: {value:,.0f} {label[1]}, {source}" for device, value, source in peaks)
    fig, (ax,) = _figure(f"{label[0]} against context ({workload})", caption_for(
        ok, f"dashed lines: peak {peak_text or 'unknown for this device'}"))
    palette, markers = _styles(ok, palette, markers)
    _sns().lineplot(data=ok, x="seq_len", y=quantity, hue="kernel", style="device", palette=palette,
                    markers=markers, dashes=False, ax=ax, errorbar=None)
    for device, value, source in peaks:
        ax.axhline(value, color="#555555", ls="--", lw=1)
        ax.annotate(f"peak {value:,.0f} {label[1]} ({source.split(':')[0]})", (ok["seq_len"].min(), value),
                    textcoords="offset points", xytext=(2, 3), fontsize=7, color="#333333")
    _context_axis(ax, ok["seq_len"], log_y=False)
    ax.set_ylim(0, max([ok[quantity].max()] + [p[1] for p in peaks]) * 1.12)
    ax.set_ylabel(f"{'compute' if quantity == 'tflops' else 'bandwidth'} ({label[1]})")
    _legend_outside(ax)
    return fig


def speedup_chart(rows, baseline: str, palette=None, markers=None, chosen_automatically: bool = False):
    """Baseline median latency over each kernel's, per context; above 1 is faster."""
    ok = _ok(rows)
    mode, workload = _one(ok, "mode"), _one(ok, "workload")
    keys = ["device", "dtype", "seq_len"]
    base = ok[ok["kernel"] == baseline].groupby(keys)["median_ms"].median().rename("baseline_ms")
    joined = ok.join(base, on=keys).dropna(subset=["baseline_ms"])
    joined = joined.assign(speedup=joined["baseline_ms"] / joined["median_ms"])
    missing = sorted(set(ok["seq_len"].astype(int)) - set(base.index.get_level_values("seq_len").astype(int)))
    note = f"speedup = {baseline} median latency / kernel median latency"
    note += " (baseline chosen automatically; pass --baseline to choose)" if chosen_automatically else ""
    note += f"; no {baseline} time at {', '.join(fmt.k(n) for n in missing)}" if missing else ""
    fig, (ax,) = _figure(f"{mode.capitalize()} speedup over {baseline} ({workload})", caption_for(ok, note))
    palette, markers = _styles(ok, palette, markers)
    _sns().lineplot(data=joined, x="seq_len", y="speedup", hue="kernel", style="device", palette=palette,
                    markers=markers, dashes=False, ax=ax, errorbar=None)
    ax.axhline(1.0, color="#555555", ls="--", lw=1)
    _context_axis(ax, ok["seq_len"])
    _plain_numbers(ax.yaxis)
    ax.set_ylabel(f"speedup over {baseline} (x)")
    _legend_outside(ax)
    return fig


def memory_chart(rows, palette=None, markers=None):
    """Peak memory against context: measured (solid), predicted from shapes (dotted), points that
    ran out of memory (red x at their predicted peak) and the device's capacity."""
    mode, workload = _one(rows, "mode"), _one(rows, "workload")
    oom = rows[rows["status"] == "oom"]
    ok = _ok(rows)
    capacity = {d: s.memory_bytes for d in rows["device"].unique() if (s := match_gpu(d))}
    fig, (ax,) = _figure(f"{mode.capitalize()} peak memory against context ({workload})", caption_for(
        rows, "solid: measured peak allocated; dotted: predicted from shapes"
              + (f"; red x: out of memory ({len(oom)} point(s)), drawn at the predicted peak" if len(oom) else "")))
    palette, markers = _styles(rows, palette, markers)
    gib = ok.assign(peak_gib=ok["peak_mem_bytes"] / 2**30, predicted_gib=ok["predicted_mem_bytes"] / 2**30)
    if gib["peak_gib"].notna().any():
        _sns().lineplot(data=gib, x="seq_len", y="peak_gib", hue="kernel", style="device", palette=palette,
                        markers=markers, dashes=False, ax=ax, errorbar=None)
    for kernel, group in rows.sort_values("seq_len").groupby("kernel"):
        predicted = group.dropna(subset=["predicted_mem_bytes"])
        ax.plot(predicted["seq_len"], predicted["predicted_mem_bytes"] / 2**30, ls=":", lw=1.2,
                color=palette.get(kernel, "#777777"))
    if len(oom):
        y = oom["predicted_mem_bytes"].fillna(max(capacity.values(), default=2**40)) / 2**30
        handle = ax.scatter(oom["seq_len"], y, marker="x", s=70, color="#d62728", zorder=4)
        _add_legend_entries(ax, [handle], ["out of memory"])
    for device, limit in capacity.items():
        ax.axhline(limit / 2**30, color="#555555", ls="--", lw=1)
        ax.annotate(f"{device} memory {limit / 2**30:.0f} GiB", (rows["seq_len"].min(), limit / 2**30),
                    textcoords="offset points", xytext=(2, 3), fontsize=7)
    _context_axis(ax, rows["seq_len"])
    ax.set_ylabel("peak memory (GiB)")
    _legend_outside(ax)
    return fig


def power_chart(rows, palette=None, markers=None):
    """Mean board power (bars to the maximum) and energy per token against context."""
    ok = _ok(rows)
    mode, workload = _one(ok, "mode"), _one(ok, "workload")
    fig, (left, right) = _figure(f"{mode.capitalize()} power and energy per token ({workload})", caption_for(
        ok, "left: mean power while the point ran, bars up to the maximum sample; right: energy per "
            "processed token (prefill: batch x context tokens; decode: batch x new tokens)"), ncols=2)
    palette, markers = _styles(ok, palette, markers)
    sns = _sns()
    sns.lineplot(data=ok, x="seq_len", y="power_w_mean", hue="kernel", style="device", palette=palette,
                 markers=markers, dashes=False, ax=left, errorbar=None, legend=False)
    left.vlines(ok["seq_len"], ok["power_w_mean"], ok["power_w_max"], colors=[palette[k] for k in ok["kernel"]],
                lw=1)
    sns.lineplot(data=ok, x="seq_len", y="joules_per_token", hue="kernel", style="device", palette=palette,
                 markers=markers, dashes=False, ax=right, errorbar=None)
    _context_axis(left, ok["seq_len"], log_y=False)
    _context_axis(right, ok["seq_len"])
    left.set_ylabel("power (W)")
    left.set_ylim(bottom=0)
    right.set_ylabel("energy per token (J)")
    _legend_outside(right)
    return fig


def claim_chart(document: dict):
    """Output tokens/s against context: the serving model at the largest batch, at batch 1 and
    with prefill counted; the claim's two points; measured end-to-end points."""
    points = document["points"]
    n = [p["seq_len"] for p in points]
    calibrated = not document["assumptions"]["calibration"]["ideal"]
    claim = document["claim"]
    caption = (f"Model {document['model']} on {document['num_gpus']} x {document['gpu_config']['name']}, "
               f"{document['assumptions']['decode_tokens']} tokens decoded per sequence, "
               f"{'calibrated on measurements' if calibrated else 'ideal (spec bandwidth and FLOP/s)'}; "
               f"claim: {document['claim_source']}. Ratios 1k/128k: max batch "
               f"{fmt.ratio(document['ratio_max_batch'])}, batch 1 {fmt.ratio(document['ratio_batch1'])}, "
               f"with prefill {fmt.ratio(document['ratio_with_prefill'])}; numbers at the top line: largest batch.")
    fig, (ax,) = _figure("Output tokens/s against context: where the claimed drop comes from", caption,
                         legend_outside=False)
    colors = _sns().color_palette("deep", 6)
    series = [("tok_s_max_batch", "model, largest batch that fits", colors[0]),
              ("tok_s_batch1", "model, batch 1", colors[1]),
              ("tok_s_with_prefill", "model, largest batch, prefill counted", colors[2])]
    for key, label, color in series:
        ys = [p[key] or np.nan for p in points]
        ax.plot(n, ys, marker="o", ms=4, lw=1.8, color=color, label=label)
        if calibrated and document.get("ideal_points"):
            ax.plot(n, [p[key] or np.nan for p in document["ideal_points"]], lw=1, ls=":", color=color)
    for p in points:
        if p["max_batch"]:
            ax.annotate(str(p["max_batch"]), (p["seq_len"], p["tok_s_max_batch"]), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=7, color=colors[0])
    ax.scatter([claim["short_ctx"], claim["long_ctx"]], [claim["short_tok_s"], claim["long_tok_s"]], marker="*",
               s=220, color="#d62728", zorder=5, label="claim (Cartridges, Fig. 3)")
    for (mode, kernel), color in zip(sorted({(m["mode"], m["kernel"]) for m in document["measured"]}), colors[3:] * 4):
        measured = [m for m in document["measured"] if (m["mode"], m["kernel"]) == (mode, kernel)]
        ax.scatter([m["seq_len"] for m in measured], [m["tok_s"] for m in measured], marker="D", s=36,
                   color=color, zorder=4, label=f"measured {mode}, {kernel}")
    _context_axis(ax, n + [claim["short_ctx"], claim["long_ctx"]])
    ax.set_ylabel("output tokens/s (all sequences)")
    if calibrated:
        ax.plot([], [], ls=":", color="#555555", label="ideal model (dotted)")
    ax.legend(loc="lower left", fontsize="small", framealpha=0.9)
    return fig


def _ok(rows):
    return rows[(rows["status"] == "ok") & (rows["median_ms"] > 0)].sort_values("seq_len")


def _one(rows, column: str) -> str:
    values = sorted({str(v) for v in rows[column].dropna()})
    return "/".join(values) if values else "?"


def _peaks(roof, rows) -> list:
    """(device, peak, source) for the devices in `rows`, from the roofline rows."""
    if roof is None or roof.empty:
        return []
    mine = roof[roof["mode"].isin(rows["mode"].unique()) & roof["device"].isin(rows["device"].unique())]
    mine = mine.dropna(subset=["peak"]).drop_duplicates(["device", "peak"])
    return [(r["device"], float(r["peak"]), r["peak_source"]) for _, r in mine.iterrows()]


# --- saving -----------------------------------------------------------------------------------

def save(fig, path_stem, formats=("png", "svg")) -> dict:
    """Write the figure as PATH_STEM.png / .svg; returns {format: path}."""
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    files = {}
    for kind in formats:
        path = stem.with_suffix(f".{kind}")
        fig.savefig(path, format=kind, dpi=DPI)
        files[kind] = path
    return files


def _slug(*parts) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9.]+", "-", str(p)).strip("-") for p in parts if p)


def pick_baseline(kernels, baseline=None) -> tuple:
    """(baseline, chosen automatically?): the requested kernel, else what one would otherwise
    use (torch SDPA's flash backend, the flash-attn package), else an unfused reference."""
    kernels = set(kernels)
    if baseline:
        if baseline not in kernels:
            raise ValueError(f"baseline: {baseline!r} has no ok records; kernels present: {', '.join(sorted(kernels))}")
        return baseline, False
    for candidate in ("sdpa-flash", "flash-attn", "sdpa-math", "naive"):
        if candidate in kernels:
            return candidate, True
    return (sorted(kernels)[0], True) if kernels else (None, True)


def render_all(results, out_dir, *, fits=(), roof=None, claim=None, baseline=None,
               formats=("png", "svg")) -> tuple[list, list]:
    """Draw every chart the data allows into `out_dir`; returns (charts, skipped) where
    skipped lists what could not be drawn and why."""
    out = Path(out_dir)
    charts, skipped = [], []
    palette = palette_for(results["kernel"])
    markers = markers_for(results["device"])

    def emit(name, fig, title):
        charts.append(Chart(name, title, caption_of(fig), save(fig, out / name, formats)))

    for (mode, workload), rows in results[results["mode"].isin(("prefill", "decode"))].groupby(["mode", "workload"]):
        ok = _ok(rows)
        if ok.empty:
            skipped.append(f"{mode} {workload}: no ok records, so no latency or rate chart")
        else:
            emit(_slug("latency", mode, workload), latency_chart(rows, fits, palette, markers),
                 f"{mode} latency, {workload}")
            quantity = "tflops" if mode == "prefill" else "gbps"
            if ok[quantity].notna().any():
                emit(_slug(quantity, workload), rate_chart(rows, roof, quantity, palette, markers),
                     f"{mode} {quantity}, {workload}")
            _speedup(rows, ok, mode, workload, baseline, palette, markers, emit, skipped)
            if ok["power_w_mean"].notna().any() or ok["joules_per_token"].notna().any():
                emit(_slug("power", mode, workload), power_chart(rows, palette, markers), f"{mode} power, {workload}")
            else:
                skipped.append(f"{mode} {workload}: no power or energy readings (NVML absent?)")
        if rows["peak_mem_bytes"].notna().any() or rows["predicted_mem_bytes"].notna().any():
            emit(_slug("memory", mode, workload), memory_chart(rows, palette, markers), f"{mode} memory, {workload}")
    if claim is not None:
        emit("claim", claim_chart(claim), "claim")
    return charts, skipped


def _speedup(rows, ok, mode, workload, baseline, palette, markers, emit, skipped) -> None:
    kernels = set(ok["kernel"])
    if baseline and baseline not in kernels:
        skipped.append(f"{mode} {workload}: baseline {baseline} has no ok records here, so no speedup chart")
        return
    chosen, auto = pick_baseline(kernels, baseline)
    if len(kernels) < 2:
        skipped.append(f"{mode} {workload}: one kernel only, so no speedup chart")
        return
    emit(_slug("speedup", mode, workload), speedup_chart(rows, chosen, palette, markers, auto),
         f"{mode} speedup over {chosen}, {workload}")
