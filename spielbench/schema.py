"""Validation against the suite's JSON schemas, with one-line errors: the one path every config takes.

Two schemas: the run config (``spielbench/runconfig.schema.yaml``, read by :class:`spielbench.runconfig.RunConfig`)
and the pipeline config (``workflow/schemas/config.schema.yaml``, read by :func:`spielbench.pipeline.resolve_pipeline`
at parse time), which reuses the run config's definitions through relative ``$ref``\\ s, so each type, bound and
allowed value of a run is written once. Validation is jsonschema's (Draft 2020-12) with two changes of meaning:
``number`` is a finite number (``.inf`` and ``.nan`` are refused wherever a number is expected) and ``integer``
an ``int`` (not ``3.0``, not ``true``). Of all the errors, one is reported, as one line naming the key as a
dotted path (``runs[1].rank``, ``training.warmup_ratio``), the value and what was expected:
``runs[1].rank: expected an integer >= 1, got 0``.
"""
from __future__ import annotations

import copy
import functools
import math
from pathlib import Path
from typing import Any, Iterable

from spielbench.errors import InputError

#: The run config's schema (package data, beside :mod:`spielbench.runconfig`).
RUN_SCHEMA = Path(__file__).with_name("runconfig.schema.yaml")
#: The pipeline config's schema (in a checkout of the suite: the workflow is not part of the package).
PIPELINE_SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"

_TYPE_PHRASES = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
                 "object": "a mapping", "array": "a list", "null": "null"}
_UNKNOWN_KEYS = ("additionalProperties", "unevaluatedProperties")


def _load_yaml(path: Path) -> dict:
    """A schema file; the enums that have a registry are filled from it: the run config schema's
    ``$defs/method`` from the method registry, the pipeline schema's ``evaluation.tasks`` from the task table."""
    import yaml

    schema = yaml.safe_load(path.read_text(encoding="utf-8"))
    if path.resolve() == RUN_SCHEMA.resolve():
        from spielbench.methods import METHODS, table_order

        schema["$defs"]["method"]["enum"] = sorted(METHODS, key=table_order)
    if path.resolve() == PIPELINE_SCHEMA.resolve():
        from spielbench.lm_eval_tasks.registry import TASKS

        schema["properties"]["evaluation"]["properties"]["tasks"]["items"]["enum"] = list(TASKS)
    return schema


