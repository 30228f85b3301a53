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
from dataclasses import dataclass, field
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


def _iter_records(path: Path) -> Iterator[tuple[int, object, InputError | None]]:
    """Yield ``(line_number, record, None)`` from a JSON-lines file or a file holding one JSON list, and
    ``(line_number, None, error)`` for a JSON-lines line that is not valid JSON (the caller raises or skips it).

    Blank lines in JSON-lines files are skipped. Raises ``InputError`` for a missing or empty file
    and for a JSON list that is not valid JSON (naming the line; the list cannot be read past it).
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
            yield lineno, None, InputError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                                           f"expected one JSON object per line ({ACCEPTED})")
            continue
        yield lineno, rec, None


def _iter_json_list(path: Path, text: str, start: int) -> Iterator[tuple[int, object, None]]:
    """Yield ``(line_number, element, None)`` for each element of the JSON list starting at ``text[start]``."""
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
        yield lineno(pos), rec, None
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


#: Key of the provenance a derived file keeps per record (``{"file": str, "line": int}``: the user's file and
#: line the record came from), so that reports and errors name the user's file whichever split it landed in.
ORIGIN_KEY = "origin"

#: Values of ``on_malformed`` (config ``data.on_malformed``): reject the file at the first malformed record,
#: or skip malformed records and report them.
ON_MALFORMED = ("error", "skip")

#: How many skipped or dropped records a report lists by line.
MAX_REPORTED = 5


@dataclass
class InstructionFile:
    """An instruction file read by :func:`read_instruction_file`.

    Attributes:
        format: "alpaca", "tulu" or "flan".
        examples: ``[{"messages": [...]}]`` in file order (empty when read without keeping examples).
        origins: per record (kept or not), ``(file, line)`` it came from: its ``origin`` field in a
            derived file, else this file and the record's 1-based line.
        count: valid records read.
        skipped: ``[(file, line, reason)]`` of the malformed records skipped (``on_malformed="skip"``).
    """

    format: str
    examples: list[dict] = field(default_factory=list)
    origins: list[tuple[str, int]] = field(default_factory=list)
    count: int = 0
    skipped: list[tuple[str, int, str]] = field(default_factory=list)

    def skipped_report(self) -> dict:
        """``{"count", "first": [{"file", "line", "reason"}, ...]}`` (at most :data:`MAX_REPORTED` listed)."""
        return {"count": len(self.skipped),
                "first": [{"file": f, "line": n, "reason": r} for f, n, r in self.skipped[:MAX_REPORTED]]}


def _origin(path: Path, lineno: int, rec: object) -> tuple[str, int]:
    o = rec.get(ORIGIN_KEY) if isinstance(rec, dict) else None
    if isinstance(o, dict) and isinstance(o.get("file"), str) and isinstance(o.get("line"), int):
        return o["file"], o["line"]
    return str(path), lineno


def read_instruction_file(path: str | os.PathLike, max_examples: int | None = None, on_malformed: str = "error",
                          keep_examples: bool = True) -> InstructionFile:
    """Read and validate an instruction file (Alpaca JSON, Tülu JSONL, Flan JSONL), strictly or skipping
    malformed records.

    Args:
        path: the file.
        max_examples: stop after this many valid records (None: all).
        on_malformed: "error" raises at the first malformed record; "skip" leaves it out and lists it in
            ``skipped`` (a record of the wrong type or fields, another format than the first valid one, a
            JSON-lines line that is not JSON). File-level problems always raise.
        keep_examples: keep the converted examples (False: only validate and count).

    Raises:
        InputError: naming the file and line: a missing, empty or unreadable file; a JSON list that is not
            valid JSON; with "error" any malformed record; with "skip" a file without one valid record.
    """
    if on_malformed not in ON_MALFORMED:
        raise InputError(f"on_malformed: expected one of {list(ON_MALFORMED)}, got {on_malformed!r}")
    path = Path(path)
    out = InstructionFile(format="")
    fmt = None
    for lineno, rec, error in _iter_records(path):
        try:
            if error is not None:
                raise error
            if fmt is None:
                got = _record_format(rec)
                if got is None:
                    what = f"an object with {', '.join(sorted(rec)) or 'no fields'}" if isinstance(rec, dict) \
                        else f"a JSON {type(rec).__name__}"
                    raise InputError(f"{path}:{lineno}: unrecognised instruction data format ({what}); "
                                     f"expected {ACCEPTED}")
                msgs = _to_messages(path, lineno, rec, got)
                fmt = got
            else:
                msgs = _to_messages(path, lineno, rec, fmt)
        except InputError as err:
            if on_malformed == "error":
                raise
            file, line = _origin(path, lineno, rec)
            out.skipped.append((file, line, str(err).split(": ", 1)[-1]))
            continue
        out.count += 1
        if keep_examples:
            out.examples.append({"messages": msgs})
            out.origins.append(_origin(path, lineno, rec))
        if max_examples is not None and out.count >= max_examples:
            break
    if fmt is None:
        if out.skipped:
            raise InputError(f"{path}: none of its {len(out.skipped)} records is valid (first, line "
                             f"{out.skipped[0][1]}: {out.skipped[0][2]}); expected {ACCEPTED}")
        raise InputError(f"{path}: holds no records (an empty JSON list or only blank lines); expected {ACCEPTED}")
    out.format = fmt
    return out


def _scan(path: str | os.PathLike, max_examples: int | None, convert: bool):
    read = read_instruction_file(path, max_examples=max_examples, keep_examples=convert)
    return read.format, read.count, read.examples


def detect_format(path: str | os.PathLike) -> str:
    """Detect the format of an instruction data file from its first record.

    Returns ``"alpaca"``, ``"tulu"`` or ``"flan"``. Reads the whole file only when it is a JSON list
    (JSON lines are read up to the first record). Raises ``InputError`` (file, line, what was
    expected) for a missing or empty file, invalid JSON, or a first record of no known format.
    """
    fmt, _, _ = _scan(path, max_examples=1, convert=False)
    return fmt


def validate_instruction_file(path: str | os.PathLike, on_malformed: str = "error") -> tuple[str, int]:
    """Check an instruction data file completely without keeping it in memory as messages.

    Checks that the file exists, that its format is recognised, and that every record is valid for
    that format (with ``on_malformed="skip"``: that at least one is; see :func:`read_instruction_file`).
    Returns ``(format, number_of_valid_records)``. Raises ``InputError`` naming the file, the
    line and what was expected at the first problem. Meant to run at pipeline start, before any
    model is loaded (about 1 s per 100k short records).
    """
    read = read_instruction_file(path, on_malformed=on_malformed, keep_examples=False)
    return read.format, read.count


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


def heldout_indices(n: int, heldout_examples: int, seed: int, what: str = "the data") -> set[int]:
    """The seeded held-out draw of a split: ``min(heldout_examples, n // 10)`` indices (at least 1) of
    ``range(n)`` drawn with ``random.Random(seed)``.

    Raises:
        InputError: ``heldout_examples < 1``, or fewer than 2 examples (naming ``what``).
    """
    import random

    if not isinstance(heldout_examples, int) or heldout_examples < 1:
        raise InputError(f"heldout_examples: expected a positive integer, got {heldout_examples!r}")
    if n < 2:
        raise InputError(f"{what}: holds {n} usable record(s); at least 2 are needed to split off a held-out set")
    k = max(1, min(heldout_examples, n // 10))
    return set(random.Random(seed).sample(range(n), k))


def write_split(examples: list[dict], origins: list[tuple[str, int]], held: set[int],
                train_out: str | os.PathLike, heldout_out: str | os.PathLike, *,
                validation: set[int] | None = None, validation_out: str | os.PathLike | None = None
                ) -> tuple[int, int]:
    """Write ``examples`` (file order kept) to a train and a held-out Tülu JSONL file, the indices in ``held``
    to the held-out one, each record with its ``origin`` (:data:`ORIGIN_KEY`). Atomic writes. With
    ``validation_out``, the indices in ``validation`` (disjoint from ``held``) go to a third file and
    not to the train file.

    Returns ``(n_train, n_heldout)``."""
    from spielbench.assets import write_jsonl

    def rec(i):
        return {**examples[i], ORIGIN_KEY: {"file": origins[i][0], "line": origins[i][1]}}

    val = set(validation or ()) if validation_out is not None else set()
    write_jsonl(heldout_out, (rec(i) for i in sorted(held)))
    if validation_out is not None:
        write_jsonl(validation_out, (rec(i) for i in sorted(val)))
    write_jsonl(train_out, (rec(i) for i in range(len(examples)) if i not in held and i not in val))
    return len(examples) - len(held) - len(val), len(held)


def validation_indices(n: int, held: set[int], validation_examples: int, seed: int) -> set[int]:
    """The seeded validation draw of a split (learning-rate selection): ``min(validation_examples, r // 10)``
    indices (at least 1) of the ``r`` indices of ``range(n)`` not in ``held``, drawn with
    ``random.Random(f"{seed}/validation")``; disjoint from ``held``.

    Raises:
        InputError: ``validation_examples < 1``, or no index left outside ``held`` (fewer than 2 remain).
    """
    import random

    if not isinstance(validation_examples, int) or validation_examples < 1:
        raise InputError(f"validation_examples: expected a positive integer, got {validation_examples!r}")
    rest = [i for i in range(n) if i not in held]
    if len(rest) < 2:
        raise InputError(f"the data holds {len(rest)} example(s) besides the held-out set; at least 2 are needed "
                         "to split off a validation set")
    k = max(1, min(validation_examples, len(rest) // 10))
    return set(random.Random(f"{seed}/validation").sample(rest, k))


def split_instruction_file(path: str | os.PathLike, train_out: str | os.PathLike,
                           heldout_out: str | os.PathLike, heldout_examples: int, seed: int) -> tuple[int, int]:
    """Split a user's instruction file into a train and a held-out file (Tülu ``messages`` JSONL).

    Reads ``path`` with ``read_instruction_file``, draws the held-out examples with :func:`heldout_indices`
    and writes both files with :func:`write_split` (they share no record; each record names the user's
    file and line it came from). The workflow's split (``spielbench.data.split_user_data``) also drops
    examples training could not use before drawing.

    Returns ``(n_train, n_heldout)``. Raises ``InputError`` on bad input, when ``heldout_examples < 1``
    or when the file holds fewer than 2 records.
    """
    read = read_instruction_file(path)
    held = heldout_indices(len(read.examples), heldout_examples, seed, what=str(path))
    return write_split(read.examples, read.origins, held, train_out, heldout_out)
