"""`attnlab e2e`: output tokens/s of a Llama-shaped decoder from 1k to 128k tokens of context."""
from __future__ import annotations

import sys
from pathlib import Path

from attnlab.cli._args import error_line, parse_device, parse_seq_lens, positive_int, seconds
from attnlab.models import PRESETS

HELP = "end-to-end decode throughput of a Llama-shaped decoder against context length"


def add_arguments(parser) -> None:
    parser.add_argument("--preset", default=None,
                        help=f"model shape: {', '.join(PRESETS)} (default: llama3-8b on CUDA, tiny on a CPU)")
    parser.add_argument("--attention", default="auto",
                        help="decode attention implementation, e.g. triton-decode, flash-attn, sdpa-flash, naive "
                             "(default: the fastest available; see `attnlab kernels`)")
    parser.add_argument("--prefill-attention", default="auto",
                        help="prefill implementation with --with-prefill (default: --attention where it "
                             "serves prefill, else the fastest available)")
    parser.add_argument("--seq-lens", type=parse_seq_lens, default=None,
                        help="comma list of context lengths, 1k = 1024 (default: 1k..128k on CUDA, "
                             "256..2k on a CPU)")
    parser.add_argument("--batch", type=positive_int, default=None,
                        help="fixed batch (default: the largest that fits; 4 on a CPU)")
    parser.add_argument("--with-prefill", action="store_true",
                        help="also time the prefill of the context and report tokens/s including it")
    parser.add_argument("--decode-tokens", type=positive_int, default=128, help="tokens decoded per sequence (default 128)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed decode steps first (default 3)")
    parser.add_argument("--out", default=None,
                        help="JSONL file to append to, new or an attnlab one (its folder is created if missing; "
                             "default: e2e-PRESET-ATTENTION.jsonl)")
    parser.add_argument("--budget-s", type=seconds, default=None,
                        help="stop starting new lengths after this many seconds; the rest are recorded skipped")
    parser.add_argument("--device", type=parse_device, default=None,
                        help="cuda, cuda:N or cpu (default: cuda if present)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="weights and cache (default: bfloat16 on CUDA, float32 on a CPU)")
    parser.add_argument("--mem-budget-gib", type=float, default=None,
                        help="plan the largest batch within this many GiB instead of free device memory")
    parser.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly even where a graph works")
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    from attnlab.bench import e2e
    from attnlab.bench.output_file import WriteFailed
    from attnlab.bench.records import RecordWriter

    rows = []
    try:
        options = _options(args, e2e)
        decode_name, _ = e2e.implementation_names(options)
        out = Path(args.out or f"e2e-{options.preset}-{decode_name}.jsonl")
        with RecordWriter(out) as writer:
            _measure(writer, options, e2e, rows)
    except WriteFailed as exc:
        rest = ",".join(str(n) for n in options.seq_lens[len(rows):])
        print(error_line("e2e", exc, args) + f"; free space and run the same command with --seq-lens {rest} "
              "to measure the rest", file=sys.stderr)
        return 2
    except ValueError as exc:    # a bad name or value: say which, without a traceback
        print(error_line("e2e", exc, args), file=sys.stderr)
        return 2
    _print_table(rows)
    print(f"wrote {len(rows)} records to {out}")
    return 0 if all(r["status"] in ("ok", "oom", "skipped") for r in rows) else 1


def _measure(writer, options, e2e, rows: list) -> None:
    """Each length's record into `writer` and `rows` as it ends; NVML samples beside the file."""
    from attnlab.bench.nvml import nvml_reason
    from attnlab.bench.records import environment
    from attnlab.bench.sweep import check_nvml_csv, nvml_csv_path

    options.nvml_csv = str(nvml_csv_path(writer.path))
    if not nvml_reason(options.device):
        check_nvml_csv(options.nvml_csv)
    with _Progress(len(options.seq_lens)) as progress:
        writer.write(environment(sys.argv, device=options.device, run_id=options.run_id))
        progress.show(options.seq_lens[0])
        for i, record in enumerate(e2e.run(options)):
            writer.write(record)
            rows.append(record)
            progress.advance(options.seq_lens[i + 1] if i + 1 < len(options.seq_lens) else None)


def _options(args, e2e):
    return e2e.E2EOptions(
        preset=args.preset, attention=args.attention, prefill_attention=args.prefill_attention,
        seq_lens=args.seq_lens, batch=args.batch, decode_tokens=args.decode_tokens,
        warmup_steps=args.warmup_steps, with_prefill=args.with_prefill, device=args.device,
        dtype=args.dtype, budget_s=args.budget_s, cuda_graph=not args.no_cuda_graph, seed=args.seed,
        mem_budget_bytes=None if args.mem_budget_gib is None else int(args.mem_budget_gib * 2**30),
    ).resolved()


def _print_table(rows: list) -> None:
    header = ("seq_len", "batch", "status", "step_ms", "tok/s", "graph", "peak_GiB", "J/token", "note")
    table = [header]
    for r in rows:
        table.append((str(r["seq_len"]), str(r.get("batch") or "-"), r["status"],
                      _fmt(r.get("median_ms"), ".2f"), _fmt(r.get("tokens_per_s"), ",.0f"),
                      "yes" if r.get("cuda_graph") else "no",
                      _fmt(r["peak_mem_bytes"] / 2**30 if r.get("peak_mem_bytes") else None, ".1f"),
                      _fmt(r.get("joules_per_token"), ".3f"), (r.get("reason") or "")[:60]))
    first = rows[0] if rows else {}
    print(f"{first.get('workload')} / {first.get('kernel')} on {first.get('device')}, "
          f"{first.get('decode_tokens')} tokens decoded per sequence")
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.rjust(w) if i < 8 else cell for i, (cell, w) in enumerate(zip(row, widths))))
    ok = [r for r in rows if r["status"] == "ok"]
    if len(ok) >= 2:
        print(f"drop from {ok[0]['seq_len']} to {ok[-1]['seq_len']} tokens: "
              f"{ok[0]['tokens_per_s'] / ok[-1]['tokens_per_s']:.1f}x")


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


class _Progress:
    """A rich progress bar on a terminal; silent when stderr is not one or rich is missing."""

    def __init__(self, total: int):
        self.total, self.bar, self.task = total, None, None

    def __enter__(self):
        if sys.stderr.isatty():
            try:
                from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            except ImportError:
                return self
            from rich.console import Console
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                                transient=True)
            self.bar.start()
            self.task = self.bar.add_task("e2e", total=self.total)
        return self

    def show(self, seq_len) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=f"e2e seq_len {seq_len}")

    def advance(self, next_seq_len) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)
            if next_seq_len is not None:
                self.show(next_seq_len)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False
