"""Compile attnlab's Triton kernels for named GPU targets, without a GPU; prints JSON.

Run in its own process: Triton picks compiler or interpreter when kernel modules are
imported, and the tests import them in interpreter mode.

Each kernel is compiled as Triton's JIT would compile it for the llama3-8b shapes: an integer
argument equal to 1 becomes a constant, and pointers and integers divisible by 16 are marked
so. Without that, loads neither vectorise nor pipeline, and the build would not be the one a
GPU runs. Arguments the kernel marks do_not_specialize (the window) are plain integers.

Besides the plain kernels it builds their variants (a window with softcap, packed sequences),
so a variant that no longer compiles fails here too.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from attnlab.kernels import triton_decode, triton_prefill  # noqa: E402

POINTERS = {"Opart": "*fp32", "Lpart": "*fp32", "Lens": "*i32", "CuSeqlensQ": "*i32", "CuSeqlensK": "*i32"}
FLOATS = ("qk_scale", "cap_log2")
HEADS, KV_HEADS = 32, 8  # llama3-8b


def contiguous_strides(shape):
    strides = [1]
    for n in reversed(shape[1:]):
        strides.insert(0, strides[0] * n)
    return strides


def named_strides(prefix, shape):
    axes = "bmhd" if prefix in "qo" else "bnhd"
    return {f"stride_{prefix}{axis}": s for axis, s in zip(axes[-len(shape):], contiguous_strides(shape))}


def prefill_ints(seqlen, head_dim):
    ints = dict(seqlen_q=seqlen, seqlen_k=seqlen, heads=HEADS, groups=HEADS // KV_HEADS, seq_bucket=seqlen)
    for prefix, heads in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS), ("o", HEADS)):
        ints.update(named_strides(prefix, [1, seqlen, heads, head_dim]))
    return ints


def varlen_ints(total, head_dim):
    """Packed sequences (total, heads, head_dim): no batch stride, no lengths on the host."""
    ints = dict(heads=HEADS, groups=HEADS // KV_HEADS, seq_bucket=total)
    for prefix, heads in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS), ("o", HEADS)):
        ints.update(named_strides(prefix, [total, heads, head_dim]))
    return ints


def decode_ints(cache_len, splits, rows, head_dim):
    ints = dict(q_len=1, groups=HEADS // KV_HEADS, kv_heads=KV_HEADS, split_len=cache_len // splits,
                num_splits=splits)
    for prefix, shape in (("q", [1, 1, HEADS, head_dim]), ("o", [1, 1, HEADS, head_dim]),
                          ("k", [1, cache_len, KV_HEADS, head_dim]), ("v", [1, cache_len, KV_HEADS, head_dim])):
        ints.update(named_strides(prefix, shape))
    ints.update(zip(("stride_pb", "stride_ph", "stride_ps", "stride_pm"),
                    contiguous_strides([1, KV_HEADS, splits, rows])))
    return ints


def compile_for(fn, capability, tensor_type, ints, constexprs, descriptors=(), **options):
    """Compile fn as the JIT specialises it for these integer arguments.

    descriptors: tensor arguments passed as (batch, seqlen, heads, head_dim) TMA descriptors.
    """
    constexprs, signature, attrs = dict(constexprs), {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in descriptors:
            block = triton_prefill.kv_block_shape(constexprs["BLOCK_N"], constexprs["BLOCK_D"])
            signature[name] = f"tensordesc<{tensor_type[1:]}[{','.join(map(str, block))}]>"
        elif name[0].isupper():  # tensors are the capitalised arguments
            signature[name] = POINTERS.get(name, tensor_type)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOATS:
            signature[name] = "fp32"
        elif fn.params[i].do_not_specialize:
            signature[name] = "i32"
        elif ints[name] == 1:
            constexprs[name], signature[name] = 1, "constexpr"
        else:
            signature[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
    ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
    return dict(shared_bytes=kernel.metadata.shared, wgmma="wgmma.mma_async" in ptx, mma_sync="mma.sync" in ptx,
                griddepcontrol="griddepcontrol" in ptx, launch_pdl=kernel.metadata.launch_pdl,
                cp_async=ttgir.count("async_copy_global_to_local"), tma_copies=ttgir.count("async_tma_copy"),
                **ptxas_usage(ptx, capability))


def ptxas_usage(ptx, capability):
    """Registers per thread and spilled bytes, as ptxas reports them."""
    arch = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        report = subprocess.run([get_ptxas(capability).path, f"-arch={arch}", "-v", f.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return dict(registers=int(re.search(r"Used (\d+) registers", report).group(1)),
                spill_bytes=int(spills.group(1)) + int(spills.group(2)))


def prefill(capability, tensor_type, head_dim, causal, config, tma, window=False, softcap=False, varlen=False):
    """The prefill kernel ("prefill"), or with a window, softcap or packed sequences, its variant
    ("prefill_window", "prefill_varlen")."""
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=triton_prefill.block_d(head_dim), IS_CAUSAL=causal,
                      WINDOW=window, SOFTCAP=softcap, UPCAST_DOT=False, DOT_PRECISION="ieee", TMA=tma, **config.kwargs)
    kernel = triton_prefill._attention_varlen_fwd if varlen else triton_prefill._attention_fwd
    ints = varlen_ints(16384, head_dim) if varlen else prefill_ints(16384, head_dim)
    result = compile_for(kernel, capability, tensor_type, ints, constexprs, descriptors=("K", "V") if tma else (),
                         num_warps=config.num_warps, num_stages=config.num_stages)
    name = "prefill_varlen" if varlen else "prefill_window" if window or softcap else "prefill"
    return dict(result, kernel=name, capability=capability, dtype=tensor_type, head_dim=head_dim,
                causal=causal, tma=tma, window=window, softcap=softcap, config=str(config))


def tuned_configs(dtype, head_dim):
    """The tiles autotuning may try for this case."""
    return triton_prefill._prune(triton_prefill._configs(), {"Q": torch.empty(0, dtype=dtype)},
                                 BLOCK_D=triton_prefill.block_d(head_dim))


def decode(capability):
    """The split and merge kernels as Hopper builds them: with programmatic dependent launch; and
    the split kernel with a window and softcap ("decode_split_window")."""
    splits, rows, bd = 32, 16, 128
    ints = decode_ints(32768, splits, rows, bd)

    def split(window):
        return compile_for(triton_decode._decode_split, capability, "*bf16", ints,
                           dict(HEAD_DIM=128, BLOCK_D=bd, BLOCK_M=rows, BLOCK_N=64, WINDOW=window, SOFTCAP=window,
                                UPCAST_DOT=False, DOT_PRECISION="ieee", PDL=True), num_warps=4, num_stages=3)
    merge = compile_for(triton_decode._decode_merge, capability, "*bf16", ints,
                        dict(HEAD_DIM=128, BLOCK_D=bd, SPLIT_BLOCK=32, PDL=True), launch_pdl=True)
    return [dict(split(False), kernel="decode_split", capability=capability),
            dict(merge, kernel="decode_merge", capability=capability),
            dict(split(True), kernel="decode_split_window", capability=capability)]


def variants():
    """Hopper builds of the prefill's variants, on the first tile autotuning may pick."""
    config = tuned_configs(torch.bfloat16, 128)[0]
    return [prefill(90, "*bf16", 128, True, config, True, window=True, softcap=True),
            prefill(90, "*bf16", 128, True, config, True, varlen=True),
            prefill(90, "*bf16", 128, False, config, False, window=True, varlen=True)]


def main():
    results = []
    for head_dim in (64, 128, 256):  # every tile autotuning may pick on Hopper
        for config in tuned_configs(torch.bfloat16, head_dim):
            for tma in (True, False) if head_dim == 128 else (True,):
                results.append(prefill(90, "*bf16", head_dim, True, config, tma))
    results.append(prefill(90, "*fp32", 64, False, tuned_configs(torch.float32, 64)[0], True))
    results.append(prefill(90, "*fp16", 59, False, triton_prefill._configs()[0], False))
    results.append(prefill(80, "*bf16", 128, True, triton_prefill._configs()[0], False))
    results += decode(90)
    results += variants()
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
