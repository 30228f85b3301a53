"""Typed result records: the run metrics (``metrics.json``), the evaluation result (``eval.json``) and one
efficiency-benchmark point (``results/benchmark/<size>__<method>.json``).

Each record is a dataclass whose fields are the JSON keys its readers use; its JSON schema is generated
from the dataclass (:meth:`Record.json_schema`), so the dataclass is the format's one home. Reading
(:meth:`Record.from_json`) validates the object against that schema with ``jsonschema`` and raises one
:class:`~spielbench.errors.InputError` naming the file and the field; keys a record does not model are
kept in ``extra`` and written back by :meth:`Record.to_json`. The three top-level records carry a
``format`` version; files written before the field existed (metrics and benchmark points) read as
version 1.

Units are in the key names (``_s`` seconds, ``_bytes`` bytes); losses are nats per token.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar, Union

from spielbench.errors import InputError

R = TypeVar("R", bound="Record")

_PRIMITIVES = {int: "integer", float: "number", str: "string", bool: "boolean", dict: "object", list: "array"}
_WORDS = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
          "object": "an object", "array": "a list", "null": "null"}


def _split_optional(tp) -> tuple[list, bool]:
    """The members of a union type hint other than None, and whether None is one of them."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = typing.get_args(tp)
        return [a for a in args if a is not type(None)], type(None) in args
    return [tp], False


def _schema_of(tp) -> dict:
    """JSON schema of one field type (int, float, str, bool, Any, list[X], dict[str, X], a Record, unions)."""
    members, nullable = _split_optional(tp)
    if any(m is Any for m in members):
        return {}
    if len(members) == 1 and isinstance(members[0], type) and issubclass(members[0], Record):
        schema = members[0].json_schema()
        if nullable:
            schema["type"] = [schema["type"], "null"]
        return schema
    types_, extra = [], {}
    for m in members:
        origin = typing.get_origin(m) or m
        if origin not in _PRIMITIVES:
            raise TypeError(f"no JSON schema for field type {m!r}")
        types_.append(_PRIMITIVES[origin])
        args = typing.get_args(m)
        if origin is list and args:
            extra["items"] = _schema_of(args[0])
        if origin is dict and args:
            extra["additionalProperties"] = _schema_of(args[1])
    if nullable:
        types_.append("null")
    return {"type": types_[0] if len(types_) == 1 else types_, **extra}


def _build(tp, value):
    """``value`` (already validated against ``_schema_of(tp)``) as the Python value of type ``tp``."""
    if value is None:
        return None
    members, _ = _split_optional(tp)
    for m in members:
        origin = typing.get_origin(m) or m
        if isinstance(origin, type) and issubclass(origin, Record) and isinstance(value, dict):
            return origin._from_valid(value)
        if origin is list and isinstance(value, list):
            args = typing.get_args(m)
            return [_build(args[0], v) for v in value] if args else list(value)
        if origin is dict and isinstance(value, dict):
            args = typing.get_args(m)
            return {k: _build(args[1], v) for k, v in value.items()} if args else dict(value)
        if origin is int and isinstance(value, (int, float)) and not isinstance(value, bool):
            return int(value)
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return value


def _path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _expected(schema: dict) -> str:
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else list(kinds or [])
    words = [_WORDS[k] for k in kinds if k != "null"] or ["null"]
    return " or ".join(words)


def _message(err, where: str) -> str:
    """One line for a ``jsonschema`` error: ``<where>: <field path>: expected <type>, got <value>``."""
    parts = list(err.absolute_path)
    if err.validator == "required":
        name = next(r for r in err.validator_value if r not in err.instance)
        prop = err.schema.get("properties", {}).get(name, {})
        return f"{where}: {_path(parts + [name])}: expected {_expected(prop)}, got None"
    at = _path(parts) or "(top level)"
    if err.validator == "type":
        return f"{where}: {at}: expected {_expected(err.schema)}, got {err.instance!r}"
    if err.validator == "enum":
        return f"{where}: {at}: expected one of {', '.join(map(str, err.validator_value))}, got {err.instance!r}"
    return f"{where}: {at}: {err.message}"


