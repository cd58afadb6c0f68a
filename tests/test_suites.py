"""The device suites, read without a GPU: every attnlab command they would run parses, names
kernels the registry knows, and writes inside the run folder. A typo found here instead of
on the device costs nothing; found there, it costs the session its measurements."""
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from attnlab.cli import build_parser
from attnlab.kernels import get
from paths import ROOT


def dry_run(script, tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), ATTNLAB_SUITE_DRY_RUN="1", PYTHON="python3")
    done = subprocess.run(["bash", str(ROOT / "suites" / script)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60, check=True)
    steps = {}
    for line in done.stdout.splitlines():
        name, sep, command = line.partition(": ")
        if sep and " " not in name:
            steps[name] = command
    return steps


@pytest.mark.parametrize("script", ["device_suite.sh", "kernel_suite.sh"])
def test_every_attnlab_step_parses(script, tmp_path):
    steps = dry_run(script, tmp_path)
    assert {"install", "environment", "check", "gpu-tests"} <= set(steps)
    commands = {name: shlex.split(c) for name, c in steps.items() if c.startswith("python3 -m attnlab ")}
    assert commands
    for name, words in commands.items():
        args = build_parser().parse_args(words[3:])       # argparse exits on a bad flag
        for kernel in getattr(args, "kernels", None) or ():
            if kernel != "auto":
                get(kernel)                                 # raises on an unknown name
        out = getattr(args, "out", None)
        if out and words[3] != "kernels":
            assert not Path(out).is_relative_to(ROOT), f"{name} writes into the tree: {out}"


def test_device_suite_runs_the_served_model_with_each_decode_kernel(tmp_path):
    steps = dry_run("device_suite.sh", tmp_path)
    e2e = {name: build_parser().parse_args(shlex.split(c)[3:]) for name, c in steps.items()
           if shlex.split(c)[3:4] == ["e2e"]}
    assert {args.model for args in e2e.values()} == {"llama3-8b"}
    assert [args.kernels for args in e2e.values()] == [["triton-decode"], ["sdpa-flash"]]
    assert all(args.seq_lens[:2] == [1024, 131072] for args in e2e.values())


def test_kernel_suite_measures_what_the_comparison_needs(tmp_path):
    steps = dry_run("kernel_suite.sh", tmp_path)
    parse = lambda name: build_parser().parse_args(shlex.split(steps[name])[3:])
    prefill, fa_paper, decode = parse("prefill"), parse("fa-paper"), parse("decode")
    assert {"triton", "triton-ptr", "sdpa-flash", "sdpa-cudnn"} <= set(prefill.kernels) == set(fa_paper.kernels)
    assert {4096, 16384, 131072} <= set(prefill.seq_lens) and fa_paper.seq_lens == [16384]
    assert {"triton-decode", "triton-decode-nopdl", "sdpa-flash"} <= set(decode.kernels)
    assert {32768, 65536, 131072} <= set(decode.seq_lens)
    assert parse("tuning").command == "tune"


def test_tune_needs_a_gpu(capsys):
    from attnlab.cli import main

    assert main(["tune", "--device", "cpu", "--out", os.devnull]) == 2
    assert "device" in capsys.readouterr().err


def test_device_suite_measures_training_beside_the_baselines(tmp_path):
    steps = dry_run("device_suite.sh", tmp_path)
    args = build_parser().parse_args(shlex.split(steps["training"])[3:])
    assert args.workload == "llama3-8b" and set(args.modes) == {"backward", "fwd_bwd"}
    assert {"triton", "sdpa-cudnn", "sdpa-flash"} <= set(args.kernels)
    assert min(args.seq_lens) == 1024 and max(args.seq_lens) == 32768
