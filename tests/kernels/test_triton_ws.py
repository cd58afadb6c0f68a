"""The warp-specialised Hopper prefill, `triton-ws` (kernels/triton_ws.py).

On a CPU it runs in Triton's interpreter, in-kernel tensor descriptors included, and is held
to FlashAttention's criterion against float64 on awkward shapes. Whether the compiler
partitions its loop is a property of the build, not of any output, so it is checked offline:
run as a script (`python tests/kernels/test_triton_ws.py`, without TRITON_INTERPRET) this file
compiles the kernel for sm_90a as the JIT would specialise it for llama3-8b shapes and prints
what the TTGIR, PTX and ptxas show as JSON; the slow tests below read that.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

import attnlab.kernels as K
from attnlab.kernels.impls import triton_ws as registration

HOPPER_SHARED_BYTES = 227 * 1024
SEQLEN_PAIRS = [(113, 203), (203, 113), (1, 97), (128, 128), pytest.param(1023, 1024, marks=pytest.mark.slow)]
HEAD_LAYOUTS = [(4, 4), (4, 2), (4, 1)]  # MHA, GQA, MQA


def needs_the_interpreter():
    status = K.get("triton-ws").available("cpu")
    if not status:
        pytest.skip(f"triton-ws does not run on this CPU: {status.reason}")


def check(batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, dtype, causal, seed=0):
    from reference import assert_close_as_naive, random_qkv, reference, visible_keys

    needs_the_interpreter()
    q, k, v = random_qkv(batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, dtype, seed=seed)
    ref = reference(q, k, v, visible_keys(seqlen_q, seqlen_k, causal)[None])
    out = K.attention(q, k, v, causal=causal, impl="triton-ws")
    assert out.shape == q.shape and out.dtype == dtype
    naive = K.attention(q, k, v, causal=causal, impl="naive")
    assert_close_as_naive(out, naive, ref, f"triton-ws {tuple(q.shape)} k {tuple(k.shape)} causal={causal}")


# --- right, in the interpreter ---

@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlen_q,seqlen_k", SEQLEN_PAIRS)
def test_awkward_seqlens(seqlen_q, seqlen_k, causal, dtype):
    heads, kv_heads = (2, 1) if seqlen_q * seqlen_k > 200_000 else (4, 2)
    check(1 if seqlen_q > 1000 else 2, seqlen_q, seqlen_k, heads, kv_heads, 64, dtype, causal)


@pytest.mark.parametrize("heads,kv_heads", HEAD_LAYOUTS)
@pytest.mark.parametrize("head_dim", registration.HEAD_DIMS)
def test_head_layouts_and_dims(heads, kv_heads, head_dim):
    check(2, 70, 97, heads, kv_heads, head_dim, torch.float16, True)


def test_bf16_through_the_interpreter():
    # bf16 products go through fp32 in the interpreter, whose bf16 tl.dot is wrong
    check(2, 97, 131, 4, 2, 128, torch.bfloat16, True)


@pytest.mark.parametrize("scale", [-0.3, 0.0])
def test_any_finite_scale(scale):
    from reference import assert_close_as_naive, random_qkv, reference, visible_keys

    needs_the_interpreter()
    q, k, v = random_qkv(2, 70, 97, 4, 2, 32, torch.float32)
    q *= 40  # scores wide enough that a wrong running maximum would overflow exp2
    ref = reference(q, k, v, visible_keys(70, 97, True)[None], scale=scale)
    out = K.attention(q, k, v, causal=True, scale=scale, impl="triton-ws")
    assert_close_as_naive(out, K.attention(q, k, v, causal=True, scale=scale, impl="naive"), ref, f"scale {scale}")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, in the interpreter, on all-NaN rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nan_rules(dtype):
    import nan_rules

    needs_the_interpreter()
    nan_rules.check_prefill(lambda q, k, v: K.attention(q, k, v, causal=True, impl="triton-ws"), dtype=dtype)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_each_sequence_stays_in_its_rows():
    # Descriptors start at their sequence's first row: keys past seqlen_k read as zeros, not as
    # the next sequence's, and the last query tile's store stops at seqlen_q. NaN in every other
    # sequence must not reach sequence 1, and its output must not spill into sequence 2.
    from reference import random_qkv

    needs_the_interpreter()
    q, k, v = random_qkv(3, 45, 50, 2, 1, 32, torch.float32)
    alone = K.attention(q[1:2], k[1:2], v[1:2], impl="triton-ws")
    poisoned = [t.clone() for t in (q, k, v)]
    for t in poisoned:
        t[0], t[2] = float("nan"), float("nan")
    out = K.attention(*poisoned, impl="triton-ws")
    assert torch.equal(out[1], alone[0])
    assert torch.isnan(out[0]).all() and torch.isnan(out[2]).all()


# --- what the registration declares ---

def test_refuses_what_the_tile_cannot_hold():
    impl = K.get("triton-ws")
    for head_dim in (40, 96, 256):
        assert not impl.supports("prefill", torch.float16, head_dim, "cuda")
    assert not impl.supports("prefill", torch.float32, 64, "cuda")
    assert impl.supports("prefill", torch.float32, 64, "cpu")
    assert impl.supports("prefill", torch.bfloat16, 128, "cuda")


def test_refuses_rows_a_descriptor_cannot_read_naming_the_argument():
    from reference import random_qkv

    needs_the_interpreter()
    q, k, v = random_qkv(1, 16, 16, 2, 2, 32, torch.float16)
    spread = k.transpose(1, 2).contiguous().transpose(1, 2)  # (batch, heads, seqlen, head_dim) storage
    with pytest.raises(ValueError, match=r"^k: 'triton-ws' needs heads side by side"):
        K.attention(q, spread, v, impl="triton-ws")
    shifted = torch.empty(q.numel() + 1, dtype=q.dtype)[1:].view(q.shape)  # base 2 bytes off alignment
    with pytest.raises(ValueError, match=r"^q: 'triton-ws' needs a 16-byte aligned base"):
        K.attention(shifted, k, v, impl="triton-ws")


def test_auto_keeps_triton_first():
    # Until a profile shows triton-ws faster, `auto` ranks it after the triton kernel.
    ws, triton = K.get("triton-ws").speed_rank, K.get("triton").speed_rank
    assert all(ws[device] > triton[device] for device in ("cuda", "cpu"))
    q = torch.zeros(1, 16, 2, 64, dtype=torch.float16)
    assert K.resolve("auto", "prefill", q).name != "triton-ws"


@pytest.mark.parametrize("capability,ok", [((8, 0), False), ((8, 9), False), ((9, 0), True)])
def test_probe_needs_hopper_and_says_why(monkeypatch, capability, ok):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *device: capability)
    status = registration.probe("cuda")
    assert bool(status) == ok
    if not ok:
        assert "9.0+" in status.reason and f"found {capability[0]}.{capability[1]}" in status.reason


def test_the_kernel_module_is_imported_on_first_call_only():
    # Triton picks compiler or interpreter when a kernel module is imported.
    code = ("import sys, attnlab.kernels as K; K.get('triton-ws').available('cpu'); "
            "print('attnlab.kernels.triton_ws' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr[-2000:]


def test_every_head_dim_has_a_hopper_tile():
    from attnlab.kernels import triton_ws

    assert set(triton_ws.HOPPER_TILES) == set(registration.HEAD_DIMS)


# --- on a Hopper GPU (skipped elsewhere) ---

@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_on_hopper_sequences_stay_apart(causal):
    from reference import assert_close_as_naive, random_qkv, reference, visible_keys

    if not K.get("triton-ws").available("cuda"):
        pytest.skip(K.get("triton-ws").available("cuda").reason)
    q, k, v = random_qkv(3, 1000, 2001, 32, 8, 128, torch.bfloat16, device="cuda")
    ref = reference(q, k, v, visible_keys(1000, 2001, causal)[None])
    out = K.attention(q, k, v, causal=causal, impl="triton-ws")
    assert_close_as_naive(out, K.attention(q, k, v, causal=causal, impl="naive"), ref, f"hopper causal={causal}")


# --- the sm_90a build, offline ---

def compile_hopper_builds():
    """Build the kernel for sm_90a (no GPU needed) as the launcher would launch it for llama3-8b
    prefill at 16k (heads 32, kv_heads 8, head_dim 128, bf16), and a control build with warp
    specialisation off; a list of what each build shows."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from attnlab.kernels import triton_ws

    builds = []
    for head_dim, causal, specialise in ((128, True, True), (128, False, True), (64, True, True), (128, True, False)):
        q = torch.empty(1, 16384, 32, head_dim, dtype=torch.bfloat16, device="meta")
        k = torch.empty(1, 16384, 8, head_dim, dtype=torch.bfloat16, device="meta")
        _, args, options = triton_ws.launch(q, k, k, q, causal, head_dim ** -0.5)
        build = dict(num_warps=options.pop("num_warps"), num_stages=options.pop("num_stages"))
        options["WARP_SPECIALIZE"] = specialise
        source = ASTSource(**jit_specialisation(triton_ws._attention_ws_fwd, args, options))
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=build)
        builds.append(dict(build_facts(kernel), head_dim=head_dim, causal=causal, warp_specialize=specialise, **build))
    return builds