def _is_finite_number(checker, value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(checker, value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@functools.lru_cache(maxsize=None)
def _validator_class(fill_defaults: bool):
    """Draft 2020-12 with finite numbers and strict integers; with ``fill_defaults``, each ``properties``
    keyword also inserts the ``default`` of an absent property (a copy) into the mapping it checks."""
    from jsonschema import Draft202012Validator, validators

    checker = Draft202012Validator.TYPE_CHECKER.redefine_many(
        {"number": _is_finite_number, "integer": _is_int})
    if not fill_defaults:
        return validators.extend(Draft202012Validator, type_checker=checker)
    check_properties = Draft202012Validator.VALIDATORS["properties"]

    def properties_with_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if isinstance(sub, dict) and "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from check_properties(validator, properties, instance, schema)

    return validators.extend(Draft202012Validator, {"properties": properties_with_defaults}, type_checker=checker)


@functools.lru_cache(maxsize=None)
def _schema_and_registry(path: Path):
    """The schema at ``path`` (its ``$id`` set to its file URI, so relative ``$ref``\\ s name files beside it)
    and a registry that loads the files those refs name."""
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    @functools.lru_cache(maxsize=None)  # a Registry is immutable: what it retrieves is not kept in it
    def retrieve(uri: str):
        return Resource(contents=_load_yaml(Path(url2pathname(urlparse(uri).path))), specification=DRAFT202012)

    schema = dict(_load_yaml(path))
    schema["$id"] = path.resolve().as_uri()
    registry = Registry(retrieve=retrieve).with_resource(schema["$id"], Resource(schema, DRAFT202012))
    return schema, registry


def schema_at(path: Path, pointer: str = "") -> dict:
    """The subschema at the JSON pointer ``pointer`` (``"/$defs/settings"``) of the schema file ``path``."""
    schema, registry = _schema_and_registry(Path(path))
    return registry.resolver(base_uri=schema["$id"]).lookup(f"#{pointer}").contents


def validate(instance: Any, path: Path, *, source: str = "config", fill_defaults: bool = False) -> None:
    """Check ``instance`` against the schema file ``path``.

    Args:
        instance: the parsed config (mappings, lists, scalars).
        path: :data:`RUN_SCHEMA`, :data:`PIPELINE_SCHEMA` or another schema file.
        source: what the errors of the whole instance name (``"run config"``, a file name, ``"runs[3]"``);
            errors inside it name the dotted path of the key.
        fill_defaults: insert the schema's defaults of absent keys into ``instance`` (in place).

    Raises:
        InputError: one line, ``<key>: expected <what>, got <value>`` (or ``<key>: unknown key 'x'; known
            keys: ...``, ``<key>: missing required key 'x'``), for the first error in the order: unknown
            keys, missing keys, then the rest in the schema's order.
    """
    schema, registry = _schema_and_registry(Path(path))
    validator = _validator_class(fill_defaults)(schema, registry=registry)
    resolver = registry.resolver(base_uri=schema["$id"])
    found = []
    for error in _leaves(validator.iter_errors(instance)):
        message = _message(error, resolver)
        if message is not None:
            rank = 0 if error.validator in _UNKNOWN_KEYS else 1 if error.validator == "required" else 2
            found.append((rank, len(found), _where(error.absolute_path, source), message))
    if found:
        _, _, where, message = min(found)
        raise InputError(f"{where}: {message}")


def _leaves(errors: Iterable) -> Iterable:
    """The errors, with an ``anyOf``/``oneOf`` error replaced by its branches' errors."""
    for error in errors:
        if error.context:
            yield from _leaves(error.context)
        else:
            yield error


def _where(path, source: str) -> str:
    """``["runs", 1, "rank"]`` -> ``runs[1].rank``; the empty path -> ``source``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or source


def show(value: Any) -> str:
    """A value as the YAML a person wrote it reads (``null``, ``true``, ``nan``, ``'text'``), at most 80 chars."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _bounds(schema: dict) -> str:
    """``" in [0, 1)"``, ``" >= 1"``, ``" > 0"``: the numeric range a subschema states."""
    lo = ("[", schema["minimum"]) if "minimum" in schema else ("(", schema.get("exclusiveMinimum"))
    hi = ("]", schema["maximum"]) if "maximum" in schema else (")", schema.get("exclusiveMaximum"))
    if lo[1] is not None and hi[1] is not None:
        return f" in {lo[0]}{lo[1]}, {hi[1]}{hi[0]}"
    if lo[1] is not None:
        return f" {'>=' if lo[0] == '[' else '>'} {lo[1]}"
    return f" {'<=' if hi[0] == ']' else '<'} {hi[1]}"


def _types(schema: dict) -> list[str]:
    kind = schema.get("type", [])
    return [kind] if isinstance(kind, str) else list(kind)


def _property_names(schema: dict, resolver) -> set[str]:
    """The keys a subschema's ``properties`` name, through its ``allOf`` and ``$ref``\\ s."""
    names = set(schema.get("properties", {}))
    if "$ref" in schema:
        resolved = resolver.lookup(schema["$ref"])
        names |= _property_names(resolved.contents, resolved.resolver)
    for sub in schema.get("allOf", []):
        names |= _property_names(sub, resolver)
    return names


def _message(error, resolver) -> str | None:
    """What ``error`` says, after the key: ``expected ..., got ...``; None for an unknown-key error that names
    no unknown key (jsonschema also reports a key whose value failed as unevaluated)."""
    kind, value, schema = error.validator, error.instance, error.schema
    if kind in _UNKNOWN_KEYS:
        known = _property_names(schema, resolver)
        unknown = [k for k in value if k not in known]
        if not unknown:
            return None
        keys = ", ".join(repr(k) for k in unknown)
        return f"unknown key{'s' if len(unknown) > 1 else ''} {keys}; known keys: {', '.join(sorted(known))}"
    if kind == "required":
        missing = [k for k in error.validator_value if k not in value]
        return f"missing required key {missing[0]!r}"
    got = f", got {show(value)}"
    if kind == "type":
        types = _types(schema)
        if isinstance(value, float) and not math.isfinite(value) and "number" in types:
            return f"expected a finite number{got}"
        hint = ""
        if isinstance(value, str) and {"number", "integer"} & set(types):
            try:
                float(value)
                hint = " (YAML 1.1 reads a number like 1e-4 as text: write 1.0e-4)"
            except ValueError:
                pass
        wanted = [t for t in types if t != "null"] or types  # a nullable field: null means "unset"
        return f"expected {' or '.join(_TYPE_PHRASES.get(t, t) for t in wanted)}{got}{hint}"
    if kind in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        noun = "an integer" if "integer" in _types(schema) else "a number"
        return f"expected {noun}{_bounds(schema)}{got}"
    if kind == "enum":
        return f"expected one of {', '.join(str(v) for v in error.validator_value)}{got}"
    if kind == "pattern":
        return f"expected a string matching {error.validator_value}{got}"
    if kind == "minLength":
        return f"expected a non-empty string{got}" if error.validator_value == 1 else \
            f"expected a string of at least {error.validator_value} characters{got}"
    if kind == "minItems":
        return f"expected a list of at least {error.validator_value} item(s){got}"
    return " ".join(error.message.split())
