"""`attnlab sweep`: time every kernel across context lengths into a JSONL file."""
from __future__ import annotations

import argparse
import statistics
import sys

from attnlab.cli._args import (WORKLOAD_HELP, checked, device_or_default, error_line, finite_positive, parse_device,
                               parse_kv_dtype, parse_names, parse_page_size, parse_seq_lens, parse_workload,
                               positive_int, rounds, rounds_help, seconds)
from attnlab.text import k, table

HELP = "measure kernels from short to long context (time, memory, power) into JSONL records"
READS_KERNELS = True


def _dtype(text):
    from attnlab.bench.workloads import dtype_name

    return checked(dtype_name)(text)



def _lengths(text):
    from attnlab.bench.workloads import parse_lengths

    return checked(parse_lengths)(text)



def add_arguments(parser) -> None:
    parser.add_argument("--kernels", type=parse_names, default=None,
                        help="comma list of implementations (default: all available on the device)")
    parser.add_argument("--modes", type=parse_names, default=None,
                        help="comma list of prefill, decode, backward (the gradients alone, the forward run "
                             "untimed before) and fwd_bwd (forward and backward) (default: prefill,decode)")
    parser.add_argument("--seq-lens", type=parse_seq_lens, default=None,
                        help="comma list of context lengths in tokens, 1k = 1024 "
                             "(default: 1k,2k,...,128k; the cpu-small preset has its own)")
    parser.add_argument("--workload", type=parse_workload, default=None,
                        help=WORKLOAD_HELP)
    parser.add_argument("--batch", type=positive_int, default=None, help="sequences per call")
    parser.add_argument("--heads", type=positive_int, default=None, help="query heads")
    parser.add_argument("--kv-heads", type=positive_int, default=None, help="key/value heads (GQA)")
    parser.add_argument("--head-dim", type=positive_int, default=None, help="head dimension")
    parser.add_argument("--dtype", type=_dtype, default=None,
                        help="bfloat16, float16, float32 or float64 (bf16, fp16, fp32)")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=None,
                        help="causal masking for prefill (default: the preset's)")
    parser.add_argument("--window", type=positive_int, default=None,
                        help="a sliding window: each query sees at most this many keys (mistral-7b: 4096); at most "
                             "the longest length swept, a window that already masks nothing (a longer one would "
                             "measure the same and only rename the workload)")
    parser.add_argument("--softcap", type=finite_positive, default=None,
                        help="cap the logits at S * tanh(s / S) (gemma2-9b: 50)")
    parser.add_argument("--docs", type=positive_int, default=None,
                        help="pack this many equal documents into each prefill sequence (a varlen call)")
    cache = parser.add_argument_group("the decode cache (decode points only; recorded in each record)")
    cache.add_argument("--page-size", type=parse_page_size, default=None, metavar="N",
                       help="a paged cache: pages of N tokens in shuffled physical order behind a block table "
                            "(default 0: contiguous)")
    cache.add_argument("--kv-dtype", type=parse_kv_dtype, default=None,
                       help="the cache's dtype: fp8_e4m3 or fp8_e5m2 (8-bit, a float32 descale per sequence and kv "
                            "head) or bfloat16, float16, ... (default: --dtype's)")
    cache.add_argument("--lengths", type=_lengths, default=None,
                       help="each sequence's cache length: equal (the context, the default), ragged (drawn uniformly "
                            "from half the context to all of it) or ragged:uniform:F (from F x the context); the "
                            "seed and the lengths' min, median and max are recorded")
    cache.add_argument("--lengths-seed", type=int, default=0, help="the seed ragged lengths are drawn from (default 0)")
    parser.add_argument("--device", type=parse_device, default=None,
                        help="cuda, cuda:N or cpu (default: cuda if present)")
    parser.add_argument("--out", default="attnlab-sweep.jsonl",
                        help="JSONL file for the records, new or an attnlab one (its folder is created if "
                             "missing); NVML samples go beside it as .nvml.csv")
    parser.add_argument("--resume", action="store_true",
                        help="continue --out: measure only points it does not already settle")
    parser.add_argument("--budget-s", type=seconds, default=None,
                        help="stop starting points after this many seconds; the rest are recorded as skipped")
    parser.add_argument("--rounds", type=rounds, default=None, help=rounds_help())
    parser.add_argument("--l2-flush", choices=("write", "read", "none"), default="write",
                        help="how a GPU's L2 cache is emptied before each repetition: zero a buffer twice its size "
                             "(write, the default), sum one (read), or not at all; recorded in every record")
    spread = parser.add_argument_group("across processes (a shard's records go to its own file beside --out)")
    spread.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                        help="measure shard I of N of the points (whole lengths, balanced by predicted cost); "
                             "under torchrun each rank takes RANK/WORLD_SIZE on cuda:LOCAL_RANK by itself")
    spread.add_argument("--executor", choices=("local", "slurm"), default=None,
                        help="submit --shards shards through submitit (pip install attnlab[slurm]): as a SLURM job "
                             "array, or as processes on this machine")
    spread.add_argument("--shards", type=positive_int, default=None, help="how many shards --executor runs")
    spread.add_argument("--slurm-partition", default=None, help="the SLURM partition of the job array")
    spread.add_argument("--slurm-timeout-min", type=positive_int, default=60,
                        help="each task's time limit in minutes (default 60)")


def _shard(text):
    from attnlab.bench.shards import parse_shard

    return checked(parse_shard)(text)


