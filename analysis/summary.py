"""The report's first section: the answer before the evidence.

One headline table per workload: each kernel's time and rate at a few context lengths, beside
the best peer measured in the same run (same card, same state), with the ratio; the caption
names the run (and card) behind each column, and says so where the columns come from several
cards. Then a few plain sentences on what the data say, each computed from the records, the
fits and the claim.
"""
from __future__ import annotations

from collections import Counter

from attnlab import text as fmt
from attnlab.analysis.claim import validation_brief
from attnlab.analysis.conditions import cards_of, named_run, record_cards, several_cards_note
from attnlab.analysis.select import POINT_KEY, SAME_POINT, exclusion_kind, point_labels, standing_ok
from attnlab.schema import BACKWARD, DECODE, FWD_BWD, OK, PREFILL

RATE = {PREFILL: ("tflops", "TFLOP/s", "matmul"), DECODE: ("gbps", "GB/s", "copy"),
        BACKWARD: ("tflops", "TFLOP/s", "matmul"), FWD_BWD: ("tflops", "TFLOP/s", "matmul")}
HEADLINE_LENGTHS = 3
MAX_SENTENCES = 5
GROUP = ["mode", "workload", "device", "dtype"]
PEER_KEY = ["run_id", *SAME_POINT]      # a peer: another kernel's record of the same point in the same run


def headline_blocks(results) -> list:
    """A note and one table per (mode, workload, device, dtype) of standing ok records."""
    ok = standing_ok(results)
    ok = ok[ok["mode"].isin(RATE)]
    peers = _valid_ok(results)
    blocks = []
    for key in _workloads(results):
        mode, workload, device, dtype = key
        rows = _of(ok, key)
        rows = rows.assign(label=point_labels(rows, rows["kernel"], within=GROUP)[0])
        rate, unit, _ = RATE[mode]
        lengths = _some(sorted(set(rows["seq_len"])))
        table = [[label] + [_cell(rows, peers, label, n, rate, unit) for n in lengths]
                 for label in sorted(set(rows["label"]))]
        table = [row for row in table if any(cell != "-" for cell in row[1:])]
        blocks.append(("p", f"{workload} {mode}, {dtype}, {device}: median ms per call and {unit}; in brackets the "
                            f"best other kernel of the same run over this one (above 1: this one is faster). "
                            f"{_columns_text(rows, lengths)}"))
        blocks.append(("table", ["kernel", *(fmt.k(n) for n in lengths)], table))
    return blocks or [("p", "No ok prefill or decode records.")]


def _columns_text(rows, lengths: list) -> str:
    """'Runs by column: 1k: run A (card a); 16k: run B (card b).', and a warning where the
    columns come from several cards: compare within a column, where one run set them side by side."""
    cards = record_cards(rows)
    shown = rows[rows["seq_len"].isin(lengths)]
    columns = "; ".join(f"{fmt.k(n)}: run {', '.join(named_run(r, cards) for r in sorted(set(group['run_id'])))}"
                        for n, group in shown.groupby("seq_len"))
    several = several_cards_note(cards_of(shown))
    apart = f"; {several}: compare kernels within a column, not one column with another" if several else ""
    return f"Runs by column: {columns}{apart}."


def _of(rows, key):
    """The rows of one (mode, workload, device, dtype) group."""
    return rows[(rows[GROUP].astype(str) == [str(v) for v in key]).all(axis=1)]


def _valid_ok(results):
    return results[results["valid"] & (results["status"] == OK) & results["mode"].isin(RATE)]


