"""The record vocabulary: one torch-free module that the writers in bench and the readers in
analysis share, so that what one writes the other reads as valid."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from attnlab import schema
from attnlab.bench import records as rec


def ok_record(mode=schema.PREFILL, status=schema.OK, **fields):
    base = dict(run_id="r1", kernel="naive", mode=mode, workload="w", batch=1, heads=2, kv_heads=2, head_dim=16,
                dtype="float32", causal=False, seq_len=1024, q_len=1024, status=status, times_ms=[1.0, 2.0, 3.0],
                median_ms=2.0, tflops=1.5, device="cpu")
    return rec.new_record(**{**base, **fields})


def test_importing_the_schema_does_not_import_torch():
    code = "import attnlab.schema, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_a_written_record_loads_as_valid_with_every_field(tmp_path):
    pytest.importorskip("pandas")
    from attnlab.analysis.load import load

    out = tmp_path / "run.jsonl"
    with rec.RecordWriter(out) as writer:
        writer.write({"schema": rec.ENV_SCHEMA, "run_id": "r1", "time": "2026-01-01T00:00:00+00:00"})
        writer.write(ok_record())
    loaded = load(out)
    assert not loaded.warnings and len(loaded.results) == 1 and len(loaded.environments) == 1
    row = loaded.results.iloc[0]
    assert set(schema.FIELDS) <= set(loaded.results.columns)
    assert row["valid"] and row["excluded"] == "" and row["schema"] == schema.RESULT_SCHEMA
    assert [k for k in rec.read_records(out)[0]][:len(schema.FIELDS)] == list(schema.FIELDS)


@pytest.mark.parametrize("mode", schema.MODES)
@pytest.mark.parametrize("status", schema.STATUSES)
def test_every_status_and_mode_a_writer_may_use_is_valid_to_the_reader(mode, status):
    from attnlab.analysis import select

    assert select.invalid_reason(ok_record(mode=mode, status=status)) == ""


def test_an_unknown_status_is_refused_by_the_writer():
    with pytest.raises(ValueError, match=f"status: expected one of {', '.join(schema.STATUSES)}, got 'fine'"):
        rec.new_record(status="fine")


def test_older_result_schemas_are_read_and_a_newer_one_is_refused_by_name(tmp_path):
    older, other = schema.family(schema.RESULT_SCHEMA) + "0", schema.family(schema.RESULT_SCHEMA) + "x"
    path = tmp_path / "mixed.jsonl"
    lines = [{"schema": older, "kernel": "old"}, {"schema": schema.RESULT_SCHEMA, "kernel": "now"},
             {"schema": other, "kernel": "not a version"}, {"schema": schema.ENVIRONMENT_SCHEMA, "run_id": "r"}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert [r["kernel"] for r in schema.read_records(path)] == ["old", "now"]
    assert [e["run_id"] for e in schema.read_environments(path)] == ["r"]

    newer = f"{schema.family(schema.RESULT_SCHEMA)}{schema.version(schema.RESULT_SCHEMA) + 1}"
    path.write_text(json.dumps({"schema": newer}) + "\n")
    with pytest.raises(ValueError, match=f"{newer} is newer than this reader's {schema.RESULT_SCHEMA}"):
        rec.read_records(path)


def test_schema_names_split_into_family_and_version():
    assert schema.family(schema.TUNING_SCHEMA) == "attnlab.tuning/"
    assert schema.version("attnlab.result/12") == 12
    assert schema.version("attnlab.result/12", of=schema.RESULT_SCHEMA) == 12
    assert schema.version("attnlab.result/12", of=schema.TUNING_SCHEMA) is None
    assert schema.version("attnlab.result/one") is None and schema.version(None) is None


def test_status_rank_orders_every_status():
    rank = schema.STATUS_RANK
    assert set(rank) == set(schema.STATUSES)
    failures = [s for s in schema.STATUSES if s not in (schema.OK, schema.SKIPPED)]
    assert failures and all(rank[schema.OK] > rank[f] > rank[schema.SKIPPED] for f in failures)
    # What settles a point on resume is everything ranked above a skipped point.
    assert set(schema.FINAL_STATUSES) == {s for s in schema.STATUSES if rank[s] > rank[schema.SKIPPED]}


def test_the_modules_name_the_same_words():
    from attnlab.analysis import load, select
    from attnlab.bench import e2e, sweep, tuning, workloads

    assert (rec.SCHEMA, rec.ENV_SCHEMA, rec.FIELDS) == (schema.RESULT_SCHEMA, schema.ENVIRONMENT_SCHEMA, schema.FIELDS)
    assert (load.RESULT_SCHEMA, load.ENVIRONMENT_SCHEMA, load.TUNING_SCHEMA) == (
        schema.RESULT_SCHEMA, schema.ENVIRONMENT_SCHEMA, schema.TUNING_SCHEMA)
    assert tuning.TUNING_SCHEMA == schema.TUNING_SCHEMA and sweep.CALIBRATION == schema.CALIBRATION
    assert (select.STATUSES, select.MODES) == (schema.STATUSES, schema.MODES)
    assert workloads.MODES == schema.KERNEL_MODES == (schema.PREFILL, schema.DECODE, schema.BACKWARD, schema.FWD_BWD)
    assert (e2e.MODE_DECODE, e2e.MODE_PREFILL_DECODE) == schema.E2E_MODES
    assert set(schema.MODES) == {*schema.KERNEL_MODES, schema.CALIBRATION, *schema.E2E_MODES, schema.RING}


def test_schema_names_are_spelled_only_in_the_schema_module():
    import attnlab.analysis
    import attnlab.bench
    import attnlab.kernels

    names = (schema.RESULT_SCHEMA, schema.ENVIRONMENT_SCHEMA, schema.RETRACTION_SCHEMA, schema.TUNING_SCHEMA)
    folders = {Path(m.__file__).parent for m in (attnlab, attnlab.analysis, attnlab.bench, attnlab.kernels)}
    spelled = sorted(str(path) for folder in folders for path in folder.rglob("*.py")
                     if any(name in path.read_text(encoding="utf-8") for name in names))
    assert spelled == [schema.__file__]


def test_the_reader_replaces_lone_surrogates_and_keeps_pairs(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_text('{"schema": "attnlab.result/1", "kernel": "k\\ud800", "\\udc00": "\\ud83d\\ude00"}\n')
    (record,) = schema.read_records(path)
    assert record == {"schema": schema.RESULT_SCHEMA, "kernel": "k\ufffd", "\ufffd": "\U0001f600"}


def test_the_reader_names_an_unfinished_last_line_and_tells_it_from_a_bad_one():
    found = schema.parse_json_lines('{"a": 1}\n{"b": \n{"c": 3}\n{"d"', "run.jsonl")
    assert [n for n, _ in found.values] == [1, 3] and [n for n, _ in found.bad] == [2] and found.partial == 4
    assert found.partial_warning.startswith("run.jsonl:4: ignored an unfinished last line")
    ended = schema.parse_json_lines('{"a": 1}\n{"d"\n')      # a newline ends it: not a line in flight
    assert [n for n, _ in ended.bad] == [2] and ended.partial is None


def test_a_newer_environment_or_retraction_is_refused_too(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_text('{"schema": "attnlab.result/1"}\n{"schema": "attnlab.environment/2", "run_id": "r"}\n')
    with pytest.raises(ValueError, match=r"run.jsonl:2: written by a newer attnlab \(schema attnlab.environment/2"):
        schema.read_records(path)


def test_every_field_a_record_is_read_by_has_one_kind():
    named = (*schema.FIELDS, *schema.POINT_FIELDS, *schema.ROLE_FIELDS)
    assert [f for f in named if f not in schema.FIELD_KINDS] == []
    assert set(schema.FIELD_KINDS.values()) == {schema.TEXT, schema.WHOLE, schema.NUMBER, schema.FLAG, schema.TIMES}
    assert schema.FIELDS == tuple(schema.CONTRACT_KINDS) and schema.FIELDS[:3] == ("schema", "run_id", "kernel")
    assert set(schema.OPTION_KINDS) <= set(schema.POINT_FIELDS)         # an option tells points apart
    assert {*schema.VARIANT_DEFAULTS, *schema.CACHE_DEFAULTS} <= set(schema.OPTION_KINDS)


def test_the_analysis_column_lists_derive_from_the_kinds():
    pytest.importorskip("pandas")
    from attnlab.analysis import load, select

    kinds = schema.FIELD_KINDS
    assert set(load.NUMERIC_FIELDS) == {f for f, k in kinds.items() if k in (schema.WHOLE, schema.NUMBER)}
    others = [f for f in schema.POINT_FIELDS if f != "seq_len"]
    assert select.WHOLE_NUMBER_FIELDS == tuple(f for f in others if kinds[f] == schema.WHOLE)
    assert set(select.NUMBER_FIELDS) == {f for f in others if kinds[f] in (schema.WHOLE, schema.NUMBER)}
    assert set(select.TEXT_FIELDS) == {"run_id", "status", *(f for f in schema.POINT_FIELDS if kinds[f] == schema.TEXT)}
    assert select.POINT_KEY == schema.POINT_FIELDS


def test_a_new_record_carries_the_roles_the_registry_gives_its_kernel():
    pytest.importorskip("torch")
    from attnlab.kernels import registry

    record = ok_record(kernel="triton-ptr")
    assert {k: record[k] for k in schema.ROLE_FIELDS} == registry.roles("triton-ptr")
    assert record["family"] == "triton" and record["ablation_of"] == "triton"
    assert ok_record(kernel="sdpa-flash", baseline=False)["baseline"] is False      # given: it stands
    assert not set(schema.ROLE_FIELDS) & set(ok_record(kernel="not-registered"))
    assert list(record)[:len(schema.FIELDS)] == list(schema.FIELDS)


def test_the_roles_file_holds_each_registered_kernel_once(tmp_path):
    pytest.importorskip("torch")
    from attnlab.bench import roles

    lines = [json.loads(line) for line in roles.write_roles(tmp_path / "roles.jsonl").read_text().splitlines()]
    assert len({line["kernel"] for line in lines}) == len(lines) and lines
    assert all(line["schema"] == schema.ROLES_SCHEMA and set(line) == {"schema", "kernel", *schema.ROLE_FIELDS}
               for line in lines)
