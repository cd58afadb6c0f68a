"""`attnlab lab`: the main job. Measure this machine, then report that run beside the committed
profiles: on a GPU, the llama3-8b sweep from 1k to 128k; without one, the CPU workload with the
implementations that run natively (Triton's interpreter says nothing of speed), at the lengths of the
cpu-small preset."""
from __future__ import annotations

import sys
from pathlib import Path

from attnlab.cli._args import error_line, finite_seconds, output_folder, parse_seq_lens, rounds, rounds_help

HELP = "the main job: measure this machine (a GPU sweep, or a CPU one), then report it beside profiles/"
READS_KERNELS = True
WORKLOAD = {"cuda": "llama3-8b", "cpu": "cpu-small"}
HEARTBEAT_S = 30.0      # off a terminal, the longest the job stays silent


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="out", type=output_folder, metavar="DIR",
                        help="folder for the run (sweep.jsonl, resumed if there) and the report (report/, as "
                             "`attnlab report --out` writes it) (default %(default)s)")
    parser.add_argument("--profiles", default="profiles", metavar="DIR",
                        help="committed measurements to report beside this machine's (default %(default)s)")
    parser.add_argument("--seq-lens", type=parse_seq_lens, default=None, metavar="LIST",
                        help="context lengths (default: the workload preset's, llama3-8b on a GPU, cpu-small on a CPU)")
    parser.add_argument("--modes", type=_modes, default=None, metavar="LIST",
                        help="comma list of prefill, decode, backward and fwd_bwd (default: prefill,decode)")
    parser.add_argument("--budget-s", type=finite_seconds, default=600.0,
                        help="sweep time budget; points past it are recorded skipped (default %(default)s)")
    parser.add_argument("--rounds", type=rounds, default=None, help=rounds_help())
    parser.add_argument("--force", action="store_true", help="passed to `attnlab report`: write into DIR/report "
                                                             "even where it holds files attnlab did not write")


def _modes(text: str) -> list:
    import argparse

    from attnlab.cli._args import parse_names
    from attnlab.schema import KERNEL_MODES

    modes = parse_names(text)
    unknown = [mode for mode in modes if mode not in KERNEL_MODES]
    if unknown:
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(KERNEL_MODES)}, got {unknown[0]!r}")
    return modes


def run(args) -> int:
    sweep_out = Path(args.out) / "sweep.jsonl"
    status = measure(args, sweep_out)
    if status:
        return status
    profiles = Path(args.profiles)
    runs = ([profiles] if profiles.exists() else []) + [sweep_out]
    from attnlab.cli import build_parser

    report_args = ["report", *map(str, runs), "--out", str(Path(args.out) / "report"),
                   "--this-machine", str(sweep_out), *(["--force"] if args.force else [])]
    report = build_parser().parse_args(report_args)
    from attnlab.cli._progress import Heartbeat

    say(f"writing the report of this run beside {', '.join(map(str, runs[:-1])) or 'no profiles'} "
        f"into {report.out}")
    with Heartbeat(sys.stderr, HEARTBEAT_S, "writing the report", prefix=lambda: "attnlab lab: "):
        return report.run(report)


def say(line: str) -> None:
    """What the job is doing, on stderr beside the progress lines."""
    print(f"attnlab lab: {line}", file=sys.stderr, flush=True)


def measure(args, sweep_out: Path) -> int:
    """Sweep this machine into sweep_out (resuming it); 0, or the exit status to end with."""
    import torch

    from attnlab.bench.output_file import WriteFailed
    from attnlab.bench.sweep import SweepConfig, run_sweep
    from attnlab.bench.workloads import DEFAULT_MODES, preset
    from attnlab.cli._progress import make_progress

    device = "cuda" if torch.cuda.is_available() else "cpu"
    seq_lens = args.seq_lens      # None: the preset's
    config = SweepConfig(workload=preset(WORKLOAD[device]), device=device, out=sweep_out, seq_lens=seq_lens,
                         modes=tuple(args.modes or DEFAULT_MODES),
                         budget_s=args.budget_s, resume=sweep_out.exists(), argv=sys.argv,
                         **({"rounds": args.rounds} if args.rounds else {}))
    say(f"measuring this machine ({device}, {config.workload.name}) into {sweep_out}"
        f"{', resuming it' if config.resume else ''}")
    try:
        result = run_sweep(config, progress=make_progress(enabled=True, heartbeat_s=HEARTBEAT_S))
    except WriteFailed as exc:
        print(error_line("lab", exc, args) + "; free space and run the same command again", file=sys.stderr)
        return 2
    except ValueError as exc:      # a foreign or busy out/sweep.jsonl
        print(error_line("lab", exc, args), file=sys.stderr)
        return 2
    print(f"sweep of this machine ({device}, {WORKLOAD[device]}): {result.out} "
          f"({', '.join(f'{n} {s}' for s, n in sorted(result.counts.items())) or 'nothing new'})")
    if result.interrupted:
        print("interrupted: run the same command again to finish", file=sys.stderr)
        return 130
    return 0
