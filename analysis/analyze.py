"""Everything `attnlab analyze` writes, as one library call: load, fit, roofline, claim, charts.

Files written into the output folder: fits.json and fits.csv (the fits, and every record left
out with its reason), roofline.csv (every standing ok prefill and decode point against its
peak), claim.json (the serving model, calibrated on the records where they allow),
charts/*.png and *.svg with a *.csv of what each draws.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from attnlab.analysis.claim import build_claim, infer_gpu
from collections import Counter

from attnlab.analysis.fits import fit_all, left_out, write_fits
from attnlab.analysis.load import label_this_machine, load
from attnlab.analysis.roofline import roofline
from attnlab.analysis.select import exclusion_kind
from attnlab.models import DEFAULT_MODEL

ROOFLINE_COLUMNS = ["run_id", "kernel", "mode", "workload", "device", "dtype", "seq_len", "achieved", "peak",
                    "peak_unit", "pct_of_peak", "peak_source"]


@dataclass
class Analysis:
    """What `analyze` found and wrote. `warnings` gathers everything it skipped, with reasons."""

    loaded: object
    fits: list
    roof: object
    claim: dict
    excluded: list = field(default_factory=list)
    charts: list = field(default_factory=list)
    files: list = field(default_factory=list)
    warnings: list = field(default_factory=list)

    @property
    def results(self):
        return self.loaded.results


def analyze(paths, out_dir, *, baseline=None, model=DEFAULT_MODEL, gpu=None, formats=("png", "svg"),
            charts: bool = True, n_boot: int = 2000, all_runs: bool = False, this_machine=()) -> Analysis:
    """Load `paths` (files or folders), analyse and write into `out_dir`. `gpu` is the claim
    model's GPU (preset or device name); by default the one the records name, else h100-sxm.
    Charts draw the one record that stands for each point; `all_runs` overlays every valid
    run instead, each as its own series. Runs read from the files in `this_machine` are
    labelled as this machine's. ValueError if the paths hold no result records."""
    loaded = load(paths)
    label_this_machine(loaded, this_machine)
    results = loaded.results
    if results.empty:
        raise ValueError(f"paths: no attnlab result records in {', '.join(map(str, paths))}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fits, skipped_fits = fit_all(results, environments=loaded.environments, n_boot=n_boot)
    excluded = left_out(results, fits)
    roof = roofline(results)
    claim, claim_notes = build_claim(model, gpu or infer_gpu(results) or "h100-sxm", results=results, fits=fits,
                                     environments=loaded.environments)
    files = write_fits(fits, out, skipped_fits, excluded) + _write_data(out, roof, claim)
    warnings = list(loaded.warnings) + _left_out_summary(excluded)
    warnings += [f"not fitted: {_key(s)}: {s['reason']}" for s in skipped_fits]
    warnings += [f"claim: {note}" for note in claim_notes]
    analysis = Analysis(loaded, fits, roof, claim, excluded=excluded, files=files, warnings=warnings)
    if charts:
        from attnlab.analysis.charts import render_all
        drawn, not_drawn = render_all(results, out / "charts", fits=fits, roof=roof, claim=claim,
                                      baseline=baseline, formats=formats, all_runs=all_runs)
        analysis.charts = drawn
        analysis.files += [path for chart in drawn for path in chart.files.values()]
        analysis.warnings += [f"chart not drawn: {reason}" for reason in not_drawn]
    return analysis


def _write_data(out: Path, roof, claim: dict) -> list:
    roof_path, claim_path = out / "roofline.csv", out / "claim.json"
    roof.reindex(columns=ROOFLINE_COLUMNS).to_csv(roof_path, index=False)
    claim_path.write_text(json.dumps(claim, indent=2) + "\n", encoding="utf-8")
    return [roof_path, claim_path]


def _left_out_summary(excluded: list) -> list:
    """One line for the records left out at loading, by kind: each is listed in fits.json."""
    kinds = Counter(exclusion_kind(e["reason"]) for e in excluded if _at_loading(e["reason"]))
    if not kinds:
        return []
    counts = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
    return [f"left out {sum(kinds.values())} record(s) ({counts}); fits.json 'excluded' lists each with its reason"]


def _at_loading(reason: str) -> bool:
    return reason.startswith(("invalid", "retracted", "superseded"))


def _key(item: dict) -> str:
    return " ".join(str(item.get(k)) for k in ("kernel", "mode", "workload", "device"))