@dataclass(kw_only=True)
class Record:
    """Base of every record: typed fields (the modelled JSON keys) plus ``extra`` (every other key, kept)."""

    extra: dict = field(default_factory=dict)
    #: where the record was read from (the ``where`` of :meth:`from_json`: a file name or path), else None
    source: str | None = field(default=None, init=False, repr=False, compare=False, metadata={"json": False})
    #: the keys of the object this record was read from, in order (None when built in code)
    _source_keys: tuple[str, ...] | None = field(default=None, init=False, repr=False, compare=False,
                                                 metadata={"json": False})

    #: accepted values of a top-level record's ``format`` field (None: a nested record, no version)
    FORMATS: ClassVar[tuple[str, ...] | None] = None

    @classmethod
    def _fields(cls) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)
                if f.name != "extra" and f.metadata.get("json", True)}

    @classmethod
    def json_schema(cls) -> dict:
        """The JSON schema (draft 2020-12) of this record; unmodelled keys are allowed (kept in ``extra``)."""
        props = {name: _schema_of(tp) for name, tp in cls._fields().items()}
        if cls.FORMATS:
            props["format"] = {"enum": list(cls.FORMATS)}
        required = [f.name for f in dataclasses.fields(cls) if f.init
                    and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        schema = {"type": "object", "properties": props, "additionalProperties": True}
        if required:
            schema["required"] = required
        if cls.__doc__:
            schema["description"] = cls.__doc__.split("\n\n")[0].strip()
        return schema

    @classmethod
    def from_json(cls: type[R], obj: Any, where: str = "") -> R:
        """Validate ``obj`` (a parsed JSON object) against :meth:`json_schema` and build the record.

        Raises:
            InputError: ``obj`` does not match the schema (``where``, e.g. the file name, prefixes the field
                path of the first mismatch), or a record's own consistency check fails.
        """
        import jsonschema

        validator = jsonschema.Draft202012Validator(cls.json_schema())
        err = jsonschema.exceptions.best_match(validator.iter_errors(obj))
        if err is not None:
            raise InputError(_message(err, where or cls.__name__))
        rec = cls._from_valid(obj)
        rec._check_tree(where or cls.__name__)
        rec.source = where or None
        return rec

    @classmethod
    def _from_valid(cls: type[R], obj: dict) -> R:
        fields = cls._fields()
        kwargs = {name: _build(tp, obj[name]) for name, tp in fields.items() if name in obj}
        rec = cls(**kwargs, extra={k: v for k, v in obj.items() if k not in fields})
        rec._source_keys = tuple(obj)
        return rec

    @classmethod
    def read(cls: type[R], path: str | Path) -> R:
        """Read and validate the record stored in the JSON file ``path``.

        Raises:
            InputError: the file is missing, is not valid JSON, or does not match the schema (names the file).
        """
        p = Path(path)
        if not p.is_file():
            raise InputError(f"{p}: file does not exist")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise InputError(f"{p}: not valid JSON (line {err.lineno}: {err.msg})") from None
        if not isinstance(data, dict):
            raise InputError(f"{p}: expected a JSON object, got {type(data).__name__}")
        return cls.from_json(data, str(p))

    def to_json(self) -> dict:
        """The record as a JSON-ready object.

        Built in code: the modelled fields in declaration order, then ``extra``. Read from a file: that
        file's keys in its order (so a file read and written back is unchanged), then any modelled field
        set since to a value other than its default.
        """
        values = {name: getattr(self, name) for name in self._fields()}
        if self._source_keys is None:
            out = {name: _dump(v) for name, v in values.items()}
        else:
            out = {k: _dump(values[k]) if k in values else self.extra[k] for k in self._source_keys
                   if k in values or k in self.extra}
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            out.update({n: _dump(v) for n, v in values.items() if n not in out and v != defaults.get(n)})
        out.update({k: v for k, v in self.extra.items() if k not in out})
        return out

    def check(self, where: str) -> None:
        """Consistency checks across fields (none by default). Raises InputError naming ``where``."""

    def _check_tree(self, where: str) -> None:
        self.check(where)
        for name in self._fields():
            for child in _records_in(getattr(self, name)):
                child._check_tree(f"{where}: {name}" if ":" not in where else f"{where}.{name}")


def _records_in(value):
    if isinstance(value, Record):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _records_in(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _records_in(v)


def _dump(value):
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, list):
        return [_dump(v) for v in value]
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    return value


# ------------------------------------------------------------------------------------------ metrics.json


@dataclass(kw_only=True)
class Budget(Record):
    """The trainable-parameter budget of a run (``budget`` of metrics.json)."""

    rank: int | None = None
    requested_density: float | None = None
    trainable_params: int | None = None


@dataclass(kw_only=True)
class TrainingSettings(Record):
    """The training settings a run recorded (``training`` of metrics.json); learning rate as used."""

    seed: int | None = None
    learning_rate: float | None = None
    gradient_checkpointing: bool | None = None


@dataclass(kw_only=True)
class Memory(Record):
    """Peak memory and exact state bytes (``memory`` of metrics.json), in bytes.

    ``trainable_state_bytes`` = trainable parameters + their gradients + optimizer state.
    """

    cuda_max_allocated_bytes: int | None = None
    peak_rss_bytes: int | None = None
    trainable_state_bytes: int | None = None


@dataclass(kw_only=True)
class LossPoint(Record):
    """One logged training loss (nats per target token) at an optimizer step."""

    step: int | None = None
    loss: float | None = None


@dataclass(kw_only=True)
class ReselectionEvent(Record):
    """One drop/grow event of a SpIEL run (docs/METHOD.md §3): rate p(t), indices replaced and active
    (over all matrices), and the fraction of the index set still in the initial one."""

    step: int | None = None
    rate: float | None = None
    num_replaced: int | None = None
    num_active: int | None = None
    overlap_initial: float | None = None


@dataclass(kw_only=True)
class RunMetrics(Record):
    """One training run's ``metrics.json`` (written by ``spielbench.train``; its timings from ``spielbench.measure``).

    ``device`` is ``measure.device_description``'s object (``{"device", "name", ...}``) or a bare string;
    ``heldout_loss`` is the trainer's own held-out loss after training (nats/token);
    ``selector_history`` is None for methods without reselection.
    """

    VERSION: ClassVar[str] = "spielbench-metrics/1"
    FORMATS: ClassVar[tuple[str, ...]] = (VERSION,)

    format: str = VERSION
    run_id: str | None = None
    method: str | None = None
    budget: Budget | None = None
    training: TrainingSettings | None = None
    steps: int | None = None
    tokens_seen: int | None = None
    wall_time_s: float | None = None
    step_time_mean_s: float | None = None
    step_time_p50_s: float | None = None
    tokens_per_s: float | None = None
    memory: Memory | None = None
    adapter_bytes: int | None = None
    loss_curve: list[LossPoint] | None = None
    heldout_loss: float | None = None
    selector_history: list[ReselectionEvent] | None = None
    device: Any = None

    @property
    def device_name(self) -> str | None:
        """The device string (``cpu``, ``cuda:0``) whichever form ``device`` has."""
        return self.device.get("device") if isinstance(self.device, dict) else self.device


# ------------------------------------------------------------------------------------------ eval.json


@dataclass(kw_only=True)
class TaskResult(Record):
    """One task of eval.json: the headline metric over ``n`` items, or ``skipped`` with a ``note``.

    ``value`` is a fraction in [0, 1]; ``stderr`` lm-eval's standard error (None when it reports none);
    ``doc_ids``/``item_scores`` give the headline metric per item, for paired comparisons.
    """

    metric: str | None = None
    value: float | None = None
    stderr: float | None = None
    n: int | None = None
    skipped: bool | None = None
    note: str | None = None
    item_scores: list[float] | None = None
    doc_ids: list | None = None


@dataclass(kw_only=True)
class HeldoutResult(Record):
    """The held-out loss of eval.json: token-mean cross-entropy (nats/token) over ``n_examples`` examples.

    ``example_nll`` (summed nats per example) and ``example_tokens`` (label tokens per example) are given
    together or not at all; ``loss = Σ example_nll / Σ example_tokens``.
    """

    loss: float | None = None
    n_examples: int | None = None
    n_tokens: int | None = None
    stderr: float | None = None
    example_nll: list[float] | None = None
    example_tokens: list[int] | None = None

    def check(self, where: str) -> None:
        """Raises InputError when only one per-example list is given, or their lengths differ."""
        a, b = self.example_nll, self.example_tokens
        if (a is None) != (b is None) or (a is not None and len(a) != len(b)):
            raise InputError(f"{where}: example_nll and example_tokens must both be given, with equal lengths")


@dataclass(kw_only=True)
class EvalResult(Record):
    """One evaluated model's ``eval.json`` (written by ``spielbench.evaluate``): task results and held-out loss."""

    VERSION: ClassVar[str] = "spielbench-eval/1"
    FORMATS: ClassVar[tuple[str, ...]] = (VERSION,)

    format: str = VERSION
    run_id: str | None = None
    method: str | None = None
    tasks: dict[str, TaskResult | None] = field(default_factory=dict)
    heldout: HeldoutResult | None = None


# ------------------------------------------------------------------------------------------ benchmark


@dataclass(kw_only=True)
class BenchmarkPoint(Record):
    """One (model size, method) point of the efficiency benchmark (written by ``spielbench.benchmark``).

    ``status`` is "ok", "oom", "unsupported", "error" or "timeout" (``detail`` says why); timings and peaks
    are None unless "ok". ``peak_memory_bytes`` is CUDA max allocated when ``cuda_max_allocated_bytes`` is
    set, else the CPU peak RSS; ``adapter_state_bytes`` = trainable parameters + gradients + optimizer state
    + SpIEL index buffers; ``n_params_model`` = parameters of the base model.
    """

    VERSION: ClassVar[str] = "spielbench-benchmark/1"
    FORMATS: ClassVar[tuple[str, ...]] = (VERSION,)

    format: str = VERSION
    size: str
    method: str
    status: str
    detail: str | None = None
    rank: int | None = None
    trainable_params: int | None = None
    n_params_model: int | None = None
    step_time_mean_s: float | None = None
    step_time_p50_s: float | None = None
    tokens_per_s: float | None = None
    peak_memory_bytes: int | None = None
    cuda_max_allocated_bytes: int | None = None
    adapter_state_bytes: int | None = None

    @property
    def ok(self) -> bool:
        """True when the point completed (timings and peak memory are valid)."""
        return self.status == "ok"

    @property
    def peak_memory_kind(self) -> str | None:
        """What ``peak_memory_bytes`` measures ("CUDA max allocated" or "CPU peak RSS"); None without a peak."""
        if self.peak_memory_bytes is None:
            return None
        return "CUDA max allocated" if self.cuda_max_allocated_bytes is not None else "CPU peak RSS"


#: The record types by the file they describe (for schema export and tests).
RECORDS: dict[str, type[Record]] = {"metrics.json": RunMetrics, "eval.json": EvalResult,
                                    "benchmark": BenchmarkPoint}
