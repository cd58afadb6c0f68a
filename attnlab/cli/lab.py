"""`attnlab lab`: the main job. On a GPU, sweep it (llama3-8b, 1k to 128k) and report the run
beside the committed profiles; without one, report the committed profiles alone."""
from __future__ import annotations

import sys
from pathlib import Path

from attnlab.cli._args import finite_seconds, output_folder

HELP = "the main job: sweep this GPU if there is one, then write the report (profiles/ without a GPU)"


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="out", type=output_folder, metavar="DIR",
                        help="folder for the run (sweep.jsonl, resumed if there) and the report (report/, as "
                             "`attnlab report --out` writes it) (default %(default)s)")
    parser.add_argument("--profiles", default="profiles", metavar="DIR",
                        help="committed measurements (default %(default)s)")
    parser.add_argument("--budget-s", type=finite_seconds, default=600.0,
                        help="sweep time budget on a GPU (default %(default)s)")
    parser.add_argument("--force", action="store_true", help="passed to `attnlab report`: write into DIR/report "
                                                             "even where it holds files attnlab did not write")


def run(args) -> int:
    import torch

    out = Path(args.out)
    profiles = Path(args.profiles)
    runs = [profiles] if profiles.exists() else []
    if torch.cuda.is_available():
        from attnlab.bench.sweep import SweepConfig, run_sweep
        from attnlab.bench.workloads import preset
        from attnlab.cli._progress import make_progress

        sweep_out = out / "sweep.jsonl"
        out.mkdir(parents=True, exist_ok=True)
        config = SweepConfig(workload=preset("llama3-8b"), device="cuda", out=sweep_out, budget_s=args.budget_s,
                             resume=sweep_out.exists(), argv=sys.argv)
        result = run_sweep(config, progress=make_progress())
        print(f"sweep: {result.out} ({', '.join(f'{n} {s}' for s, n in sorted(result.counts.items()))})")
        runs.append(sweep_out)
    if not runs:
        print(f"attnlab lab: nothing to report: no GPU here and no {args.profiles}/", file=sys.stderr)
        return 2
    from attnlab.cli import build_parser

    force = ["--force"] if args.force else []
    report = build_parser().parse_args(["report", *map(str, runs), "--out", str(out / "report"), *force])
    return report.run(report)
