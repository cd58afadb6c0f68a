"""Text from records reaches SVG charts, HTML pages and Markdown whatever it holds: characters
XML forbids (NUL, other controls, lone surrogates) are replaced, markup is escaped, and a '$' is
drawn as itself rather than read as mathtext."""
import json
import re
import xml.etree.ElementTree as ElementTree

import pytest

pytest.importorskip("pandas")
pytest.importorskip("scipy")
pytest.importorskip("seaborn")

from attnlab.cli import main  # noqa: E402

# What XML 1.0 and HTML forbid in a document: C0 controls but tab, newline and return; DEL and C1;
# surrogates; U+FFFE and U+FFFF.
FORBIDDEN = re.compile("[^\t\n\r\x20-\x7e\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
# As a file holds them: JSON escapes, so that the surrogate is a lone one.
KERNELS = {"nul": r"na\u0000ive<&>", "controls": r"sd\u000bpa\u007f\u0085\ud800", "dollars": r"$\\foo$_x"}


def hostile_run(tmp_path):
    """Two kernels with hostile names, at three lengths, in a workload and on a device whose names
    hold controls too."""
    lines = []
    for i, kernel in enumerate(KERNELS.values()):
        for n in (1024, 2048, 4096):
            ms = (0.01 + 1e-5 * n) * (1 + i)
            record = {"schema": "attnlab.result/1", "run_id": "r1", "mode": "decode", "batch": 1, "heads": 8,
                      "kv_heads": 8, "head_dim": 64, "dtype": "bfloat16", "causal": True, "seq_len": n, "q_len": 1,
                      "status": "ok", "times_ms": [ms * (1 + j / 100) for j in range(5)], "median_ms": ms,
                      "bytes": 1e5 * n, "gbps": 1e5 * n / ms / 1e6, "power_w_mean": 300.0,
                      "peak_mem_bytes": 1e6 * n, "predicted_mem_bytes": 1e6 * n}
            text = json.dumps(record)[:-1]
            lines.append(text + f', "kernel": "{kernel}", "workload": "w\\u001f", "device": "G\\u0001 H100"}}')
    path = tmp_path / "run.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def assert_clean(path):
    text = path.read_text(encoding="utf-8")
    assert not FORBIDDEN.findall(text), (path.name, FORBIDDEN.findall(text)[:5])
    return text


def test_report_charts_are_valid_xml_and_its_pages_hold_no_forbidden_character(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["report", str(hostile_run(tmp_path)), "--out", str(out), "--bootstrap", "50",
                 "--formats", "png,svg"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Glyph" not in err
    svgs = sorted((out / "charts").glob("*.svg"))
    assert len(svgs) >= 4
    for svg in svgs:
        ElementTree.fromstring(assert_clean(svg).encode("utf-8"))     # raises on invalid XML
    page = assert_clean(out / "report.html")
    assert "na\ufffdive&lt;&amp;&gt;" in page and "<&>" not in page
    assert r"$\\foo$\_x" in assert_clean(out / "report.md")     # the name, its markup escaped, not a formula


def test_compare_pages_hold_no_forbidden_character(tmp_path, capsys):
    run = hostile_run(tmp_path)
    html, md = tmp_path / "compare.html", tmp_path / "compare.md"
    assert main(["compare", str(run), str(run), "--html", str(html), "--md", str(md)]) == 0
    page = assert_clean(html)
    ElementTree.fromstring(page.split("<figure>", 1)[1].split("<figcaption>", 1)[0])    # the inline SVG
    assert "sd\ufffdpa\ufffd\ufffd\ufffd" in page
    assert_clean(md)
    assert "Traceback" not in capsys.readouterr().err
