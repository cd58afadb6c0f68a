"""`attnlab claim`: the analytic serving model behind "10,000 tokens/s at 1k, 130 at 128k"."""
from __future__ import annotations

import json
import sys

HELP = "explain the drop in output tokens/s from 1k to 128k of context with a serving model"


def add_arguments(parser) -> None:
    from attnlab.analysis.claim import MODEL_PRESETS
    from attnlab.analysis.roofline import GPU_SPECS

    parser.add_argument("results", nargs="*", metavar="RESULTS",
                        help="optional result files or folders: calibrate on them and show measured points")
    parser.add_argument("--model", default="llama3-8b", choices=sorted(MODEL_PRESETS),
                        help="model preset (default %(default)s)")
    parser.add_argument("--gpu", default=None,
                        help=f"GPU preset ({', '.join(GPU_SPECS)}) or device name (default: the one the "
                             f"results name, else h100-sxm)")
    parser.add_argument("--num-gpus", type=int, default=1, help="GPUs serving one model, ideal tensor parallel")
    parser.add_argument("--seq-lens", default="1k,2k,4k,8k,16k,32k,64k,120k,128k",
                        help="context lengths, comma separated; 1k means 1024 (default %(default)s)")
    parser.add_argument("--decode-tokens", type=int, default=128, help="tokens decoded per sequence (default 128)")
    parser.add_argument("--bw-efficiency", type=float, default=None,
                        help="what-if: share of spec bandwidth for weights and KV (instead of calibrating)")
    parser.add_argument("--compute-efficiency", type=float, default=None,
                        help="what-if: share of spec bf16 FLOP/s (instead of calibrating)")
    parser.add_argument("--overhead-ms", type=float, default=None, help="what-if: fixed cost per decode step")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="write the result as JSON to PATH (or to stdout without PATH, instead of the table)")
    parser.add_argument("--chart", default=None, metavar="PATH",
                        help="draw the claim chart to PATH (.png; an .svg is written beside it)")


def run(args) -> int:
    from attnlab.analysis import MissingExtra
    try:
        document, notes = _build(args)
        if args.chart:
            _chart(document, args.chart)
    except (MissingExtra, FileNotFoundError, ValueError) as exc:
        print(f"attnlab claim: {exc}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if args.json == "-":
        print(json.dumps(document, indent=2))
        return 0
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(document, indent=2) + "\n")
    print(render(document))
    return 0


def _build(args):
    from attnlab.analysis.claim import build_claim, infer_gpu
    from attnlab.analysis.text import parse_seq_len

    seq_lens = [parse_seq_len(s) for s in args.seq_lens.split(",") if s.strip()]
    results, environments, notes = None, None, []
    if args.results:
        from attnlab.analysis.load import load
        loaded = load(args.results)
        results, environments, notes = loaded.results, loaded.environments, list(loaded.warnings)
    calibration = _what_if(args)
    gpu = args.gpu or infer_gpu(results) or "h100-sxm"
    document, more = build_claim(args.model, gpu, seq_lens=seq_lens, num_gpus=args.num_gpus,
                                 decode_tokens=args.decode_tokens, calibration=calibration, results=results,
                                 environments=environments)
    return document, notes + more


def _what_if(args):
    """A calibration from the what-if flags, or None to calibrate on results (or stay ideal)."""
    from attnlab.analysis.claim import Calibration

    given = {name: value for name, value in (("bw_efficiency", args.bw_efficiency),
                                             ("compute_efficiency", args.compute_efficiency),
                                             ("overhead_ms", args.overhead_ms)) if value is not None}
    if not given:
        return None
    for name in ("bw_efficiency", "compute_efficiency"):
        if name in given and not 0 < given[name] <= 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a fraction in (0, 1], got {given[name]}")
    if given.get("overhead_ms", 0) < 0:
        raise ValueError(f"--overhead-ms: expected 0 or more, got {given['overhead_ms']}")
    bw = given.get("bw_efficiency", 1.0)
    return Calibration(weights_bw_efficiency=bw, kv_bw_efficiency=bw,
                       compute_efficiency=given.get("compute_efficiency", 1.0),
                       overhead_ms=given.get("overhead_ms", 0.0), sources=("set on the command line",))


def _chart(document, path) -> None:
    from pathlib import Path

    from attnlab.analysis.charts import claim_chart, save
    stem = Path(path)
    save(claim_chart(document), stem.with_suffix(""), ("png", "svg"))


def render(document) -> str:
    from attnlab.analysis import text

    claim = document["claim"]
    rows = [[text.k(p["seq_len"]), p["max_batch"], text.num(p["tok_s_max_batch"]), text.num(p["tok_s_batch1"]),
             text.num(p["tok_s_with_prefill"])] for p in document["points"]]
    lines = [f"{document['model']} on {document['num_gpus']} x {document['gpu_config']['name']}: "
             f"KV cache {document['kv_bytes_per_token'] / 1024:.0f} KiB per token\n",
             text.table(["context", "max batch", "tok/s max batch", "tok/s batch 1", "tok/s with prefill"], rows), "",
             f"{text.k(claim['short_ctx'])}/{text.k(claim['long_ctx'])}: {text.ratio(document['ratio_max_batch'])} "
             f"at the largest batch, "
             f"{text.ratio(document['ratio_batch1'])} at batch 1, {text.ratio(document['ratio_with_prefill'])} "
             f"with prefill; the claim: {claim['short_tok_s']:,} -> {claim['long_tok_s']} tokens/s "
             f"({text.ratio(claim['short_tok_s'] / claim['long_tok_s'])})", ""]
    for m in document["measured_ratios"]:
        lines.append(f"measured {m['mode']} with {m['kernel']}: {text.k(m['short_ctx'])}/{text.k(m['long_ctx'])} = "
                     f"{m['ratio']:.1f}x")
    lines += [""] + _wrap(document["explanation"])
    return "\n".join(lines)


def _wrap(paragraph: str) -> list:
    import textwrap
    return textwrap.wrap(paragraph, 100)
