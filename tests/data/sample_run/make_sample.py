"""Regenerate the synthetic sample in this folder: `python tests/data/sample_run/make_sample.py`.

The numbers are invented to look like an H100 run of the llama3-8b workload (they follow
a + b n + c n^2 with lognormal noise); they are not a measurement.
"""
import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
RUN_ID = "sample-h100-20261127"
DEVICE = "NVIDIA H100 80GB HBM3"
FREE_BYTES = 79.1 * 2**30
SEQ_LENS = [1024 * 2**i for i in range(8)]
SHAPE = {"workload": "llama3-8b", "batch": 1, "heads": 32, "kv_heads": 8, "head_dim": 128, "dtype": "bf16",
         "causal": True}
# (a ms, b ms/token, c ms/token^2) per kernel and mode.
CURVES = {
    ("triton", "prefill"): (0.015, 2.0e-6, 1.95e-8),
    ("sdpa-flash", "prefill"): (0.012, 2.5e-6, 2.45e-8),
    ("sdpa-cudnn", "prefill"): (0.020, 1.5e-6, 1.50e-8),
    ("naive", "prefill"): (0.030, 1.0e-5, 1.20e-7),
    ("triton-decode", "decode"): (0.010, 1.9e-6, 0.0),
    ("sdpa-flash", "decode"): (0.008, 8.0e-6, 0.0),
    ("naive", "decode"): (0.020, 1.4e-5, 0.0),
}


def bare(kernel, mode, n):
    """The fields a point has before it runs: shape, work and predicted memory."""
    b, h, kvh, d = SHAPE["batch"], SHAPE["heads"], SHAPE["kv_heads"], SHAPE["head_dim"]
    q_len = n if mode == "prefill" else 1
    flops = 4 * b * h * q_len * n * d / (2 if mode == "prefill" else 1)
    moved = (2 * h * q_len + 2 * kvh * n) * d * 2 * b
    predicted = moved + (b * h * q_len * n * 12 if kernel == "naive" else 0) + 64 * 2**20
    return {"schema": "attnlab.result/1", "run_id": RUN_ID, "kernel": kernel, "mode": mode, **SHAPE,
            "seq_len": n, "q_len": q_len, "flops": flops, "bytes": moved, "predicted_mem_bytes": predicted,
            "device": DEVICE, "reason": None, "times_ms": [], "median_ms": None}


def record(rng, kernel, mode, n, **extra):
    base = bare(kernel, mode, n)
    b, q_len, flops, moved, predicted = (base[k] for k in ("batch", "q_len", "flops", "bytes", "predicted_mem_bytes"))
    if predicted > FREE_BYTES:
        return {**base, "status": "oom", "reason": f"predicted peak {predicted / 1e9:.1f} GB exceeds free memory "
                                                   f"{FREE_BYTES / 1e9:.1f} GB; not launched"}
    a, lin, quad = CURVES[(kernel, mode)]
    times = (a + lin * n + quad * n * n) * np.exp(rng.normal(0, 0.015, 12))
    median = float(np.median(times))
    power = min(690.0, 180 + 70 * np.log2(n / 512)) if mode == "prefill" else min(420.0, 150 + 35 * np.log2(n / 512))
    tokens = b * q_len
    energy = power * median / 1e3
    return {**base, "status": "ok", "times_ms": [round(float(t), 6) for t in times], "median_ms": median,
            "p10_ms": float(np.percentile(times, 10)), "p90_ms": float(np.percentile(times, 90)),
            "tflops": flops / median / 1e9, "gbps": moved / median / 1e6, "tokens_per_s": tokens / median * 1e3,
            "peak_mem_bytes": int(predicted * 1.02), "power_w_mean": power, "power_w_max": power * 1.08,
            "energy_j": energy, "joules_per_token": energy / tokens, **extra}


def e2e_records():
    """Step times made, operation by operation, from known rates: the weights streamed at the
    sample's copy bandwidth, the KV cache read at triton-decode's marginal bandwidth (bytes per
    token over its curve's b), the GEMMs at 60% of the sample's matmul, 1 ms of overhead; at
    the batches the planner (attnlab.models) would choose on 80 GiB. The claim model's
    calibration should recover these rates."""
    from attnlab import models
    config = models.PRESETS["llama3-8b"]
    copy_bytes_s, matmul_flops_s, overhead_ms = 2941e9, 0.6 * 712.4e12, 1.0
    kv_bytes_s = 2 * 8 * 128 * 2 / (CURVES[("triton-decode", "decode")][1] * 1e-3)
    gemms = [(g, config.layers) for g in config.layer_gemms()] + [(config.lm_head_gemm(), 1)]
    out = []
    for n in SEQ_LENS:
        batch = models.largest_batch(config, n, 128, models.budget_from_total(80 * 2**30),
                                     attention=models.AttentionMemory(), dtype_bytes=2, graph=True)
        gemm_s = sum(max(count * g.params * 2 / copy_bytes_s, 2 * batch * count * g.params / matmul_flops_s)
                     for g, count in gemms)
        kv_s = batch * (n + 64) * config.kv_bytes_per_token(2) / kv_bytes_s
        step_ms = 1e3 * (gemm_s + kv_s) + overhead_ms
        out.append({"schema": "attnlab.result/1", "run_id": RUN_ID, "kernel": "triton-decode", "mode": "e2e-decode",
                    "workload": "llama3-8b", "model": "llama3-8b", "batch": batch, "heads": 32, "kv_heads": 8,
                    "head_dim": 128, "dtype": "bf16", "causal": True, "seq_len": n, "q_len": 1, "status": "ok",
                    "reason": None, "times_ms": [], "median_ms": step_ms, "p10_ms": step_ms * 0.99,
                    "p90_ms": step_ms * 1.01, "tokens_per_s": 1e3 * batch / step_ms, "cuda_graph": True,
                    "peak_mem_bytes": int(0.9 * 80 * 2**30), "power_w_mean": 560.0, "power_w_max": 640.0,
                    "joules_per_token": 560.0 * step_ms / 1e3 / batch, "device": DEVICE})
    return out


