"""`attnlab check` must catch a wrong kernel, not only pass right ones."""
import dataclasses

import torch

from attnlab.kernels import registry, selfcheck


def test_every_usable_implementation_passes_on_cpu():
    results = selfcheck.check("cpu", torch.float16)
    names = {r.impl for r in results}
    assert {"sdpa-flash", "sdpa-math", "triton", "triton-decode"} <= names
    assert all(r.ok for r in results), [r for r in results if not r.ok]


def test_a_wrong_kernel_fails_the_check(monkeypatch):
    broken = dataclasses.replace(registry.get("sdpa-math"),
                                 prefill=lambda q, k, v, causal, scale: q * 0.5)
    monkeypatch.setitem(registry._REGISTRY, "sdpa-math", broken)
    results = [r for r in selfcheck.check("cpu", torch.float16) if r.impl == "sdpa-math"]
    assert any(not r.ok for r in results if r.mode == "prefill")
    assert all(r.ok for r in results if r.mode == "decode")