def jit_specialisation(fn, args, constexprs):
    """ASTSource's arguments, as Triton's JIT specialises these launch arguments (the conventions
    of compile_kernels.py): an integer equal to 1 becomes a constant, and tensors and integers
    divisible by 16 are marked so."""
    constexprs, signature, attrs = dict(constexprs), {}, {}
    runtime = [name for name in fn.arg_names if name not in constexprs]
    for name, value in zip(runtime, args):
        i = fn.arg_names.index(name)
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + {torch.bfloat16: "bf16", torch.float16: "fp16"}[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            constexprs[name], signature[name] = 1, "constexpr"
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    signature.update({name: "constexpr" for name in constexprs})
    return dict(fn=fn, signature={name: signature[name] for name in fn.arg_names}, constexprs=constexprs,
                attrs=attrs)


def build_facts(kernel):
    """What partitioning leaves in a build: TTGIR regions, PTX register budgets and thread count,
    wgmma shapes, and ptxas's registers, spills and the shared memory the launch asks for."""
    ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
    return dict(shared_bytes=kernel.metadata.shared, threads=int(re.search(r"\.reqntid (\d+)", ptx).group(1)),
                regions=ttgir_regions(ttgir),
                setmaxnreg=sorted(set(re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx))),
                wgmma=sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx))),
                **ptxas_report(ptx))


