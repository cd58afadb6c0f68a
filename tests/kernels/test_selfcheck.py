"""`attnlab check` must catch a wrong kernel, not only pass right ones."""
import dataclasses

import pytest
import torch

from attnlab.kernels import registry, selfcheck


@pytest.mark.slow     # every implementation, the Triton ones in the interpreter
def test_every_usable_implementation_passes_on_cpu():
    results = selfcheck.check("cpu", torch.float16)
    names = {r.impl for r in results}
    assert {"sdpa-flash", "sdpa-math", "triton", "triton-decode"} <= names
    assert all(r.ok for r in results), [(r.impl, r.case, r.why) for r in results if not r.ok]
    long_prefill = {r.impl for r in results if r.case.startswith("q (1, 611, ")}
    assert {"flex", "sdpa-flash", "sdpa-math", "triton", "triton-ptr", "triton-ws"} <= long_prefill
    long_decode = {r.impl for r in results if r.mode == "decode" and "419, 700" in r.case}
    assert {"flex", "sdpa-flash", "sdpa-math", "triton-decode", "triton-decode-nopdl",
            "triton-decode-fused"} <= long_decode
    decode_options = {(r.impl, option) for r in results if r.mode == "decode"
                      for option in ("window", "softcap") if f" {option}=" in r.case}
    assert {("triton-decode", "window"), ("triton-decode", "softcap"), ("triton-decode-fused", "softcap"),
            ("sdpa-math", "window")} <= decode_options
    assert ("sdpa-math", "softcap") not in decode_options         # declared by neither of its calls


def test_a_wrong_kernel_fails_the_check(monkeypatch):
    broken = dataclasses.replace(registry.get("sdpa-math"),
                                 prefill=lambda q, k, v, causal, scale: q * 0.5)
    monkeypatch.setitem(registry._REGISTRY, "sdpa-math", broken)
    results = selfcheck.check("cpu", torch.float16, kernels=["sdpa-math"])
    assert any(not r.ok for r in results if r.mode == "prefill")
    assert all(r.ok for r in results if r.mode == "decode")


def test_an_option_declared_but_ignored_fails_its_own_case():
    from attnlab.kernels.impls import naive

    def ignores_the_window(q, k, v, causal, scale, window=(-1, -1)):
        return naive.prefill(q, k, v, causal, scale)

    registry.register_kernel("test-ignores-window", prefill=ignores_the_window, options=("window",), devices="cpu",
                             dtypes=("float16", "float32", "float64"))
    try:
        results = [r for r in selfcheck.check("cpu", torch.float16, kernels=["test-ignores-window"])]
    finally:
        registry.unregister("test-ignores-window")
    failed = {r.case for r in results if not r.ok}
    assert failed and all("window=(24, -1)" in case for case in failed)
    assert sum(r.ok for r in results) == len(selfcheck.PREFILL_CASES)     # plain attention is right
