"""Every bad flag ends the command with exit status 2 and one line that names the flag, before
any work: no traceback, no file written."""
import os

import pytest
import torch

from attnlab.cli import main
from paths import SAMPLE


def exit_status(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exc:   # argparse's own errors
        return exc.code


def assert_refused(argv, flag, capsys, expected=""):
    assert exit_status(argv) == 2
    err = capsys.readouterr().err
    assert flag in err and expected in err and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if "error" in line]) == 1, err


@pytest.mark.parametrize("command", ["analyze", "report"])
@pytest.mark.parametrize("value", ["0", "-5", "1.5", "ten", "49", "1000000000"])
def test_bootstrap_is_a_whole_number_from_50(command, value, tmp_path, capsys):
    assert_refused([command, str(SAMPLE), "--out", str(tmp_path / "o"), "--bootstrap", value], "--bootstrap",
                   capsys, "from 50")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", ["gif", "png,bmp", ",", "csv"])
def test_formats_are_ones_the_charts_are_written_in(value, tmp_path, capsys):
    assert_refused(["analyze", str(SAMPLE), "--out", str(tmp_path / "o"), "--formats", value], "--formats",
                   capsys, "png, svg, pdf")


def test_the_model_is_a_preset(tmp_path, capsys):
    assert_refused(["analyze", str(SAMPLE), "--out", str(tmp_path / "o"), "--model", "gpt-9"], "--model", capsys)


@pytest.mark.parametrize("command", ["analyze", "report", "lab"])
def test_out_is_a_folder_that_can_be_written(command, tmp_path, capsys):
    a_file = tmp_path / "results.jsonl"
    a_file.write_text("")
    inputs = [] if command == "lab" else [str(SAMPLE)]
    for out in (a_file, "/dev/null", a_file / "below", ""):
        assert_refused([command, *inputs, "--out", str(out)], "--out", capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_out_in_a_read_only_folder_is_refused(tmp_path, capsys):
    tmp_path.chmod(0o500)
    try:
        assert_refused(["analyze", str(SAMPLE), "--out", str(tmp_path / "o")], "--out", capsys, "not writable")
    finally:
        tmp_path.chmod(0o700)


def test_an_out_folder_that_cannot_be_made_is_one_line(capsys):
    assert_refused(["analyze", str(SAMPLE), "--out", "/proc/attnlab/o"], "--out", capsys)


@pytest.mark.parametrize("flag,value", [("--overhead-ms", "inf"), ("--overhead-ms", "nan"), ("--overhead-ms", "-1"),
                                        ("--bw-efficiency", "nan"), ("--bw-efficiency", "inf"),
                                        ("--bw-efficiency", "0"), ("--compute-efficiency", "1.5"),
                                        ("--compute-efficiency", "-inf"), ("--num-gpus", "0"),
                                        ("--decode-tokens", "-1"), ("--seq-lens", "1k,zero")])
def test_claim_numbers_are_finite_and_in_range(flag, value, capsys):
    assert_refused(["claim", flag, value], flag, capsys)


def test_claim_file_outputs(tmp_path, capsys):
    assert_refused(["claim", "--json", str(tmp_path)], "--json", capsys, "not one")
    assert_refused(["claim", "--chart", str(tmp_path)], "--chart", capsys, "not one")
    a_file = tmp_path / "f"
    a_file.write_text("")
    assert_refused(["claim", "--json", str(a_file / "c.json")], "--json", capsys, "is a file")
    # A missing folder is made, as --out makes one.
    assert exit_status(["claim", "--json", str(tmp_path / "new" / "deeper" / "c.json")]) == 0
    assert (tmp_path / "new" / "deeper" / "c.json").is_file()


@pytest.mark.parametrize("value", ["tpu", "cuda:abc", "cpu:0", "gpu"])
@pytest.mark.parametrize("command", ["check", "kernels"])
def test_device_is_cpu_cuda_or_cuda_n(command, value, capsys):
    assert_refused([command, "--device", value], "--device", capsys, "cpu, cuda or cuda:N")


def test_check_refuses_a_gpu_this_machine_lacks(capsys):
    absent = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    assert_refused(["check", "--device", absent], "--device", capsys, "is not here")


@pytest.mark.parametrize("value", ["inf", "nan", "-1"])
def test_lab_budget_is_finite(value, capsys):
    assert_refused(["lab", "--budget-s", value], "--budget-s", capsys, "finite")


@pytest.mark.parametrize("flag,value,expected", [("--seq-lens", "1k,zero", "seq_lens: 'zero'"),
                                                 ("--model", "gpt-9", "unknown model preset"),
                                                 ("--kernels", "naive,no-such-kernel", "no-such-kernel"),
                                                 ("--kernels", ",", "comma list")])
def test_e2e_flags_are_refused_by_name(flag, value, expected, tmp_path, capsys):
    out = tmp_path / "e2e.jsonl"
    assert_refused(["e2e", "--device", "cpu", flag, value, "--out", str(out)], flag, capsys, expected)
    assert not out.exists()


def test_e2e_names_the_prefill_kernel_at_fault(tmp_path, capsys):
    assert_refused(["e2e", "--device", "cpu", "--with-prefill", "--prefill-kernel", "no-such-kernel",
                    "--out", str(tmp_path / "e2e.jsonl")], "--prefill-kernel", capsys, "no-such-kernel")


@pytest.mark.parametrize("old", ["--preset", "--attention", "--prefill-attention"])
def test_e2e_old_flag_names_are_gone(old, capsys):
    assert exit_status(["e2e", old, "x"]) == 2
    assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["e2e", "--device", "cpu", "--seq-lens", "256"], ["tune"]])
@pytest.mark.parametrize("foreign", ["my notes\n", '{"not": "attnlab"}\n'])
def test_a_file_out_that_attnlab_did_not_write_is_left_as_it_was(command, foreign, tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text(foreign)
    assert_refused([*command, "--out", str(out)], "--out", capsys, str(out))
    assert out.read_text() == foreign and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_tune_names_a_foreign_out_before_the_device_it_lacks(tmp_path, capsys):
    out = tmp_path / "run.jsonl"
    out.write_text('{"schema": "attnlab.result/1"}\n')     # a sweep's file: not a tuning document
    assert_refused(["tune", "--device", "cuda", "--out", str(out)], "--out", capsys, "not an attnlab tuning document")
