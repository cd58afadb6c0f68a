"""`attnlab compare BASE NEW`: is the new kernel faster, or is it noise? Exit status 0 when no
point regressed, 1 when one did, 2 for input that cannot be compared."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from attnlab import text
from attnlab.cli._args import checked, error_line, output_file

HELP = "compare two runs point by point: the environment difference, then each point's ratio, interval and test"
# The library names the sides as its arguments, base and new; the command line calls them BASE and NEW.
POSITIONALS = {"base": "BASE", "new": "NEW"}


def add_arguments(parser) -> None:
    from attnlab.analysis import compare

    parser.epilog = (f"Verdicts: {compare.RULE}. ratio = NEW / BASE, each the median of its round medians (above "
                     f"1: slower); the interval is a 1 - alpha {compare.INTERVAL} ({compare.BOOTSTRAP_DRAWS} draws, "
                     f"seeded); '~' marks an interval that holds 1; p is a {compare.TEST}. The interval need only "
                     f"exclude 1, not the threshold: requiring that would pass a likely 8% regression with an "
                     f"interval of [1.03, 1.13] as unchanged. Compared: ok prefill, decode and e2e "
                     f"records with raw times (calibration is the GPU's reference, not the code under test). Exit "
                     f"status: 0 when nothing regressed, 1 when a point regressed, 2 for bad input.")
    parser.add_argument("base", metavar="BASE", help="the reference: a run file (JSONL or pytest-benchmark JSON) "
                                                     "or a folder of them")
    parser.add_argument("new", metavar="NEW", help="the run to judge against BASE, as BASE")
    parser.add_argument("--threshold", type=checked(compare.parse_threshold), default=compare.DEFAULT_THRESHOLD,
                        metavar="T", help="the smallest change that matters: a percentage such as 5%% or 0.5%%, of "
                                          "any size (500%% counts only changes beyond 6x), or a fraction below 1 "
                                          "such as 0.05 (a bare 5 is refused: it could mean 5%% or 500%%); "
                                          "symmetric: slower than 1 + T or faster than 1 / (1 + T) (default 5%%)")
    parser.add_argument("--alpha", type=checked(compare.parse_alpha), default=compare.DEFAULT_ALPHA,
                        help="the interval's level is 1 - alpha (default %(default)s)")
    parser.add_argument("--noise", default=None, metavar="AA.json",
                        help="the --json document of `attnlab compare A1 A2` on two runs of the same code: how far "
                             "each point's ratio reached there is its noise floor here (what one round cannot see)")
    parser.add_argument("--run-id-base", default=None, metavar="ID",
                        help="compare this run of BASE (default: the record standing for each point, the latest "
                             "valid run)")
    parser.add_argument("--run-id-new", default=None, metavar="ID", help="compare this run of NEW (default: as BASE)")
    parser.add_argument("--json", default=None, type=output_file, metavar="PATH",
                        help=f"write the {compare.COMPARE_SCHEMA} document to PATH ('-': to stdout, instead of the "
                             f"tables)")
    parser.add_argument("--md", default=None, type=output_file, metavar="PATH", help="write a Markdown report")
    parser.add_argument("--html", default=None, type=output_file, metavar="PATH",
                        help="write a self-contained HTML report with the ratio chart (inline SVG); the CSV of what "
                             "the chart draws is written beside it (NAME_ratio.csv)")
    parser.add_argument("--force", action="store_true",
                        help="replace existing files at --json, --md and --html whoever wrote them (never an input)")


def run(args) -> int:
    from attnlab.analysis import MissingExtra
    from attnlab.analysis.compare import compare

    try:
        _check_outputs(args)
        comparison = compare(args.base, args.new, threshold=args.threshold, alpha=args.alpha,
                             run_id_base=args.run_id_base, run_id_new=args.run_id_new, noise=args.noise)
        _write(args, comparison)
    except (MissingExtra, OSError, ValueError) as exc:
        print(_error_line(exc, args), file=sys.stderr)
        return 2
    for warning in comparison.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(json.dumps(comparison.document(), indent=2) if args.json == "-" else render(comparison))
    return 1 if comparison.regressed else 0


def _error_line(exc: BaseException, args) -> str:
    name, colon, rest = str(exc).partition(": ")
    if colon and name in POSITIONALS:
        return f"attnlab compare: error: {POSITIONALS[name]}: {' '.join(rest.split())}"
    return error_line("compare", exc, args)


def _report_paths(args) -> list:
    """(flag, path) of each file asked for, the chart's CSV beside the HTML page included."""
    from attnlab.analysis.compare import chart_csv_path

    paths = [("--json", args.json if args.json != "-" else None), ("--md", args.md), ("--html", args.html)]
    if args.html:
        paths.append(("--html", str(chart_csv_path(args.html))))
    return [(flag, path) for flag, path in paths if path]


def _check_outputs(args) -> None:
    """Before any work: refuse outputs over the inputs, or over files attnlab did not write."""
    from attnlab.analysis.outputs import check_output_file, refuse_shared

    outputs = _report_paths(args)
    refuse_shared(outputs)
    for flag, path in outputs:
        check_output_file(path, flag=flag, inputs=[args.base, args.new, *([args.noise] if args.noise else [])],
                          force=args.force)


def _write(args, comparison) -> None:
    from attnlab.analysis.compare import write_reports
    from attnlab.analysis.outputs import record_files

    written = write_reports(comparison, json_path=args.json if args.json != "-" else None, md_path=args.md,
                            html_path=args.html)
    record_files([Path(p) for p in written], "compare")


def render(comparison) -> str:
    """The terminal view: the sides, the environment difference, then the points and the counts."""
    from attnlab.analysis import compare as cmp

    parts = [cmp.side_text(comparison.base), cmp.side_text(comparison.new), "", cmp.environment_summary(comparison)]
    if comparison.environment_diff:
        parts.append(text.table(*cmp.environment_rows(comparison)))
    parts += ["", text.table(*cmp.point_rows(comparison)), "",
              f"{cmp.counts_text(comparison)} (threshold {text.percent(comparison.threshold)}, "
              f"alpha {comparison.alpha:g}; '~': the interval holds 1; noise: how far the point reaches by itself)"]
    return "\n".join(parts)
