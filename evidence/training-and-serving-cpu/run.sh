#!/usr/bin/env bash
# The lab's new modes run end to end on this kind of machine (2 CPU cores), kept beside this
# script in OUT (default: a folder named by today's date). CPU times say nothing of a GPU: these
# runs show that each mode is measured, checked against float64 and analysed.
#   training: cpu-small backward and fwd_bwd (naive, sdpa-flash, sdpa-math), 3 rounds, analysed;
#   serving decode: pages of 64 in FP8 (e4m3) with ragged lengths, beside a contiguous float32
#   cache of equal lengths, batch 4; the tiny served model with an FP8 cache in pages of 16.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${OUT:-$here/$(date -u +%Y-%m-%d)}"
mkdir -p "$out"
cd "$out"
attnlab=(python3 -m attnlab)
"${attnlab[@]}" sweep --modes backward,fwd_bwd --workload cpu-small --device cpu --rounds 3 --out training.jsonl
"${attnlab[@]}" analyze training.jsonl --out training-analysis --formats png > training-analysis.txt
decode=(sweep --modes decode --workload cpu-small --device cpu --kernels naive,sdpa-math --batch 4 --rounds 3)
"${attnlab[@]}" "${decode[@]}" --page-size 64 --kv-dtype fp8_e4m3 --lengths ragged:uniform:0.25 --out paged-fp8.jsonl
"${attnlab[@]}" "${decode[@]}" --out contiguous.jsonl
"${attnlab[@]}" e2e --model tiny --kv-dtype fp8_e4m3 --page-size 16 --device cpu --out e2e-fp8.jsonl
# What the Triton backward and the paged/FP8 decodes compile to on an H100 (sm_90), built here without a GPU.
"${attnlab[@]}" inspect --arch 90 --kernels triton,triton-decode,triton-decode-fused > inspect-sm90.txt