def _some(lengths: list) -> list:
    """The shortest, the longest and one between: where fixed costs, the middle and the
    asymptote show."""
    if len(lengths) <= HEADLINE_LENGTHS:
        return lengths
    return [lengths[0], lengths[len(lengths) // 2], lengths[-1]]


def _cell(rows, peers, label: str, seq_len, rate: str, unit: str) -> str:
    """The record of the series `label` (a kernel and what tells its records apart) at `seq_len`."""
    mine = rows[(rows["label"] == label) & (rows["seq_len"] == seq_len)]
    if mine.empty:
        return "-"
    record = mine.iloc[0]
    text = f"{fmt.num(record['median_ms'])} ms, {fmt.num(record[rate])} {unit}"
    peer = best_peer(peers, record)
    return text if peer is None else f"{text} ({peer['median_ms'] / record['median_ms']:.2f}x {peer['kernel']})"


def best_peer(peers, record):
    """The fastest other kernel's record of the same point in the same run, or None."""
    same = _matching(peers, record, PEER_KEY)
    same = same[same["kernel"] != record["kernel"]]
    return None if same.empty else same.loc[same["median_ms"].idxmin()]


def _matching(rows, record, columns):
    """The rows of `rows` that agree with `record` on `columns` (those the rows have)."""
    for column in (c for c in columns if c in rows):
        rows = rows[rows[column].map(str) == str(record.get(column))]     # as text: a missing value matches itself
    return rows


# --- sentences ---------------------------------------------------------------------------------

def sentences(results, roof, claim: dict, excluded: list) -> list:
    """Three to five sentences: the fastest kernel of each workload at its longest length, the
    claim, and what was left out."""
    said = [s for s in (_fastest(results, roof, key) for key in _workloads(results)) if s]
    said = said[:MAX_SENTENCES - 2]
    if claim and claim.get("ratio_max_batch"):
        said.append(_claim_sentence(claim))
    if excluded:
        said.append(_left_out_sentence(results, excluded))
    return said


def _workloads(results) -> list:
    ok = standing_ok(results)
    ok = ok[ok["mode"].isin(RATE)]
    # The workloads measured at the most lengths first, prefill before decode: they say the most.
    sizes = ok.groupby(GROUP)["seq_len"].nunique()
    return sorted(sizes.index, key=lambda key: (-sizes[key], key[0] != PREFILL, key))


def _fastest(results, roof, key) -> str | None:
    """'<workload> <mode> at <n> on <device>: <kernel> is fastest, ...; others take Nx its time.'"""
    mode, workload, device, dtype = key
    ok = standing_ok(results)
    rows = _of(ok, key)
    longest = rows[rows["seq_len"] == rows["seq_len"].max()]
    best = longest.loc[longest["median_ms"].idxmin()]
    rate, unit, peak_kind = RATE[mode]
    same_point = _matching(_valid_ok(results), best, PEER_KEY)
    others = same_point[same_point["kernel"] != best["kernel"]].sort_values("median_ms")
    text = (f"{workload} {mode} at {fmt.k(best['seq_len'])} on {device}, run {best['run_id']}: {best['kernel']} "
            f"is fastest, {fmt.num(best['median_ms'])} ms ({fmt.num(best[rate])} {unit}"
            f"{_share(roof, best, peak_kind)})")
    if not others.empty:
        slower = ", ".join(f"{r['kernel']} {r['median_ms'] / best['median_ms']:.2f}x" for _, r in others.iterrows())
        text += f"; in the same run the others take {slower} its time"
    return text + "."


def _share(roof, record, peak_kind: str) -> str:
    """', 77% of the measured matmul' where the roofline has the record's share of its peak."""
    if roof is None or roof.empty:
        return ""
    row = _matching(roof, record, ("run_id", *POINT_KEY))
    if row.empty or fmt.missing(row.iloc[0]["pct_of_peak"]):
        return ""
    source = str(row.iloc[0]["peak_source"])
    where = f"the measured {peak_kind}" if source.startswith("measured") else "the spec peak"
    return f", {row.iloc[0]['pct_of_peak']:.0f}% of {where}"


def _claim_sentence(claim: dict) -> str:
    c, f = claim["claim"], claim["factors"]
    text = (f"The claim ({c['short_tok_s']:,} output tokens/s at {fmt.k(c['short_ctx'])}, {c['long_tok_s']} at "
            f"{fmt.k(c['long_ctx'])}, {c['short_tok_s'] / c['long_tok_s']:.0f}x): the model gives "
            f"{claim['ratio_max_batch']:.0f}x, because the largest batch falls {f['batch_falls']:.0f}x as the KV "
            f"cache fills memory while a step's time changes {f['step_time_grows']:.2f}x")
    measured = [r for r in claim.get("ratios_side_by_side", []) if r["what"] == "attnlab measured"]
    if measured:
        text += "; attnlab measured " + ", ".join(
            f"{r['ratio']:.0f}x with {r['kernel']} from {fmt.k(r['short_ctx'])} to {fmt.k(r['long_ctx'])} in run "
            f"{r.get('run_id')}" for r in measured)
    brief = validation_brief(claim.get("validation"))
    return text + (f"; {brief}" if brief else "") + "."


def _left_out_sentence(results, excluded: list) -> str:
    kinds = Counter(exclusion_kind(entry["reason"]) for entry in excluded)
    parts = ", ".join(f"{count} {kind}" for kind, count in kinds.most_common())
    return (f"{len(excluded)} of {len(results)} records are left out of the fits ({parts}); the last sections "
            f"list each with its reason.")
