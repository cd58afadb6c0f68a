"""No command writes over its inputs, and analyze, report and claim replace only what attnlab
wrote before (the manifest, analysis/outputs.py); --force overrides the second rule only."""
import json
import shutil

import pytest

from attnlab.analysis.outputs import MANIFEST, Manifest, owned_folder, record_files
from attnlab.cli import main
from paths import PROFILES, SAMPLE

FAST = ["--bootstrap", "50", "--no-charts"]


@pytest.fixture
def results(tmp_path):
    path = tmp_path / "results.jsonl"
    shutil.copy(SAMPLE / "results.jsonl", path)
    return path


def analyze(*argv):
    return main(["analyze", *map(str, argv), *FAST])


def test_claim_json_onto_its_input_is_refused_and_the_input_kept(results, capsys):
    before = results.read_bytes()
    assert main(["claim", str(results), "--json", str(results)]) == 2
    assert main(["claim", str(results), "--json", str(results), "--force"]) == 2
    err = capsys.readouterr().err
    assert "--json" in err and "an input of this run" in err and "Traceback" not in err
    assert results.read_bytes() == before


def test_claim_outputs_through_a_link_to_an_input_are_refused(results, tmp_path, capsys):
    (tmp_path / "link.json").symlink_to(results)
    (tmp_path / "chart.csv").symlink_to(results)
    before = results.read_bytes()
    assert main(["claim", str(results), "--json", str(tmp_path / "link.json"), "--force"]) == 2
    assert main(["claim", str(results), "--chart", str(tmp_path / "chart.png"), "--force"]) == 2
    assert "--chart" in capsys.readouterr().err
    assert results.read_bytes() == before and not (tmp_path / "chart.png").exists()


def test_claim_json_replaces_a_claim_document_but_not_another_file_unless_forced(tmp_path, capsys):
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}\n')
    assert main(["claim", "--json", str(notes)]) == 2
    assert "--json" in capsys.readouterr().err and notes.read_text() == '{"mine": true}\n'
    assert main(["claim", "--json", str(notes), "--force"]) == 0
    assert {"claim", "points"} <= set(json.loads(notes.read_text()))
    foreign_claim = tmp_path / "elsewhere" / "claim.json"   # a claim document attnlab may replace
    foreign_claim.parent.mkdir()
    foreign_claim.write_text(notes.read_text())
    assert main(["claim", "--json", str(foreign_claim), "--seq-lens", "1k,2k"]) == 0
    assert [p["seq_len"] for p in json.loads(foreign_claim.read_text())["points"]] == [1024, 2048]


def test_claim_chart_replaces_its_own_files_only(tmp_path, capsys):
    pytest.importorskip("seaborn")
    chart = tmp_path / "charts" / "claim.png"   # its folder is made
    assert main(["claim", "--chart", str(chart)]) == 0
    assert main(["claim", "--chart", str(chart)]) == 0   # a rerun replaces what the first wrote
    assert set(Manifest.read(chart.parent).entries) == {"claim.png", "claim.svg", "claim.csv"}
    mine = tmp_path / "mine.svg"
    mine.write_text("<svg/>")
    assert main(["claim", "--chart", str(tmp_path / "mine.png")]) == 2
    assert "--chart" in capsys.readouterr().err and mine.read_text() == "<svg/>"
    assert not (tmp_path / "mine.png").exists()


