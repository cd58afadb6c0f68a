"""Every chart renders headless to a valid PNG (and SVG), carries its own caption, draws each
point from exactly one record (never a mean across runs) and writes a CSV of what it draws."""
import math
import struct
from pathlib import Path

import pytest

pytest.importorskip("seaborn")
pytest.importorskip("scipy")

from attnlab.analysis import charts  # noqa: E402
from attnlab.analysis.claim import build_claim  # noqa: E402
from attnlab.analysis.fits import fit_all  # noqa: E402
from attnlab.analysis.load import load  # noqa: E402
from attnlab.analysis.roofline import roofline  # noqa: E402
from paths import SAMPLE

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sample():
    results = load(SAMPLE).results
    fits, _ = fit_all(results, n_boot=200)
    claim, _ = build_claim("llama3-8b", "h100-sxm", results=results)
    return results, fits, roofline(results), claim


def png_size(path):
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height, len(data)


def assert_valid_png(path):
    width, height, size = png_size(path)
    assert width >= 600 and height >= 400 and size > 10_000  # a real picture, not an empty canvas


def rows(results, mode):
    return results[(results["mode"] == mode) & (results["workload"] == "llama3-8b")]


def test_every_chart_renders_headless(sample, tmp_path):
    import matplotlib
    results, fits, roof, claim = sample
    figures = {
        "latency": charts.latency_chart(rows(results, "prefill"), fits),
        "tflops": charts.rate_chart(rows(results, "prefill"), roof, "tflops"),
        "gbps": charts.rate_chart(rows(results, "decode"), roof, "gbps"),
        "speedup": charts.speedup_chart(rows(results, "prefill"), "sdpa-flash"),
        "memory": charts.memory_chart(rows(results, "prefill")),
        "power": charts.power_chart(rows(results, "decode")),
        "claim": charts.claim_chart(claim),
    }
    assert matplotlib.get_backend().lower() == "agg"
    for name, fig in figures.items():
        files = charts.save(fig, tmp_path / name, ("png",))
        assert_valid_png(files["png"])
        assert files["csv"].read_text().startswith("chart,series,kernel,seq_len,y,y_unit,")
        caption = charts.caption_of(fig)
        assert fig._suptitle.get_text(), name
        if name != "claim":
            assert "NVIDIA H100 80GB HBM3" in caption and "bf16" in caption, name
        else:
            assert "H100 SXM" in caption


def test_axes_carry_units(sample):
    results, fits, roof, _ = sample
    ax = charts.latency_chart(rows(results, "decode"), fits).axes[0]
    assert ax.get_ylabel() == "latency per call (ms)" and ax.get_xlabel() == "context length (tokens)"
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    ax = charts.rate_chart(rows(results, "prefill"), roof, "tflops").axes[0]
    assert "TFLOP/s" in ax.get_ylabel()
    # The peak line sits at the run's measured matmul rate (712.4 in the sample).
    assert any(abs(line.get_ydata()[0] - 712.4) < 1e-6 for line in ax.get_lines() if line.get_linestyle() == "--")


def test_memory_chart_marks_out_of_memory_points(sample):
    results = sample[0]
    ax = charts.memory_chart(rows(results, "prefill")).axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "out of memory" in labels
    oom = [c for c in ax.collections if c.get_offsets().shape[0] == 4]  # naive at 16k..128k
    assert oom


