"""The report leads with the answer and names no path of the machine that ran anything."""
import re

import pytest

pytest.importorskip("pandas")
pytest.importorskip("scipy")

from attnlab.analysis.conditions import clocks_text, command_text, commit_text  # noqa: E402
from attnlab.analysis.report import build_report  # noqa: E402
from paths import PROFILES

MACHINE_PATH = re.compile(r"(?<![\w.])/(root|home|tmp|work|opt|usr|var|mnt|srv)/")


@pytest.fixture(scope="module")
def profiles_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return build_report([PROFILES.resolve()], out, formats=("png",), n_boot=50)   # named by an absolute path


def test_the_report_opens_with_a_summary_holding_a_table_and_the_claim_chart(profiles_report):
    md = profiles_report.md_path.read_text()
    headings = re.findall(r"^## (.+)$", md, flags=re.M)
    assert headings[0] == "Summary" and headings[-2:] == ["Run conditions", "Records"]
    summary = md.split("## Summary", 1)[1].split("\n## ", 1)[0]
    assert "| kernel |" in summary and "![claim](charts/claim.png)" in summary
    sentences = [line for line in summary.splitlines() if line.startswith("- ")]
    assert 3 <= len(sentences) <= 5
    assert any("triton-decode is fastest" in s and "85% of the measured copy" in s for s in sentences)


def test_no_path_of_any_machine_appears(profiles_report):
    for page in (profiles_report.md_path, profiles_report.html_path):
        found = MACHINE_PATH.findall(page.read_text())
        assert not found, (page.name, found[:5])
    assert "| attnlab sweep --workload llama3-8b --modes decode" in profiles_report.md_path.read_text()


def test_every_run_is_named_with_its_card_and_runs_of_two_cards_are_said_to_be(profiles_report):
    md = profiles_report.md_path.read_text()
    runs = set(re.findall(r"\b2026112[78]T\d{6}Z-[0-9a-f]{8}\b", md))
    assert len(runs) == 8
    for run in runs:
        assert re.findall(re.escape(run) + r"(?! \(card (d3d8bafb|840e80cf|1c0221f8)\))", md) == [], run
    summary = md.split("## Summary", 1)[1].split("\n## ", 1)[0]
    prefill, decode = [line for line in summary.splitlines() if line.startswith("llama3-8b ")]
    assert "2 different cards (1c0221f8, d3d8bafb)" in prefill and "different cards" not in decode
    assert "16k: run 20261127T235510Z-079f38a4 (card d3d8bafb)" in prefill


def test_the_claim_section_gives_its_error_in_and_out_of_sample(profiles_report):
    md = profiles_report.md_path.read_text()
    claim = md.split("## The claim", 1)[1].split("\n## ", 1)[0]
    assert "in sample at most 4.1% (at 128k); out of sample at most 5.3% (at 128k)" in claim
    assert "| compute\\_efficiency and overhead\\_ms |" in claim and "binds only at 1k, 2k" in claim


@pytest.mark.parametrize("argv, shown", [
    (["/work/main/attnlab/__main__.py", "sweep", "--out", "/root/out/decode.jsonl"],
     "attnlab sweep --out decode.jsonl"),
    (["/venv/lib/python3.12/site-packages/pytest/__main__.py", "bench/", "--attnlab-nvml-csv", "/tmp/x/b.nvml.csv",
      "--benchmark-json=/tmp/x/b.json"], "pytest bench/ --attnlab-nvml-csv b.nvml.csv --benchmark-json=b.json"),
    (["/usr/local/bin/attnlab", "e2e", "--out", "/data/runs/a/e2e.jsonl", "--weights", "/data/runs/w.bin"],
     "attnlab e2e --out e2e.jsonl --weights w.bin"),
    (["-c"], "python3 -c"),
    (None, "-"),
])
def test_a_command_is_shown_as_typed_without_machine_paths(argv, shown):
    assert command_text(argv) == shown


def test_commit_and_clocks_read_as_a_person_would_say_them():
    assert commit_text("HEAD") == commit_text(None) == "unknown"
    assert commit_text("1f7cee6a9b8c7d6e5f") == "1f7cee6a9b"
    clocks = {"sm_mhz": 345, "mem_mhz": 2619, "sm_max_mhz": 1980, "mem_max_mhz": 2619, "sm_app_mhz": 1980,
              "mem_app_mhz": 2619}
    assert clocks_text(clocks) == "SM 1980 of 1980 MHz, memory 2619 MHz"
    assert clocks_text(None) == "-"
