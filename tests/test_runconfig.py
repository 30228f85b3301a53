"""One validation of configs, from the schema: RunConfig's fields, types and bounds are the run config schema's
(spielbench/runconfig.schema.yaml), the pipeline schema reuses them, every error is one line naming the dotted
key, the value and what was expected, and the SpIEL options the harness passes through agree with SpielConfig."""
from __future__ import annotations

import copy
import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from spielbench import pipeline, runconfig
from spielbench.errors import InputError
from spielbench.runconfig import RunConfig, load_run_config
from spielbench.schema import PIPELINE_SCHEMA, RUN_SCHEMA, schema_at, show, validate

REPO = Path(__file__).resolve().parents[1]
REQUIRED = {"method": "lora", "model": "m", "train_data": "t.jsonl"}
_JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", dict: "object"}


def _run_properties() -> dict:
    return {**schema_at(RUN_SCHEMA, "/$defs/settings")["properties"], **schema_at(RUN_SCHEMA)["properties"]}


def _json_types(annotation) -> set[str]:
    """``int | None`` -> ``{"integer", "null"}``, ``dict[str, Any]`` -> ``{"object"}``."""
    if typing.get_origin(annotation) is dict:
        return {"object"}
    args = typing.get_args(annotation) or (annotation,)
    return {"null" if a is type(None) else _JSON_TYPES[a] for a in args}


