#!/usr/bin/env bash
# Two questions about `attnlab compare` on this kind of machine (2 CPU cores), answered from runs
# kept beside this script in OUT (default: a folder named by today's date):
#   A/A: six default sweeps of the same code, back to back; every pair compared both ways.
#   planted: the same sweep with a plugin kernel, then with it slowed 3x, then as at first.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${OUT:-$here/$(date -u +%Y-%m-%d)}"
mkdir -p "$out"
cd "$out"
for i in 1 2 3 4 5 6; do
    python3 -m attnlab sweep --out "aa$i.jsonl" > /dev/null
done
# compared A B FILE_A FILE_B: compare B against A, keep the document, say its exit status and counts.
compared() {
    local status=0
    python3 -m attnlab compare "$3" "$4" --json "compare-$1-$2.json" > /dev/null || status=$?
    echo "$1 $2 exit $status: $(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['counts'])" \
        "compare-$1-$2.json")"
}
for pair in "1 2" "3 4" "5 6" "1 3" "2 4" "3 5" "4 6" "1 6" "2 5"; do
    set -- $pair
    compared "aa$1" "aa$2" "aa$1.jsonl" "aa$2.jsonl"
    compared "aa$2" "aa$1" "aa$2.jsonl" "aa$1.jsonl"
done | tee aa.txt
plugin=(--kernel-module "$here/planted.py" --kernels naive,sdpa-flash,sdpa-math,planted)
PLANTED_REPEAT=1 python3 -m attnlab sweep "${plugin[@]}" --out planted-base.jsonl > /dev/null
PLANTED_REPEAT=3 python3 -m attnlab sweep "${plugin[@]}" --out planted-3x.jsonl > /dev/null || true
PLANTED_REPEAT=1 python3 -m attnlab sweep "${plugin[@]}" --out planted-again.jsonl > /dev/null
for pair in "base 3x" "3x again" "base again"; do
    set -- $pair
    python3 -m attnlab compare "planted-$1.jsonl" "planted-$2.jsonl" --json "compare-planted-$1-$2.json" \
        > "compare-planted-$1-$2.txt" || true
done
python3 - <<'PY' | tee planted.txt
import json
for name in ("base-3x", "3x-again", "base-again"):
    points = json.load(open(f"compare-planted-{name}.json"))["points"]
    by = {}
    for p in points:
        by.setdefault(p["verdict"], []).append(f"{p['kernel']} {p['mode']} {p['seq_len']}")
    print(name, {verdict: len(names) for verdict, names in by.items()},
          "regressed:", by.get("regressed", []), "improved:", by.get("improved", []))
PY
# The same question for two saved pytest-benchmark runs of the grid (cpu-small, five rounds).
for i in 1 2; do
    (cd "$here/../.." && python3 -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
        --benchmark-json="$out/grid$i.json" > /dev/null)
done
{ compared grid1 grid2 grid1.json grid2.json; compared grid2 grid1 grid2.json grid1.json; } | tee grid.txt
