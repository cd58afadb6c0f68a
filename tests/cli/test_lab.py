"""`attnlab lab`, the main job: it measures this machine (without a GPU, a CPU sweep of the
implementations that run natively), reports that run beside the profiles it is given, and
runs again into the same folder, resuming the sweep."""
import json

import pytest
import torch

from attnlab.analysis.outputs import Manifest
from attnlab.cli import main
from paths import SAMPLE

QUICK = ["--seq-lens", "128,256,512,1024"]

pytestmark = [pytest.mark.slow,  # the main job: a two-minute CPU sweep, shortened
              pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the main job sweeps it"),
              pytest.mark.filterwarnings("ignore")]


def test_the_main_job_measures_this_machine_and_reports_it_beside_the_profiles(tmp_path, capsys):
    pytest.importorskip("seaborn")
    out = tmp_path / "out"
    assert main(["lab", "--out", str(out), "--profiles", str(SAMPLE), *QUICK]) == 0
    records = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    ok = [r for r in records if r.get("schema") == "attnlab.result/1" and r["status"] == "ok"
          and r["mode"] != "calibration"]
    assert len({r["kernel"] for r in ok}) >= 2 and len({r["seq_len"] for r in ok}) >= 4
    assert not {r["kernel"] for r in ok} & {"triton", "triton-decode"}     # no interpreter timings
    summary = (out / "report" / "report.md").read_text().split("\n## ", 2)[1]
    assert "(this machine)" in summary and "cpu-small" in summary and "NVIDIA H100" in summary
    first = Manifest.read(out / "report").entries
    assert {"report.html", "report.md", "fits.json"} <= set(first)

    assert main(["lab", "--out", str(out), "--profiles", str(SAMPLE), *QUICK]) == 0   # resumes: nothing new
    assert "nothing new" in capsys.readouterr().out
    assert Manifest.read(out / "report").entries == first
    (out / "report" / "notes.md").write_text("mine\n")
    assert main(["lab", "--out", str(out), "--profiles", str(SAMPLE), *QUICK]) == 2
    assert "notes.md" in capsys.readouterr().err and (out / "report" / "notes.md").read_text() == "mine\n"
