#!/usr/bin/env bash
# Install attnlab (editable) with the extras named in $1 (default: analysis,nvml).
# A machine without torch gets the pinned CPU set from requirements-ci.txt; a machine that
# has torch (a GPU box) keeps its torch and Triton and gets only what is missing.
set -euo pipefail
cd "$(dirname "$0")"
extras=${1:-analysis,nvml}
if ! python3 -c "import torch" 2>/dev/null; then
    python3 -m pip install -q -r requirements-ci.txt
fi
python3 -m pip install -q -e ".[$extras]"
