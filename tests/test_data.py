"""Instruction data: chat-template rendering, response-only labels, truncation, filtering, collation."""
from __future__ import annotations

import json

import pytest
import torch

from spielbench.data import (
    IGNORE_INDEX,
    describe_drops,
    encode_examples,
    encode_messages,
    load_instruction_dataset,
    make_collator,
    pad_token_id_of,
    split_user_data,
)
from spielbench.errors import InputError


def _labelled_text(tok, enc):
    """The decoded label tokens, split into contiguous runs."""
    runs, cur = [], []
    for i, lab in zip(enc["input_ids"], enc["labels"]):
        if lab == IGNORE_INDEX:
            if cur:
                runs.append(tok.decode(cur))
                cur = []
        else:
            assert lab == i
            cur.append(lab)
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_single_turn_labels_only_the_response_and_end_of_turn(chat_tokenizer):
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Yo é"}]
    enc = encode_messages(chat_tokenizer, msgs, max_seq_length=512)
    assert chat_tokenizer.decode(enc["input_ids"]) == chat_tokenizer.apply_chat_template(msgs, tokenize=False)
    assert _labelled_text(chat_tokenizer, enc) == ["Yo é<|im_end|>\n"]
    assert enc["labels"][0] == IGNORE_INDEX


def test_multi_turn_labels_every_assistant_turn_and_no_user_or_system_turn(chat_tokenizer):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "1"},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "22"},
    ]
    enc = encode_messages(chat_tokenizer, msgs, max_seq_length=512)
    assert _labelled_text(chat_tokenizer, enc) == ["1<|im_end|>\n", "22<|im_end|>\n"]


def test_truncation_keeps_the_prefix_and_drops_examples_without_response_tokens(chat_tokenizer):
    msgs = [{"role": "user", "content": "x" * 20}, {"role": "assistant", "content": "answer"}]
    full = encode_messages(chat_tokenizer, msgs, max_seq_length=10_000)
    n_prompt = next(i for i, x in enumerate(full["labels"]) if x != IGNORE_INDEX)
    cut = encode_messages(chat_tokenizer, msgs, max_seq_length=n_prompt + 2)
    assert cut["input_ids"] == full["input_ids"][: n_prompt + 2]
    assert sum(x != IGNORE_INDEX for x in cut["labels"]) == 2
    assert encode_messages(chat_tokenizer, msgs, max_seq_length=n_prompt) is None

    examples = [{"messages": msgs}, {"messages": [{"role": "user", "content": "short"},
                                                  {"role": "assistant", "content": "ok"}]}]
    feats, stats = encode_examples(chat_tokenizer, examples, max_seq_length=n_prompt)
    assert stats.read == 2 and stats.kept == 1 and stats.dropped_no_response == 1
    assert len(feats) == 1 and _labelled_text(chat_tokenizer, feats[0]) == ["ok<|im_end|>\n"]
    # a conversation with no assistant turn has nothing to learn from
    assert encode_messages(chat_tokenizer, [{"role": "user", "content": "alone"}], 100) is None


def test_collator_pads_right_with_pad_id_mask_and_ignored_labels(chat_tokenizer):
    feats = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}]
    batch = make_collator(chat_tokenizer)(feats)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())
    assert feats[1] == {"input_ids": [4], "labels": [4]}  # the features are not changed
    rounded = make_collator(chat_tokenizer, pad_to_multiple_of=4)([{"input_ids": [1] * 5, "labels": [1] * 5}])
    assert rounded["input_ids"].shape == (1, 8)
    # a left-padding tokenizer without a pad token: still right padding, with its eos id; it is not changed
    tok = chat_tokenizer.__class__(tokenizer_object=chat_tokenizer.backend_tokenizer, eos_token="<|im_end|>")
    tok.padding_side = "left"
    batch = make_collator(tok)(feats)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 2, 2]] and batch["labels"][1].tolist() == [4, -100, -100]
    assert tok.pad_token_id is None and tok.padding_side == "left"


def test_pad_id_falls_back_to_eos(chat_tokenizer):
    assert pad_token_id_of(chat_tokenizer) == 0
    tok = chat_tokenizer.__class__(tokenizer_object=chat_tokenizer.backend_tokenizer, eos_token="<|im_end|>")
    assert tok.pad_token_id is None and pad_token_id_of(tok) == 2


def test_load_dataset_reads_flan_and_reports_missing_or_empty(tmp_path, chat_tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"inputs": f"q{i}", "targets": f"a{i}"}) + "\n" for i in range(5)))
    ds = load_instruction_dataset(path, chat_tokenizer, 64, max_examples=3)
    assert len(ds) == 3 and ds.stats.kept == 3
    assert _labelled_text(chat_tokenizer, ds[1]) == ["a1<|im_end|>\n"]

    with pytest.raises(InputError, match=r"train_data: file .*nope.jsonl does not exist"):
        load_instruction_dataset(tmp_path / "nope.jsonl", chat_tokenizer, 64)
    with pytest.raises(InputError, match=r"heldout_data: no example of .*d.jsonl has an assistant response token "
                                         r"within max_seq_length=4 \(5 read, 5 dropped\)"):
        load_instruction_dataset(path, chat_tokenizer, 4, field_name="heldout_data")


def test_real_smollm2_template_labels_the_response(real_tokenizer):
    """SmolLM2's template inserts a default system prompt; labels still cover exactly the answer turn."""
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    enc = encode_messages(real_tokenizer, msgs, 512)
    assert _labelled_text(real_tokenizer, enc) == ["4<|im_end|>\n"]
    assert "system" in real_tokenizer.decode(enc["input_ids"])


