"""`attnlab tune`: the tiles a kernel's autotuning tries for the prefill on this GPU, timed."""
from __future__ import annotations

import sys
from pathlib import Path

from attnlab.cli._args import WORKLOAD_HELP, error_line, parse_device, parse_names, parse_seq_lens, parse_workload

HELP = "time every tile the autotuning of each tunable prefill kernel tries on this GPU, and the one it picks"
READS_KERNELS = True


def add_arguments(parser) -> None:
    parser.add_argument("--workload", default="llama3-8b", type=parse_workload,
                        help=f"{WORKLOAD_HELP} (default %(default)s)")
    parser.add_argument("--seq-lens", type=parse_seq_lens, default=[16384, 131072],
                        help="comma list of context lengths, 1k = 1024 (default 16k,128k)")
    parser.add_argument("--device", type=parse_device, default="cuda", help="cuda or cuda:N (default cuda)")
    parser.add_argument("--kernels", type=parse_names, default=None,
                        help="comma list of implementations to tune (default: every one that declares a tune "
                             "hook and runs here)")
    parser.add_argument("--out", default="tuning.json",
                        help="JSON document, new or an earlier tuning document, rewritten after each case "
                             "(its folder is created if missing)")


def run(args) -> int:
    from attnlab.bench.output_file import WriteFailed
    from attnlab.bench.tuning import tune
    from attnlab.bench.workloads import preset

    try:
        _check_out(args.out)
        if not args.device.startswith("cuda"):
            raise ValueError(f"device: autotuning times tiles on a GPU, got {args.device!r}")
        document = tune(preset(args.workload), args.seq_lens, args.device, args.out, argv=sys.argv,
                        kernels=args.kernels)
    except WriteFailed as exc:
        print(error_line("tune", exc, args) + "; free space and run it again", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(error_line("tune", exc, args), file=sys.stderr)
        return 2
    for case in document["cases"]:
        path = case["kernel"] + {True: " (tma)", False: " (pointers)"}.get(case.get("tma"), "")
        if case["status"] != "ok":
            print(f"{case['seq_len']:>7} {path:22} {case['status']}: {case.get('reason', '')}")
            continue
        tiles = ", ".join(f"{_tile(t)} {t['median_ms']:.3f}" for t in case["tiles"])
        print(f"{case['seq_len']:>7} {path:22} chose {_tile(case['chosen'])}  (ms: {tiles})")
    print(f"written: {args.out}")
    return 0


def _check_out(path) -> None:
    """Refuse an --out that is not a tuning document before anything else is checked, so that
    the flag is named wherever the command is run (`tune` checks it again, holding the file)."""
    from attnlab.bench.tuning import check_replaceable

    if Path(path).is_file():
        check_replaceable(Path(path))


def _tile(tile: dict) -> str:
    """A candidate as its settings, whatever the kernel calls them: BLOCK_M=64,BLOCK_N=32,num_warps=4."""
    return ",".join(f"{k}={v}" for k, v in tile.items() if k != "median_ms")
