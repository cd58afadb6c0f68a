"""`attnlab lab`, the main job, runs twice in a row into the same folder (without a GPU it
reports the profiles it is given)."""
from pathlib import Path

import pytest
import torch

from attnlab.analysis.outputs import Manifest
from attnlab.cli import main

SAMPLE = Path(__file__).parent / "data" / "sample_run"

pytestmark = [pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the main job sweeps it"),
              pytest.mark.filterwarnings("ignore")]


def test_the_main_job_runs_twice_into_one_folder(tmp_path, capsys):
    pytest.importorskip("seaborn")
    out = tmp_path / "out"
    assert main(["lab", "--out", str(out), "--profiles", str(SAMPLE)]) == 0
    first = Manifest.read(out / "report").entries
    assert {"report.html", "report.md", "fits.json"} <= set(first)
    assert main(["lab", "--out", str(out), "--profiles", str(SAMPLE)]) == 0
    assert Manifest.read(out / "report").entries == first
    (out / "report" / "notes.md").write_text("mine\n")
    assert main(["lab", "--out", str(out), "--profiles", str(SAMPLE)]) == 2
    assert "notes.md" in capsys.readouterr().err and (out / "report" / "notes.md").read_text() == "mine\n"
