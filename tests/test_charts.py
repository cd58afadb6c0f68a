"""Every chart renders headless to a valid PNG (and SVG) and carries its own caption."""
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

SAMPLE = Path(__file__).parent / "data" / "sample_run"
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
    _, skipped = charts.render_all(decode, tmp_path / "b", fits=fits, roof=roof, baseline="flash-attn",
                                   formats=("png",))
    assert any("baseline flash-attn has no ok records" in s for s in skipped)
