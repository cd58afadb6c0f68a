#!/usr/bin/env bash
# The kernel comparison on one GPU, as one command of at most 7 minutes from the repository root:
#
#     OUT=/path/to/results PYTHON=python3 bash suites/kernel_suite.sh
#
# Side by side in one run, each sweep opening with its calibration records (bf16 matmul peak,
# device copy bandwidth):
#   prefill.jsonl   llama3-8b causal prefill, 4k to 128k: triton, triton-ws (warp-specialised),
#                   triton-ptr (its pointer-path ablation), sdpa-flash, sdpa-cudnn
#   fa-paper.jsonl  fa-paper non-causal prefill at 16k, the same kernels
#   decode.jsonl    llama3-8b decode, 16k to 128k and 1k: triton-decode, triton-decode-fused (one
#                   kernel per call), triton-decode-nopdl (the ablation without programmatic
#                   dependent launch), sdpa-flash, sdpa-cudnn
#   decode-read-flush.jsonl  triton-decode and sdpa-flash at 32k to 128k, the L2 emptied by a read
#   prefill-again.jsonl, decode-again.jsonl  the core lengths measured a second time
#   tuning.json     the tile autotuning chose for triton and triton-ptr, with every tile's time
# after the float64 check (check.txt), and then the GPU correctness matrix
# (tests/kernels/test_kernels_gpu.py, gpu-tests.xml) with what is left: a fresh machine compiles and
# autotunes every new shape there, so it may not finish; device_suite.sh runs every GPU test.
# $OUT receives suite.log and suite.tar.gz with these, environment.jsonl and the sweeps'
# .nvml.csv files. All of it ends within ATTNLAB_SUITE_S seconds (default 420).

SUITE_DEFAULT_S=420
source "$(dirname "$0")/suite_steps.sh"
setup_steps "kernel suite"

PREFILL_KERNELS=triton,triton-ws,triton-ptr,sdpa-flash,sdpa-cudnn
# sweep NAME SECONDS RESERVE ARGS...: an attnlab sweep that stops starting points 15 s
# before its box closes, room for the point in flight; three interleaved rounds a point, which
# fit the boxes (each round adds the call that checks the output and a warm-up).
sweep() {
    local name=$1 limit=$2 reserve=$3
    shift 3
    step "$name" "$limit" "$reserve" "$PY" -m attnlab sweep --device cuda --budget-s $(( limit - 15 )) \
        --rounds 3 --out "$RUN/$name.jsonl" "$@"
}
sweep prefill 110 300 --workload llama3-8b --modes prefill --kernels $PREFILL_KERNELS \
    --seq-lens 16k,128k,4k,64k,32k,8k
sweep fa-paper 35 265 --workload fa-paper --modes prefill --kernels $PREFILL_KERNELS --seq-lens 16k
sweep decode 45 220 --workload llama3-8b --modes decode \
    --kernels triton-decode,triton-decode-fused,triton-decode-nopdl,sdpa-flash,sdpa-cudnn \
    --seq-lens 32k,64k,128k,16k,1k
# The same decode with the L2 emptied by a read rather than a write: does the write-back of the
# default flush cost the streaming kernels their fixed ~30 us?
sweep decode-read-flush 30 190 --workload llama3-8b --modes decode --kernels triton-decode,triton-decode-fused,sdpa-flash \
    --seq-lens 32k,64k,128k --l2-flush read
# The core lengths again, a second run of the same kernels (interleaved within each length, as
# every sweep orders its points): two runs of one point say how far a difference is noise.
sweep prefill-again 45 130 --workload llama3-8b --modes prefill --kernels $PREFILL_KERNELS --seq-lens 16k,128k,4k
sweep decode-again 30 100 --workload llama3-8b --modes decode \
    --kernels triton-decode,triton-decode-fused,sdpa-flash,sdpa-cudnn --seq-lens 32k,128k
step tuning 40 60 "$PY" -m attnlab tune --workload llama3-8b --seq-lens 16k,128k --out "$RUN/tuning.json"

step gpu-tests 240 0 "$PY" -m pytest -m gpu tests/kernels/test_kernels_gpu.py -q -p no:cacheprovider \
    --junitxml="$RUN/gpu-tests.xml"
finish
exit 0
