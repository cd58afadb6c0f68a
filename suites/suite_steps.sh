# Shared by the device suites: sourced, never run. The sourcing script sets SUITE_DEFAULT_S;
# ATTNLAB_SUITE_S overrides it. Each step has its own time box and none depends on another's
# success, so one that fails or overruns loses only its own output; the archive
# $OUT/suite.tar.gz is written even when the suite is interrupted. The suites read the GPU's
# clocks and power settings and never change them.
# ATTNLAB_SUITE_DRY_RUN=1 prints each step's command instead of running it.

set -u

OUT="${OUT:?set OUT to the folder for the results}"
mkdir -p "$OUT"
LOG="$OUT/suite.log"
RUN="$(mktemp -d)"                   # results, packed into one archive at the end
PY="${PYTHON:-python}"
TOTAL_S="${ATTNLAB_SUITE_S:-$SUITE_DEFAULT_S}"    # the whole suite, kill margins included
DRY_RUN="${ATTNLAB_SUITE_DRY_RUN:-0}"
pack() { tar -czf "$OUT/suite.tar.gz" -C "$RUN" . ; }
trap pack EXIT
export PYTHONUNBUFFERED=1
SUITE_START=$(date +%s)

left() { echo $(( SUITE_START + TOTAL_S - $(date +%s) )); }

# step NAME SECONDS RESERVE COMMAND...: run COMMAND for at most SECONDS, and never into the
# RESERVE seconds kept for the steps after it; output and exit code go to the log. SIGINT
# first, so a sweep or pytest stops cleanly with what it has written; KILL 10 s later.
step() {
    local name=$1 limit=$2 reserve=$3
    shift 3
    if [[ "$DRY_RUN" == 1 ]]; then
        printf '%s\n' "$name: $*"
        return 0
    fi
    local room=$(( $(left) - reserve - 10 ))
    (( room < limit )) && limit=$room
    if (( limit < 5 )); then
        echo "=== $name: not run, no time left" >>"$LOG"
        return 0
    fi
    local start=$(date +%s)
    echo "=== $name (limit ${limit}s): $*" >>"$LOG"
    timeout -s INT -k 10 "$limit" "$@" >>"$LOG" 2>&1
    echo "=== $name: exit $? after $(( $(date +%s) - start ))s" >>"$LOG"
    return 0
}

# The first steps of every suite: the GPU's state (read only), attnlab installed without
# network, and the environment line the results are read with.
setup_steps() {
    echo "attnlab $1, $(date -u +%Y-%m-%dT%H:%M:%SZ), ${HOSTNAME:-}" >"$LOG"
    step gpu-info 15 200 nvidia-smi -q -d CLOCK,POWER,PERFORMANCE,TEMPERATURE
    step install 60 200 "$PY" -m pip install --no-deps --no-build-isolation -e .
    step environment 30 200 "$PY" -c "
import json, sys
from attnlab.bench.records import environment, jsonable
open('$RUN/environment.jsonl', 'w').write(json.dumps(jsonable(environment(sys.argv))) + '\\n')
"
    step kernels 20 200 "$PY" -m attnlab kernels
    step check 45 200 bash -c "'$PY' -m attnlab check --dtype bfloat16 > '$RUN/check.txt' 2>&1; s=\$?; cat '$RUN/check.txt'; exit \$s"
}

finish() {
    echo "=== suite done after $(( $(date +%s) - SUITE_START ))s; files:" >>"$LOG"
    ls -l "$RUN" >>"$LOG" 2>&1
}
