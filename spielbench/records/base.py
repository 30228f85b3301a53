"""The machinery of every result record: a dataclass's JSON schema generated from its type hints, reading
(validated with ``jsonschema``, one :class:`~spielbench.errors.InputError` naming the file and the field)
and writing back (a file read and written back is unchanged).

Field types a record may use: int, float, str, bool, Any, list[X], dict[str, X], another Record, and
``X | None``; an int field accepts a JSON integer (``3.0`` too), a float field any JSON number.
"""
from __future__ import annotations

import dataclasses
import functools
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
    @functools.cache
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
    @functools.cache
    def _validator(cls):
        import jsonschema

        return jsonschema.Draft202012Validator(cls.json_schema())

    @classmethod
    def from_json(cls: type[R], obj: Any, where: str = "") -> R:
        """Validate ``obj`` (a parsed JSON object) against :meth:`json_schema` and build the record.

        Raises:
            InputError: ``obj`` does not match the schema (``where``, e.g. the file name, prefixes the field
                path of the first mismatch), or a record's own consistency check fails.
        """
        import jsonschema

        err = jsonschema.exceptions.best_match(cls._validator().iter_errors(obj))
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
        data = read_json(p)
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

    def write(self, path: str | Path, **dumps_kwargs: Any) -> None:
        """Write :meth:`to_json` to ``path`` atomically (:func:`spielbench.fsio.write_json_atomic`; indented,
        a final newline; ``dumps_kwargs`` go to :func:`json.dumps`)."""
        from spielbench.fsio import write_json_atomic

        write_json_atomic(path, self.to_json(), **dumps_kwargs)

    @classmethod
    def write_checked(cls, obj: dict, path: str | Path, **dumps_kwargs: Any) -> R:
        """Validate the JSON object ``obj`` as this record (:meth:`from_json`, ``where`` = ``path``) and write
        it through the record (:meth:`write`): a writer's file is one its readers accept, with ``obj``'s keys
        in ``obj``'s order.

        Raises:
            InputError: ``obj`` does not match the schema (nothing is written).
        """
        rec = cls.from_json(obj, str(path))
        rec.write(path, **dumps_kwargs)
        return rec

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



def read_json(path: str | Path) -> dict:
    """Read a JSON object from ``path``.

    Raises:
        InputError: the file is missing, is not valid JSON, or does not hold an object (names the file).
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
    return data