def test_tokenizer_without_chat_template_gets_the_tulu_format(chat_tokenizer):
    """Base models (e.g. Llama-2-7b-hf) ship no chat template: the reference's Tülu format is used."""
    import copy

    from spielbench.data import TULU_CHAT_TEMPLATE, encode_messages

    tok = copy.deepcopy(chat_tokenizer)
    tok.chat_template = None
    msgs = [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "four"}]
    enc = encode_messages(tok, msgs, max_seq_length=128)
    assert tok.chat_template == TULU_CHAT_TEMPLATE
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text.startswith("<|user|>\nWhat is two plus two?\n<|assistant|>\nfour")
    answer = [t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != -100]
    assert "four" in tok.decode(answer)
    assert "two plus two" not in tok.decode(answer)


# ------------------------------------------------------------------------------ drops, skips, the user split


def _alpaca(path, outputs):
    """An Alpaca JSON list with one record per line (record i on line i + 2), ``output`` from ``outputs``."""
    lines = [json.dumps({"instruction": f"Repeat {i}", "input": "", "output": out}) for i, out in enumerate(outputs)]
    path.write_text("[\n" + ",\n".join(lines) + "\n]\n")
    return path


def test_empty_response_is_dropped_and_reported_with_file_and_line(tmp_path, chat_tokenizer):
    """An empty response used to be kept and trained on the end-of-turn token alone."""
    path = _alpaca(tmp_path / "a.json", ["one", "", "three", "  ", "five"])
    ds = load_instruction_dataset(path, chat_tokenizer, 64)
    assert len(ds) == 3 and ds.stats.dropped_empty_response == 2
    report = ds.stats.drop_report()
    assert report == {"count": 2, "by_reason": {"empty response": 2},
                      "first": [{"file": str(path), "line": 3, "reason": "empty response"},
                                {"file": str(path), "line": 5, "reason": "empty response"}]}
    assert describe_drops(report, "train_data", 5) == (
        f"train_data: dropped 2 of 5 examples (empty response: 2); first: {path}:3 (empty response), "
        f"{path}:5 (empty response)")


def test_malformed_records_reject_the_file_or_are_skipped_and_reported(tmp_path, chat_tokenizer):
    """One Tülu record without an assistant turn used to reject the whole file with no way to skip it."""
    recs = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(4)]
    recs[2] = {"messages": [{"role": "user", "content": "no answer"}]}
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + "{not json\n")
    with pytest.raises(InputError, match=r"t.jsonl:3: 'messages' has no assistant turn"):
        load_instruction_dataset(path, chat_tokenizer, 64)
    ds = load_instruction_dataset(path, chat_tokenizer, 64, on_malformed="skip")
    assert len(ds) == 3 and ds.stats.skipped_malformed == 2
    first = ds.stats.drop_report()["first"]
    assert [(d["file"], d["line"]) for d in first] == [(str(path), 3), (str(path), 5)]
    assert first[0]["reason"].startswith("malformed record (skipped): 'messages' has no assistant turn")
    assert "not valid JSON" in first[1]["reason"]
    with pytest.raises(InputError, match=r"on_malformed: expected one of \['error', 'skip'\]"):
        load_instruction_dataset(path, chat_tokenizer, 64, on_malformed="ignore")


def test_user_split_drops_unusable_examples_before_the_split_and_names_the_users_lines(tmp_path, chat_tokenizer):
    """An over-long example that the seeded draw puts in the held-out split used to make every training job
    fail, naming the derived held-out file; now it is dropped before the split, reported with the user's
    file and line, and the split files keep each record's origin."""
    from spielbench.formats import heldout_indices, load_instruction_examples

    n = 20
    held_before = sorted(heldout_indices(n, 2, seed=5))  # what the old split drew from all 20 records
    outputs = [f"answer {i}" for i in range(n)]
    for i in held_before:
        outputs[i] = "y" * 200  # longer than max_seq_length: truncated away in the held-out loss
    outputs[7 if 7 not in held_before else 8] = ""
    src = _alpaca(tmp_path / "mine.json", outputs)
    report = split_user_data(src, chat_tokenizer, 48, tmp_path / "u" / "train.jsonl", tmp_path / "u" / "heldout.jsonl",
                             tmp_path / "u" / "report.json", heldout_examples=2, seed=5)
    assert report["read"] == n and report["train"] + report["heldout"] == n - 3
    assert report["dropped"]["by_reason"] == {"empty response": 1, "longer than max_seq_length": 2}
    lines = sorted(d["line"] for d in report["dropped"]["first"])
    assert lines == sorted([i + 2 for i in held_before] + [(7 if 7 not in held_before else 8) + 2])
    assert all(d["file"] == str(src) for d in report["dropped"]["first"])
    assert json.loads((tmp_path / "u" / "report.json").read_text()) == report

    held = load_instruction_dataset(tmp_path / "u" / "heldout.jsonl", chat_tokenizer, 48)
    assert len(held) == report["heldout"] and held.stats.drop_report()["count"] == 0
    # a run with a shorter max_seq_length drops more; the report names the user's file and line
    # (at 28 tokens the prompt "Repeat <i>" leaves a response token for one-digit i only)
    again = load_instruction_dataset(tmp_path / "u" / "train.jsonl", chat_tokenizer, 28)
    first = again.stats.drop_report()["first"]
    assert first and all(d["file"] == str(src) and d["line"] >= 10 + 2 for d in first)
    assert first[0]["reason"] == "no response token within max_seq_length"
    with pytest.raises(InputError, match=r"no example of .*mine.json has an assistant response token"):
        load_instruction_dataset(tmp_path / "u" / "train.jsonl", chat_tokenizer, 20)
    # the split files are plain Tülu JSONL (the origin field is ignored by readers)
    assert len(load_instruction_examples(tmp_path / "u" / "train.jsonl")) == report["train"]
