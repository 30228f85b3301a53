"""The one held-out loss (spielbench.heldout): token mean, per-example values, the label-rows head and its check."""
from __future__ import annotations

import json

import pytest
import torch

from spielbench.data import make_collator
from spielbench.errors import InputError
from spielbench.heldout import HEAD_FULL, HEAD_LABEL_ROWS, heldout_loss, heldout_loss_of_file

FEATS = [
    {"input_ids": [5, 6, 7, 8, 9, 10], "labels": [-100, -100, 7, 8, 9, 10]},  # 4 predicted tokens
    {"input_ids": [11, 12, 13], "labels": [-100, -100, 13]},  # 1 predicted token
    {"input_ids": [20, 21, 22, 23, 24, 25, 26, 27], "labels": [-100, -100, -100, -100, -100, 25, 26, -100]},  # 2
]


def _per_token_reference(model, feats):
    """Per example: the NLLs of its label tokens, from the model's own logits one example at a time."""
    out = []
    with torch.no_grad():
        for f in feats:
            logits = model(input_ids=torch.tensor([f["input_ids"]])).logits[0]
            out.append([torch.nn.functional.cross_entropy(logits[t - 1], torch.tensor(f["labels"][t])).item()
                        for t in range(1, len(f["labels"])) if f["labels"][t] != -100])
    return out


def test_token_mean_per_example_values_in_dataset_order_and_the_label_rows_head(tiny_llama, chat_tokenizer):
    got = heldout_loss(tiny_llama, FEATS, make_collator(chat_tokenizer), batch_size=2)
    ref = _per_token_reference(tiny_llama, FEATS)
    assert got["head"] == HEAD_LABEL_ROWS  # a plain LLaMA: decoder + lm_head is the model's own logits
    assert got["n_examples"] == 3 and got["n_tokens"] == 7 and got["example_tokens"] == [4, 1, 2]
    assert got["example_nll"] == pytest.approx([sum(r) for r in ref], rel=1e-5)
    flat = [x for r in ref for x in r]
    assert got["loss"] == pytest.approx(sum(flat) / len(flat), rel=1e-5)
    mean_of_means = sum(sum(r) / len(r) for r in ref) / len(ref)
    assert abs(got["loss"] - mean_of_means) > 1e-4  # the token mean, not a mean of example means
    # batching does not change the numbers (pads are masked and ignored); the result is in dataset order
    one = heldout_loss(tiny_llama, FEATS, make_collator(chat_tokenizer), batch_size=1)
    assert one["example_nll"] == pytest.approx(got["example_nll"], rel=1e-5)
    assert tiny_llama.training  # the model's mode is restored (a fresh model is in train mode)


