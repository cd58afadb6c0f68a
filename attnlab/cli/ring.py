"""`attnlab ring`: ring attention across torchrun's ranks, one record per context length."""
from __future__ import annotations

import argparse
import os
import sys

from attnlab.cli._args import device_or_default, error_line, parse_seq_lens, parse_workload, positive_int
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
                        help="preset without a window or softcap: llama3-8b (default on CUDA), fa-paper, "
                             "cpu-small (default on CPU)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="cpu (gloo) or cuda (NCCL, each rank on cuda:LOCAL_RANK); default cuda if present")
    parser.add_argument("--reps", type=positive_int, default=5, help="timed repetitions per length (default 5)")


def build_config(args):
    from attnlab.bench.ring import RingConfig, check_config
    from attnlab.bench.workloads import default_preset, preset

    device = device_or_default(args.device)
    workload = preset(args.workload or default_preset(device)).override(causal=args.causal)
    config = RingConfig(workload=workload, out=args.out, seq_lens=args.seq_lens, device=device,
                        layout=args.layout, reps=args.reps, argv=sys.argv)
    check_config(config)
    return config


def run(args) -> int:
    from attnlab.bench.output_file import WriteFailed
    from attnlab.bench.ring import require_launch, run_ring

    try:
        launch = require_launch()
        config = build_config(args)
    except ValueError as exc:     # the same on every rank: rank 0 says it
        if _rank0():
            print(error_line("ring", exc, args), file=sys.stderr)
        return 2
    try:
        result = run_ring(config, launch)
    except (ValueError, WriteFailed) as exc:
        print(error_line("ring", exc, args) + f" (rank {launch.rank} of {launch.world})", file=sys.stderr)
        return 2
    if result.rank == 0:
        _report(result)
    return 0


def _rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


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
