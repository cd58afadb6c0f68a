#!/usr/bin/env bash
# The GPU measurement suite, as one command run from the repository root:
#
#     OUT=/path/to/results bash suites/device_suite.sh
#
# Installs attnlab (no network), checks every kernel against float64, runs the GPU tests,
# sweeps llama3-8b prefill and decode from 1k to 128k with every available kernel, runs the
# variants (mistral-7b's 4096-key window, prefill and decode; eight packed documents, a varlen
# prefill), training (llama3-8b backward and forward+backward, 1k to 32k: triton beside sdpa-cudnn
# and sdpa-flash), the end-to-end llama3-8b decoder (triton-decode, then sdpa-flash while time is left)
# and the pytest-benchmark grid. $OUT receives suite.log (every step's output, exit code and
# duration) and suite.tar.gz holding:
#   environment.jsonl  check.txt  gpu-tests.xml  sweep.jsonl  sweep.nvml.csv  variants.jsonl  training.jsonl
#   e2e-<kernel>.jsonl  e2e-<kernel>.nvml.csv  benchmark.json  benchmark.nvml.csv
# All of it ends within ATTNLAB_SUITE_S seconds (default 540); see suite_steps.sh.

SUITE_DEFAULT_S=540
source "$(dirname "$0")/suite_steps.sh"
setup_steps "device suite"

step gpu-tests 90 330 "$PY" -m pytest -m gpu tests -q -p no:cacheprovider --junitxml="$RUN/gpu-tests.xml"

# The sweep gets what is left but the 320 s of the steps after it, the lengths the reports
# quote first (4k, 16k, 64k, 128k). Its --budget-s stops starting points 40 s before its
# box closes: room for the point in flight.
SWEEP_S=$(( $(left) - 320 - 10 ))
step sweep "$SWEEP_S" 320 "$PY" -m attnlab sweep --workload llama3-8b --modes prefill,decode \
    --seq-lens 1k,4k,16k,64k,128k,32k,8k,2k --device cuda --budget-s $(( SWEEP_S > 60 ? SWEEP_S - 40 : 20 )) \
    --out "$RUN/sweep.jsonl"

# Variants, into one file: a window makes prefill linear and decode flat past 4096 keys; packed
# documents attend only within themselves.
step variants 35 285 "$PY" -m attnlab sweep --workload mistral-7b --modes prefill,decode --seq-lens 16k,64k,4k \
    --kernels triton,triton-decode,flex,sdpa-efficient --device cuda --budget-s 20 --out "$RUN/variants.jsonl"
step varlen 35 250 "$PY" -m attnlab sweep --workload llama3-8b --docs 8 --modes prefill --seq-lens 16k,64k \
    --kernels triton,flex --device cuda --budget-s 20 --out "$RUN/variants.jsonl" --resume

# Training: the gradients alone (the forward run untimed before them) and forward plus backward,
# every point's dq, dk and dv checked against float64 on sampled rows first.
step training 50 200 "$PY" -m attnlab sweep --workload llama3-8b --modes backward,fwd_bwd \
    --kernels triton,sdpa-cudnn,sdpa-flash --seq-lens 1k,4k,16k,32k,2k,8k --rounds 3 --device cuda --budget-s 35 \
    --out "$RUN/training.jsonl"

# The served model: output tokens/s at the largest batch that fits, 1k to 128k.
step e2e-triton-decode 90 110 "$PY" -m attnlab e2e --model llama3-8b --kernels triton-decode \
    --seq-lens 1k,128k,2k,4k,8k,16k,32k,64k --budget-s 60 --out "$RUN/e2e-triton-decode.jsonl"
step e2e-sdpa-flash 60 70 "$PY" -m attnlab e2e --model llama3-8b --kernels sdpa-flash --seq-lens 1k,128k,16k \
    --budget-s 35 --out "$RUN/e2e-sdpa-flash.jsonl"

# Benchmarks stop starting after 35 s of the session, so pytest ends inside its box and
# writes the JSON (an interrupted pytest-benchmark may not).
step benchmark-grid 60 0 "$PY" -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider \
    --attnlab-seq-lens 1k,16k --attnlab-budget-s 0.1 --attnlab-energy-s 1.0 --attnlab-session-budget-s 35 \
    --attnlab-nvml-csv "$RUN/benchmark.nvml.csv" --benchmark-json="$RUN/benchmark.json"

finish
exit 0
