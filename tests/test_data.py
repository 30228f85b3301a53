"""Instruction data: chat-template rendering, response-only labels, truncation, filtering, collation."""
from __future__ import annotations

import json

import pytest
import torch

from spielbench.data import (
    IGNORE_INDEX,
    PaddingCollator,
    encode_examples,
    encode_messages,
    load_instruction_dataset,
    pad_token_id_of,
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


def test_collator_pads_right_with_pad_id_mask_and_ignored_labels():
    coll = PaddingCollator(pad_token_id=7)
    batch = coll([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())
    rounded = PaddingCollator(0, pad_to_multiple_of=4)([{"input_ids": [1] * 5, "labels": [1] * 5}])
    assert rounded["input_ids"].shape == (1, 8)


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
