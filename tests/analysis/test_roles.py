"""A kernel's roles (family, ablation_of, baseline) come from the registry, travel in its records
or in a roles file beside older data, and decide how the analysis draws it and what it compares
against; nothing in the analysis is keyed on a kernel's name."""
import json

import pytest

pytest.importorskip("pandas")
pytest.importorskip("seaborn")

from attnlab import schema  # noqa: E402
from attnlab.analysis import charts  # noqa: E402
from attnlab.analysis.load import load  # noqa: E402
from attnlab.analysis.roles import ROLES_FILE  # noqa: E402
from paths import PROFILES  # noqa: E402


def write(path, *objects):
    path.write_text("".join(json.dumps(o) + "\n" for o in objects))
    return path


def result(kernel, seq_len=1024, median_ms=1.0, run_id="r1", **fields):
    return {"schema": schema.RESULT_SCHEMA, "run_id": run_id, "kernel": kernel, "mode": schema.PREFILL,
            "workload": "w", "batch": 1, "heads": 2, "kv_heads": 2, "head_dim": 16, "dtype": "float16",
            "causal": True, "seq_len": seq_len, "q_len": seq_len, "status": schema.OK, "times_ms": [median_ms],
            "median_ms": median_ms, "device": "cpu", **fields}


def roles_line(kernel, family, ablation_of="", baseline=False):
    return {"schema": schema.ROLES_SCHEMA, "kernel": kernel, "family": family, "ablation_of": ablation_of,
            "baseline": baseline}


@pytest.fixture
def plugin_family():
    """Three kernels a plugin registers: a prefill, its decode (prefill_partner) and an ablation of it."""
    torch = pytest.importorskip("torch")
    from attnlab.kernels import registry

    def call(q, *args, **options):
        return torch.zeros_like(q)
    names = ("zz-plugin", "zz-plugin-decode", "zz-plugin-noopt")
    registry.register_kernel(names[0], prefill=call, devices="cpu", dtypes="float32")
    registry.register_kernel(names[1], decode=call, devices="cpu", dtypes="float32", prefill_partner=names[0])
    registry.register_kernel(names[2], prefill=call, devices="cpu", dtypes="float32", ablation_of=names[0])
    yield names
    for name in names:
        registry.unregister(name)


def test_the_registry_derives_a_family_through_ablations_and_prefill_partners(plugin_family):
    from attnlab.kernels import registry

    base, decode, ablation = plugin_family
    assert registry.roles(ablation) == {"family": base, "ablation_of": base, "baseline": False}
    assert registry.roles(decode)["family"] == base
    assert registry.roles("triton-decode-nopdl") == {"family": "triton", "ablation_of": "triton-decode",
                                                     "baseline": False}
    assert registry.roles("sdpa-flash")["baseline"] and not registry.roles("triton")["baseline"]
    with pytest.raises(ValueError, match="no-such-kernel"):
        registry.roles("no-such-kernel")


def test_a_plugin_ablation_is_drawn_in_a_lighter_shade_of_its_familys_hue(plugin_family, tmp_path):
    from attnlab.bench.records import RecordWriter, new_record

    base, decode, ablation = plugin_family
    out = tmp_path / "run.jsonl"
    with RecordWriter(out) as writer:
        for kernel in plugin_family:
            fields = {k: v for k, v in result(kernel).items() if k != "schema"}
            writer.write(new_record(**fields))
    rows = load(out).results
    assert rows.set_index("kernel").loc[ablation, "family"] == base
    palette, markers = charts.palette_for(rows), charts.kernel_markers(rows)
    hue = charts.family_hues([base])[base]
    assert palette[base] == palette[decode] == hue
    assert palette[ablation] == charts._lighter(hue) != hue
    assert markers[base] != markers[decode]         # one colour: the markers tell them apart


def test_a_records_own_roles_win_over_the_roles_file_and_with_neither_a_kernel_stands_alone(tmp_path):
    write(tmp_path / "run.jsonl", result("k-own", family="fam-a", ablation_of="", baseline=False),
          result("k-filed"), result("k-unknown"))
    write(tmp_path / ROLES_FILE, roles_line("k-own", "fam-b", baseline=True), roles_line("k-filed", "fam-b",
                                                                                          ablation_of="k-own"))
    loaded = load(tmp_path / "run.jsonl")       # the roles file is read from beside a file named
    roles = loaded.results.set_index("kernel")[list(schema.ROLE_FIELDS)].to_dict("index")
    assert roles["k-own"] == {"family": "fam-a", "ablation_of": "", "baseline": False}
    assert roles["k-filed"] == {"family": "fam-b", "ablation_of": "k-own", "baseline": False}
    assert roles["k-unknown"] == {"family": "k-unknown", "ablation_of": "", "baseline": False}
    assert not loaded.warnings


def test_roles_files_that_disagree_are_named_and_odd_lines_skipped(tmp_path):
    write(tmp_path / "run.jsonl", result("k"))
    (tmp_path / "a").mkdir()
    write(tmp_path / "a" / ROLES_FILE, roles_line("k", "one"))       # read first: sorted by path
    write(tmp_path / "b.jsonl", roles_line("k", "two"), {"schema": schema.ROLES_SCHEMA, "kernel": "k"})
    loaded = load(tmp_path)
    assert loaded.results.iloc[0]["family"] == "one"
    assert any("differ" in w and "b.jsonl:1" in w for w in loaded.warnings)
    assert any("b.jsonl:2" in w and "without a family" in w for w in loaded.warnings)


def test_the_baseline_is_a_kernel_whose_records_say_so_measured_at_the_most_points_then_the_fastest():
    pd = pytest.importorskip("pandas")

    def rows(*specs):
        return pd.DataFrame([result(k, n, ms, family=k, ablation_of="", baseline=b) for k, n, ms, b in specs])
    lengths = (1024, 2048)
    more_points = rows(*[("b-slow", n, 5.0, True) for n in lengths], ("a-fast", 1024, 1.0, True),
                       *[("new", n, 0.5, False) for n in lengths])
    assert charts.pick_baseline(more_points) == ("b-slow", True)
    tied = rows(*[(k, n, ms, True) for k, ms in (("a-slow", 4.0), ("z-fast", 2.0)) for n in lengths])
    assert charts.pick_baseline(tied) == ("z-fast", True)
    assert charts.pick_baseline(tied, "a-slow") == ("a-slow", False)     # asked for: it wins
    no_baseline = rows(("y", 1024, 1.0, False), ("x", 1024, 2.0, False))
    assert charts.pick_baseline(no_baseline) == ("x", True)


def test_the_committed_profiles_compare_against_sdpa_flash_and_draw_a_family_in_one_hue():
    results = load(PROFILES).results
    ok = results[(results["excluded"] == "") & (results["status"] == schema.OK)]
    for _, group in ok[ok["mode"].isin((schema.PREFILL, schema.DECODE))].groupby(["mode", "workload"]):
        assert charts.pick_baseline(group) == ("sdpa-flash", True)
    palette = charts.palette_for(ok)
    assert palette["triton"] == palette["triton-decode"] != palette["sdpa-flash"]
