"""Reading and checking the task data files, shared by every task folder (docs/METHOD.md §8.5).

Every row is checked before lm-eval sees it: a bad file raises
:class:`spielbench.errors.InputError` whose message starts with ``<file>:<line>:`` (or names the
JSON entry) and says what was expected. A task folder's normaliser turns one source row into the
fields its YAML uses and raises :class:`RowError` for a bad row; :func:`read_rows` adds the file
and line. The loaders return a ``datasets.DatasetDict`` with a single ``test`` split
(:func:`as_dataset`), optionally in a seeded random order (:func:`shuffled`) so that an item limit
draws a random subset.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Callable

from spielbench.errors import InputError

#: The marker that rendered YAMLs replace with the absolute evaluation-data folder.
EVAL_DIR_MARKER = "@EVAL_DIR@"


class RowError(ValueError):
    """One row does not have the expected fields; the loader prefixes ``<file>:<line>:``."""


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """Read a JSONL file into ``(line_number, object)`` pairs (1-based line numbers, blank lines skipped).

    Raises:
        InputError: the path still holds :data:`EVAL_DIR_MARKER` (a YAML used without rendering),
            the file is missing, a line is not UTF-8 or not valid JSON, a line is not a JSON
            object, or the file holds no rows; the message names the file and line.
    """
    p = Path(path)
    if EVAL_DIR_MARKER in str(p):
        raise InputError(
            f"{p}: the task YAML was not rendered (its data path still holds {EVAL_DIR_MARKER}); "
            "use the include folder written by `python -m spielbench.evaluate --render-tasks DIR`"
        )
    if not p.is_file():
        raise InputError(f"{p}: file not found (expected a JSONL file, one JSON object per line)")
    rows: list[tuple[int, dict]] = []
    with open(p, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"{p}:{lineno}: not UTF-8 text ({exc.reason})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(
                    f"{p}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
                    "expected one JSON object per line"
                ) from None
            if not isinstance(obj, dict):
                raise InputError(f"{p}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            rows.append((lineno, obj))
    if not rows:
        raise InputError(f"{p}: no rows (expected one JSON object per line)")
    return rows


def read_rows(path: str | os.PathLike, normalise: Callable[[dict], dict], label: str) -> list[dict]:
    """Read a JSONL file and normalise every row, in file order.

    Args:
        path: the JSONL file.
        normalise: the task's row normaliser (raises :class:`RowError` for a bad row).
        label: the row kind named in error messages (e.g. ``"arc"``, ``"TyDiQA"``).

    Raises:
        InputError: unreadable file (:func:`read_jsonl`) or a bad row, as
            ``<file>:<line>: <what is wrong> (<label> row)``.
    """
    docs = []
    for lineno, row in read_jsonl(path):
        try:
            docs.append(normalise(row))
        except RowError as exc:
            raise InputError(f"{path}:{lineno}: {exc} ({label} row)") from None
    return docs


def read_json_list(path: Path, key: str, expected: str) -> list:
    """The list under ``key`` of a JSON file holding one object (the BBH and SQuAD file formats).

    Args:
        path: the JSON file.
        key: the top-level field holding the list (``"examples"``, ``"data"``).
        expected: what the file should be, for the error message.

    Raises:
        InputError: the file is unreadable or not JSON (``<file>: not a readable JSON file``), or
            not an object with a list under ``key`` (``<file>: expected <expected>``).
    """
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get(key), list):
        raise InputError(f"{path}: expected {expected}")
    return obj[key]


_KINDS: dict[str, Callable[[Any], bool]] = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "dict": lambda v: isinstance(v, dict),
}


def field(row: dict, name: str, kind: str) -> Any:
    """``row[name]``, checked to be of ``kind`` (``"str"``, ``"int"``, ``"bool"``, ``"list[str]"``, ``"dict"``).

    Raises:
        RowError: the field is missing or of another kind (a bool is not an int).
    """
    if name not in row:
        raise RowError(f"missing field '{name}' (expected {kind})")
    value = row[name]
    if not _KINDS[kind](value):
        raise RowError(f"field '{name}' should be {kind}, got {json.dumps(value)[:60]}")
    return value


def shuffled(docs: list[dict], seed: int | None) -> list[dict]:
    """``docs`` in a seeded random order (``seed=None``: unchanged), so an item limit draws a random subset."""
    if seed is None:
        return docs
    out = list(docs)
    random.Random(int(seed)).shuffle(out)
    return out


def as_dataset(docs: list[dict]):
    """``docs`` as the ``datasets.DatasetDict({"test": ...})`` a ``custom_dataset`` returns."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