def test_render_all_writes_png_and_svg_and_explains_what_it_skips(sample, tmp_path):
    results, fits, roof, claim = sample
    decode = results[results["mode"].isin(["decode", "calibration"])].copy()
    decode[["power_w_mean", "power_w_max", "joules_per_token"]] = float("nan")
    drawn, skipped = charts.render_all(decode, tmp_path, fits=fits, roof=roof, claim=claim, baseline="naive")
    names = {c.name for c in drawn}
    assert names == {"latency_decode_llama3-8b", "gbps_llama3-8b", "speedup_decode_llama3-8b",
                     "memory_decode_llama3-8b", "claim"}
    assert any("no power or energy" in s for s in skipped)
    for chart in drawn:
        assert_valid_png(chart.files["png"])
        svg = chart.files["svg"].read_text()
        assert svg.lstrip().startswith("<?xml") and "<svg" in svg
        assert chart.files["csv"] == tmp_path / f"{chart.name}.csv" and chart.files["csv"].is_file()
    _, skipped = charts.render_all(decode, tmp_path / "b", fits=fits, roof=roof, baseline="flash-attn",
                                   formats=("png",))
    assert any("baseline flash-attn has no ok records" in s for s in skipped)


# --- one point, one record ----------------------------------------------------------------------

H100 = "NVIDIA H100 80GB HBM3"


def record(run_id, kernel, seq_len, median_ms, tflops, excluded="", **fields):
    """A prefill result record as the loader gives it, with `excluded` and `valid` filled."""
    return {"run_id": run_id, "kernel": kernel, "mode": "prefill", "workload": "llama3-8b", "device": H100,
            "dtype": "bf16", "batch": 1.0, "heads": 32.0, "kv_heads": 8.0, "head_dim": 128.0, "causal": True,
            "seq_len": float(seq_len), "q_len": float(seq_len), "status": "ok", "median_ms": median_ms,
            "p10_ms": median_ms * 0.98, "p90_ms": median_ms * 1.03, "tflops": tflops, "gbps": math.nan,
            "peak_mem_bytes": seq_len * 2.0**16, "predicted_mem_bytes": seq_len * 2.0**16,
            "power_w_mean": math.nan, "power_w_max": math.nan, "joules_per_token": math.nan, "times_ms": [],
            "source": "synthetic", "excluded": excluded, "valid": not excluded.startswith(("retracted", "invalid")),
            **fields}


@pytest.fixture
def two_runs():
    """Triton prefill at 16k measured by two runs (r2 stands), and by a retracted third."""
    import pandas as pd
    return pd.DataFrame([
        record("r1", "triton", 16384, 4.97, 443.0, excluded="superseded by run r2, which measured the point later"),
        record("r2", "triton", 16384, 4.48, 491.0),
        record("r0", "triton", 16384, 9.0, 240.0, excluded="retracted: clocks throttled (retractions.jsonl:1)"),
        record("r2", "triton", 8192, 1.2, 458.0),
        record("r2", "sdpa-flash", 8192, 1.7, 323.0),
        record("r2", "sdpa-flash", 16384, 6.43, 342.0),
    ])


def render(results, out, monkeypatch, **options):
    """render_all's charts, the figures it saved (by name) and each chart's CSV (by name)."""
    import pandas as pd
    figures, save = {}, charts.save

    def keep(fig, stem, formats):
        figures[Path(stem).name] = fig
        return save(fig, stem, formats)
    monkeypatch.setattr(charts, "save", keep)
    drawn, _ = charts.render_all(results, out, **{"formats": ("png",), **options})
    return drawn, figures, {c.name: pd.read_csv(c.files["csv"], keep_default_na=False) for c in drawn}


def at(table, kernel, seq_len):
    return table[(table["kernel"] == kernel) & (table["seq_len"] == seq_len)]


def line_y(fig, label, seq_len):
    """The y each legend-labelled line of `fig` draws at `seq_len`."""
    lines = [line for ax in fig.axes for line in ax.get_lines() if line.get_label() == label]
    return [float(y) for line in lines for x, y in zip(line.get_xdata(), line.get_ydata()) if x == seq_len]


