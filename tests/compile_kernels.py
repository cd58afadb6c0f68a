"""Compile attnlab's Triton kernels for named GPU targets, without a GPU; prints JSON.

Run in its own process: Triton picks compiler or interpreter when kernel modules are
imported, and the tests import them in interpreter mode.
"""
import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from attnlab.kernels import triton_decode, triton_prefill  # noqa: E402

POINTERS = {"Opart": "*fp32", "Lpart": "*fp32", "Lens": "*i32"}


def compile_for(fn, capability, tensor_type, constexprs, **options):
    names = fn.arg_names
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name[0].isupper():  # tensors are the capitalised arguments
            signature[name] = POINTERS.get(name, tensor_type)
        else:
            signature[name] = "fp32" if name == "qk_scale" else "i32"
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(names.index(k),): v for k, v in constexprs.items()})
    kernel = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
    ptx = kernel.asm["ptx"]
    return {"shared_bytes": kernel.metadata.shared, "wgmma": "wgmma.mma_async" in ptx,
            "mma_sync": "mma.sync" in ptx}


def prefill(capability, tensor_type, head_dim, causal, config):
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=triton_prefill.block_d(head_dim), IS_CAUSAL=causal,
                      UPCAST_DOT=False, DOT_PRECISION="ieee", **config.kwargs)
    result = compile_for(triton_prefill._attention_fwd, capability, tensor_type, constexprs,
                         num_warps=config.num_warps, num_stages=config.num_stages)
    return dict(result, kernel="prefill", capability=capability, dtype=tensor_type, head_dim=head_dim,
                causal=causal, config=str(config))


def main():
    results = []
    tuned = triton_prefill._prune(triton_prefill._configs(), {"Q": torch.empty(0, dtype=torch.bfloat16)},
                                  BLOCK_D=128)
    for config in tuned:  # every tile autotuning may pick for the llama3 shapes on Hopper
        results.append(prefill(90, "*bf16", 128, True, config))
    first = triton_prefill._configs()[0]
    results.append(prefill(90, "*fp16", 59, False, first))
    results.append(prefill(80, "*bf16", 128, True, first))
    common = dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_M=16)
    split = compile_for(triton_decode._decode_split, 90, "*bf16",
                        dict(common, BLOCK_N=64, UPCAST_DOT=False, DOT_PRECISION="ieee"), num_warps=4, num_stages=3)
    merge = compile_for(triton_decode._decode_merge, 90, "*bf16", common)
    results += [dict(split, kernel="decode_split", capability=90), dict(merge, kernel="decode_merge", capability=90)]
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
