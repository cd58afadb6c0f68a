"""The report of a run leads with that run: this machine's tables before the runs read beside
it, the serving model's chart only where records read feed it (and said whose), each chart's
caption said once, and what the report left out summed up in one line that names its file."""
import json
from types import SimpleNamespace

import pytest

pytest.importorskip("pandas")

from attnlab.analysis.charts import Chart  # noqa: E402
from attnlab.analysis.load import label_this_machine, load  # noqa: E402
from attnlab.analysis.report import (_claim_chart_label, _claim_chart_shown, _headline_blocks,  # noqa: E402
                                     _html_block, _md_block)
from attnlab.cli.report import warnings_line  # noqa: E402
from paths import SAMPLE  # noqa: E402

PNG = bytes.fromhex("89504e470d0a1a0a")      # a PNG's signature: enough for a page to embed


def cpu_run(path):
    def record(kernel, seq_len, ms):
        return {"schema": "attnlab.result/1", "run_id": "here", "kernel": kernel, "mode": "prefill",
                "workload": "cpu-small", "dtype": "float32", "device": "cpu", "status": "ok", "seq_len": seq_len,
                "q_len": seq_len, "median_ms": ms, "times_ms": [ms] * 3, "tflops": 1 / ms}
    records = [record(kernel, n, n / 1e3 * (1 + i)) for i, kernel in enumerate(("naive", "sdpa-math"))
               for n in (256, 512, 1024)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def beside_the_sample(tmp_path_factory):
    mine = cpu_run(tmp_path_factory.mktemp("here") / "sweep.jsonl")
    loaded = load([SAMPLE, mine])
    label_this_machine(loaded, [mine])
    return loaded.results


def test_this_machines_tables_come_first(beside_the_sample):
    blocks = _headline_blocks(beside_the_sample)
    notes = [b[1] for b in blocks if b[0] == "p"]
    assert notes[0].startswith("This machine")
    assert "cpu-small" in notes[1] and "(this machine)" in notes[1]
    others = notes.index("The other runs read beside it, for comparison:")
    assert others > 1 and all("(this machine)" not in note for note in notes[others:])


def test_without_a_run_of_this_machine_the_tables_are_as_before(beside_the_sample):
    others = beside_the_sample[~beside_the_sample["device"].str.endswith("(this machine)")]
    assert not any(b[0] == "p" and b[1].startswith("This machine") for b in _headline_blocks(others))


def claim_fed_by(*runs):
    provenance = [{"points": [{"run_id": run, "seq_len": 1024}]} for run in runs]
    return {"model": "llama3-8b", "gpu": "h100-sxm", "measured": [],
            "assumptions": {"calibration": {"provenance": provenance}}}


def test_the_serving_model_chart_only_where_records_feed_it_and_says_whose(beside_the_sample):
    analysis = SimpleNamespace(claim=claim_fed_by(), results=beside_the_sample)
    assert not _claim_chart_shown(analysis)              # an uncalibrated model says nothing of these runs
    profile_run = next(run for run in beside_the_sample["run_id"] if run != "here")
    analysis.claim = claim_fed_by(profile_run)
    assert _claim_chart_shown(analysis)
    label = _claim_chart_label(analysis)
    assert "llama3-8b on h100-sxm" in label and "not this machine's" in label and profile_run in label
    analysis.claim = claim_fed_by("here")
    assert "calibrated on or set beside this machine's run" in _claim_chart_label(analysis)


def test_a_charts_caption_is_said_once_in_the_image(tmp_path):
    (tmp_path / "charts").mkdir()
    png = tmp_path / "charts" / "latency_x.png"
    png.write_bytes(PNG)
    chart = Chart("latency_x", "Latency", "a caption drawn in the image", {"png": png})
    assert "a caption drawn in the image" not in "\n".join(_md_block(("chart", chart), tmp_path))
    page = _html_block(("chart", chart))
    assert "<figcaption>" not in page and page.count("a caption drawn in the image") == 1     # in the alt text


def test_what_was_left_out_is_one_line_naming_its_file(tmp_path):
    warnings = ["left out 85 record(s) (60 retracted, 25 superseded); fits.json 'excluded' lists each",
                "not fitted: naive prefill: 2 context length(s)", "not fitted: flex prefill: 1 context length(s)",
                "chart not drawn: decode cpu-small: no power readings"]
    line = warnings_line(warnings, tmp_path / "warnings.txt")
    assert line == (f"warning: left out 85 record(s) (60 retracted, 25 superseded); not fitted (2); chart not drawn: "
                    f"each with its reason in {tmp_path / 'warnings.txt'} and in the report's 'What was skipped'")
