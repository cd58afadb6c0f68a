"""The HTML report in a real browser: headless Chromium (Debian's `chromium`, which .ci/run
installs) driven by Playwright. It loads without a console error, every chart decodes, the
summary comes first, and markup from records never runs."""
import json
import shutil

import pytest

from paths import SAMPLE

sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright: pip install playwright")
CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs a Chromium binary: apt-get install chromium")

HOSTILE = '<img src=x onerror="window.pwned = 1">'


@pytest.fixture(scope="module")
def page_of_report(tmp_path_factory):
    from attnlab.analysis.report import build_report
    runs = tmp_path_factory.mktemp("runs")
    shutil.copytree(SAMPLE, runs / "sample")
    lines = (runs / "sample" / "results.jsonl").read_text().splitlines()
    hostile = [json.loads(line) for line in lines if '"mode": "prefill"' in line and '"kernel": "triton"' in line]
    (runs / "sample" / "results.jsonl").write_text("\n".join(lines + [json.dumps({**r, "kernel": HOSTILE})
                                                                       for r in hostile]) + "\n")
    report = build_report([runs], tmp_path_factory.mktemp("report"), formats=("png",), n_boot=100)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        errors = []
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(report.html_path.as_uri(), wait_until="load")
        yield page, errors
        browser.close()


def test_the_page_loads_without_a_console_error(page_of_report):
    page, errors = page_of_report
    assert page.title() == "attnlab report"
    assert errors == []


def test_every_chart_decodes(page_of_report):
    page, _ = page_of_report
    widths = page.eval_on_selector_all("img", "images => images.map(i => i.complete ? i.naturalWidth : 0)")
    masks = page.eval_on_selector_all("img[alt^='mask']", "images => images.map(i => i.naturalWidth)")
    assert len(widths) >= 10 and all(w > 0 for w in widths), widths
    assert sorted(w for w in widths if w <= 600) == sorted(masks) and all(w > 200 for w in masks)  # masks are small


def test_the_summary_comes_first_with_a_table_and_the_claim_chart(page_of_report):
    page, _ = page_of_report
    headings = page.eval_on_selector_all("h2", "hs => hs.map(h => h.textContent)")
    assert headings[0] == "Summary" and headings[-1] == "Records"
    summary = page.evaluate("""() => {
        const out = {tables: 0, images: 0};
        for (let n = document.querySelector('h2').nextElementSibling; n && n.tagName !== 'H2';
             n = n.nextElementSibling) {
            if (n.tagName === 'TABLE') out.tables++;
            if (n.querySelector && n.querySelector('img')) out.images++;
        }
        return out; }""")
    assert summary["tables"] >= 1 and summary["images"] == 1


def test_markup_from_records_is_shown_never_run(page_of_report):
    page, _ = page_of_report
    assert page.evaluate("() => window.pwned") is None
    assert HOSTILE in page.inner_text("body")
