"""attnlab.text (numbers, context lengths, tables) and the CLI's progress display: what people read."""
import io
import math
import subprocess
import sys

import pytest

from attnlab import text
from attnlab.cli._progress import Progress, make_progress


def test_the_module_needs_no_torch():
    code = "import sys, attnlab.text; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


@pytest.mark.parametrize("given,tokens", [("4096", 4096), ("4k", 4096), ("4K", 4096), (" 128k ", 131072),
                                          ("1m", 1 << 20), ("2M", 2 << 20), ("1000", 1000)])
def test_a_length_is_tokens_with_k_and_m_as_powers_of_two(given, tokens):
    assert text.parse_seq_len(given) == tokens


def test_a_list_keeps_its_order_and_drops_repeats():
    assert text.parse_seq_lens("1k,2k,1k") == [1024, 2048]
    assert text.parse_seq_lens("128k, 1k,4096,4k") == [131072, 1024, 4096]


@pytest.mark.parametrize("bad", ["", ",", "0", "1.5k", "-4", "k", "1k,zero", "4g", "1 k 2"])
def test_a_bad_list_is_an_error_naming_seq_lens_and_what_was_expected(bad):
    with pytest.raises(ValueError) as error:
        text.parse_seq_lens(bad)
    message = str(error.value)
    assert message.startswith("seq_lens: ") and "expected" in message


def test_a_bad_length_names_the_argument_it_came_from():
    with pytest.raises(ValueError, match=r"^seq_len: 'zero' is not a context length; expected"):
        text.parse_seq_len("zero")
    with pytest.raises(ValueError, match=r"^long_ctx: "):
        text.parse_seq_len("0", name="long_ctx")


@pytest.mark.parametrize("tokens,label", [(128, "128"), (1000, "1000"), (1024, "1k"), (131072, "128k"),
                                          (1536, "1536"), (1 << 20, "1m"), (3 << 20, "3m"), (1024 * 1025, "1025k")])
def test_the_label_is_the_short_form_people_say(tokens, label):
    assert text.k(tokens) == label
    assert text.parse_seq_len(label) == tokens     # every label reads back as its length


def test_a_missing_value_is_a_dash():
    assert text.k(None) == text.k(math.nan) == text.num(None) == text.pct(math.nan) == "-"
    assert text.ratio(None) == "n/a"


def test_numbers_keep_three_figures():
    assert [text.num(v) for v in (0, 0.012345, 12.345, 1234.5)] == ["0", "0.0123", "12.3", "1,234"]
    assert text.pct(42.4) == "42%" and text.ratio(76.96) == "77.0x"


def test_a_table_is_left_aligned_by_default_with_a_rule_under_the_headers():
    lines = text.table(["kernel", "ms"], [["naive", "1.5"], ["sdpa-flash", "12.25"]]).splitlines()
    assert lines == ["kernel      ms", "----------  -----", "naive       1.5", "sdpa-flash  12.25"]


def test_a_table_right_aligns_its_numeric_columns():
    rows = [["naive", "1.5", "-", "1,234"], ["sdpa-flash", "12.25", "4k", "7"]]
    lines = text.table(["kernel", "ms", "at", "tok/s"], rows, align="numbers").splitlines()
    assert lines[2] == "naive         1.5   -  1,234"
    assert lines[3] == "sdpa-flash  12.25  4k      7"
    assert lines[0] == "kernel         ms  at  tok/s"


def test_a_table_takes_an_alignment_per_column_and_refuses_a_wrong_one():
    assert text.table(["a", "b"], [["1", "x"], ["22", "y"]], align="lr").splitlines()[2:] == ["1   x", "22  y"]
    with pytest.raises(ValueError, match="^align: "):
        text.table(["a", "b"], [], align="l")


RECORD = {"mode": "decode", "kernel": "naive", "seq_len": 1024, "status": "ok", "median_ms": 1.25}


def _run(progress, records):
    progress.start(len(records))
    for record in records:
        progress.update(record)
        progress.advance(record)
    progress.close()


def test_plain_progress_prints_one_line_per_finished_item_when_enabled():
    stream = io.StringIO()
    e2e_record = {**RECORD, "mode": "e2e-decode", "seq_len": 2048, "tokens_per_s": 1234.0}
    _run(Progress(True, stream), [RECORD, e2e_record])
    assert stream.getvalue().splitlines() == ["[1/2] decode naive 1k: ok 1.250 ms",
                                              "[2/2] e2e-decode naive 2k: ok 1.250 ms 1,234 tok/s"]


def test_progress_is_silent_when_not_enabled_and_off_a_terminal():
    for progress in (Progress(False, io.StringIO()), make_progress(stream=io.StringIO())):
        _run(progress, [RECORD])
        assert progress.stream.getvalue() == ""


def test_progress_asked_for_off_a_terminal_is_plain_lines():
    stream = io.StringIO()
    _run(make_progress(enabled=True, stream=stream), [RECORD])
    assert stream.getvalue() == "[1/1] decode naive 1k: ok 1.250 ms\n"


@pytest.mark.parametrize("given,expected", [("a\x00b", "a\ufffdb"), ("\x0b\x1f\x7f\x85", "\ufffd" * 4),
                                            ("x\ud800y", "x\ufffdy"), ("\ufffe", "\ufffd"),
                                            ("tab\tline\nret\r", "tab\tline\nret\r"),
                                            ("é 😀 <&> $", "é 😀 <&> $")])
def test_xml_safe_replaces_exactly_what_a_page_may_not_hold(given, expected):
    assert text.xml_safe(given) == expected


def test_encodable_replaces_lone_surrogates_only():
    assert text.encodable("a\udc00b\U0001f600") == "a\ufffdb\U0001f600"
    text.encodable("\ud800x").encode("utf-8")      # would raise with the surrogate in it


@pytest.mark.parametrize("fraction,shown", [(0.05, "5%"), (0.0005, "0.05%"), (0.125, "12.5%"), (5.0, "500%"),
                                            (0.0, "0%"), (None, "-")])
def test_a_percentage_shows_the_digits_its_fraction_holds(fraction, shown):
    assert text.percent(fraction) == shown