def test_a_point_measured_by_two_runs_is_drawn_from_the_standing_record(two_runs, tmp_path, monkeypatch):
    _, figures, tables = render(two_runs, tmp_path, monkeypatch)
    rate = at(tables["tflops_llama3-8b"], "triton", 16384)
    latency = at(tables["latency_prefill_llama3-8b"], "triton", 16384)
    assert len(rate) == 1 and len(latency) == 1
    assert (rate.iloc[0]["y"], rate.iloc[0]["run_id"]) == (491.0, "r2")
    assert (latency.iloc[0]["y"], latency.iloc[0]["run_id"]) == (4.48, "r2")
    # The picture holds the standing record's value, not the mean of the two runs (467).
    assert line_y(figures["tflops_llama3-8b"], "triton", 16384) == [491.0]
    assert line_y(figures["latency_prefill_llama3-8b"], "triton", 16384) == [4.48]
    speedup = at(tables["speedup_prefill_llama3-8b"], "triton", 16384).iloc[0]
    assert (speedup["median_ms"], speedup["baseline_ms"], speedup["baseline_run_id"]) == (4.48, 6.43, "r2")
    assert speedup["y"] == pytest.approx(6.43 / 4.48)


def test_all_runs_draws_each_valid_run_as_its_own_series(two_runs, tmp_path, monkeypatch):
    _, figures, tables = render(two_runs, tmp_path, monkeypatch, all_runs=True)
    rate = at(tables["tflops_llama3-8b"], "triton", 16384).set_index("run_id")
    assert sorted(rate.index) == ["r1", "r2"]   # the retracted run r0 is not drawn
    assert (rate.loc["r1", "y"], rate.loc["r2", "y"]) == (443.0, 491.0)
    assert rate.loc["r1", "series"] == "triton, run r1" and rate.loc["r2", "series"] == "triton, run r2"
    assert line_y(figures["tflops_llama3-8b"], "triton, run r1", 16384) == [443.0]
    assert line_y(figures["tflops_llama3-8b"], "triton, run r2", 16384) == [491.0]
    latency = at(tables["latency_prefill_llama3-8b"], "triton", 16384).set_index("run_id")
    assert (latency.loc["r1", "y"], latency.loc["r2", "y"]) == (4.97, 4.48)
    # A run is named even where no other run measured the point.
    _, _, tables = render(two_runs[two_runs["excluded"] == ""], tmp_path / "one", monkeypatch, all_runs=True,
                          formats=())
    assert set(tables["tflops_llama3-8b"]["series"]) == {"triton, run r2", "sdpa-flash, run r2"}


def test_two_records_at_one_length_of_a_series_are_refused(two_runs):
    again = two_runs[two_runs["run_id"] == "r2"]
    twice = again.iloc[[0, 0, 1]].assign(median_ms=[4.48, 4.97, 1.2], tflops=[491.0, 443.0, 458.0])
    refused = r"2 rows at series 'triton', .*seq_len 16384 \(runs r2, r2\).*one record per point"
    for draw in (lambda rows: charts.rate_chart(rows, None, "tflops"), charts.latency_chart, charts.power_chart):
        with pytest.raises(ValueError, match=refused):
            draw(twice.assign(power_w_mean=300.0, joules_per_token=1e-3))
    with pytest.raises(ValueError, match=r"baseline triton holds 2 rows at .*seq_len 16384"):
        charts.speedup_chart(twice, "triton")


def test_series_name_what_tells_records_apart_and_dtypes_get_their_own_charts(two_runs, tmp_path, monkeypatch):
    import pandas as pd
    standing = two_runs[two_runs["excluded"] == ""]
    mixed = pd.concat([standing, standing.assign(heads=16.0, tflops=400.0),
                       standing.assign(dtype="fp16", tflops=380.0)], ignore_index=True)
    drawn, _, tables = render(mixed, tmp_path, monkeypatch, formats=())
    assert {"tflops_llama3-8b_bf16", "tflops_llama3-8b_fp16"} <= {c.name for c in drawn}
    assert set(tables["tflops_llama3-8b_fp16"]["dtype"]) == {"fp16"}
    series = set(at(tables["tflops_llama3-8b_bf16"], "triton", 16384)["series"])
    assert series == {"triton, heads 16", "triton, heads 32"}
    # A field that changes only along the x axis (q_len here, batch in fa-paper) splits nothing.
    labels, fields = charts.series_labels(standing, standing["kernel"])
    assert fields == [] and set(labels) == {"triton", "sdpa-flash"}


