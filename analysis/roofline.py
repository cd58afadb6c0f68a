"""How close each point came to what the GPU can do: percent of the compute peak for prefill
(compute-bound) and of the memory bandwidth for decode (bound by reading the KV cache).

Peaks come from the run's own calibration records (a bf16 matmul and a device copy) where
it has them, otherwise from the spec table below; every row says which it used.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from attnlab.analysis import _deps
from attnlab.analysis.select import point_labels, standing_ok
from attnlab.schema import CALIBRATION, DECODE, QUADRATIC_MODES

# Spec peaks are for bf16/fp16 on tensor cores; other dtypes get no percentage.
TENSOR_CORE_DTYPES = ("bf16", "bfloat16", "fp16", "float16", "half")


@dataclass(frozen=True)
class GpuSpec:
    """Vendor spec figures: dense bf16 TFLOP/s (no sparsity), HBM GB/s (1e9 bytes/s), memory
    in GiB as the device reports it (approximately), board power in W."""

    key: str
    name: str
    bf16_tflops: float
    bandwidth_gbps: float
    memory_gib: float
    power_w: float

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * 2**30


_SPECS = (
    GpuSpec("h100-sxm", "H100 SXM 80GB", 989.4, 3350, 80, 700),
    GpuSpec("h100-pcie", "H100 PCIe 80GB", 756.5, 2000, 80, 350),
    GpuSpec("h100-nvl", "H100 NVL 94GB", 835.5, 3900, 94, 400),
    GpuSpec("h200", "H200 SXM 141GB", 989.4, 4800, 140, 700),
    GpuSpec("h200-nvl", "H200 NVL 141GB", 835.5, 4800, 140, 600),
    GpuSpec("a100-80gb", "A100 SXM 80GB", 312, 2039, 80, 400),
    GpuSpec("a100-40gb", "A100 SXM 40GB", 312, 1555, 40, 400),
    GpuSpec("a100-pcie-80gb", "A100 PCIe 80GB", 312, 1935, 80, 300),
    GpuSpec("a100-pcie-40gb", "A100 PCIe 40GB", 312, 1555, 40, 250),
    GpuSpec("b200", "B200 180GB", 2250, 8000, 180, 1000),
    GpuSpec("l40s", "L40S 48GB", 362, 864, 48, 350),
    GpuSpec("l4", "L4 24GB", 121, 300, 24, 72),
    GpuSpec("a10", "A10 24GB", 125, 600, 24, 150),
)
GPU_SPECS = {spec.key: spec for spec in _SPECS}


def _tokens(name: str) -> set:
    return set(re.sub(r"[^a-z0-9]+", " ", name.lower()).split())


def match_gpu(name) -> GpuSpec | None:
    """The spec for a device name as CUDA or NVML reports it ("NVIDIA H100 80GB HBM3",
    "NVIDIA A100-SXM4-40GB", "NVIDIA H100 PCIe") or a preset key ("h100-sxm"); None if unknown.
    Whole tokens only, so "GH200" is not taken for an H200."""
    if not name:
        return None
    if str(name).lower() in GPU_SPECS:
        return GPU_SPECS[str(name).lower()]
    t = _tokens(str(name))
    if "h200" in t:
        return GPU_SPECS["h200-nvl" if "nvl" in t else "h200"]
    if "h100" in t:
        return GPU_SPECS["h100-pcie" if "pcie" in t else "h100-nvl" if "nvl" in t else "h100-sxm"]
    if "a100" in t:
        size = "40gb" if t & {"40gb", "40g", "40"} else "80gb"
        return GPU_SPECS[f"a100-pcie-{size}" if "pcie" in t else f"a100-{size}"]
    for key in ("b200", "l40s", "l4", "a10"):
        if key in t:
            return GPU_SPECS[key]
    return None


def gpu_spec(gpu) -> GpuSpec:
    """A GpuSpec, a preset key or a device name; ValueError naming the choices if unknown."""
    if isinstance(gpu, GpuSpec):
        return gpu
    spec = match_gpu(gpu)
    if spec is None:
        raise ValueError(f"gpu: {gpu!r} is not a known GPU; expected one of {', '.join(GPU_SPECS)} "
                         f"or a device name containing one (e.g. 'NVIDIA H100 80GB HBM3')")
    return spec


def measured_peaks(results) -> dict:
    """{run_id: {"tflops": ..., "gbps": ...}} from ok calibration records (the best of each kind)."""
    peaks = {}
    ok = standing_ok(results)
    calibration = ok[ok["mode"] == CALIBRATION]
    for run_id, rows in calibration.groupby("run_id"):
        matmul = rows[rows["kernel"].str.startswith("matmul")]["tflops"].dropna()
        copy = rows[rows["kernel"].str.contains("copy")]["gbps"].dropna()
        peaks[run_id] = {"tflops": float(matmul.max()) if len(matmul) else None,
                         "gbps": float(copy.max()) if len(copy) else None}
    return peaks


def peak_for(row, measured: dict) -> tuple:
    """(peak, unit, source) that a row is judged against: the compute peak for prefill, backward
    and fwd_bwd (the training modes do the same matmuls, 2.5 and 3.5 times over), bandwidth for decode."""
    compute = row["mode"] in QUADRATIC_MODES
    kind, unit = ("tflops", "TFLOP/s") if compute else ("gbps", "GB/s")
    if str(row["dtype"]).lower().removeprefix("torch.") not in TENSOR_CORE_DTYPES:
        return None, unit, f"no peak for dtype {row['dtype']} (peaks are for bf16/fp16)"
    value = (measured.get(row["run_id"]) or {}).get(kind)
    if value:
        what = "bf16 matmul" if compute else "device copy"
        return value, unit, f"measured: {what} calibration in run {row['run_id']}"
    spec = match_gpu(row["device"])
    if spec is None:
        return None, unit, f"no calibration in the run and no spec for device {row['device']!r}"
    return (spec.bf16_tflops if compute else spec.bandwidth_gbps), unit, f"spec: {spec.name}"


def roofline(results):
    """Standing ok kernel-mode rows with `peak`, `peak_unit`, `peak_source`, `achieved` and
    `pct_of_peak` (compute for prefill, backward and fwd_bwd, bandwidth for decode)."""
    pd = _deps.pandas("the roofline view")
    ok = standing_ok(results)
    rows = ok[ok["mode"].isin((*QUADRATIC_MODES, DECODE))].copy()
    measured = measured_peaks(results)
    columns = ["peak", "peak_unit", "peak_source"]
    if rows.empty:
        return rows.assign(**{c: pd.Series(dtype=object) for c in columns}, achieved=[], pct_of_peak=[])
    rows[columns] = pd.DataFrame([peak_for(r, measured) for _, r in rows.iterrows()], index=rows.index)
    rows["peak"] = pd.to_numeric(rows["peak"], errors="coerce")
    rows["achieved"] = rows["tflops"].where(rows["mode"].isin(QUADRATIC_MODES), rows["gbps"])
    rows["pct_of_peak"] = 100.0 * rows["achieved"] / rows["peak"]
    return rows


def roofline_summary(roof):
    """One row per curve (kernel, mode, workload, device, dtype, and the options that tell its
    records from the kernel's others, named in `label`: 'triton-decode, q len 4'): the share
    of peak at the longest length and the best share, with the peak's source."""
    keys = ["kernel", "mode", "workload", "device", "dtype", "label"]
    labels = point_labels(roof, roof["kernel"], within=keys[1:5])[0] if len(roof) else roof["kernel"]
    out = []
    for key, rows in roof.assign(label=labels).sort_values("seq_len").groupby(keys, sort=True):
        last = rows.iloc[-1]
        best = rows.loc[rows["pct_of_peak"].idxmax()] if rows["pct_of_peak"].notna().any() else last
        out.append({**dict(zip(keys, key)), "peak": last["peak"], "peak_unit": last["peak_unit"],
                    "peak_source": last["peak_source"], "longest_seq_len": int(last["seq_len"]),
                    "pct_at_longest": last["pct_of_peak"], "best_pct": best["pct_of_peak"],
                    "best_seq_len": int(best["seq_len"])})
    return _deps.pandas("the roofline view").DataFrame(out)
