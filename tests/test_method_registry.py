"""The method registry (spielbench/methods.py) is the one home of what a method is: the schema agrees with
it, its cross references hold, and a method added to it alone shows up in the tables with its label and order.
"""
from __future__ import annotations

import csv
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from spielbench import aggregate as agg
from spielbench import methods
from spielbench.errors import InputError
from spielbench.methods import METHODS, REGISTRY

REPO = Path(__file__).resolve().parents[1]


def test_schema_method_enum_equals_the_trainable_registry():
    """The registry is the one list of methods: the schema files name none, spielbench.schema fills the run
    config schema's method enum from the registry, and the pipeline schema refers to that definition."""
    from spielbench.schema import PIPELINE_SCHEMA, RUN_SCHEMA, schema_at, validate

    enums = []

    def walk(node):  # every `method:` schema with an enum (under definitions or properties)
        if isinstance(node, dict):
            if isinstance(node.get("method"), dict) and "enum" in node["method"]:
                enums.append(node["method"]["enum"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for path in ("spielbench/runconfig.schema.yaml", "workflow/schemas/config.schema.yaml"):
        walk(yaml.safe_load((REPO / path).read_text()))
    assert not enums, "a schema file lists methods of its own"
    assert schema_at(RUN_SCHEMA, "/$defs/method")["enum"] == sorted(METHODS, key=methods.table_order)
    assert sorted(METHODS) == sorted(n for n, s in REGISTRY.items() if s.trainable)
    with pytest.raises(InputError, match="runs\\[0\\].method"):
        validate({"runs": [{"method": "not-a-method"}]}, PIPELINE_SCHEMA, source="config")


def test_registry_cross_references_hold():
    orders = [s.order for s in REGISTRY.values()]
    assert len(set(orders)) == len(orders)
    for name, spec in REGISTRY.items():
        assert spec.label and spec.name == name
        assert spec.lora_reference in REGISTRY
        assert (spec.fp32_twin is not None) == (spec.quantized and spec.trainable), name
        if spec.fp32_twin:
            twin = REGISTRY[spec.fp32_twin]
            assert not twin.quantized and twin.family == spec.family and spec.lora_reference == "qlora"
    assert methods.benchmark_methods()[-2:] == ("floor", "spiel-reference") and "base" not in methods.benchmark_methods()
    assert methods.ranked_methods() == ("lora", "spiel-ag", "spiel-ma", "spiel-static", "shira", "qlora", "qspiel-ag",
                                        "qspiel-ma")
    assert methods.method_label("unknown-method") == "unknown-method"
    assert methods.table_order("unknown-method") > methods.table_order("spiel-reference")


def _run(method: str, rank: int, acc: float, target: str | None = None) -> agg.RunRecord:
    target = target or f"{method}-r{rank}"
    cfg = {"method": method, "rank": rank, "seed": 1, "max_steps": 10, "run_id": target}
    metrics = {"method": method, "budget": {"rank": rank, "trainable_params": 100 * rank},
               "steps": 10, "step_time_mean_s": 1.0 + acc, "memory": {"peak_rss_bytes": 2**30,
                                                                     "trainable_state_bytes": 1600 * rank}}
    evaluation = {"tasks": {"t": {"metric": "acc", "value": acc, "stderr": 0.01, "n": 100}}}
    return agg.make_record(target, cfg, "M", "D", metrics, evaluation)


def test_a_method_added_to_the_registry_alone_appears_in_the_tables(monkeypatch, tmp_path):
    lora = REGISTRY["lora"]
    dummy = dataclasses.replace(lora, name="dummy", label="Dummy adapter", order=35, description="a test method")
    qdummy = dataclasses.replace(dummy, name="qdummy", label="qDummy", order=95, quantized=True, fp32_twin="dummy",
                                 lora_reference="qlora")
    for spec in (dummy, qdummy):
        monkeypatch.setitem(REGISTRY, spec.name, spec)
        monkeypatch.setitem(METHODS, spec.name, spec)
    records = [agg.make_record("base", {}, "M", "D", None,
                               {"tasks": {"t": {"metric": "acc", "value": 0.5, "stderr": 0.01, "n": 100}}})]
    records += [_run("spiel-ma", 4, 0.61), _run("qdummy", 4, 0.58), _run("dummy", 4, 0.62), _run("lora", 4, 0.60),
                _run("spiel-ag", 4, 0.63), _run("qlora", 4, 0.57)]
    agg.write_results(records, [], tmp_path, tasks=["t"])

    with open(tmp_path / "tables" / "main.csv", newline="") as fh:
        order = [r["method"] for r in csv.DictReader(fh)]
    assert order == ["base", "lora", "spiel-ag", "dummy", "spiel-ma", "qlora", "qdummy"]  # order 35, then 95
    md = (tmp_path / "tables" / "main.md").read_text()
    assert re.search(r"\| Dummy adapter +\| dummy-r4 +\|", md) and re.search(r"\| qDummy +\| qdummy-r4 +\|", md)
    assert "Dummy adapter" in (tmp_path / "tables" / "main.tex").read_text()

    with open(tmp_path / "tables" / "quantized.csv", newline="") as fh:
        quantized = [r["run"] for r in csv.DictReader(fh)]
    assert quantized == ["lora-r4", "dummy-r4", "qlora-r4", "qdummy-r4"]  # the 4-bit twin comes from the registry

    with open(tmp_path / "tables" / "efficiency.csv", newline="") as fh:
        eff = {r["run"]: r for r in csv.DictReader(fh)}
    assert float(eff["dummy-r4"]["step_time_vs_lora"]) == pytest.approx(1.62 / 1.60)   # vs LoRA at the same rank
    assert float(eff["qdummy-r4"]["step_time_vs_lora"]) == pytest.approx(1.58 / 1.57)  # vs qLoRA (its lora_reference)


def test_unregistered_method_sorts_last_with_its_own_name(tmp_path):
    records = [_run("lora", 4, 0.6), _run("mystery", 4, 0.6), _run("spiel-ag", 4, 0.6)]
    table = agg.main_table(records, ["t"])
    assert list(table.display["Method"]) == ["LoRA", "SpIEL-AG", "mystery"]


def test_literal_method_lists_elsewhere_agree_with_the_registry():
    """pipeline.py and benchmark.py held their own method lists; where they still do, they agree with the registry."""
    from spielbench import benchmark, pipeline

    checked = 0
    if hasattr(pipeline, "RANKED_METHODS"):
        assert set(pipeline.RANKED_METHODS) == set(methods.ranked_methods())
        checked += 1
    if hasattr(benchmark, "all_methods"):
        assert set(benchmark.all_methods()) == set(methods.benchmark_methods())
        checked += 1
    if hasattr(benchmark, "_method_family"):
        for name in methods.benchmark_methods():
            assert benchmark._method_family(name) == REGISTRY[name].family, name
        checked += 1
    if not checked:
        pytest.skip("pipeline.py and benchmark.py read the registry: nothing to keep in agreement")


def test_the_evaluation_task_enum_is_the_task_table():
    """The pipeline schema lists no tasks of its own: spielbench.schema fills the enum from the task table."""
    from spielbench.lm_eval_tasks.registry import TASKS
    from spielbench.schema import PIPELINE_SCHEMA, schema_at, validate

    raw = yaml.safe_load(PIPELINE_SCHEMA.read_text())
    assert "enum" not in raw["properties"]["evaluation"]["properties"]["tasks"]["items"]
    assert schema_at(PIPELINE_SCHEMA, "/properties/evaluation/properties/tasks/items")["enum"] == list(TASKS)
    with pytest.raises(InputError, match=r"evaluation.tasks\[0\]"):
        validate({"runs": [{"method": "lora"}], "evaluation": {"tasks": ["arc_hard"]}}, PIPELINE_SCHEMA)
