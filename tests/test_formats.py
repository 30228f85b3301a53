"""Instruction data formats: detection, conversion to messages, and the error messages on bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from spielbench.errors import InputError
from spielbench.formats import (
    detect_format,
    load_instruction_examples,
    split_instruction_file,
    validate_instruction_file,
)

ALPACA = [
    {"instruction": "Give the capital of France.", "input": "", "output": "Paris"},
    {"instruction": "Translate to German.", "input": "good morning", "output": "guten Morgen"},
]
TULU = [
    {"dataset": "oasst", "id": "a1", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]},
    {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue"}]},
]
FLAN = [
    {"inputs": "Is the sky blue?\n\nOPTIONS:\n- yes\n- no", "targets": "yes", "task": "t", "template": "t/0"},
    {"inputs": "2+3=", "targets": "5"},
    {"inputs": "Capital of Italy?", "targets": "Rome"},
]


def _jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, indent=2), encoding="utf-8")
    return path


def _err(path, fn=validate_instruction_file) -> str:
    with pytest.raises(InputError) as info:
        fn(path)
    return str(info.value)


def test_alpaca_json_list_is_detected_and_converted(tmp_path):
    p = _json(tmp_path / "data.json", ALPACA)
    assert detect_format(p) == "alpaca"
    assert validate_instruction_file(p) == ("alpaca", 2)
    ex = load_instruction_examples(p)
    assert ex == [
        {"messages": [{"role": "user", "content": "Give the capital of France."},
                      {"role": "assistant", "content": "Paris"}]},
        {"messages": [{"role": "user", "content": "Translate to German.\n\ngood morning"},
                      {"role": "assistant", "content": "guten Morgen"}]},
    ]


def test_alpaca_without_input_field_is_accepted(tmp_path):
    p = _json(tmp_path / "a.json", [{"instruction": "Say hi", "output": "hi"}])
    assert load_instruction_examples(p)[0]["messages"][0] == {"role": "user", "content": "Say hi"}


def test_tulu_jsonl_keeps_all_turns(tmp_path):
    p = _jsonl(tmp_path / "tulu.jsonl", TULU)
    assert detect_format(p) == "tulu"
    ex = load_instruction_examples(p)
    assert [m["role"] for m in ex[0]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert ex[1]["messages"][1] == {"role": "assistant", "content": "Blue"}
    assert set(ex[0]) == {"messages"}


def test_flan_jsonl_with_blank_lines_and_max_examples(tmp_path):
    p = tmp_path / "flan.txt"  # detection is by content, not by file name
    p.write_text(json.dumps(FLAN[0]) + "\n\n" + json.dumps(FLAN[1]) + "\n" + json.dumps(FLAN[2]) + "\n")
    assert validate_instruction_file(p) == ("flan", 3)
    ex = load_instruction_examples(p, max_examples=2)
    assert len(ex) == 2
    assert ex[1]["messages"] == [{"role": "user", "content": "2+3="}, {"role": "assistant", "content": "5"}]


def test_byte_order_mark_is_ignored(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_text("\ufeff" + json.dumps(FLAN[1]) + "\n", encoding="utf-8")
    assert validate_instruction_file(p) == ("flan", 1)


def test_any_format_in_either_container(tmp_path):
    assert detect_format(_jsonl(tmp_path / "a.jsonl", ALPACA)) == "alpaca"
    assert validate_instruction_file(_json(tmp_path / "f.json", FLAN)) == ("flan", 3)


def test_missing_file_names_path(tmp_path):
    msg = _err(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in msg and "not found" in msg


def test_folder_instead_of_file(tmp_path):
    assert "is a folder" in _err(tmp_path)


@pytest.mark.parametrize("content", ["", "  \n\n", "[]", "[ ]\n"])
def test_empty_file(tmp_path, content):
    p = tmp_path / "empty.json"
    p.write_text(content)
    msg = _err(p, load_instruction_examples)
    assert "empty.json" in msg and ("empty" in msg or "no records" in msg)


def test_unrecognised_format_lists_accepted_ones(tmp_path):
    p = _jsonl(tmp_path / "x.jsonl", [{"prompt": "a", "completion": "b"}])
    msg = _err(p, detect_format)
    assert "x.jsonl:1" in msg and "unrecognised" in msg
    assert "completion, prompt" in msg
    for name in ("Alpaca", "Tülu", "Flan", "instruction", "messages", "inputs", "targets"):
        assert name in msg


def test_top_level_scalar_is_unrecognised(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text('"just a string"\n')
    assert "unrecognised" in _err(p)


def test_bad_json_line_reports_line_number(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(FLAN[0]) + "\n" + json.dumps(FLAN[1]) + "\n{not json}\n")
    msg = _err(p)
    assert "bad.jsonl:3" in msg and "not valid JSON" in msg


def test_record_missing_field_reports_line_and_field(tmp_path):
    p = tmp_path / "f.jsonl"
    p.write_text(json.dumps(FLAN[0]) + "\n" + json.dumps({"inputs": "q"}) + "\n")
    msg = _err(p)
    assert "f.jsonl:2" in msg and "flan" in msg and "inputs" in msg


def test_wrong_field_type(tmp_path):
    p = _jsonl(tmp_path / "f.jsonl", [FLAN[0], {"inputs": "q", "targets": 5}])
    msg = _err(p)
    assert "f.jsonl:2" in msg and "'targets' must be a string" in msg


def test_mixed_formats_are_rejected(tmp_path):
    p = _jsonl(tmp_path / "mix.jsonl", [FLAN[0], FLAN[1], ALPACA[0]])
    msg = _err(p)
    assert "mix.jsonl:3" in msg and "expected a flan record" in msg


def test_alpaca_list_error_points_at_element_line(tmp_path):
    records = [ALPACA[0], {"instruction": "x", "output": ["not", "a", "string"]}]
    p = _json(tmp_path / "alp.json", records)
    starts = [i + 1 for i, text in enumerate(p.read_text().splitlines()) if text == "  {"]
    line = starts[1]  # the second element's opening brace
    msg = _err(p)
    assert f"alp.json:{line}" in msg and "'output' must be a string" in msg


def test_truncated_json_list(tmp_path):
    p = tmp_path / "t.json"
    p.write_text('[\n{"instruction": "a", "output": "b"},\n{"instruction": "c", ')
    msg = _err(p)
    assert "t.json:3" in msg and "not valid JSON" in msg


@pytest.mark.parametrize("messages, expected", [
    ([], "non-empty list"),
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
    ([{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}], "messages[0].role"),
    ([{"role": "user"}, {"role": "assistant", "content": "yo"}], "messages[0] must be an object"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}], "messages[1].content"),
])
def test_tulu_schema_errors(tmp_path, messages, expected):
    p = _jsonl(tmp_path / "tulu.jsonl", [TULU[1], {"messages": messages}])
    msg = _err(p)
    assert "tulu.jsonl:2" in msg and expected in msg


def test_max_examples_must_be_positive(tmp_path):
    p = _jsonl(tmp_path / "f.jsonl", FLAN)
    with pytest.raises(InputError, match="max_examples"):
        load_instruction_examples(p, max_examples=0)


def test_split_instruction_file_is_deterministic_and_disjoint(tmp_path):
    src = _json(tmp_path / "alpaca.json",
                [{"instruction": f"Repeat {i}", "input": "", "output": str(i)} for i in range(40)])
    a = split_instruction_file(src, tmp_path / "a_train.jsonl", tmp_path / "a_held.jsonl", 96, seed=3)
    b = split_instruction_file(src, tmp_path / "b_train.jsonl", tmp_path / "b_held.jsonl", 96, seed=3)
    assert a == b == (36, 4)  # at most a tenth of the file is held out
    assert (tmp_path / "a_held.jsonl").read_bytes() == (tmp_path / "b_held.jsonl").read_bytes()
    train = load_instruction_examples(tmp_path / "a_train.jsonl")
    held = load_instruction_examples(tmp_path / "a_held.jsonl")
    assert detect_format(tmp_path / "a_train.jsonl") == "tulu"
    outs = {e["messages"][1]["content"] for e in train}
    held_outs = {e["messages"][1]["content"] for e in held}
    assert not outs & held_outs and len(outs | held_outs) == 40
    split_instruction_file(src, tmp_path / "c_train.jsonl", tmp_path / "c_held.jsonl", 2, seed=4)
    assert len(load_instruction_examples(tmp_path / "c_held.jsonl")) == 2
    with pytest.raises(InputError, match="at least 2"):
        split_instruction_file(_json(tmp_path / "one.json", ALPACA[:1]), tmp_path / "x", tmp_path / "y", 5, 0)
