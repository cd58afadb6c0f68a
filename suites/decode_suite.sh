#!/usr/bin/env bash
# Decode as servers run it, on one GPU, as one command of at most 8 minutes from the repository root:
#
#     OUT=/path/to/results PYTHON=python3 bash suites/decode_suite.sh
#
# Every decode point is checked against float64 (its pages gathered, its 8-bit values times their
# descales) before it is timed; each sweep opens with its calibration records. Side by side:
#   paged.jsonl    llama3-8b decode, batch 16, at 1k, 8k and 32k: a contiguous cache, then pages of
#                  16, 64 and 256 tokens in shuffled physical order (does the page size cost
#                  bandwidth, as it does flash-attention on a B200, PR 2104?)
#   fp8.jsonl      llama3-8b decode, batch 1, 1k to 128k: the cache in bf16 and in fp8_e4m3 (a byte an
#                  element, a descale per sequence and kv head), contiguous and in pages of 64
#   ragged.jsonl   llama3-8b decode, batch 16, pages of 64, at 8k and 32k: every sequence the full
#                  context, then lengths drawn from a quarter of it to all of it (seed 0; the
#                  records hold each point's min, median and max)
#   e2e-fp8.jsonl  the served model at 1k and 120k with an fp8 cache in pages of 64, then the same
#                  model with its bf16 cache: what the claim's kv-fp8 what-if is tested against
# $OUT receives suite.log and suite.tar.gz with these, environment.jsonl, check.txt and the
# .nvml.csv files. All of it ends within ATTNLAB_SUITE_S seconds (default 480).

SUITE_DEFAULT_S=480
source "$(dirname "$0")/suite_steps.sh"
setup_steps "decode suite"

DECODE_KERNELS=triton-decode,triton-decode-fused,flash-attn,sdpa-flash
# sweep NAME SECONDS RESERVE ARGS...: a decode sweep of llama3-8b into $RUN/NAME.jsonl (resumed, so
# that each step adds its points to the file the step before it opened) that stops starting
# points 10 s before its box closes; three interleaved rounds a point.
sweep() {
    local name=$1 file=$2 limit=$3 reserve=$4
    shift 4
    local resume=()
    [[ -s "$RUN/$file.jsonl" ]] && resume=(--resume)
    step "$name" "$limit" "$reserve" "$PY" -m attnlab sweep --workload llama3-8b --modes decode --device cuda \
        --rounds 3 --budget-s $(( limit - 10 )) --out "$RUN/$file.jsonl" "${resume[@]}" "$@"
}

sweep paged-contiguous paged 30 330 --batch 16 --kernels $DECODE_KERNELS --seq-lens 32k,8k,1k
sweep paged-16 paged 30 300 --batch 16 --kernels $DECODE_KERNELS --seq-lens 32k,8k,1k --page-size 16
sweep paged-64 paged 30 270 --batch 16 --kernels $DECODE_KERNELS --seq-lens 32k,8k,1k --page-size 64
sweep paged-256 paged 30 240 --batch 16 --kernels $DECODE_KERNELS --seq-lens 32k,8k,1k --page-size 256

sweep fp8-bf16 fp8 30 210 --kernels triton-decode,triton-decode-fused,sdpa-flash --seq-lens 128k,16k,1k
sweep fp8 fp8 30 180 --kernels triton-decode,triton-decode-fused,sdpa-flash --seq-lens 128k,16k,1k \
    --kv-dtype fp8_e4m3
sweep fp8-paged fp8 25 155 --kernels triton-decode,triton-decode-fused,sdpa-flash --seq-lens 128k,16k,1k \
    --kv-dtype fp8_e4m3 --page-size 64

sweep ragged-equal ragged 25 130 --batch 16 --kernels triton-decode,triton-decode-fused,flash-attn \
    --seq-lens 32k,8k --page-size 64
sweep ragged ragged 25 105 --batch 16 --kernels triton-decode,triton-decode-fused,flash-attn \
    --seq-lens 32k,8k --page-size 64 --lengths ragged:uniform:0.25

# The served model: the largest batch that fits an fp8 cache (a byte a cached element), then bf16.
step e2e-fp8 55 50 "$PY" -m attnlab e2e --model llama3-8b --kernels triton-decode --kv-dtype fp8_e4m3 \
    --page-size 64 --seq-lens 1k,120k --budget-s 40 --out "$RUN/e2e-fp8.jsonl"
step e2e-bf16 45 0 "$PY" -m attnlab e2e --model llama3-8b --kernels triton-decode --seq-lens 1k,120k \
    --budget-s 30 --out "$RUN/e2e-fp8.jsonl"

finish
exit 0
