"""What the compiler makes of each Triton implementation, for a named GPU, without a GPU.

    python -m attnlab.kernels.inspect --arch 90 [--kernels triton,triton-decode] [--out FILE]   # JSON rows

An implementation that declares `builds` (register_kernel) says which kernels one call
launches and with which arguments; each is compiled as Triton's JIT would compile it for
those arguments (an integer equal to 1 becomes a constant, pointers and integers divisible by
16 are marked so: without that, loads neither vectorise nor pipeline, and the build would not
be the one a GPU runs), then read: registers and spills from ptxas, shared memory, wgmma or
mma, TMA and cp.async copies, warp specialisation, setmaxnreg, programmatic launch, and SASS
instruction counts where the Triton wheel's nvdisasm serves.

Run in its own process without TRITON_INTERPRET (`attnlab inspect` does): Triton chooses
compiler or interpreter when a kernel module is imported. The rows go to `--out` (default:
stdout); whatever plugins and builds write to stdout meanwhile goes to stderr, so that stdout
carries the JSON alone.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

ARCHES = {"80": 80, "90": 90, "100": 100}
FLOATS = ("qk_scale", "cap_log2", "scale")      # scalar float arguments, by the name kernels give them
SASS = {"hgmma": r"\bHGMMA\b", "tma_loads": r"\bUTMALDG\b", "tma_stores": r"\bUTMASTG\b",
        "exp2": r"\bMUFU\.EX2\b", "local_loads": r"\bLDL\b", "local_stores": r"\bSTL\b"}


@dataclass
class Build:
    """One kernel launch of a call, as the JIT would specialise it.

    `ints`: the integer arguments' values; `constexprs`: the constexpr arguments; `tensor_type`:
    the element type of tensor arguments ("*bf16"), with `pointers` naming those of another
    type and `descriptors` those passed as TMA descriptors of `block` shape; `options`:
    num_warps, num_stages, launch_pdl; `labels`: what the row says of the case (head_dim, config)."""

    kernel: str
    fn: object
    ints: dict
    constexprs: dict
    tensor_type: str = "*bf16"
    pointers: dict = field(default_factory=dict)
    descriptors: dict = field(default_factory=dict)      # name -> block shape
    options: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)
    kernels_per_call: int = 1


def contiguous_strides(shape) -> list:
    strides = [1]
    for n in reversed(shape[1:]):
        strides.insert(0, strides[0] * n)
    return strides


def named_strides(prefix: str, shape, axes: str) -> dict:
    """{"stride_<prefix><axis>": stride} of a contiguous tensor of `shape`, axes named by `axes`."""
    return {f"stride_{prefix}{axis}": s for axis, s in zip(axes[-len(shape):], contiguous_strides(shape))}


def compile_build(build: Build, capability: int) -> dict:
    """The row of one build compiled for `capability`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = _signature(build)
    source = ASTSource(fn=build.fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=build.options)
    ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
    return dict(kernel=build.kernel, arch=capability, **build.labels, kernels_per_call=build.kernels_per_call,
                warps=_warps(ptx, compiled.metadata.num_warps), shared_bytes=compiled.metadata.shared,
                wgmma="wgmma.mma_async" in ptx, mma_sync="mma.sync" in ptx,
                tma_copies=ttgir.count("async_tma_copy"), cp_async=ttgir.count("async_copy_global_to_local"),
                warp_specialized="ttg.warp_specialize" in ttgir, setmaxnreg=sorted(set(
                    int(n) for n in re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", ptx))),
                griddepcontrol="griddepcontrol" in ptx,
                launch_pdl=bool(getattr(compiled.metadata, "launch_pdl", False)),
                **_ptxas(ptx, capability), sass=_sass(compiled.asm.get("cubin"), capability))


def _signature(build: Build) -> tuple:
    constexprs, signature, attrs = dict(build.constexprs), {}, {}
    for i, name in enumerate(build.fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in build.descriptors:
            block = ",".join(map(str, build.descriptors[name]))
            signature[name] = f"tensordesc<{build.tensor_type[1:]}[{block}]>"
        elif name[0].isupper():                          # tensors are the capitalised arguments
            signature[name] = build.pointers.get(name, build.tensor_type)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOATS:
            signature[name] = "fp32"
        elif build.fn.params[i].do_not_specialize:
            signature[name] = "i32"
        elif build.ints[name] == 1:
            constexprs[name], signature[name] = 1, "constexpr"
        else:
            signature[name] = "i32"
            if build.ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _warps(ptx: str, num_warps: int) -> int:
    """Warps a program runs, warp-specialised partitions included: the threads PTX requires, in warps."""
    threads = re.search(r"\.(?:reqntid|maxntid)\s+(\d+)", ptx)
    return int(threads.group(1)) // 32 if threads else num_warps


def _tool(name: str, capability: int):
    from triton.backends.nvidia.compiler import get_ptxas

    path = os.path.join(os.path.dirname(get_ptxas(capability).path), name)
    return path if os.path.exists(path) else None


def _ptxas(ptx: str, capability: int) -> dict:
    """Registers per thread and spilled bytes, as ptxas reports them."""
    from triton.backends.nvidia.compiler import get_ptxas

    arch = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        report = subprocess.run([get_ptxas(capability).path, f"-arch={arch}", "-v", f.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return dict(registers=int(re.search(r"Used (\d+) registers", report).group(1)),
                spill_bytes=int(spills.group(1)) + int(spills.group(2)))


def _sass(cubin, capability: int) -> dict | None:
    """Instruction counts in the SASS, where the wheel's nvdisasm reads this cubin."""
    nvdisasm = _tool("nvdisasm", capability)
    if not cubin or not nvdisasm:
        return None
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        done = subprocess.run([nvdisasm, f.name], capture_output=True, text=True)
    if done.returncode:
        return None
    return {name: len(re.findall(pattern, done.stdout)) for name, pattern in SASS.items()}


def inspect(capabilities, kernels=None) -> list[dict]:
    """Rows for every build of every implementation that declares builds (or those named)."""
    from attnlab.kernels import implementations

    rows = []
    for impl in implementations():
        if impl.builds is None or (kernels and impl.name not in kernels):
            continue
        for capability in capabilities:
            for build in impl.builds(capability):
                rows.append(dict(implementation=impl.name, **compile_build(build, capability)))
    return rows


def main(argv=None) -> int:
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"
    parser = argparse.ArgumentParser(prog="python -m attnlab.kernels.inspect")
    parser.add_argument("--arch", action="append", choices=sorted(ARCHES), default=None)
    parser.add_argument("--kernels", default=None)
    parser.add_argument("--kernel-module", action="append", default=[])
    parser.add_argument("--plugin-timeout", type=float, default=None)
    parser.add_argument("--out", default="-", help="write the JSON rows here ('-': stdout)")
    args = parser.parse_args(argv)
    from attnlab.kernels import load_plugins
    from attnlab.kernels.plugins import stdout_to_stderr

    for failure in load_plugins(args.kernel_module, timeout_s=args.plugin_timeout):
        print(f"warning: {failure}", file=sys.stderr)
    kernels = [k for k in (args.kernels or "").split(",") if k]
    with stdout_to_stderr():      # a plugin's builds may print
        rows = inspect([ARCHES[a] for a in args.arch or ["90"]], kernels or None)
    if args.out == "-":
        json.dump(rows, sys.stdout)
    else:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(rows, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
