"""`attnlab report`: one self-contained report.html and a report.md from run folders."""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from attnlab.cli._args import output_folder
from attnlab.cli.analyze import OWNERSHIP, add_common, write_into_out

HELP = "write report.html (self-contained) and report.md from run folders or result files"
WARNINGS_FILE = "warnings.txt"     # beside the report: what it left out or could not draw, one line each
# Notes on what the data hold, summed up in one line; any other warning (a file read in part, ...)
# is printed whole.
NOTES = ("left out ", "not fitted: ", "chart not drawn: ")


def add_arguments(parser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run folders or result files (on a machine without a GPU: profiles/)")
    parser.add_argument("--out", default="out/report", type=output_folder, metavar="DIR",
                        help=f"folder for report.html, report.md, charts/ and the data files (default %(default)s); "
                             f"{OWNERSHIP}")
    add_common(parser)
    parser.add_argument("--this-machine", action="append", default=[], metavar="FILE",
                        help="label the runs in FILE (one of RUN_DIR's) as this machine's; repeatable")


def run(args) -> int:
    def build():
        from attnlab.analysis.report import build_report
        report = build_report(args.runs, args.out, baseline=args.baseline, model=args.model, gpu=args.gpu,
                              formats=args.formats, n_boot=args.bootstrap, all_runs=args.all_runs,
                              this_machine=args.this_machine)
        if report.warnings:
            path = Path(args.out) / WARNINGS_FILE
            path.write_text("".join(f"{warning}\n" for warning in report.warnings), encoding="utf-8")
            report.files.append(path)
        return report

    report = write_into_out(args, "report", args.runs, build)
    if report is None:
        return 2
    for warning in report.warnings:
        if not warning.startswith(NOTES):
            print(f"warning: {warning}", file=sys.stderr)
    notes = [warning for warning in report.warnings if warning.startswith(NOTES)]
    if notes:
        print(warnings_line(notes, Path(args.out) / WARNINGS_FILE), file=sys.stderr)
    print(f"wrote {report.html_path} and {report.md_path} ({len(report.charts)} charts, "
          f"{len(report.files)} files in all)")
    return 0


def warnings_line(notes: list, path: Path) -> str:
    """One line for what the report left out or could not draw (NOTES): each kind once, with how
    many ('not fitted (5)'), and where each is said in full."""
    kinds = Counter(_gist(note) for note in notes)
    said = "; ".join(kind if count == 1 else f"{kind} ({count})" for kind, count in kinds.items())
    return f"warning: {said}: each with its reason in {path} and in the report's 'What was skipped'"


def _gist(note: str) -> str:
    """'left out 85 record(s) (60 retracted, 25 superseded)', 'not fitted', 'chart not drawn': a
    note up to its details."""
    return note.split(";")[0] if note.startswith("left out") else note.split(":")[0]