def build_config(args, launch=None):
    """The SweepConfig the flags describe: a preset, then explicit flags over it; under torchrun
    (`launch`) the rank's shard, file and GPU."""
    from attnlab.bench.device import check_device
    from attnlab.bench.sweep import SweepConfig, check_window
    from attnlab.bench.workloads import DEFAULT_MODES, MODES, default_preset, preset
    from attnlab.kernels import get

    device = check_device(_device(args.device, launch))
    base = preset(args.workload or default_preset(device.type))
    if args.window is not None:
        check_window(args.window, args.seq_lens or base.seq_lens)
    workload = base.override(
        batch=args.batch, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
        dtype=args.dtype, causal=args.causal, window=args.window, softcap=args.softcap, docs=args.docs)
    modes = tuple(args.modes or DEFAULT_MODES)
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"--modes: expected some of {', '.join(MODES)}, got {mode!r}")
    for name in args.kernels or ():
        get(name)   # an unknown name fails here, listing the known ones
    shard = launch.shard if launch else args.shard
    out = launch.path(args.out) if launch else shard.path(args.out) if shard else args.out
    return SweepConfig(workload=workload, device=str(device), out=out, kernels=args.kernels, modes=modes,
                       seq_lens=args.seq_lens, resume=args.resume, budget_s=args.budget_s, shard=shard,
                       l2_flush=args.l2_flush, cache=_cache(args, modes),
                       **({"rounds": args.rounds} if args.rounds else {}))


def _cache(args, modes):
    """The decode cache the flags describe; a cache flag without decode among the modes is refused,
    naming the flag."""
    from attnlab.bench.workloads import DECODE, DecodeCache

    given = {name: getattr(args, name, None) for name in ("page_size", "kv_dtype", "lengths")}
    given = {name: value for name, value in given.items() if value is not None}
    if given and DECODE not in modes:
        raise ValueError(f"{next(iter(given))}: sets the decode cache, but --modes has no decode")
    if getattr(args, "lengths_seed", 0) < 0:
        raise ValueError(f"lengths_seed: expected a whole number >= 0, got {args.lengths_seed}")
    return DecodeCache(**given, lengths_seed=getattr(args, "lengths_seed", 0))


def _device(given, launch) -> str:
    """The device flag, where torchrun placed a rank on a GPU: cuda means cuda:LOCAL_RANK."""
    device = device_or_default(given)
    if launch and device == "cuda":
        return f"cuda:{launch.local_rank}"
    return device


def _spread(args):
    """(torchrun's Launch or None, why torchrun's variables were ignored or ""); refuses flags that
    contradict each other, naming them."""
    from attnlab.bench.shards import torchrun_launch

    launch, ignored = torchrun_launch()
    if launch and (args.shard or args.executor):
        raise ValueError("shard: under torchrun each rank takes its own shard; drop --shard and --executor")
    if args.executor and args.shard:
        raise ValueError("shard: --executor runs every shard; drop --shard")
    if bool(args.executor) != bool(args.shards):
        raise ValueError("shards: --executor and --shards go together")
    return launch, ignored


FAILED_STATUSES = ("wrong", "error")


def run(args) -> int:
    from attnlab.bench.output_file import WriteFailed
    from attnlab.bench.sweep import run_sweep
    from attnlab.cli._progress import make_progress

    try:
        launch, ignored = _spread(args)
        if ignored:
            print(f"attnlab sweep: warning: {ignored}; going on as if none were set", file=sys.stderr)
        config = build_config(args, launch)
        if args.executor:
            return _submit(args, config)
        result = run_sweep(config, progress=make_progress(False if launch else None))
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
    return 1 if _failed(result.records) else 0


def _failed(records) -> list:
    """Points that failed (a kernel that raised, or gave a wrong answer): said on stderr, one line
    a kernel, so that the exit status says what the file holds."""
    failed = [r for r in records if r.get("status") in FAILED_STATUSES]
    for kernel in dict.fromkeys(r["kernel"] for r in failed):
        mine = [r for r in failed if r["kernel"] == kernel]
        print(f"attnlab sweep: {kernel} failed {len(mine)} point(s), first: {' '.join(mine[0]['reason'].split())}",
              file=sys.stderr)
    return failed


def _submit(args, config) -> int:
    """Run --shards shards through submitit and say where each wrote; 1 if a shard failed."""
    from attnlab.bench.jobs import submit

    outcomes = submit(config, args.shards, args.executor, partition=args.slurm_partition,
                      timeout_min=args.slurm_timeout_min, kernel_modules=args.kernel_module,
                      plugin_timeout_s=args.plugin_timeout)
    rows = [(str(o.shard), o.job_id, o.run_id or "-", ", ".join(f"{n} {s}" for s, n in sorted(o.counts.items()))
             or o.error, o.out) for o in outcomes]
    print(table(("shard", "job", "run", "records", "file"), rows))
    return 1 if any(o.error for o in outcomes) else 0


def _report(result) -> None:
    counts = ", ".join(f"{n} {status}" for status, n in sorted(result.counts.items())) or "nothing"
    rounds = max((r.get("rounds") or 1 for r in result.records), default=1)
    print(f"run {result.run_id}: {counts}" + (f" (a record a point a round, {rounds} rounds)" if rounds > 1 else "")
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
        rows.setdefault((r["mode"], r["kernel"]), {}).setdefault(r["seq_len"], []).append(r["median_ms"])
    header = ["mode", "kernel"] + [k(n) for n in lengths]
    body = [[mode, kernel] + [f"{statistics.median(cells[n]):.3f}" if n in cells else "-" for n in lengths]
            for (mode, kernel), cells in sorted(rows.items())]
    print("median ms per call (the median of its rounds' medians):")
    print(table(header, body, align="numbers"))