@pytest.mark.parametrize("command", ["analyze", "report"])
def test_out_with_a_foreign_file_is_refused_and_the_file_kept(command, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "fits.json").write_text("my own fits\n")
    assert main([command, str(SAMPLE), "--out", str(out), "--bootstrap", "50"]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "fits.json" in err and "--force" in err and "Traceback" not in err
    assert (out / "fits.json").read_text() == "my own fits\n" and sorted(p.name for p in out.iterdir()) == [
        "fits.json"]


def test_force_writes_beside_foreign_files_and_keeps_them(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.md").write_text("notes\n")
    assert analyze(SAMPLE, "--out", out, "--force") == 0
    assert (out / "notes.md").read_text() == "notes\n" and (out / "fits.json").is_file()
    assert "notes.md" not in Manifest.read(out).entries   # still not attnlab's: the next run asks again
    assert analyze(SAMPLE, "--out", out) == 2


def test_out_holding_the_inputs_is_refused_even_with_force(results, tmp_path, capsys):
    before = results.read_bytes()
    assert analyze(tmp_path, "--out", tmp_path, "--force") == 2           # the folder the inputs are in
    assert analyze(results, "--out", tmp_path, "--force") == 2            # a folder holding a named input
    assert main(["report", str(results), "--out", str(tmp_path), "--force"]) == 2
    err = capsys.readouterr().err
    assert err.count("an input of this run") == 3 and "--out" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"] and results.read_bytes() == before


def test_a_listed_file_replaced_by_a_link_to_an_input_is_refused(results, tmp_path):
    out = tmp_path / "out"
    assert analyze(results, "--out", out) == 0
    (out / "fits.json").unlink()
    (out / "fits.json").symlink_to(results)
    before = results.read_bytes()
    assert analyze(results, "--out", out) == 2 and analyze(results, "--out", out, "--force") == 2
    assert results.read_bytes() == before


def test_a_listed_file_replaced_by_a_link_elsewhere_is_not_written_through(results, tmp_path, capsys):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere.txt"
    assert analyze(results, "--out", out) == 0
    elsewhere.write_text("not attnlab's\n")
    (out / "fits.csv").unlink()
    (out / "fits.csv").symlink_to(elsewhere)   # attnlab writes no links: this one is not its own
    assert analyze(results, "--out", out) == 2
    assert "fits.csv" in capsys.readouterr().err and elsewhere.read_text() == "not attnlab's\n"


def test_a_second_run_replaces_the_first_and_removes_what_it_no_longer_writes(tmp_path):
    pytest.importorskip("seaborn")
    out = tmp_path / "out"
    assert main(["analyze", str(SAMPLE), "--out", str(out), "--bootstrap", "50", "--formats", "png"]) == 0
    charts = sorted((out / "charts").glob("*.png"))
    assert charts and all(f"charts/{p.name}" in Manifest.read(out).entries for p in charts)
    assert analyze(SAMPLE, "--out", out) == 0   # no charts this time: the first run's are stale
    assert not (out / "charts").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, "claim.json", "fits.csv", "fits.json",
                                                            "roofline.csv"])
    assert set(Manifest.read(out).entries) == {"claim.json", "fits.csv", "fits.json", "roofline.csv"}


def test_stale_files_of_other_commands_and_foreign_files_stay(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "claim.png").write_text("a claim chart")
    record_files([out / "claim.png"], "claim")
    (out / "notes.md").write_text("notes")
    with owned_folder(out, flag="--out", inputs=[], command="analyze", force=True) as written:
        (out / "old.csv").write_text("x")
        written.append(out / "old.csv")
    with owned_folder(out, flag="--out", inputs=[], command="report", force=True) as written:
        (out / "new.csv").write_text("y")
        written.append(out / "new.csv")
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, "claim.png", "new.csv", "notes.md"])
    assert Manifest.read(out).entries == {"claim.png": "claim", "new.csv": "report"}


