"""`attnlab ring`: ring attention across torchrun's ranks, one record per context length."""
from __future__ import annotations

import argparse
import sys

from attnlab.cli._args import device_or_default, error_line, parse_seq_lens, parse_workload, WORKLOAD_HELP, positive_int, seconds
from attnlab.text import k, table

HELP = "time ring attention across ranks under torchrun, and how much of its communication it hides"


def add_arguments(parser) -> None:
    parser.add_argument("--seq-lens", type=parse_seq_lens, default=None,
                        help="comma list of total context lengths in tokens, 1k = 1024, each cut across the ranks "
                             "(default: the workload's)")
    parser.add_argument("--out", default="attnlab-ring.jsonl",
                        help="JSONL file for the records, new or an attnlab one; rank 0 alone writes it")
    parser.add_argument("--layout", choices=("zigzag", "contiguous"), default="zigzag",
                        help="how the sequence is cut: zigzag (two chunks per rank, causal work even; the default) "
                             "or contiguous")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=None,
                        help="causal over the whole sequence (default: the workload's)")
    parser.add_argument("--workload", type=parse_workload, default=None,
                        help=f"{WORKLOAD_HELP}; one without a window or softcap")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="cpu (gloo) or cuda (NCCL, each rank on cuda:LOCAL_RANK); default cuda if present")
    parser.add_argument("--reps", type=positive_int, default=5, help="timed repetitions per length (default 5)")
    parser.add_argument("--timeout", type=_timeout, default=600.0, metavar="SECONDS",
                        help="the process group's timeout: how long a rank waits for a dead or stuck peer before "
                             "every rank stops with an error naming it (default 600; gloo's own is 30 minutes)")


def _timeout(text):
    value = seconds(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def build_config(args):
    from attnlab.bench.ring import RingConfig, check_config
    from attnlab.bench.workloads import default_preset, preset

    device = device_or_default(args.device)
    workload = preset(args.workload or default_preset(device)).override(causal=args.causal)
    config = RingConfig(workload=workload, out=args.out, seq_lens=args.seq_lens, device=device,
                        layout=args.layout, reps=args.reps, argv=sys.argv, timeout_s=args.timeout)
    check_config(config)
    return config


def run(args) -> int:
    from attnlab.bench.output_file import WriteFailed
    from attnlab.bench.ring import RingBroken, require_launch, run_ring

    try:
        launch = require_launch()
    except ValueError as exc:     # not a launched rank: this process alone says it
        print(error_line("ring", exc, args), file=sys.stderr)
        return 2
    try:
        config = build_config(args)
    except ValueError as exc:     # the same on every rank: rank 0 says it
        if launch.rank == 0:
            print(error_line("ring", exc, args), file=sys.stderr)
        return 2
    try:
        result = run_ring(config, launch)
    except RingBroken as exc:     # names this rank and the timeout itself
        print(error_line("ring", exc, args), file=sys.stderr)
        return 1
    except (ValueError, WriteFailed) as exc:
        print(error_line("ring", exc, args) + f" (rank {launch.rank} of {launch.world})", file=sys.stderr)
        return 2
    if result.rank == 0:
        _report(result)
    return 0


def _report(result) -> None:
    counts = ", ".join(f"{n} {status}" for status, n in sorted(result.counts.items())) or "nothing"
    print(f"run {result.run_id} on {result.world} ranks: {counts}")
    print(f"records: {result.out}")
    rows = [[k(r["seq_len"]), *(_ms(r.get(f)) for f in ("median_ms", "compute_ms", "wait_ms", "comm_alone_ms")),
             "-" if r.get("hidden_fraction") is None else f"{r['hidden_fraction']:.0%}"]
            for r in result.records if r["status"] == "ok"]
    if rows:
        print(table(("seq_len", "ring ms", "compute ms", "wait ms", "comm alone ms", "hidden"), rows, align="numbers"))
    for r in result.records:
        if r["status"] != "ok":
            print(f"{k(r['seq_len'])}: {r['status']}: {r['reason']}")


def _ms(value) -> str:
    return "-" if value is None else f"{value:.3f}"