def test_run_config_fields_are_the_schema_properties_with_the_same_types():
    props = _run_properties()
    hints = typing.get_type_hints(RunConfig)
    assert [f.name for f in dataclasses.fields(RunConfig)] and {f.name for f in dataclasses.fields(RunConfig)} == set(props)
    for name, prop in props.items():
        if "$ref" in prop:  # method (an enum of strings), spiel (a mapping)
            prop = schema_at(RUN_SCHEMA, prop["$ref"].lstrip("#"))
        kinds = prop["type"] if isinstance(prop["type"], list) else [prop["type"]]
        assert _json_types(hints[name]) == set(kinds), name
    required = [f.name for f in dataclasses.fields(RunConfig) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    assert sorted(schema_at(RUN_SCHEMA)["required"]) == sorted(required)
    # the defaults are the dataclass's alone, and each passes the schema
    assert not any("default" in p for p in props.values())
    RunConfig(**REQUIRED)


def test_the_old_hand_checks_are_gone():
    """No coercion or range check of RunConfig's own, no method list or rank rule of the pipeline's own."""
    for gone in ("_coerce", "_check_ranges", "_check_finite", "_type_name"):
        assert not hasattr(runconfig, gone), gone
    assert not hasattr(pipeline, "RANKED_METHODS")
    assert set(pipeline.TRAINING_KEYS) | {"spiel"} == set(schema_at(RUN_SCHEMA, "/$defs/settings")["properties"])


def _bounded():
    """(field path, subschema) of every run-config value with a numeric bound, ``spiel.*`` included."""
    for name, prop in _run_properties().items():
        if any(k in prop for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
            yield (name,), prop
    for name, prop in schema_at(RUN_SCHEMA, "/$defs/spiel")["properties"].items():
        if any(k in prop for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
            yield ("spiel", name), prop


def _config_with(path: tuple[str, ...], value):
    data = dict(REQUIRED)
    if len(path) == 1:
        data[path[0]] = value
    else:
        data[path[0]] = {path[1]: value, **({"reselection_steps": 10**6} if path[1] != "reselection_steps" else {})}
    return data


def _accepts(path, value) -> bool:
    try:
        RunConfig.from_mapping(_config_with(path, value))
        return True
    except InputError as err:
        message = str(err)
        assert "\n" not in message and message.startswith(".".join(path)) and ": expected " in message, message
        if not isinstance(value, list):
            assert message.endswith(f", got {show(value)}"), message
        return False


@pytest.mark.parametrize("path, prop", list(_bounded()), ids=lambda x: ".".join(x) if isinstance(x, tuple) else "")
def test_each_bound_is_enforced_exactly_as_the_schema_states_it(path, prop):
    """At each bound RunConfig accepts or refuses as the schema says (no stricter or looser check of its own),
    far inside it accepts, and the refusal names the field and the value."""
    step = 1 if "integer" in prop["type"] else 1e-6
    if "minimum" in prop:
        assert _accepts(path, prop["minimum"]) and not _accepts(path, prop["minimum"] - step)
    if "exclusiveMinimum" in prop:
        assert not _accepts(path, prop["exclusiveMinimum"]) and _accepts(path, prop["exclusiveMinimum"] + step)
    if "maximum" in prop:
        assert _accepts(path, prop["maximum"]) and not _accepts(path, prop["maximum"] + step)
    elif "exclusiveMaximum" in prop:
        assert not _accepts(path, prop["exclusiveMaximum"]) and _accepts(path, prop["exclusiveMaximum"] - step)
    else:
        assert _accepts(path, 10**6)


@pytest.mark.parametrize("text, message", [
    ("max_steps: 3.0", "max_steps: expected an integer, got 3.0"),
    ("max_steps: true", "max_steps: expected an integer, got true"),
    ("gradient_checkpointing: 'yes'", "gradient_checkpointing: expected true or false, got 'yes'"),
    ("learning_rate: .inf", "learning_rate: expected a finite number, got inf"),
    ("lora_alpha: -.inf", "lora_alpha: expected a finite number, got -inf"),
    ("warmup_ratio: .nan", "warmup_ratio: expected a finite number, got nan"),
    ("density: .nan", "density: expected a finite number, got nan"),
    ("spiel: {initial_reselection_rate: .nan}", "spiel.initial_reselection_rate: expected a finite number, got nan"),
    ("spiel: {reselection_rate_policy: cosin}",
     "spiel.reselection_rate_policy: expected one of linear, cosine, none, got 'cosin'"),
    ("spiel: {target_modules: []}", "spiel.target_modules: expected a list of at least 1 item(s), got []"),
    ("on_malformed: ignore", "on_malformed: expected one of error, skip, got 'ignore'"),
    ("model: ''", "model: expected a non-empty string, got ''"),
    ("spiel: 3", "spiel: expected a mapping, got 3"),
    ("rnak: 3", "r.yaml: unknown key 'rnak'; known keys: data_report, density, device, "),
])
def test_run_config_file_errors_are_one_line_naming_the_field(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text("method: lora\nmodel: m\ntrain_data: t\n" + text + "\n")
    with pytest.raises(InputError) as err:
        load_run_config(path)
    assert "\n" not in str(err.value) and str(err.value).startswith(message.replace("r.yaml", str(path))), str(err.value)


def test_set_overrides_are_checked_by_the_same_schema():
    """``--set`` values are YAML like the file's (1e-4 a number, as YAML 1.2 reads it) and checked the same way."""
    cfg = load_run_config(None, ["method=lora", "model=m", "train_data=t", "learning_rate=1e-4", "lora_alpha=8"])
    assert cfg.learning_rate == 1e-4 and isinstance(cfg.lora_alpha, float) and cfg.lora_alpha == 8.0
    with pytest.raises(InputError, match=r"^warmup_ratio: expected a number in \[0, 1\), got 1$"):
        load_run_config(None, ["method=lora", "model=m", "train_data=t", "warmup_ratio=1"])
    with pytest.raises(InputError, match=r"^run config: missing required key 'train_data'$"):
        load_run_config(None, ["method=lora", "model=m"])


def _pipeline_config():
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


@pytest.mark.parametrize("change, message", [
    (lambda c: c["runs"][1].update(rank=0), "runs[1].rank: expected an integer >= 1, got 0"),
    (lambda c: c["training"].update(warmup_ratio=1.5), "training.warmup_ratio: expected a number in [0, 1), got 1.5"),
    (lambda c: c["training"].update(lora_dropout=1.0), "training.lora_dropout: expected a number in [0, 1), got 1.0"),
    (lambda c: c["runs"][2].update(learning_rate=float("nan")), "runs[2].learning_rate: expected a finite number, got nan"),
    (lambda c: c["runs"][2].update(learning_rate="1e-4"),
     "runs[2].learning_rate: expected a number, got '1e-4' (YAML 1.1 reads a number like 1e-4 as text: write 1.0e-4)"),
    (lambda c: c["training"].update(heldout_examples=None), "training.heldout_examples: expected an integer, got null"),
    (lambda c: c["training"]["spiel"].update(delta_dtype="int8"),
     "training.spiel.delta_dtype: expected one of float32, bfloat16, float16, got 'int8'"),
    (lambda c: c["training"].update(device="gpu"), "training.device: expected a string matching "),
    (lambda c: c["data"].update(on_malformed="drop"), "data.on_malformed: expected one of error, skip, got 'drop'"),
    (lambda c: c["evaluation"].update(limit=0), "evaluation.limit: expected an integer >= 1, got 0"),
    (lambda c: c["claims"]["margins"].update(heldout_loss=0.5),
     "claims.margins.heldout_loss: expected a number in (0, 0.02], got 0.5"),
    (lambda c: c["runs"].append({"rank": 4}), "runs[18]: missing required key 'method'"),
    (lambda c: c.update(trainig={}), "config: unknown key 'trainig'; known keys: benchmark, claims, data, "),
])
def test_pipeline_config_errors_are_one_line_naming_the_dotted_key(change, message):
    cfg = _pipeline_config()
    change(cfg)
    if "runs[18]" in message:
        message = message.replace("18", str(len(cfg["runs"]) - 1))
    with pytest.raises(pipeline.PipelineConfigError) as err:
        pipeline.resolve_pipeline(cfg, check_device=False, check_model=False)
    assert "\n" not in str(err.value) and str(err.value).startswith(message), str(err.value)


def test_pipeline_validation_fills_the_schema_defaults_and_leaves_run_defaults_to_run_config():
    cfg = {"runs": [{"method": "lora", "rank": 2, "learning_rate": 1.0e-3}]}
    pipe = pipeline.resolve_pipeline(cfg, check_device=False, check_model=False)
    assert cfg["model"] == {"source": "smollm2", "name": "SmolLM2-135M-Instruct"} and cfg["data"]["on_malformed"] == "error"
    assert cfg["training"] == {} and pipe.runs["lora-r2"]["rank"] == 2 and "max_steps" not in pipe.runs["lora-r2"]
    again = copy.deepcopy(cfg)
    pipeline.resolve_pipeline(again, check_device=False, check_model=False)
    assert again == cfg  # idempotent: the preflight job validates the same config again
    cfg["model"]["name"], cfg["evaluation"]["tasks"][:] = "changed", ["mmlu"]
    fresh: dict = {}
    validate(fresh, PIPELINE_SCHEMA, fill_defaults=True)  # defaults are copies: nothing leaks between configs
    assert fresh["model"]["name"] == "SmolLM2-135M-Instruct" and fresh["evaluation"]["tasks"] == ["arc_easy", "boolq"]


# ------------------------------------------------------------------ SpIEL options: the library's own checks


def _spiel_accepts(field: str, value) -> bool:
    """Whether spiel.SpielConfig takes ``value`` for ``field``, the other fields at values that do not bound
    it (a budget unless the budget is probed; gamma 0 when S is probed, as SpielConfig needs gamma < S)."""
    from spiel.config import SpielConfig

    kwargs = {} if field in ("lora_rank_equivalent", "density") else {"lora_rank_equivalent": 1}
    kwargs.update({"selection_accumulation_steps": 0} if field == "reselection_steps" else {"reselection_steps": 10**6})
    kwargs[field] = value
    try:
        SpielConfig(**kwargs)
        return True
    except ValueError:
        return False


#: run-config value -> SpielConfig field it becomes (methods.MethodSpec.spiel_config).
_SHARED = {("spiel", k): k for k in ("reselection_steps", "selection_accumulation_steps", "initial_reselection_rate",
                                     "reselection_rate_policy", "delta_dtype", "target_modules")}
_SHARED.update({("rank",): "lora_rank_equivalent", ("density",): "density"})


@pytest.mark.parametrize("path", list(_SHARED), ids=".".join)
def test_spiel_options_agree_with_spiel_config(path):
    """Where the harness passes a value to spiel.SpielConfig (which keeps its own checks: the library does not
    read the harness's schema), both accept and refuse the same values at every bound and enum."""
    from spiel import config as spiel_config

    props = schema_at(RUN_SCHEMA, "/$defs/spiel")["properties"] if path[0] == "spiel" else _run_properties()
    prop, field = props[path[-1]], _SHARED[path]
    probes = []
    step = 1 if "integer" in prop["type"] else 1e-6
    for key, delta in (("minimum", -step), ("exclusiveMinimum", step), ("maximum", step), ("exclusiveMaximum", -step)):
        if key in prop:
            probes += [prop[key], prop[key] + delta, prop[key] - delta]
    if "integer" in prop["type"]:
        probes += [2.5, True]
    if "enum" in prop:
        probes += list(prop["enum"]) + ["nope", ""]
        shared = {"reselection_rate_policy": spiel_config._POLICIES, "delta_dtype": tuple(spiel_config._DELTA_DTYPES)}
        assert sorted(prop["enum"]) == sorted(shared[field])
    if field == "target_modules":
        probes += [[], [""], ["q_proj"], "", "q_proj|v_proj", [3]]
    if "number" in prop["type"]:
        probes += [float("nan"), float("inf")]
    assert probes, path
    for value in probes:
        assert _accepts(path, value) == _spiel_accepts(field, value), (path, value)


def test_a_runs_own_spiel_options_override_only_the_keys_it_sets():
    """SpIEL's defaults are SpielConfig's alone: the schema fills none into a run's ``spiel`` (it used to, and
    those filled-in defaults overrode the ``training.spiel`` values the run did not set)."""
    cfg = {"training": {"spiel": {"initial_reselection_rate": 0.3, "reselection_steps": 8}},
           "runs": [{"method": "spiel-ag", "rank": 2, "learning_rate": 1.0e-3, "spiel": {"reselection_steps": 10}},
                    {"method": "spiel-ma", "rank": 2, "learning_rate": 1.0e-3}]}
    runs = pipeline.resolve_pipeline(cfg, check_device=False, check_model=False).runs
    assert runs["spiel-ag-r2"]["spiel"] == {"initial_reselection_rate": 0.3, "reselection_steps": 10}
    assert runs["spiel-ma-r2"]["spiel"] == {"initial_reselection_rate": 0.3, "reselection_steps": 8}
