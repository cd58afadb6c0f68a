#!/usr/bin/env bash
# How long the README's test command takes on this kind of machine (2 CPU cores), and the quick
# loop without the slow tests: the last lines of each run (its slowest tests, its counts, its
# time) kept in OUT (default: a folder named by today's date).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${OUT:-$here/$(date -u +%Y-%m-%d)}"
mkdir -p "$out"
cd "$here/../.."
{ time python3 -m pytest -q -n 2 -p no:cacheprovider --durations=50; } 2>&1 | tail -60 > "$out/all.txt"
{ time python3 -m pytest -q -n 2 -p no:cacheprovider -m "not slow"; } 2>&1 | tail -5 > "$out/not-slow.txt"