def ttgir_regions(ttgir):
    """The ttg.warp_specialize op's regions (default, partition0, ...): each one's warps, TMA
    copies into shared memory and warpgroup dots. Empty when the loop was not partitioned."""
    if "ttg.warp_specialize(" not in ttgir:
        return {}
    body = ttgir[ttgir.index("ttg.warp_specialize("):]
    body = body[:re.search(r"^\s*\} : \(", body, re.M).start()]  # up to the op's closing brace
    region = re.compile(r"^\s*(?:default \{|(partition\d+)\()", re.M)
    cuts = [(m.start(), m.group(1) or "default") for m in region.finditer(body)]
    module_warps = int(re.search(r'"ttg.num-warps" = (\d+)', ttgir).group(1))  # the default region's
    regions = {}
    for (start, name), (end, _) in zip(cuts, cuts[1:] + [(len(body), "")]):
        text = body[start:end]
        warps = re.search(r"\) num_warps\((\d+)\)", text)
        regions[name] = dict(warps=int(warps.group(1)) if warps else module_warps,
                             tma_loads=text.count("ttng.async_tma_copy_global_to_local"),
                             dots=text.count("ttng.warp_group_dot "))
    return regions


def ptxas_report(ptx):
    """ptxas -v on the PTX, for its own target: registers, spilled bytes and the report."""
    from triton.backends.nvidia.compiler import get_ptxas

    arch = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        report = subprocess.run([get_ptxas(90).path, f"-arch={arch}", "-v", f.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return dict(arch=arch, registers=int(re.search(r"Used (\d+) registers", report).group(1)),
                spill_bytes=int(spills.group(1)) + int(spills.group(2)),
                ptxas=[line.strip() for line in report.splitlines() if "Used" in line or "spill" in line])


@pytest.fixture(scope="module")
def hopper_builds():
    # A process of its own: Triton picks compiler or interpreter at import, and this one interprets.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def specialised(builds):
    return [b for b in builds if b["warp_specialize"]]


@pytest.mark.slow
def test_hopper_loop_is_warp_specialised(hopper_builds):
    # One producer warpgroup that only copies (TMA) and two consumer warpgroups that run the
    # dots: 12 warps, registers moved from the producer (40) to the consumers (232).
    for b in specialised(hopper_builds):
        assert b["arch"] == "sm_90a" and b["num_warps"] == 4, b
        assert b["threads"] == 12 * 32, b
        regions = b["regions"]
        assert sorted(regions) == ["default", "partition0", "partition1"], b
        assert sum(r["warps"] for r in regions.values()) == 12, b
        assert regions["default"]["tma_loads"] > 0 and regions["default"]["dots"] == 0, b
        for consumer in ("partition0", "partition1"):
            assert regions[consumer]["warps"] == 4 and regions[consumer]["dots"] == 2, b
            assert regions[consumer]["tma_loads"] == 0, b
        assert {("dec", "40"), ("inc", "232")} <= set(map(tuple, b["setmaxnreg"])), b


@pytest.mark.slow
def test_the_control_build_is_not_partitioned(hopper_builds):
    # The checks above can fail: with warp_specialize off the same loop stays in 4 warps.
    control = next(b for b in hopper_builds if not b["warp_specialize"])
    assert control["regions"] == {} and control["threads"] == 4 * 32 and not control["setmaxnreg"]


@pytest.mark.slow
def test_hopper_build_uses_wgmma(hopper_builds):
    for b in specialised(hopper_builds):
        assert "m64n128k16" in b["wgmma"], b  # each consumer warpgroup: 64 query rows by 128 keys


@pytest.mark.slow
def test_hopper_build_does_not_spill_and_fits_shared_memory(hopper_builds):
    for b in specialised(hopper_builds):
        assert b["spill_bytes"] == 0, b["ptxas"]
        assert 0 < b["shared_bytes"] <= HOPPER_SHARED_BYTES, b


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"
    json.dump(compile_hopper_builds(), sys.stdout)
