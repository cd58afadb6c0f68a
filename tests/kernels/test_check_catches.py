"""`attnlab check` holds every implementation, plugins included, to what it declares: each wrong
plugin here (a bug only past some length, NaN from past the cache, an option declared but
ignored, no tensor, the wrong dtype, inputs changed) fails by name with the reason, while the
right kernels checked beside it pass. Plugins are registered in this process and removed after;
one end-to-end run goes through `python -m attnlab check --kernel-module` in a process of its own."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnlab.cli import main
from attnlab.kernels import registry, selfcheck
from attnlab.kernels.impls import naive
from attnlab.kernels.plugins import ENV_VAR
from paths import ROOT
from wrong_kernels import (BUG_FROM, PLUGINS, capless_decode, capless_prefill, cleans_the_cache, doubles_q_after,
                           float64_prefill, leaky_decode, returns_none, short_sighted_prefill, windowless_decode)

DTYPES = ("float16", "float32")
LONG_PREFILL = selfcheck.PREFILL_CASES[0]


@pytest.fixture
def register():
    """register(name, **declarations): a plugin for this test only."""
    made = []

    def add(name, **declarations):
        made.append(name)
        registry.register_kernel(name, devices="cpu", dtypes=DTYPES, **declarations)
    yield add
    for name in made:
        registry.unregister(name)


def results_of(name, results) -> list:
    mine = [r for r in results if r.impl == name]
    assert mine, f"{name} was not checked"
    return mine


# --- wrong only where the check reaches ---------------------------------------------------------

def test_cases_reach_past_three_tiles_with_gqa_and_causal():
    assert LONG_PREFILL.seqlen_q > 3 * 128 and LONG_PREFILL.seqlen_k > 3 * 128 and LONG_PREFILL.causal
    assert LONG_PREFILL.heads > LONG_PREFILL.kv_heads > 1
    assert any(max(c.lengths) > 3 * 128 and c.heads > c.kv_heads for c in selfcheck.DECODE_CASES)
    assert all(c.max_seqlen > min(c.lengths) for c in selfcheck.DECODE_CASES)    # every case has padding


@pytest.mark.slow     # the whole check, its long case included, for two kernels
def test_a_bug_past_256_queries_fails_the_long_case_only(register):
    register("test-short-sighted", prefill=short_sighted_prefill)
    results = selfcheck.check("cpu", torch.float16, kernels=["test-short-sighted", "sdpa-math"])
    failed = [r for r in results_of("test-short-sighted", results) if not r.ok]
    assert [r.case for r in failed] == ["q (1, 611, 4, 64) k (1, 700, 2, 64) causal=True"]      # LONG_PREFILL
    assert LONG_PREFILL.seqlen_q > BUG_FROM + 1
    assert failed[0].max_error > 10 * failed[0].bound and "over bound" in failed[0].why
    assert all(r.ok for r in results_of("sdpa-math", results))


def test_nan_leaking_from_past_the_cache_fails_every_decode_case(register):
    register("test-leaky", decode=leaky_decode)
    results = results_of("test-leaky", selfcheck.check("cpu", torch.float16, kernels=["test-leaky"]))
    assert len(results) == len(selfcheck.DECODE_CASES)
    assert all(not r.ok and r.max_error == float("inf") and "max error inf over bound" in r.why for r in results)


@pytest.mark.parametrize("mode,option,call", [("prefill", "softcap", capless_prefill),
                                              ("decode", "window", windowless_decode),
                                              ("decode", "softcap", capless_decode)])
def test_an_option_declared_but_ignored_fails_its_case(register, mode, option, call):
    register("test-ignores-option", options=(option,), **{mode: call})
    results = results_of("test-ignores-option", selfcheck.check("cpu", torch.float16, kernels=["test-ignores-option"]))
    failed = [r for r in results if not r.ok]
    assert failed and all(r.mode == mode and f" {option}=" in r.case and "over bound" in r.why for r in failed)
    assert all(r.ok for r in results if f" {option}=" not in r.case)


def test_a_declared_option_is_checked_in_both_modes_and_the_right_kernel_passes(register):
    register("test-windowed", prefill=naive.prefill, decode=naive.decode, options=("window", "softcap"))
    results = results_of("test-windowed", selfcheck.check("cpu", torch.float16, kernels=["test-windowed"]))
    assert all(r.ok for r in results), [r.why for r in results if not r.ok]
    options = {(r.mode, option) for r in results for option in ("window", "softcap") if f" {option}=" in r.case}
    assert options == {(m, o) for m in ("prefill", "decode") for o in ("window", "softcap")}


# --- not an answer --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,calls,reason", [
    (torch.float16, dict(prefill=returns_none, decode=returns_none), "returned NoneType, not a tensor"),
    (torch.float32, dict(prefill=float64_prefill), "returned dtype torch.float64, expected torch.float32"),
    (torch.float32, dict(prefill=lambda *args: naive.prefill(*args)[:, :-1]), "returned shape"),
])
def test_what_is_not_an_answer_fails_every_case_with_the_reason(register, dtype, calls, reason):
    register("test-not-an-answer", **calls)
    results = results_of("test-not-an-answer", selfcheck.check("cpu", dtype, kernels=["test-not-an-answer"]))
    cases = len(selfcheck.PREFILL_CASES) + (len(selfcheck.DECODE_CASES) if "decode" in calls else 0)
    assert len(results) == cases
    assert all(not r.ok and r.verdict.reason and r.why.startswith(reason) for r in results)


# --- inputs: a copy each, and changing them fails -------------------------------------------------

@pytest.mark.slow     # the whole check for two kernels
def test_a_kernel_that_changes_its_inputs_fails_and_the_next_kernel_is_unaffected(register):
    register("test-changes-inputs", prefill=doubles_q_after, decode=cleans_the_cache)
    register("test-right-after", prefill=naive.prefill, decode=naive.decode)
    results = selfcheck.check("cpu", torch.float16, kernels=["test-changes-inputs", "test-right-after"])
    changed = results_of("test-changes-inputs", results)
    assert {(r.mode, r.why) for r in changed} == {("prefill", "changed its input q"),
                                                  ("decode", "changed its input v_cache")}
    assert all(not r.ok for r in changed)
    assert all(r.ok for r in results_of("test-right-after", results))


# --- the table says why ---------------------------------------------------------------------------

def test_each_failure_line_of_the_table_says_why(register, capsys):
    register("test-returns-none", prefill=returns_none)
    register("test-raises", prefill=lambda *args: 1 / 0)
    assert main(["check", "--device", "cpu", "--kernels", "test-returns-none,test-raises,sdpa-math"]) == 1
    lines = capsys.readouterr().out.splitlines()
    rows = {name: [line for line in lines[2:-1] if f" {name} " in line]
            for name in ("test-returns-none", "test-raises", "sdpa-math")}
    why = {"test-returns-none": "returned NoneType, not a tensor", "test-raises": "ZeroDivisionError: division by zero"}
    for name, reason in why.items():
        assert rows[name] and all(line.startswith("FAIL") and line.endswith(reason) for line in rows[name])
    assert rows["sdpa-math"] and all(line.startswith("ok") for line in rows["sdpa-math"])
    assert lines[-1].endswith(": test-raises, test-returns-none wrong")


# --- end to end: plugin files, the example beside them --------------------------------------------

PLUGIN_FILE = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from attnlab.kernels import register_kernel
from wrong_kernels import PLUGINS
for name, (calls, why) in PLUGINS.items():
    register_kernel(name, devices=("cpu",), dtypes=("float16",), **calls)
"""
RIGHT = ("torch-chunked", "sdpa-math", "sdpa-flash")


@pytest.mark.slow     # a process of its own, as a user's command
def test_wrong_plugin_files_fail_by_name_beside_the_example_and_in_tree_kernels(tmp_path):
    (tmp_path / "wrong.py").write_text(PLUGIN_FILE)
    modules = [str(tmp_path / "wrong.py"), str(ROOT / "examples" / "chunked_attention.py")]
    command = [sys.executable, "-m", "attnlab", "check", "--device", "cpu", "--kernels", ",".join([*PLUGINS, *RIGHT]),
               *(arg for module in modules for arg in ("--kernel-module", module))]
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=dict(env, OMP_NUM_THREADS="1"))
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    rows = {name: [line for line in lines[2:-1] if line.split()[1] == name] for name in [*PLUGINS, *RIGHT]}
    for name, (calls, why) in PLUGINS.items():
        failed = [line for line in rows[name] if line.startswith("FAIL")]
        assert failed and all(why in line for line in failed), (name, rows[name])
    assert all(rows[name] and all(line.startswith("ok") for line in rows[name]) for name in RIGHT), rows
    assert lines[-1].endswith(f": {', '.join(sorted(PLUGINS))} wrong")