def test_label_rows_head_equals_the_full_logits_path(tiny_llama, chat_tokenizer):
    from spielbench import heldout

    fast = heldout_loss(tiny_llama, FEATS, make_collator(chat_tokenizer), batch_size=3)
    batch = make_collator(chat_tokenizer)(FEATS)
    with torch.no_grad():
        full = heldout._nll_full(tiny_llama, batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert fast["head"] == HEAD_LABEL_ROWS
    assert fast["example_nll"] == pytest.approx(full.tolist(), rel=1e-5)


class _PostProcessed(torch.nn.Module):
    """A causal LM whose logits are scaled and softcapped after the head (as Gemma 2's
    final_logit_softcapping): the decoder and head it exposes do not give its logits."""

    def __init__(self, inner, scale: float = 20.0, cap: float = 3.0):
        super().__init__()
        self.inner, self.scale, self.cap = inner, scale, cap

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        out.logits = self.cap * torch.tanh(self.scale * out.logits / self.cap)
        return out

    def get_decoder(self):
        return self.inner.get_decoder()

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()


def test_falls_back_to_the_models_logits_when_the_head_is_post_processed(tiny_llama, chat_tokenizer):
    capped = _PostProcessed(tiny_llama)
    got = heldout_loss(capped, FEATS, make_collator(chat_tokenizer), batch_size=2)
    assert got["head"] == HEAD_FULL
    ref = _per_token_reference(capped, FEATS)
    assert got["example_nll"] == pytest.approx([sum(r) for r in ref], rel=1e-5)
    # and the plain model's numbers differ: the check did catch a real difference
    plain = heldout_loss(tiny_llama, FEATS, make_collator(chat_tokenizer), batch_size=2)
    assert abs(plain["loss"] - got["loss"]) > 1e-2


def test_the_check_waits_for_a_batch_with_labels(tiny_llama, chat_tokenizer):
    """A first batch without label tokens agrees on zeros whatever the head does; the next one is checked."""
    no_labels = {"input_ids": [30, 31, 32, 33, 34, 35, 36, 37, 38], "labels": [-100] * 9}  # longest: batch 1
    capped = _PostProcessed(tiny_llama)
    got = heldout_loss(capped, [no_labels] + FEATS, make_collator(chat_tokenizer), batch_size=1)
    assert got["head"] == HEAD_FULL and got["example_tokens"][0] == 0 and got["example_nll"][0] == 0.0
    ref = _per_token_reference(capped, FEATS)
    assert got["example_nll"][1:] == pytest.approx([sum(r) for r in ref], rel=1e-5)


def test_model_without_decoder_uses_full_logits(tiny_llama, chat_tokenizer):
    class Bare(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            return self.inner(**kwargs)

    got = heldout_loss(Bare(tiny_llama), FEATS, make_collator(chat_tokenizer))
    assert got["head"] == HEAD_FULL
    fast = heldout_loss(tiny_llama, FEATS, make_collator(chat_tokenizer))
    assert got["example_nll"] == pytest.approx(fast["example_nll"], rel=1e-5)


def test_through_peft_and_spiel_wrappers_the_label_rows_head_is_used(tiny_llama, chat_tokenizer):
    import spiel
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(tiny_llama, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    got = heldout_loss(lora, FEATS, make_collator(chat_tokenizer))
    assert got["head"] == HEAD_LABEL_ROWS
    assert got["example_nll"] == pytest.approx([sum(r) for r in _per_token_reference(lora, FEATS)], rel=1e-5)

    from conftest import make_tiny_llama

    sp = spiel.get_spiel_model(make_tiny_llama(), spiel.SpielConfig(num_tunable_weights=64, seed=0))
    with torch.no_grad():
        for _, layer in sp.sparse_layers():
            layer.values.normal_(0, 0.5)
    got = heldout_loss(sp, FEATS, make_collator(chat_tokenizer))
    assert got["head"] == HEAD_LABEL_ROWS
    assert got["example_nll"] == pytest.approx([sum(r) for r in _per_token_reference(sp, FEATS)], rel=1e-5)


def test_bad_file_names_the_file(tmp_path, tiny_llama, chat_tokenizer):
    bad = tmp_path / "held.jsonl"
    bad.write_text('{"inputs": "a", "targets": "b"}\nnot json\n', encoding="utf-8")
    with pytest.raises(InputError, match="held.jsonl"):
        heldout_loss_of_file(tiny_llama, chat_tokenizer, bad, max_seq_length=64)
    with pytest.raises(InputError, match="missing.jsonl"):
        heldout_loss_of_file(tiny_llama, chat_tokenizer, tmp_path / "missing.jsonl", max_seq_length=64)


def test_file_result_records_file_and_length(tmp_path, chat_tokenizer):
    from conftest import make_tiny_llama

    model = make_tiny_llama(vocab_size=len(chat_tokenizer))
    path = tmp_path / "held.jsonl"
    path.write_text("".join(json.dumps({"inputs": f"q{i}", "targets": " yes" * (i + 1)}) + "\n" for i in range(3)),
                    encoding="utf-8")
    got = heldout_loss_of_file(model, chat_tokenizer, path, max_seq_length=64, batch_size=2)
    assert got["file"] == str(path) and got["max_seq_length"] == 64 and got["n_examples"] == 3
    assert got["example_tokens"][0] < got["example_tokens"][1] < got["example_tokens"][2]  # file order


@pytest.mark.slow
def test_real_model_label_rows_equal_the_full_logits_and_float64(real_model, real_tokenizer):
    """SmolLM2-135M on 16 examples of the real held-out split: the label-rows head is taken, and its numbers
    are the full-logits path's and (within float32 rounding) the float64 cross-entropy of the same logits."""
    from conftest import RESOURCES

    from spielbench import heldout
    from spielbench.data import load_instruction_dataset

    path = RESOURCES / "data" / "mixture" / "heldout.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not built; run `.venv/bin/snakemake --cores all assets`")
    data = load_instruction_dataset(path, real_tokenizer, 256, max_examples=16)
    got = heldout_loss(real_model, data, make_collator(real_tokenizer))
    assert got["head"] == HEAD_LABEL_ROWS
    batch = make_collator(real_tokenizer)([data[i] for i in range(8)])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():
        full = heldout._nll_full(real_model, ids, mask, labels)
        fast = heldout._nll_label_rows(real_model.get_decoder(), real_model.get_output_embeddings(), ids, mask, labels)
        logits = real_model(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
        f64 = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                ignore_index=-100, reduction="none").view(labels[:, 1:].shape).sum(1)
    assert fast.tolist() == pytest.approx(full.tolist(), rel=1e-6)
    assert fast.double().tolist() == pytest.approx(f64.tolist(), rel=2e-5)
