"""Typed result records (spielbench/records.py): today's files read exactly, schemas, clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from spielbench.errors import InputError
from spielbench.records import RECORDS, BenchmarkPoint, EvalResult, HeldoutResult, ResultsIndex, RunMetrics

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "aggregate"


def _files(pattern: str) -> list[Path]:
    return sorted(REPO.glob(pattern))


@pytest.mark.parametrize("cls, pattern", [
    (BenchmarkPoint, "results/benchmark/*.json"),
    (BenchmarkPoint, "tests/data/aggregate/*/benchmark/*.json"),
    (RunMetrics, "tests/data/aggregate/*/runs/*/metrics.json"),
    (EvalResult, "tests/data/aggregate/*/runs/*/eval.json"),
    (RunMetrics, "runs*/*/metrics.json"),
    (EvalResult, "runs*/*/eval.json"),
    (ResultsIndex, "tests/data/aggregate/*/golden/results/runs/index.json"),
])
def test_files_read_and_write_back_unchanged(cls, pattern):
    """Every committed (and locally produced) file of each kind reads and serialises back to the same JSON."""
    files = _files(pattern)
    if not files and pattern.startswith("runs"):
        pytest.skip(f"no {pattern} in this checkout")
    assert files, pattern
    for p in files:
        raw = json.loads(p.read_text())
        rec = cls.read(p)
        assert json.dumps(rec.to_json()) == json.dumps(raw), p
        assert getattr(rec, "format", None) == getattr(cls, "VERSION", None)


def test_typed_fields_of_a_real_smoke_run():
    m = RunMetrics.read(DATA / "smoke" / "runs" / "spiel-ag-r2" / "metrics.json")
    assert m.method == "spiel-ag" and m.budget.rank == 2 and isinstance(m.budget.trainable_params, int)
    assert m.steps == len(m.loss_curve) == 4 and m.loss_curve[0].step == 1 and isinstance(m.loss_curve[0].loss, float)
    assert m.selector_history and m.selector_history[0].num_active == m.budget.trainable_params
    assert m.device_name == "cpu" and m.memory.trainable_state_bytes > 0
    assert "packages" in m.extra and "packages" not in RunMetrics.json_schema()["properties"]
    e = EvalResult.read(DATA / "smoke" / "runs" / "spiel-ag-r2" / "eval.json")
    task = e.tasks["arc_easy"]
    assert task.n == len(task.doc_ids) == len(task.item_scores) == 4 and task.metric == "acc"
    assert len(e.heldout.example_nll) == e.heldout.n_examples == 6
    assert sum(e.heldout.example_tokens) == e.heldout.n_tokens


def test_record_built_in_code_writes_every_field_and_reads_back():
    b = BenchmarkPoint(size="s", method="lora", status="ok", rank=16, peak_memory_bytes=2**30,
                       extra={"device": "cpu"})
    obj = b.to_json()
    assert obj["format"] == BenchmarkPoint.VERSION and obj["cuda_max_allocated_bytes"] is None
    assert list(obj)[-1] == "device"
    back = BenchmarkPoint.from_json(json.loads(json.dumps(obj)), "x.json")
    assert back == b and back.peak_memory_kind == "CPU peak RSS"


@pytest.mark.parametrize("cls, pattern", [
    (BenchmarkPoint, "tests/data/aggregate/smoke/benchmark/*.json"),
    (RunMetrics, "tests/data/aggregate/smoke/runs/*/metrics.json"),
    (EvalResult, "tests/data/aggregate/smoke/runs/*/eval.json"),
])
def test_writers_through_the_records_give_the_files_bytes(cls, pattern, tmp_path):
    """What train/evaluate/benchmark write (``Record.write_checked`` of their JSON object) is byte for byte
    the file the aggregation reads (the smoke case's files were written by those programs; the synthetic
    case's are hand-made, one line each)."""
    files = _files(pattern)
    assert files, pattern
    for p in files:
        text = p.read_text(encoding="utf-8")
        out = tmp_path / p.name
        cls.write_checked(json.loads(text), out, ensure_ascii=False)
        assert out.read_text(encoding="utf-8") == text, p
    bad = {"format": cls.VERSION, "size": "s", "method": 3, "status": "ok", "tasks": {}}
    with pytest.raises(InputError, match="x.json"):
        cls.write_checked(bad, tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_schemas_are_valid_and_describe_the_files(name):
    schema = RECORDS[name].json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["additionalProperties"] is True
    if name != "runs/index.json":  # the aggregation's own index carries no version
        assert schema["properties"]["format"] == {"enum": [RECORDS[name].VERSION]}


@pytest.mark.parametrize("cls, obj, message", [
    (BenchmarkPoint, {"size": "s", "method": "lora"}, r"^s__lora.json: status: expected a string, got None$"),
    (BenchmarkPoint, {"size": "s", "method": "lora", "status": "ok", "step_time_mean_s": "1s"},
     r"^s__lora.json: step_time_mean_s: expected a number, got '1s'$"),
    (BenchmarkPoint, {"size": "s", "method": "lora", "status": "ok", "format": "spielbench-benchmark/9"},
     r"format: expected one of spielbench-benchmark/1, got 'spielbench-benchmark/9'"),
    (RunMetrics, {"loss_curve": [{"step": 1, "loss": 2.0}, {"step": 2.5, "loss": 2.0}]},
     r"^s__lora.json: loss_curve\[1\].step: expected an integer, got 2.5$"),
    (RunMetrics, {"budget": {"rank": True}}, r"budget.rank: expected an integer, got True"),
    (RunMetrics, {"memory": []}, r"memory: expected an object, got \[\]"),
    (EvalResult, {"tasks": {"a": {"value": "high"}}}, r"tasks.a.value: expected a number, got 'high'"),
    (EvalResult, {"tasks": {"a": {"value": 0.5}}, "heldout": {"loss": 2.0, "example_nll": [1.0, 2.0],
                                                             "example_tokens": [1]}},
     r"^s__lora.json: heldout: example_nll and example_tokens must both be given, with equal lengths$"),
])
def test_mismatch_names_file_and_field(cls, obj, message):
    with pytest.raises(InputError, match=message):
        cls.from_json(obj, "s__lora.json")


def test_read_names_the_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        EvalResult.read(tmp_path / "eval.json")
    (tmp_path / "eval.json").write_text("[1]")
    with pytest.raises(InputError, match=r"eval.json: expected a JSON object, got list"):
        EvalResult.read(tmp_path / "eval.json")
    (tmp_path / "eval.json").write_text("{")
    with pytest.raises(InputError, match=r"eval.json: not valid JSON \(line 1"):
        EvalResult.read(tmp_path / "eval.json")


def test_heldout_lists_are_checked_only_together():
    assert HeldoutResult.from_json({"loss": 2.0}, "h").example_nll is None
    with pytest.raises(InputError, match="example_nll and example_tokens"):
        HeldoutResult.from_json({"loss": 2.0, "example_tokens": [3]}, "h")


def test_schema_command_prints_every_schema():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "spielbench.records"], capture_output=True, text=True, cwd=REPO,
                         check=True)
    schemas = json.loads(out.stdout)
    assert sorted(schemas) == sorted(RECORDS)
    assert schemas["eval.json"]["properties"]["tasks"]["additionalProperties"]["properties"]["value"] == \
        {"type": ["number", "null"]}
    bad = subprocess.run([sys.executable, "-m", "spielbench.records", "nope"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "unknown record 'nope'" in bad.stderr
