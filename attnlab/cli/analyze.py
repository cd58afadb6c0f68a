"""`attnlab analyze`: fits, roofline shares, the claim model and charts from result files."""
from __future__ import annotations

import sys

from attnlab import text
from attnlab.cli._args import bootstrap_draws, chart_formats, error_line, output_folder
from attnlab.models import DEFAULT_MODEL

HELP = "fit latency against context, compare with the GPU's peaks and draw the charts"
OWNERSHIP = ("DIR must be new, empty, or hold only files attnlab wrote there (listed in its .attnlab-outputs); "
             "a run replaces those and removes the ones it no longer writes, and never writes where its inputs are")


def add_arguments(parser) -> None:
    parser.add_argument("results", nargs="+", metavar="RESULTS",
                        help="sweep JSONL, pytest-benchmark JSON, or folders holding them")
    parser.add_argument("--out", default="out/analysis", type=output_folder, metavar="DIR",
                        help="folder for fits.json, fits.csv, roofline.csv, claim.json and charts/ "
                             f"(default %(default)s); {OWNERSHIP}")
    add_common(parser)
    parser.add_argument("--no-charts", action="store_true", help="write the data files only")


def add_common(parser) -> None:
    """Options `attnlab report` shares."""
    from attnlab.analysis.claim import MODEL_PRESETS

    parser.add_argument("--baseline", default=None,
                        help="kernel the speedup charts divide by (default: sdpa-flash, flash-attn, sdpa-math "
                             "or naive, the first present)")
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(MODEL_PRESETS),
                        help="model preset of the claim (default %(default)s)")
    parser.add_argument("--gpu", default=None,
                        help="GPU of the claim model (default: the one the records name, else h100-sxm)")
    parser.add_argument("--formats", default="png,svg", type=chart_formats,
                        help="chart formats, comma separated: png, svg, pdf (default %(default)s)")
    parser.add_argument("--bootstrap", type=bootstrap_draws, default=2000, metavar="N",
                        help="bootstrap samples behind the intervals, 50 to 100,000 (default %(default)s)")
    parser.add_argument("--all-runs", action="store_true",
                        help="charts overlay every valid run of a point, each as its own series, instead of the "
                             "one record that stands for it (the latest valid run)")
    parser.add_argument("--force", action="store_true",
                        help="write into --out even where it holds files attnlab did not write (those it does not "
                             "write stay; it still never writes where its inputs are)")


def run(args) -> int:
    def build():
        from attnlab.analysis.analyze import analyze
        return analyze(args.results, args.out, baseline=args.baseline, model=args.model, gpu=args.gpu,
                       formats=args.formats, charts=not args.no_charts, n_boot=args.bootstrap, all_runs=args.all_runs)

    analysis = write_into_out(args, "analyze", args.results, build)
    if analysis is None:
        return 2
    print_summary(analysis, args.out)
    return 0


def write_into_out(args, command: str, inputs, build):
    """What `build()` returns (an object whose `files` lists what it wrote into `args.out`), run
    under the rules of analysis.outputs; None, after one line on stderr, for an error the user
    can put right (a flag, a missing input or extra, a folder that is not the run's to write)."""
    from attnlab.analysis import MissingExtra
    from attnlab.analysis.outputs import owned_folder

    try:
        with owned_folder(args.out, flag="--out", inputs=inputs, command=command, force=args.force) as written:
            result = build()
            written += result.files
        return result
    except (MissingExtra, OSError, ValueError) as exc:
        print(error_line(command, exc, args), file=sys.stderr)
        return None


def print_summary(analysis, out) -> None:
    """Warnings to stderr; records, fits and roofline shares as tables on stdout."""
    from attnlab.analysis.roofline import roofline_summary

    for warning in analysis.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    results = analysis.results
    standing = results["excluded"] == ""
    print(f"{len(results)} records from {len(analysis.loaded.files)} file(s): {int(standing.sum())} stand for their "
          f"points, {int((standing & (results['status'] == 'ok')).sum())} of them ok\n")
    if analysis.fits:
        print(text.table(*_fit_rows(analysis.fits)) + "\n")
    if not analysis.roof.empty:
        print(text.table(*_roofline_rows(roofline_summary(analysis.roof))) + "\n")
    claim, claimed = analysis.claim, analysis.claim["claim"]
    print(f"claim model ({claim['model']} on {claim['gpu']}): {text.k(claimed['short_ctx'])}/"
          f"{text.k(claimed['long_ctx'])} = {text.ratio(claim['ratio_max_batch'])} at the largest batch, "
          f"{text.ratio(claim['ratio_batch1'])} at batch 1, {text.ratio(claim['ratio_with_prefill'])} with prefill; "
          f"the claim: {text.ratio(claimed['short_tok_s'] / claimed['long_tok_s'])}\n")
    print(f"wrote {len(analysis.files)} file(s) under {out}")


def _fit_rows(fits):
    from attnlab.analysis.fits import extrapolated_text, fit_labels

    headers = ["kernel", "mode", "workload", "device", "model", "exponent [95% CI]", "R^2", "c n^2 > b n beyond",
               "1M (ms)"]
    rows = []
    for f, label in zip(fits, fit_labels(fits)[0]):
        lo, hi = f.exponent_ci
        crossover = "never" if f.crossover_seq_len is None else f"{f.crossover_seq_len:,} tokens"
        rows.append([label, f.mode, f.workload, f.device, f.model, f"{f.exponent:.2f} [{lo:.2f}, {hi:.2f}]",
                     f"{f.r2:.4f}", crossover, extrapolated_text(f.extrapolation[-1], interval=False)])
    return headers, rows


def _roofline_rows(summary):
    headers = ["kernel", "mode", "device", "% of peak at longest", "best %", "peak source"]
    rows = [[r["label"], r["mode"], r["device"], f"{text.pct(r['pct_at_longest'])} at {text.k(r['longest_seq_len'])}",
             text.pct(r["best_pct"]), r["peak_source"]] for _, r in summary.iterrows()]
    return headers, rows
