"""`attnlab sweep`: time every kernel across context lengths into a JSONL file."""
from __future__ import annotations

import argparse
import sys

from attnlab.cli._args import (checked, device_or_default, error_line, finite_positive, parse_device, parse_names,
                               parse_seq_lens, parse_workload, positive_int, seconds)
from attnlab.text import k, table

HELP = "measure kernels from short to long context (time, memory, power) into JSONL records"
READS_KERNELS = True


def _dtype(text):
    from attnlab.bench.workloads import dtype_name

    return checked(dtype_name)(text)


def add_arguments(parser) -> None:
    parser.add_argument("--kernels", type=parse_names, default=None,
                        help="comma list of implementations (default: all available on the device)")
    parser.add_argument("--modes", type=parse_names, default=None, help="prefill, decode or both (default: both)")
    parser.add_argument("--seq-lens", type=parse_seq_lens, default=None,
                        help="comma list of context lengths in tokens, 1k = 1024 "
                             "(default: 1k,2k,...,128k; the cpu-small preset has its own)")
    parser.add_argument("--workload", type=parse_workload, default=None,
                        help="preset: llama3-8b (default on CUDA), mistral-7b, gemma2-9b, fa-paper, cpu-small "
                             "(default on CPU)")
    parser.add_argument("--batch", type=positive_int, default=None, help="sequences per call")
    parser.add_argument("--heads", type=positive_int, default=None, help="query heads")
    parser.add_argument("--kv-heads", type=positive_int, default=None, help="key/value heads (GQA)")
    parser.add_argument("--head-dim", type=positive_int, default=None, help="head dimension")
    parser.add_argument("--dtype", type=_dtype, default=None,
                        help="bfloat16, float16, float32 or float64 (bf16, fp16, fp32)")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=None,
                        help="causal masking for prefill (default: the preset's)")
    parser.add_argument("--window", type=positive_int, default=None,
                        help="a sliding window: each query sees at most this many keys (mistral-7b: 4096)")
    parser.add_argument("--softcap", type=finite_positive, default=None,
                        help="cap the logits at S * tanh(s / S) (gemma2-9b: 50)")
    parser.add_argument("--docs", type=positive_int, default=None,
                        help="pack this many equal documents into each prefill sequence (a varlen call)")
    parser.add_argument("--device", type=parse_device, default=None,
                        help="cuda, cuda:N or cpu (default: cuda if present)")
    parser.add_argument("--out", default="attnlab-sweep.jsonl",
                        help="JSONL file for the records, new or an attnlab one (its folder is created if "
                             "missing); NVML samples go beside it as .nvml.csv")
    parser.add_argument("--resume", action="store_true",
                        help="continue --out: measure only points it does not already settle")
    parser.add_argument("--budget-s", type=seconds, default=None,
                        help="stop starting points after this many seconds; the rest are recorded as skipped")


def build_config(args):
    """The SweepConfig the flags describe: a preset, then explicit flags over it."""
    from attnlab.bench.sweep import SweepConfig, check_device
    from attnlab.bench.workloads import MODES, default_preset, preset
    from attnlab.kernels import get

    device = check_device(device_or_default(args.device))
    workload = preset(args.workload or default_preset(device.type)).override(
        batch=args.batch, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
        dtype=args.dtype, causal=args.causal, window=args.window, softcap=args.softcap, docs=args.docs)
    modes = tuple(args.modes or MODES)
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"--modes: expected prefill and/or decode, got {mode!r}")
    for name in args.kernels or ():
        get(name)   # an unknown name fails here, listing the known ones
    return SweepConfig(workload=workload, device=str(device), out=args.out, kernels=args.kernels,
                       modes=modes, seq_lens=args.seq_lens, resume=args.resume, budget_s=args.budget_s)


def run(args) -> int:
    from attnlab.bench.output_file import WriteFailed
    from attnlab.bench.sweep import run_sweep
    from attnlab.cli._progress import make_progress

    try:
        config = build_config(args)
        result = run_sweep(config, progress=make_progress())
    except WriteFailed as exc:
        print(error_line("sweep", exc, args) + "; free space and run the same command with --resume "
              "to measure the rest", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(error_line("sweep", exc, args), file=sys.stderr)
        return 2
    _report(result)
    if result.interrupted:
        print(f"interrupted: {len(result.records)} records written; rerun with --resume to finish",
              file=sys.stderr)
        return 130
    return 0


def _report(result) -> None:
    counts = ", ".join(f"{n} {status}" for status, n in sorted(result.counts.items())) or "nothing"
    print(f"run {result.run_id}: {counts}"
          + (f" ({result.already_done} already in the file)" if result.already_done else ""))
    print(f"records: {result.out}")
    if result.nvml_reason:
        print(f"power and energy not measured: {result.nvml_reason}")
    else:
        print(f"NVML samples: {result.nvml_csv}")
    ok = [r for r in result.records if r["status"] == "ok" and r.get("seq_len")]
    if not ok:
        return
    lengths = sorted({r["seq_len"] for r in ok})
    rows = {}
    for r in ok:
        rows.setdefault((r["mode"], r["kernel"]), {})[r["seq_len"]] = r["median_ms"]
    header = ["mode", "kernel"] + [k(n) for n in lengths]
    body = [[mode, kernel] + [f"{cells[n]:.3f}" if n in cells else "-" for n in lengths]
            for (mode, kernel), cells in sorted(rows.items())]
    print("median ms per call:")
    print(table(header, body, align="numbers"))
