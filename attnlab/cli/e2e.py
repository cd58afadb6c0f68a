"""`attnlab e2e`: output tokens/s of a Llama-shaped decoder from 1k to 128k tokens of context."""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

from attnlab.cli._args import (checked, error_line, parse_device, parse_kv_dtype, parse_names, parse_page_size,
                               parse_seq_lens, positive_int, seconds)
from attnlab.models import PRESETS, preset
from attnlab.text import table

HELP = "end-to-end decode throughput of a Llama-shaped decoder against context length"
READS_KERNELS = True
TABLE_HEADER = ("seq_len", "batch", "status", "step_ms", "tok/s", "graph", "peak_GiB", "J/token", "note")


def add_arguments(parser) -> None:
    parser.add_argument("--model", type=checked(lambda name: preset(name).name), default=None,
                        help=f"served-model preset: {', '.join(PRESETS)} (default: llama3-8b on CUDA, tiny on a CPU)")
    parser.add_argument("--kernels", type=parse_names, default=["auto"],
                        help="comma list of decode implementations, measured one after the other into the same "
                             "file, e.g. triton-decode,sdpa-flash (default: auto, the fastest available; see "
                             "`attnlab kernels`)")
    parser.add_argument("--prefill-kernel", default="auto",
                        help="prefill implementation with --with-prefill (default: each decode kernel where it "
                             "serves prefill, else the fastest available)")
    parser.add_argument("--seq-lens", type=parse_seq_lens, default=None,
                        help="comma list of context lengths, 1k = 1024 (default: 1k..128k on CUDA, "
                             "256..2k on a CPU)")
    parser.add_argument("--batch", type=positive_int, default=None,
                        help="fixed batch (default: the largest that fits; 4 on a CPU)")
    parser.add_argument("--with-prefill", action="store_true",
                        help="also time the prefill of the context and report tokens/s including it")
    parser.add_argument("--decode-tokens", type=positive_int, default=128,
                        help="tokens decoded per sequence (default 128)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed decode steps first (default 3)")
    parser.add_argument("--out", default=None,
                        help="JSONL file to append to, new or an attnlab one (its folder is created if missing; "
                             "default: e2e-MODEL-KERNEL.jsonl, or e2e-MODEL.jsonl for several kernels)")
    parser.add_argument("--budget-s", type=seconds, default=None,
                        help="stop starting new lengths after this many seconds, all kernels together; the rest "
                             "are recorded skipped")
    parser.add_argument("--device", type=parse_device, default=None,
                        help="cuda, cuda:N or cpu (default: cuda if present)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="weights and cache (default: bfloat16 on CUDA, float32 on a CPU)")
    parser.add_argument("--kv-dtype", type=parse_kv_dtype, default=None,
                        help="the KV cache's dtype: fp8_e4m3 or fp8_e5m2 (8-bit, a float32 descale per layer, sequence "
                             "and kv head; the planner counts a byte an element) or one of --dtype's (default: --dtype)")
    parser.add_argument("--page-size", type=parse_page_size, default=0, metavar="N",
                        help="keep the cache in pages of N tokens, in shuffled physical order behind a block table, "
                             "as servers do (default 0: one contiguous cache per sequence)")
    parser.add_argument("--mem-budget-gib", type=float, default=None,
                        help="plan the largest batch within this many GiB instead of free device memory")
    parser.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly even where a graph works")
    parser.add_argument("--seed", type=int, default=0)




@dataclasses.dataclass
class _Plan:
    """One kernel's run: its options (kernel as given) and the decode implementation that names here."""

    options: Any          # bench.e2e.E2EOptions, imported only when the command runs (torch)
    decode_name: str


def run(args) -> int:
    from attnlab.bench import e2e
    from attnlab.bench.output_file import WriteFailed
    from attnlab.bench.records import RecordWriter

    rows, plans = [], []
    try:
        plans = _plans(args, e2e)       # every name is checked before the file is opened
        out = Path(args.out or _default_out(plans))
        with RecordWriter(out) as writer:
            _measure(writer, plans, e2e, rows)
    except WriteFailed as exc:
        print(error_line("e2e", exc, args) + _rest_hint(plans, len(rows)), file=sys.stderr)
        return 2
    except ValueError as exc:    # a bad name or value: say which, without a traceback
        print(error_line("e2e", exc, args), file=sys.stderr)
        return 2
    for plan in plans:
        _print_table([r for r in rows if r["kernel"] == plan.decode_name])
    print(f"wrote {len(rows)} records to {out}")
    return 0 if all(r["status"] in ("ok", "oom", "skipped") for r in rows) else 1


def _plans(args, e2e) -> list:
    """One plan per kernel in --kernels, in order, sharing one run id; a name that resolves to an
    implementation already planned ("auto" and the one it picks) is measured once."""
    shared = _options(args, e2e)
    plans = {}
    for kernel in args.kernels:
        options = dataclasses.replace(shared, kernel=kernel)
        decode_name = _decode_name(options, e2e)
        plans.setdefault(decode_name, _Plan(options, decode_name))
    return list(plans.values())


def _decode_name(options, e2e) -> str:
    """The implementation options.kernel names here; a name that does not resolve is an error naming
    --kernels, or --prefill-kernel where that one is at fault."""
    try:
        decode_name, _ = e2e.implementation_names(dataclasses.replace(options, with_prefill=False))
    except ValueError as exc:
        raise ValueError(f"kernels: {str(exc).removeprefix('impl: ')}") from None
    try:
        e2e.implementation_names(options)
    except ValueError as exc:
        raise ValueError(f"prefill_kernel: {str(exc).removeprefix('impl: ')}") from None
    return decode_name


def _default_out(plans: list) -> str:
    model = plans[0].options.model
    return f"e2e-{model}.jsonl" if len(plans) > 1 else f"e2e-{model}-{plans[0].decode_name}.jsonl"


def _measure(writer, plans: list, e2e, rows: list) -> None:
    """Each kernel's records, length by length, into `writer` and `rows` as each ends; NVML samples
    beside the file. --budget-s covers all kernels: each starts with what the ones before left."""
    from attnlab.bench.nvml import nvml_reason
    from attnlab.bench.records import environment
    from attnlab.bench.sweep import check_nvml_csv, nvml_csv_path
    from attnlab.cli._progress import make_progress

    first = plans[0].options
    nvml_csv = str(nvml_csv_path(writer.path))
    if not nvml_reason(first.device):
        check_nvml_csv(nvml_csv)
    writer.write(environment(sys.argv, device=first.device, run_id=first.run_id))
    started = time.monotonic()
    progress = make_progress()
    progress.start(len(plans) * len(first.seq_lens))
    try:
        for plan in plans:
            budget = None if first.budget_s is None else max(0.0, first.budget_s - (time.monotonic() - started))
            options = dataclasses.replace(plan.options, nvml_csv=nvml_csv, budget_s=budget)
            _measure_kernel(writer, options, plan.decode_name, e2e, rows, progress)
    finally:
        progress.close()


def _measure_kernel(writer, options, decode_name: str, e2e, rows: list, progress) -> None:
    lengths = options.seq_lens
    progress.update(_item(decode_name, lengths[0]))
    for i, record in enumerate(e2e.run(options)):
        writer.write(record)
        rows.append(record)
        progress.advance(record)
        if i + 1 < len(lengths):
            progress.update(_item(decode_name, lengths[i + 1]))


def _item(kernel: str, seq_len: int) -> dict:
    """What the progress bar shows before a length's record exists."""
    return {"mode": "e2e", "kernel": kernel, "seq_len": seq_len}


def _rest_hint(plans: list, done: int) -> str:
    """How to measure what a failed write left: the rest of the kernel in flight, then the kernels after it."""
    if not plans:
        return ""
    lengths = plans[0].options.seq_lens
    current, measured = divmod(done, len(lengths))
    commands = []
    if measured:
        rest = ",".join(str(n) for n in lengths[measured:])
        commands.append(f"--kernels {plans[current].options.kernel} --seq-lens {rest}")
        current += 1
    if current < len(plans):
        commands.append(f"--kernels {','.join(p.options.kernel for p in plans[current:])}")
    return "; free space and run the same command with " + ", then with ".join(commands) + " to measure the rest"


def _options(args, e2e):
    return e2e.E2EOptions(
        model=args.model, prefill_kernel=args.prefill_kernel,
        seq_lens=args.seq_lens, batch=args.batch, decode_tokens=args.decode_tokens,
        warmup_steps=args.warmup_steps, with_prefill=args.with_prefill, device=args.device,
        dtype=args.dtype, kv_dtype=args.kv_dtype, page_size=args.page_size, budget_s=args.budget_s, cuda_graph=not args.no_cuda_graph, seed=args.seed,
        mem_budget_bytes=None if args.mem_budget_gib is None else int(args.mem_budget_gib * 2**30),
    ).resolved()


def _print_table(rows: list) -> None:
    if not rows:
        return
    first = rows[0]
    print(f"{first.get('workload')} / {first.get('kernel')} on {first.get('device')}, "
          f"{first.get('decode_tokens')} tokens decoded per sequence")
    print(table(TABLE_HEADER, [_table_row(r) for r in rows], align="numbers"))
    ok = [r for r in rows if r["status"] == "ok"]
    if len(ok) >= 2:
        print(f"drop from {ok[0]['seq_len']} to {ok[-1]['seq_len']} tokens: "
              f"{ok[0]['tokens_per_s'] / ok[-1]['tokens_per_s']:.1f}x")


def _table_row(r: dict) -> tuple:
    peak_gib = r["peak_mem_bytes"] / 2**30 if r.get("peak_mem_bytes") else None
    return (str(r["seq_len"]), str(r.get("batch") or "-"), r["status"], _fmt(r.get("median_ms"), ".2f"),
            _fmt(r.get("tokens_per_s"), ",.0f"), "yes" if r.get("cuda_graph") else "no", _fmt(peak_gib, ".1f"),
            _fmt(r.get("joules_per_token"), ".3f"), (r.get("reason") or "")[:60])


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)