def test_a_failed_run_lists_what_it_created_so_a_rerun_may_replace_it(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with owned_folder(out, flag="--out", inputs=[], command="analyze"):
            (out / "fits.json").write_text("half written")
            raise RuntimeError("charts failed")
    assert Manifest.read(out).entries == {"fits.json": "analyze"}
    with owned_folder(out, flag="--out", inputs=[], command="analyze") as written:
        written.append(out / "claim.json")
        (out / "claim.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "claim.json"]


def test_a_foreign_manifest_is_not_trusted(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST).write_text("analyze\t../results.jsonl\n")
    assert analyze(SAMPLE, "--out", out) == 2
    assert MANIFEST in capsys.readouterr().err


def test_the_committed_report_lists_its_own_files():
    """So that `attnlab report profiles --out profiles/report --formats png` regenerates it."""
    report = PROFILES / "report"
    files = {p.relative_to(report).as_posix() for p in report.rglob("*") if p.is_file() and p.name != MANIFEST}
    manifest = Manifest.read(report)
    assert not manifest.foreign and set(manifest.entries) == files
    assert set(manifest.entries.values()) == {"report"}


# --- every output flag, against a file attnlab did not write -----------------------------------

NOTES = "my notes\n"


def foreign_files(tmp_path, results):
    """A user's notes and a sweep's records (attnlab's, but no output of these commands)."""
    return {"notes": NOTES.encode(), "sweep": results.read_bytes()}


# (argv with {out} where the output goes, the file put there first, the flag the refusal names)
FLAG_CASES = {
    "compare --json": (["compare", "{base}", "{base}", "--json", "{out}/x.json"], "x.json", "--json"),
    "compare --md": (["compare", "{base}", "{base}", "--md", "{out}/x.md"], "x.md", "--md"),
    "compare --html": (["compare", "{base}", "{base}", "--html", "{out}/x.html"], "x.html", "--html"),
    "compare --html's chart data": (["compare", "{base}", "{base}", "--html", "{out}/x.html"], "x_ratio.csv",
                                    "--html"),
    "claim --json": (["claim", "--json", "{out}/x.json"], "x.json", "--json"),
    "claim --chart": (["claim", "--chart", "{out}/x.png"], "x.svg", "--chart"),
    "analyze --out": (["analyze", "{base}", "--out", "{out}", *FAST], "notes.txt", "--out"),
    "report --out": (["report", "{base}", "--out", "{out}", "--bootstrap", "50"], "notes.txt", "--out"),
}


@pytest.mark.parametrize("kind", ["notes", "sweep"])
@pytest.mark.parametrize("case", sorted(FLAG_CASES))
def test_no_output_flag_writes_over_a_file_attnlab_did_not_write(case, kind, results, tmp_path, capsys):
    argv, name, flag = FLAG_CASES[case]
    out = tmp_path / "out"
    out.mkdir()
    foreign = out / name
    content = foreign_files(tmp_path, results)[kind]
    foreign.write_bytes(content)
    argv = [a.format(base=results, out=out) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"attnlab {argv[0]}: error: {flag}: ") and name in err, err
    assert foreign.read_bytes() == content and sorted(p.name for p in out.iterdir()) == [name]


@pytest.mark.parametrize("argv, flag", [
    (["compare", "{base}", "{base}", "--json", "{out}/link.json", "--force"], "--json"),
    (["claim", "--chart", "{out}/link.png", "--force"], "--chart"),
    (["analyze", "{base}", "--out", "{out}", "--force", *FAST], "--out"),
])
def test_no_output_is_written_through_a_link_even_with_force(argv, flag, results, tmp_path, capsys):
    out, notes = tmp_path / "out", tmp_path / "notes.txt"
    out.mkdir()
    notes.write_text(NOTES)
    for name in ("link.json", "link.png", "fits.json"):
        (out / name).symlink_to(notes)
    assert main([a.format(base=results, out=out) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {flag}: " in err and "a link" in err
    assert notes.read_text() == NOTES


@pytest.mark.parametrize("argv, flag", [
    (["compare", "{base}", "{base}", "--json", "{out}/same", "--md", "{out}/same"], "--md"),
    (["compare", "{base}", "{base}", "--md", "{out}/page_ratio.csv", "--html", "{out}/page.html"], "--html"),
    (["claim", "--chart", "{out}/claim.png", "--json", "{out}/claim.csv"], "--json"),
])
def test_two_outputs_of_one_run_may_not_share_a_file(argv, flag, results, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([a.format(base=results, out=out) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {flag}: " in err and "give each output its own file" in err
    assert not out.exists() or not any(out.iterdir())


def test_a_report_flag_given_standard_output_is_refused_rather_than_written_to_a_file_named_dash(
        results, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["compare", str(results), str(results), "--md", "-"]) == 2
    assert "error: --md: expected a file path, got '-'" in capsys.readouterr().err
    assert not (tmp_path / "-").exists()


def test_a_manifest_being_replaced_is_never_written_through_a_link(tmp_path):
    out, notes = tmp_path / "out", tmp_path / "notes.txt"
    out.mkdir()
    notes.write_text(NOTES)
    (out / f"{MANIFEST}.tmp").symlink_to(notes)     # what a killed run or a user may leave
    (out / "x.json").write_text("{}")
    record_files([out / "x.json"], "claim")
    assert notes.read_text() == NOTES and Manifest.read(out).entries == {"x.json": "claim"}