def test_every_drawn_record_row_equals_its_record(sample, tmp_path):
    import pandas as pd
    results, fits, roof, claim = sample
    for all_runs in (False, True):
        drawn, _ = charts.render_all(results, tmp_path / str(all_runs), fits=fits, roof=roof, claim=claim,
                                     formats=(), all_runs=all_runs)
        assert len(drawn) == 12
        for chart in (c for c in drawn if not c.name.startswith("mask")):   # a mask draws cells, not records
            table = pd.read_csv(chart.files["csv"], keep_default_na=False)
            assert set(table["chart"]) == {chart.name}
            for _, row in table.iterrows():
                if row["y"] == "":       # a point or curve not drawn: its row says why
                    assert row["note"].startswith("not drawn: "), (chart.name, row["series"])
                elif chart.name == "claim":
                    assert_claim_row(row, claim)
                elif row["run_id"]:
                    assert_record_row(row, results)
                elif row["series"].startswith("fit "):
                    assert_fit_row(row, fits)


def find(results, **fields):
    rows = results
    for name, value in fields.items():
        rows = rows[rows[name] == value]
    assert len(rows) == 1, fields
    return rows.iloc[0]


def assert_record_row(row, results):
    point = {k: row[k] for k in ("run_id", "kernel", "mode", "workload", "device", "dtype")}
    source = find(results, seq_len=float(row["seq_len"]), **point)
    expected = {"peak_mem_bytes / 2**30": source["peak_mem_bytes"] / 2**30,
                "predicted_mem_bytes / 2**30": source["predicted_mem_bytes"] / 2**30,
                "baseline_ms / median_ms": None}.get(row["y_from"], source.get(row["y_from"]))
    if row["y_from"] == "baseline_ms / median_ms":
        base = find(results, seq_len=float(row["seq_len"]), **{**point, "kernel": row["baseline"],
                                                              "run_id": row["baseline_run_id"]})
        assert float(row["baseline_ms"]) == pytest.approx(base["median_ms"], rel=1e-12)
        expected = base["median_ms"] / source["median_ms"]
    assert float(row["y"]) == pytest.approx(expected, rel=1e-12), (row["chart"], row["series"], row["seq_len"])
    for column in ("median_ms", "p10_ms", "p90_ms", "power_w_max"):
        if column in row and row[column] != "":
            assert float(row[column]) == pytest.approx(source[column], rel=1e-12), column


def assert_fit_row(row, fits):
    fit = next(f for f in fits if (f.kernel, f.mode, f.workload, f.device) == (row["kernel"], row["mode"],
                                                                              row["workload"], row["device"]))
    assert float(row["y"]) == pytest.approx(float(fit.predict_ms(float(row["seq_len"]))), rel=1e-12)


def assert_claim_row(row, claim):
    if row["run_id"]:
        item = next(m for m in claim["measured"] if (m["run_id"], m["mode"], m["kernel"], m["seq_len"])
                    == (row["run_id"], row["mode"], row["kernel"], int(row["seq_len"])))
        assert float(row["y"]) == pytest.approx(item["tok_s"], rel=1e-12)
    elif row["series"] == "claim":
        assert float(row["y"]) in (claim["claim"]["short_tok_s"], claim["claim"]["long_tok_s"])
    else:
        point = next(p for p in claim["points"] if p["seq_len"] == int(row["seq_len"]))
        if not row["series"].startswith("ideal "):
            assert float(row["y"]) == pytest.approx(point[row["y_from"]], rel=1e-12)


# --- charts a person can read ------------------------------------------------------------------

