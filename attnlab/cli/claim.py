"""`attnlab claim`: the analytic serving model behind "10,000 tokens/s at 1k, 130 at 128k"."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from attnlab.cli._args import error_line, finite_ms, fraction, output_file, positive_int
from attnlab.models import DEFAULT_MODEL

HELP = "explain the drop in output tokens/s from 1k to 128k of context with a serving model"


def add_arguments(parser) -> None:
    from attnlab.analysis.claim import MODEL_PRESETS
    from attnlab.analysis.roofline import GPU_SPECS

    parser.add_argument("results", nargs="*", metavar="RESULTS",
                        help="optional result files or folders: calibrate on them and show measured points")
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(MODEL_PRESETS),
                        help="model preset (default %(default)s)")
    parser.add_argument("--gpu", default=None,
                        help=f"GPU preset ({', '.join(GPU_SPECS)}) or device name (default: the one the "
                             f"results name, else h100-sxm)")
    parser.add_argument("--num-gpus", type=positive_int, default=1,
                        help="GPUs serving one model, ideal tensor parallel")
    parser.add_argument("--seq-lens", default="1k,2k,4k,8k,16k,32k,64k,120k,128k",
                        help="context lengths, comma separated; 1k means 1024 (default %(default)s)")
    parser.add_argument("--decode-tokens", type=positive_int, default=128,
                        help="tokens decoded per sequence (default 128)")
    parser.add_argument("--bw-efficiency", type=fraction, default=None,
                        help="what-if: share of spec bandwidth for weights and KV, in (0, 1] (instead of calibrating)")
    parser.add_argument("--compute-efficiency", type=fraction, default=None,
                        help="what-if: share of spec bf16 FLOP/s, in (0, 1] (instead of calibrating)")
    parser.add_argument("--overhead-ms", type=finite_ms, default=None, help="what-if: fixed cost per decode step")
    parser.add_argument("--what-if", default=None, metavar="LEVERS",
                        help="curves of the same model with another KV cache, comma separated: kv-fp8 (8-bit K and "
                             "V), window-W (a sliding window of W tokens), cartridge-C (a trained cache of C tokens "
                             "in place of the context), weights (the context in the weights: only decoded tokens "
                             "cached); W and C in tokens, k for x1024, e.g. kv-fp8,window-4k,cartridge-2k,weights")
    parser.add_argument("--json", nargs="?", const="-", default=None, type=output_file, metavar="PATH",
                        help="write the result as JSON to PATH (or to stdout without PATH, instead of the table); "
                             "missing folders are created; an existing PATH is replaced only if it is a claim "
                             "document or attnlab wrote it")
    parser.add_argument("--chart", default=None, type=output_file, metavar="PATH",
                        help="draw the claim chart to PATH (.png; an .svg and a .csv of what it draws are written "
                             "beside it); missing folders are created; an existing file is replaced only if "
                             "attnlab wrote it")
    parser.add_argument("--force", action="store_true",
                        help="replace existing files at --json and --chart whoever wrote them (never an input)")


def run(args) -> int:
    from attnlab.analysis import MissingExtra
    try:
        _check_outputs(args)
        document, notes = _build(args)
        _write(args, document)
    except (MissingExtra, OSError, ValueError) as exc:
        print(error_line("claim", exc, args), file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(json.dumps(document, indent=2) if args.json == "-" else render(document))
    return 0


def _check_outputs(args) -> None:
    """Before any work: refuse outputs over the inputs, or over files attnlab did not write."""
    from attnlab.analysis.outputs import check_output_file, refuse_shared

    outputs = [("--chart", path) for path in _chart_files(args.chart)] if args.chart else []
    outputs += [("--json", args.json)] if args.json and args.json != "-" else []
    refuse_shared(outputs)
    for flag, path in outputs:   # a claim document may be replaced wherever it is
        check_output_file(path, flag=flag, inputs=args.results, force=args.force,
                          is_own=is_claim_document if flag == "--json" else None)


def _write(args, document: dict) -> None:
    from attnlab.analysis.outputs import record_files

    written = []
    try:   # list what was written even if the second file fails, so that a rerun may replace it
        if args.chart:
            written += _chart(document, args.chart)
        if args.json and args.json != "-":
            Path(args.json).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
            written.append(Path(args.json))
    finally:
        record_files(written, "claim")


def is_claim_document(path: Path) -> bool:
    """Whether `path` holds what `claim --json` writes: a JSON object with "claim" and "points"."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(document, dict) and {"claim", "points"} <= set(document)


