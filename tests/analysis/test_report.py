"""The report builds from the committed sample: self-contained HTML, Markdown, data files."""
import base64
import json
import re

import pytest

pytest.importorskip("seaborn")
pytest.importorskip("scipy")

from attnlab.cli import main  # noqa: E402
from paths import SAMPLE


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert main(["report", str(SAMPLE), "--out", str(out), "--formats", "png", "--bootstrap", "300"]) == 0
    return out


def test_html_is_self_contained_with_every_chart_embedded(report_dir):
    page = (report_dir / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    charts = sorted((report_dir / "charts").glob("*.png"))
    assert len(images) == len(charts) >= 10
    assert all(base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n" for data in images)
    # Nothing fetched from elsewhere: no external scripts, styles or images.
    assert not re.search(r'<(script|link)\b|src="(?!data:)', page)


def test_html_has_every_section(report_dir):
    page = (report_dir / "report.html").read_text()
    for heading in ("Run conditions", "Head to head", "Fits: decode a + b n", "Charts", "Roofline", "The claim",
                    "Failed and out-of-memory points", "Left out"):
        assert f">{heading}" in page, heading
    # Conditions of the run, the failures with their reasons, the synthetic-data warning.
    for text in ("550.90.07", "SM 1980 MHz, memory 2619 MHz", "cuDNN Frontend error", "flash_attn is not installed",
                 "predicted peak", "marked synthetic", "measured: bf16 matmul calibration",
                 "largest batch falls from 437", "superseded by run sample-h100-20261127-pytest-benchmark"):
        assert text in page, text


def test_markdown_links_charts_that_exist(report_dir):
    md = (report_dir / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) >= 10 and all((report_dir / link).is_file() for link in links)
    assert "| triton | prefill | llama3-8b |" in md


def test_data_files_follow_their_contracts(report_dir):
    fits = json.loads((report_dir / "fits.json").read_text())["fits"]
    triton = next(f for f in fits if f["kernel"] == "triton" and f["mode"] == "prefill")
    assert 1.9 < triton["exponent"] < 2.1 and triton["n_points"] == 8
    claim = json.loads((report_dir / "claim.json").read_text())
    assert {"model", "gpu", "claim", "points", "ratio_max_batch", "ratio_batch1", "ratio_with_prefill",
            "explanation"} <= set(claim)
    assert (report_dir / "fits.csv").read_text().startswith("kernel,mode,workload,device,a_ms,")
    header = (report_dir / "roofline.csv").read_text().splitlines()[0]
    assert "pct_of_peak" in header and "peak_source" in header


def test_analyze_cli_writes_the_contract_files(tmp_path, capsys):
    assert main(["analyze", str(SAMPLE / "results.jsonl"), "--out", str(tmp_path), "--no-charts",
                 "--bootstrap", "200"]) == 0
    written = {"fits.json", "fits.csv", "roofline.csv", "claim.json"}
    assert {p.name for p in tmp_path.iterdir()} == written | {".attnlab-outputs"}   # the manifest of what it wrote
    printed = capsys.readouterr().out
    assert "triton-decode" in printed and "% of peak" in printed


def test_commands_name_a_missing_input(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")]) == 2
    assert "nowhere" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["analyze", str(tmp_path / "empty"), "--out", str(tmp_path / "a")]) == 2
    assert "no attnlab result records" in capsys.readouterr().err


def test_head_to_head_sets_each_kernel_against_the_baseline(tmp_path):
    from attnlab.analysis.load import load
    from attnlab.analysis.report import _head_to_head_blocks

    def record(kernel, seq_len, ms, tflops):
        return {"schema": "attnlab.result/1", "run_id": "r", "kernel": kernel, "mode": "prefill",
                "workload": "llama3-8b", "dtype": "bfloat16", "device": "H100", "status": "ok",
                "seq_len": seq_len, "median_ms": ms, "tflops": tflops,
                "baseline": kernel == "sdpa-flash"}    # its role, as the registry gives it
    records = [record("sdpa-flash", 4096, 2.0, 300.0), record("triton", 4096, 1.0, 600.0),
               record("sdpa-cudnn", 4096, 0.8, 750.0), record("triton", 8192, 3.0, 800.0),
               dict(record("naive", 4096, 9.0, 1.0), run_id="other")]   # another run: not set beside these
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    note, (kind, headers, rows) = _head_to_head_blocks(load([tmp_path]).results)
    assert "sdpa-flash's time over the kernel's" in note[1] and kind == "table"
    assert headers == ["context", "sdpa-cudnn", "sdpa-flash", "triton"]
    assert rows[0] == ["4k", "0.8 ms, 750 TFLOP/s (2.50x)", "2 ms, 300 TFLOP/s", "1 ms, 600 TFLOP/s (2.00x)"]
    assert rows[1] == ["8k", "-", "-", "3 ms, 800 TFLOP/s"]   # no baseline there: no ratio
    _, (_, _, against_cudnn) = _head_to_head_blocks(load([tmp_path]).results, baseline="sdpa-cudnn")
    assert against_cudnn[0][3].endswith("(0.80x)")


def test_markup_in_records_stays_text_and_chart_names_stay_apart(tmp_path):
    markdown_it = pytest.importorskip("markdown_it")
    from attnlab.analysis.report import build_report

    def record(kernel, workload, seq_len, ms, status="ok", reason=None):
        return {"schema": "attnlab.result/1", "run_id": "r", "kernel": kernel, "mode": "prefill",
                "workload": workload, "dtype": "bfloat16", "device": "cpu", "status": status, "reason": reason,
                "seq_len": seq_len, "q_len": seq_len, "median_ms": ms, "times_ms": [ms] * 3 if ms else [],
                "tflops": 1 / ms if ms else None}
    hostile = "<script>alert(1)</script>"
    records = [record(k, w, n, n / 1e3 * (1 + i)) for i, (k, w) in enumerate(
        [(hostile, "w a"), ("plain", "w-a")]) for n in (1024, 2048, 4096)]
    records.append(record("plain", "w-a", 8192, None, status="error", reason="**boom** [x](javascript:alert(1))"))
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    report = build_report([tmp_path], tmp_path / "out", formats=("png",), n_boot=50)
    rendered = markdown_it.MarkdownIt().render(report.md_path.read_text())
    assert "<script>" not in rendered and "javascript:" not in rendered.split("href=")[-1][:12]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in rendered and "**boom**" in rendered
    assert "<script>" not in report.html_path.read_text()
    latency = sorted(p.name for p in (tmp_path / "out" / "charts").glob("latency_*.png"))
    assert len(latency) == 2 and "latency_prefill_w-a.png" in latency, latency