def main():
    rng = np.random.default_rng(20261127)
    lines = [{"schema": "attnlab.environment/1", "run_id": RUN_ID, "gpu_name": DEVICE,
              "gpu_uuid": "GPU-00000000-sample", "driver": "550.90.07", "cuda": "12.4", "torch": "2.13.0",
              "triton": "3.9.0", "flash_attn": None, "power_limit_w": 700,
              "clocks": {"sm_mhz": 1980, "mem_mhz": 2619}, "git_commit": "sample", "host": "sample-host",
              "time": "2026-11-27T12:00:00Z", "argv": ["attnlab", "sweep", "--workload", "llama3-8b"],
              "synthetic": True},
             {"schema": "attnlab.result/1", "run_id": RUN_ID, "kernel": "matmul-bf16", "mode": "calibration",
              "status": "ok", "tflops": 712.4, "median_ms": 1.543, "device": DEVICE, "dtype": "bf16"},
             {"schema": "attnlab.result/1", "run_id": RUN_ID, "kernel": "copy", "mode": "calibration",
              "status": "ok", "gbps": 2941.0, "median_ms": 0.73, "device": DEVICE}]
    for (kernel, mode) in CURVES:
        for n in SEQ_LENS:
            if kernel == "sdpa-cudnn" and n == SEQ_LENS[-1]:
                lines.append({**bare(kernel, mode, n), "status": "error",
                              "reason": "RuntimeError: cuDNN Frontend error: no execution plan supports the graph"})
                continue
            lines.append(record(rng, kernel, mode, n))
    for n in SEQ_LENS:
        lines.append({**bare("flash-attn", "prefill", n), "status": "unsupported",
                      "reason": "flash_attn is not installed"})
    lines += e2e_records()
    (HERE / "results.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    write_benchmark_json(rng)


def write_benchmark_json(rng):
    benchmarks = []
    for kernel in ("triton", "sdpa-flash"):
        for n in (1024, 4096, 16384):
            rec = record(rng, kernel, "prefill", n)
            rec["run_id"] = RUN_ID + "-pytest-benchmark"
            data = [t / 1e3 for t in rec["times_ms"]]
            if kernel == "sdpa-flash":  # this one leaves times to the stats, as the format allows
                for key in ("times_ms", "median_ms", "p10_ms", "p90_ms"):
                    rec.pop(key)
            benchmarks.append({
                "group": f"prefill llama3-8b seq_len={n}", "name": f"test_prefill[{kernel}-{n}]",
                "fullname": f"bench/test_bench.py::test_prefill[{kernel}-{n}]",
                "params": {"kernel": kernel, "seq_len": n}, "param": f"{kernel}-{n}", "extra_info": rec,
                "options": {"disable_gc": False, "timer": "perf_counter", "min_rounds": 5, "max_time": 1.0,
                            "min_time": 5e-06, "warmup": False},
                "stats": {"min": min(data), "max": max(data), "mean": float(np.mean(data)),
                          "stddev": float(np.std(data, ddof=1)), "rounds": len(data),
                          "median": float(np.median(data)), "iqr": float(np.subtract(*np.percentile(data, [75, 25]))),
                          "q1": float(np.percentile(data, 25)), "q3": float(np.percentile(data, 75)),
                          "iqr_outliers": 0, "stddev_outliers": 1, "outliers": "1;0",
                          "ld15iqr": min(data), "hd15iqr": max(data), "ops": 1 / float(np.mean(data)),
                          "total": float(np.sum(data)), "data": data, "iterations": 1}})
    document = {
        "machine_info": {"node": "sample-host", "processor": "x86_64", "machine": "x86_64",
                         "python_compiler": "GCC 12.2.0", "python_implementation": "CPython",
                         "python_implementation_version": "3.11.7", "python_version": "3.11.7",
                         "python_build": ["main", "May  9 2026 07:35:25"], "release": "6.8.0", "system": "Linux",
                         "cpu": {"python_version": "3.11.7.final.0 (64 bit)", "arch": "X86_64", "bits": 64,
                                 "count": 32, "brand_raw": "AMD EPYC 9454"}},
        "commit_info": {"id": "sample", "time": "2026-11-27T11:00:00+00:00", "author_time": "2026-11-27T11:00:00+00:00",
                        "dirty": False, "project": "attnlab", "branch": "main"},
        "benchmarks": benchmarks, "datetime": "2026-11-27T12:30:00.000000+00:00", "version": "5.2.3"}
    (HERE / "benchmark.json").write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