def test_a_kernel_keeps_its_colour_and_marker_whatever_else_is_drawn():
    # Kernel names alone (no role columns): each kernel is its own family, its hue from that name.
    alone, crowd = charts.palette_for(["triton"]), charts.palette_for(["naive", "sdpa-flash", "triton", "zzz"])
    assert alone["triton"] == crowd["triton"] and crowd["triton"] != crowd["sdpa-flash"]
    assert charts.kernel_markers(["triton"]) == {"triton": charts.kernel_markers(["triton", "naive"])["triton"]}
    assert charts.palette_for(["my-kernel"])["my-kernel"] == charts.palette_for(["a", "my-kernel"])["my-kernel"]
    # Families drawn together differ while hues remain (tests/analysis/test_roles.py: one family, one hue).
    many = charts.palette_for([f"family-{i}" for i in range(len(charts.FAMILY_HUES))])
    assert sorted(many.values()) == sorted(charts.FAMILY_HUES)


def test_a_workload_at_one_length_is_drawn_as_bars_not_as_lines(two_runs, tmp_path, monkeypatch):
    one_length = two_runs[two_runs["seq_len"] == 16384]
    drawn, figures, tables = render(one_length, tmp_path, monkeypatch)
    assert [c.name for c in drawn] == ["tflops_llama3-8b", "mask_llama3-8b"]
    (ax,) = [a for a in figures["tflops_llama3-8b"].axes if a.patches]
    assert sorted(round(p.get_height()) for p in ax.patches) == [342, 491]
    assert list(at(tables["tflops_llama3-8b"], "triton", 16384)["y"]) == [491.0]


def test_two_peaks_within_a_few_percent_share_one_label(tmp_path):
    import pandas as pd
    from matplotlib.figure import Figure
    ax = Figure().subplots()
    lines = pd.DataFrame({"y": [731.0, 732.0, 989.0], "note": ["measured", "measured", "spec"]})
    charts._horizontal_lines(ax, lines, 1024, lambda r: f"peak {r['y']:.0f}")
    assert sorted(t.get_text() for t in ax.texts) == ["peak 731", "peak 989"]
    assert len(ax.get_lines()) == 3


@pytest.mark.parametrize("seq_len,cells,causal,window,docs", [
    (256, 16, True, 0, 1), (256, 16, True, 40, 1), (256, 16, False, 40, 1), (300, 16, True, 7, 3),
    (256, 16, False, 0, 4), (1024, 64, True, 100, 1)])
def test_a_drawn_mask_cell_is_seen_when_any_of_its_pairs_is(seq_len, cells, causal, window, docs):
    import numpy as np
    import torch

    from attnlab.kernels.masks import visible
    from attnlab.visibility import band

    pairs = visible(seq_len, seq_len, causal, window=band(window, causal)).numpy()
    doc = np.arange(seq_len) * docs // seq_len
    pairs &= doc[:, None] == doc[None, :]
    edges = np.floor(np.arange(cells + 1) * seq_len / cells).astype(int)
    expected = [[pairs[edges[a]:edges[a + 1], edges[b]:edges[b + 1]].any() for b in range(cells)]
                for a in range(cells)]
    assert torch.equal(torch.tensor(expected), torch.tensor(charts._mask_cells(seq_len, cells, causal, window, docs)))


def test_each_prefill_workload_gets_its_mask_drawn_with_its_cells_in_the_csv(tmp_path):
    results = load([SAMPLE]).results
    drawn, _ = charts.render_all(results, tmp_path, formats=("png",))
    masks = [c for c in drawn if c.name.startswith("mask")]
    prefill_workloads = set(results[results["mode"] == "prefill"]["workload"])
    assert len(masks) == len(prefill_workloads) >= 1
    cells = pytest.importorskip("pandas").read_csv(masks[0].files["csv"])
    assert len(cells) == charts.MASK_CELLS ** 2 and set(cells["y"]) == {0, 1}
    causal_mask = cells.pivot(index="query_cell", columns="key_cell", values="y").to_numpy()
    assert (causal_mask.diagonal() == 1).all() and causal_mask[0, -1] == 0   # causal: nothing above the diagonal
