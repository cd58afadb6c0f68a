"""`attnlab report`: one self-contained report.html and a report.md from run folders."""
from __future__ import annotations

import sys

from attnlab.cli._args import output_folder
from attnlab.cli.analyze import OWNERSHIP, add_common, write_into_out

HELP = "write report.html (self-contained) and report.md from run folders or result files"


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
        return build_report(args.runs, args.out, baseline=args.baseline, model=args.model, gpu=args.gpu,
                            formats=args.formats, n_boot=args.bootstrap, all_runs=args.all_runs,
                            this_machine=args.this_machine)

    report = write_into_out(args, "report", args.runs, build)
    if report is None:
        return 2
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {report.html_path} and {report.md_path} ({len(report.charts)} charts, "
          f"{len(report.files)} files in all)")
    return 0