def _build(args):
    from attnlab.analysis.claim import build_claim, infer_gpu, parse_what_if
    from attnlab.text import parse_seq_lens

    seq_lens = parse_seq_lens(args.seq_lens)    # parsed here, so that a bad list is a ValueError naming the flag
    levers = parse_what_if(args.what_if) if args.what_if is not None else ()
    results, environments, notes = None, None, []
    if args.results:
        from attnlab.analysis.load import load
        loaded = load(args.results)
        results, environments, notes = loaded.results, loaded.environments, list(loaded.warnings)
    calibration = _what_if(args)
    gpu = args.gpu or infer_gpu(results) or "h100-sxm"
    document, more = build_claim(args.model, gpu, seq_lens=seq_lens, num_gpus=args.num_gpus,
                                 decode_tokens=args.decode_tokens, calibration=calibration, results=results,
                                 environments=environments, what_if=levers)
    return document, notes + more


def _what_if(args):
    """A calibration from the what-if flags (their types have checked the ranges), or None to
    calibrate on results (or stay ideal)."""
    from attnlab.analysis.claim import Calibration

    given = {name: value for name, value in (("bw_efficiency", args.bw_efficiency),
                                             ("compute_efficiency", args.compute_efficiency),
                                             ("overhead_ms", args.overhead_ms)) if value is not None}
    if not given:
        return None
    bw = given.get("bw_efficiency", 1.0)
    return Calibration(weights_bw_efficiency=bw, kv_bw_efficiency=bw,
                       compute_efficiency=given.get("compute_efficiency", 1.0),
                       overhead_ms=given.get("overhead_ms", 0.0), sources=("set on the command line",))


def _chart_files(path) -> list:
    """The files `--chart PATH` writes: the chart as PNG and SVG, and the CSV of what it draws."""
    stem = Path(path).with_suffix("")
    return [stem.parent / f"{stem.name}.{kind}" for kind in ("png", "svg", "csv")]


def _chart(document, path) -> list:
    from attnlab.analysis.charts import claim_chart, save

    return list(save(claim_chart(document), Path(path).with_suffix(""), ("png", "svg")).values())


def render(document) -> str:
    from attnlab import text
    from attnlab.analysis.claim import validation_text

    claim = document["claim"]
    rows = [[text.k(p["seq_len"]), p["max_batch"], text.num(p["tok_s_max_batch"]), text.num(p["tok_s_batch1"]),
             text.num(p["tok_s_with_prefill"])] for p in document["points"]]
    lines = [f"{document['model']} on {document['num_gpus']} x {document['gpu_config']['name']}: "
             f"KV cache {document['kv_bytes_per_token'] / 1024:.0f} KiB per token\n",
             text.table(["context", "max batch", "tok/s max batch", "tok/s batch 1", "tok/s with prefill"], rows,
                        align="numbers"), "",
             f"{text.k(claim['short_ctx'])}/{text.k(claim['long_ctx'])}: {text.ratio(document['ratio_max_batch'])} "
             f"at the largest batch, "
             f"{text.ratio(document['ratio_batch1'])} at batch 1, {text.ratio(document['ratio_with_prefill'])} "
             f"with prefill; the claim: {claim['short_tok_s']:,} -> {claim['long_tok_s']} tokens/s "
             f"({text.ratio(claim['short_tok_s'] / claim['long_tok_s'])})", ""]
    for m in document["measured_ratios"]:
        lines.append(f"measured {m['mode']} with {m['kernel']}: {text.k(m['short_ctx'])}/{text.k(m['long_ctx'])} = "
                     f"{m['ratio']:.1f}x")
    lines += [""] + _wrap(document["explanation"])
    validation = validation_text(document.get("validation"))    # in sample beside out of sample
    lines += ["", *_wrap(validation)] if validation else []
    if document.get("what_if"):
        lines += ["", *_what_if_table(document)]
    return "\n".join(lines)


def _what_if_table(document) -> list:
    """tok/s at the largest batch (and that batch) for the model and each what-if, by context."""
    from attnlab import text

    curves = [("model", document["points"])] + [(w["name"], w["points"]) for w in document["what_if"]]
    rows = [[text.k(point["seq_len"])] + [f"{text.num(c[i]['tok_s_max_batch'])} ({c[i]['max_batch']})"
                                          for _, c in curves]
            for i, point in enumerate(document["points"])]
    legend = [f"{w['name']}: {w['description']}" + _tested_text(w) for w in document["what_if"]]
    return (["what if: output tokens/s at the largest batch (that batch), the same model with another KV cache"]
            + [text.table(["context", *(name for name, _ in curves)], rows, align="l" + "r" * len(curves)), ""]
            + [line for item in legend for line in _wrap(item)])


def _tested_text(lever: dict) -> str:
    """'; measured: 3 point(s), the model within 5.0% of each (worst at 128k)', or '' untested."""
    worst = lever.get("measured_error_worst")
    if not lever.get("measured") or not worst:
        return ""
    from attnlab import text
    return (f"; measured: {len(lever['measured'])} point(s), the model within {100 * abs(worst['model_error']):.1f}% "
            f"of each (worst at {text.k(worst['seq_len'])}, {worst['kernel']}, run {worst['run_id']})")


def _wrap(paragraph: str) -> list:
    import textwrap
    return textwrap.wrap(paragraph, 100)
