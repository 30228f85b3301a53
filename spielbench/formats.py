"""Instruction-tuning data formats: detection, validation and conversion to chat messages.

Three formats are accepted, the three the paper trained on (SpIEL paper, Section 5 datasets):

- ``alpaca``: a JSON list of objects with ``instruction`` (str), optional ``input`` (str, may be
  empty) and ``output`` (str), as in Stanford Alpaca / GPT4-Alpaca.
- ``tulu``: Tülu v2 / open-instruct JSON lines, each object with ``messages``: a non-empty list of
  ``{"role": "system"|"user"|"assistant", "content": str}`` holding at least one ``assistant`` turn
  (other fields such as ``dataset`` or ``id`` are ignored).
- ``flan``: Flan JSON lines, each object with ``inputs`` (str) and ``targets`` (str) (other fields
  such as ``task`` or ``template`` are ignored).

The format is detected from the content, not the file name: the first record's keys decide it, and
every other record must have the same format. Records may be stored either as JSON lines or as one
JSON list (Alpaca's usual container); both are accepted for all three formats.

Every example is returned as ``{"messages": [{"role": ..., "content": ...}, ...]}``:
Alpaca becomes one user turn (``instruction``, then a blank line and ``input`` when it is not empty)
and one assistant turn (``output``); Flan becomes one user turn (``inputs``) and one assistant turn
(``targets``); Tülu messages are kept as they are.

Bad input raises ``spielbench.errors.InputError`` naming the file, the line (1-based) and what was
expected: a missing file, an empty file, a line that is not JSON, a record with missing or mistyped
fields, a record of another format than the first, or an unrecognised format (the message lists
the three accepted ones).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

from spielbench.errors import InputError

FORMATS: tuple[str, ...] = ("alpaca", "tulu", "flan")
ROLES: tuple[str, ...] = ("system", "user", "assistant")
ACCEPTED = (
    "Alpaca JSON (a list of objects with 'instruction', optional 'input', 'output'), "
    "Tülu/open-instruct JSONL (objects with 'messages': [{'role', 'content'}, ...]) or "
    "Flan JSONL (objects with 'inputs' and 'targets')"
)


def _record_format(rec: object) -> str | None:
    """The format a single record looks like, from its keys; None when it fits none."""
    if not isinstance(rec, dict):
        return None
    if "messages" in rec:
        return "tulu"
    if "inputs" in rec and "targets" in rec:
        return "flan"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    return None


def _iter_records(path: Path) -> Iterator[tuple[int, object]]:
    """Yield ``(line_number, record)`` from a JSON-lines file or a file holding one JSON list.

    Blank lines in JSON-lines files are skipped. Raises ``InputError`` for a missing or empty file
    and for text that is not valid JSON (naming the line).
    """
    if not path.exists():
        raise InputError(f"{path}: instruction data file not found; expected {ACCEPTED}")
    if path.is_dir():
        raise InputError(f"{path}: is a folder; expected a file with {ACCEPTED}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e}); expected {ACCEPTED}") from None
    if text.startswith("\ufeff"):  # a UTF-8 byte-order mark
        text = text[1:]
    stripped = text.lstrip(" \t\r\n")
    if not stripped:
        raise InputError(f"{path}: file is empty; expected {ACCEPTED}")
    offset = len(text) - len(stripped)
    if stripped[0] == "[":
        yield from _iter_json_list(path, text, offset)
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); expected one "
                             f"JSON object per line ({ACCEPTED})") from None
        yield lineno, rec


def _iter_json_list(path: Path, text: str, start: int) -> Iterator[tuple[int, object]]:
    """Yield ``(line_number, element)`` for each element of the JSON list starting at ``text[start]``."""
    decoder = json.JSONDecoder()
    pos = start + 1
    n = len(text)

    def skip_ws(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    def lineno(i: int) -> int:
        return text.count("\n", 0, i) + 1

    pos = skip_ws(pos)
    if pos < n and text[pos] == "]":
        if text[pos + 1:].strip():
            raise InputError(f"{path}:{lineno(pos + 1)}: unexpected text after the JSON list")
        return
    while True:
        pos = skip_ws(pos)
        try:
            rec, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}); expected "
                             f"a JSON list of objects ({ACCEPTED})") from None
        yield lineno(pos), rec
        pos = skip_ws(end)
        if pos < n and text[pos] == ",":
            pos += 1
            continue
        if pos < n and text[pos] == "]":
            if text[pos + 1:].strip():
                raise InputError(f"{path}:{lineno(pos + 1)}: unexpected text after the JSON list")
            return
        raise InputError(f"{path}:{lineno(pos)}: not valid JSON (expected ',' or ']' in the JSON list); "
                         f"expected {ACCEPTED}")


def _check_str(path: Path, lineno: int, rec: dict, key: str, fmt: str, required: bool = True) -> None:
    if key not in rec:
        if required:
            raise InputError(f"{path}:{lineno}: {fmt} record is missing the field '{key}'")
        return
    if not isinstance(rec[key], str):
        raise InputError(f"{path}:{lineno}: field '{key}' must be a string, got {type(rec[key]).__name__}")


def _to_messages(path: Path, lineno: int, rec: object, fmt: str) -> list[dict[str, str]]:
    """Validate one record of format ``fmt`` and convert it to chat messages."""
    if not isinstance(rec, dict):
        raise InputError(f"{path}:{lineno}: expected a JSON object ({fmt} record), got {type(rec).__name__}")
    got = _record_format(rec)
    if got != fmt:
        keys = ", ".join(sorted(rec)) or "no fields"
        raise InputError(f"{path}:{lineno}: expected a {fmt} record like the first one "
                         f"({_FIELDS[fmt]}), got an object with {keys}")
    if fmt == "alpaca":
        _check_str(path, lineno, rec, "instruction", fmt)
        _check_str(path, lineno, rec, "input", fmt, required=False)
        _check_str(path, lineno, rec, "output", fmt)
        user = rec["instruction"]
        if rec.get("input"):
            user = f"{user}\n\n{rec['input']}"
        if not user.strip():
            raise InputError(f"{path}:{lineno}: field 'instruction' is empty")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]
    if fmt == "flan":
        _check_str(path, lineno, rec, "inputs", fmt)
        _check_str(path, lineno, rec, "targets", fmt)
        if not rec["inputs"].strip():
            raise InputError(f"{path}:{lineno}: field 'inputs' is empty")
        return [{"role": "user", "content": rec["inputs"]}, {"role": "assistant", "content": rec["targets"]}]
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise InputError(f"{path}:{lineno}: field 'messages' must be a non-empty list of "
                         "{'role', 'content'} objects")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InputError(f"{path}:{lineno}: messages[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise InputError(f"{path}:{lineno}: messages[{i}].role is {m['role']!r}; expected one of {list(ROLES)}")
        if not isinstance(m["content"], str):
            raise InputError(f"{path}:{lineno}: messages[{i}].content must be a string, "
                             f"got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise InputError(f"{path}:{lineno}: 'messages' has no assistant turn; expected at least one "
                         "message with role 'assistant' (the training target)")
    return out


_FIELDS = {
    "alpaca": "'instruction', optional 'input', 'output'",
    "tulu": "'messages': [{'role', 'content'}, ...]",
    "flan": "'inputs', 'targets'",
}


def _scan(path: str | os.PathLike, max_examples: int | None, convert: bool):
    path = Path(path)
    fmt = None
    examples: list[dict] = []
    count = 0
    for lineno, rec in _iter_records(path):
        if fmt is None:
            fmt = _record_format(rec)
            if fmt is None:
                what = f"an object with {', '.join(sorted(rec)) or 'no fields'}" if isinstance(rec, dict) \
                    else f"a JSON {type(rec).__name__}"
                raise InputError(f"{path}:{lineno}: unrecognised instruction data format ({what}); "
                                 f"expected {ACCEPTED}")
        msgs = _to_messages(path, lineno, rec, fmt)
        count += 1
        if convert:
            examples.append({"messages": msgs})
        if max_examples is not None and count >= max_examples:
            break
    if fmt is None:
        raise InputError(f"{path}: holds no records (an empty JSON list or only blank lines); expected {ACCEPTED}")
    return fmt, count, examples


def detect_format(path: str | os.PathLike) -> str:
    """Detect the format of an instruction data file from its first record.

    Returns ``"alpaca"``, ``"tulu"`` or ``"flan"``. Reads the whole file only when it is a JSON list
    (JSON lines are read up to the first record). Raises ``InputError`` (file, line, what was
    expected) for a missing or empty file, invalid JSON, or a first record of no known format.
    """
    fmt, _, _ = _scan(path, max_examples=1, convert=False)
    return fmt


def validate_instruction_file(path: str | os.PathLike) -> tuple[str, int]:
    """Check an instruction data file completely without keeping it in memory as messages.

    Checks that the file exists, that its format is recognised, and that every record is valid for
    that format. Returns ``(format, number_of_records)``. Raises ``InputError`` naming the file, the
    line and what was expected at the first problem. Meant to run at pipeline start, before any
    model is loaded (about 1 s per 100k short records).
    """
    fmt, count, _ = _scan(path, max_examples=None, convert=False)
    return fmt, count


def load_instruction_examples(path: str | os.PathLike, max_examples: int | None = None) -> list[dict]:
    """Read an Alpaca JSON, Tülu JSONL or Flan JSONL file as chat examples.

    Returns a list of ``{"messages": [{"role": "user"|"assistant"|"system", "content": str}, ...]}``
    in file order; with ``max_examples`` only the first ``max_examples`` records are read and
    validated. Raises ``InputError`` (file, line, what was expected) on bad input, and for
    ``max_examples < 1``.
    """
    if max_examples is not None and (not isinstance(max_examples, int) or max_examples < 1):
        raise InputError(f"max_examples: expected a positive integer or None, got {max_examples!r}")
    _, _, examples = _scan(path, max_examples=max_examples, convert=True)
    return examples


def split_instruction_file(path: str | os.PathLike, train_out: str | os.PathLike,
                           heldout_out: str | os.PathLike, heldout_examples: int, seed: int) -> tuple[int, int]:
    """Split a user's instruction file into a train and a held-out file (Tülu ``messages`` JSONL).

    Reads ``path`` with ``load_instruction_examples``, draws ``min(heldout_examples, n // 10)``
    examples (at least 1) with ``random.Random(seed)`` for the held-out file and keeps the rest, in
    file order, for the train file; the two files share no record. Both are written atomically as
    JSON lines of ``{"messages": [...]}`` (the ``tulu`` format). Used when ``data.train`` is a local
    file and ``data.heldout`` is not given.

    Returns ``(n_train, n_heldout)``. Raises ``InputError`` on bad input, when ``heldout_examples < 1``
    or when the file holds fewer than 2 records.
    """
    import random

    from spielbench.assets import write_jsonl

    if not isinstance(heldout_examples, int) or heldout_examples < 1:
        raise InputError(f"heldout_examples: expected a positive integer, got {heldout_examples!r}")
    examples = load_instruction_examples(path)
    n = len(examples)
    if n < 2:
        raise InputError(f"{path}: holds {n} record(s); at least 2 are needed to split off a held-out set")
    k = max(1, min(heldout_examples, n // 10))
    held = set(random.Random(seed).sample(range(n), k))
    write_jsonl(heldout_out, (examples[i] for i in sorted(held)))
    write_jsonl(train_out, (ex for i, ex in enumerate(examples) if i not in held))
    return n - k, k
