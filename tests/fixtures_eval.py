"""Fixtures for the evaluation tests: a scripted tiny LLaMA, a locally trained tokenizer, tiny task files.

The scripted model is a real ``LlamaForCausalLM`` whose weights make its behaviour known by hand:

* one-hot token embeddings (hidden size >= vocabulary), and zero ``o_proj``/``down_proj`` weights, so
  the residual stream at every position is exactly the current token's one-hot vector and the final
  RMSNorm turns it into ``sqrt(hidden) * e_token``;
* ``lm_head`` rows so that the logits after token ``i`` are ``sqrt(hidden) * (CHAIN_WEIGHT *
  [j == NEXT[i]] + sum_f FAVOURITES[f] * [j == f])``.

So greedy generation follows the chain ``NEXT`` from the prompt's last token, and among tokens off
the chain the model always prefers ``" yes"``, then ``" A"``, over every other token.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

#: Greedy chain after ``":"`` (GSM8K answers) and after ``"\n"`` (HumanEval bodies), as text pieces.
GSM_CHAIN = [":", " The", " answer", " is", " 3", ",", " 18", ".", "\n"]
CODE_CHAIN = ["\n", "   ", " return", " a", " +", " b", "\n\n", "def"]
#: Tokens preferred everywhere off the chain, with their logit weights (before the sqrt(hidden) scale).
FAVOURITES = {" yes": 2.0, " A": 1.0}
CHAIN_WEIGHT = 4.0

#: Every string the tokenizer is trained on: one pre-token each (ByteLevel splitting), plus words.
_CORPUS = (GSM_CHAIN + CODE_CHAIN + list(FAVOURITES)
           + [" no", " maybe", " never", " B", " C", " D", "Question", "Answer", " Question", "?", "\n"]
           + ["<user>", "<assistant>", " hello", " world", " Hi", " there"])


def build_eval_tokenizer():
    """A WordLevel tokenizer with GPT-2 style byte-level pre-tokenization, trained on :data:`_CORPUS`.

    Words outside the corpus become ``[UNK]``. Special tokens: ``<pad>`` (0), ``<eos>`` (1), ``[UNK]``
    (2). It carries a small prefix-stable chat template (for the held-out loss).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "<eos>", "[UNK]"], min_frequency=1)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<pad>", eos_token="<eos>")
    fast.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return fast


def token_id(tokenizer, piece: str) -> int:
    """The id of ``piece``, which must encode to exactly one known token."""
    ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1 and ids[0] != tokenizer.unk_token_id, (piece, ids)
    return ids[0]


def build_scripted_llama(tokenizer):
    """The scripted ``LlamaForCausalLM`` described in the module docstring (float32, eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = len(tokenizer)
    hidden = int(math.ceil(vocab / 8) * 8)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=None, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        emb = torch.zeros(vocab, hidden)
        emb[:, :vocab] = torch.eye(vocab)
        model.model.embed_tokens.weight.copy_(emb)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        head = torch.zeros(vocab, hidden)
        for chain in (GSM_CHAIN, CODE_CHAIN):
            ids = [token_id(tokenizer, p) for p in chain]
            for a, b in zip(ids, ids[1:]):
                head[b, a] = CHAIN_WEIGHT
        for piece, weight in FAVOURITES.items():
            head[token_id(tokenizer, piece), :vocab] += weight
        model.lm_head.weight.copy_(head)
    model.eval()
    return model


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_eval_fixtures(directory: Path) -> Path:
    """Tiny task files in the asset layout, with answers chosen so the scripted model's scores are known.

    - ``arc_easy_test``: 4 questions, choices yes/no/maybe/never in varying order, " yes" right in 2.
    - ``boolq_val``: 4 questions, answer True in 3 (the model always says " yes").
    - ``mmlu_dev``/``mmlu_test``: 2 subjects x 5 dev exemplars; 4 test questions, answer A in 2.
    - ``gsm8k_test``: 4 questions, reference 18 in 2 (the model always ends with "3, 18.").
    - ``humaneval_test``: 2 problems, ``add`` (solved by "return a + b") and ``sub`` (not).
    """
    directory.mkdir(parents=True, exist_ok=True)
    arc = [
        {"id": "q1", "question": "Is it?", "choices": ["no", "yes", "maybe", "never"], "gold": 1},
        {"id": "q2", "question": "Is it?", "choices": ["yes", "no", "maybe", "never"], "gold": 2},
        {"id": "q3", "question": "Is it?", "choices": ["maybe", "never", "no", "yes"], "gold": 3},
        {"id": "q4", "question": "Is it?", "choices": ["never", "yes", "no", "maybe"], "gold": 0},
    ]
    # the OLMES layout of the asset files: query + question + choices + gold
    _write_jsonl(directory / "arc_easy_test.jsonl",
                 [{**r, "query": f"Question: {r['question']}\nAnswer:"} for r in arc])
    _write_jsonl(directory / "boolq_val.jsonl", [
        {"question": "is it", "passage": "Hello world.", "answer": a} for a in (True, False, True, True)])
    dev = [{"question": f"{s} q{i}", "subject": s, "choices": ["w", "x", "y", "z"], "answer": i % 4}
           for s in ("astronomy", "virology") for i in range(5)]
    _write_jsonl(directory / "mmlu_dev.jsonl", dev)
    _write_jsonl(directory / "mmlu_test.jsonl", [
        {"question": "t1", "subject": "astronomy", "choices": ["a", "b", "c", "d"], "answer": 0},
        {"question": "t2", "subject": "astronomy", "choices": ["a", "b", "c", "d"], "answer": 1},
        {"question": "t3", "subject": "virology", "choices": ["a", "b", "c", "d"], "answer": 0},
        {"question": "t4", "subject": "virology", "choices": ["a", "b", "c", "d"], "answer": 3},
    ])
    _write_jsonl(directory / "gsm8k_test.jsonl", [
        {"question": "How many?", "answer": f"Some steps.\n#### {n}"} for n in ("18", "5", "18", "1,018")])
    _write_jsonl(directory / "humaneval_test.jsonl", [
        {"task_id": "Test/0", "prompt": 'def add(a, b):\n    """Add."""\n', "entry_point": "add",
         "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"},
        {"task_id": "Test/1", "prompt": 'def sub(a, b):\n    """Subtract."""\n', "entry_point": "sub",
         "test": "def check(candidate):\n    assert candidate(5, 3) == 2\n"},
    ])
    return directory


@pytest.fixture(scope="session")
def eval_tokenizer():
    """The locally trained tokenizer of the scripted model."""
    return build_eval_tokenizer()


@pytest.fixture(scope="session")
def scripted_llama(eval_tokenizer):
    """The scripted tiny LLaMA (shared; do not mutate)."""
    return build_scripted_llama(eval_tokenizer)


@pytest.fixture(scope="session")
def eval_fixture_dir(tmp_path_factory) -> Path:
    """A folder of tiny task files (see :func:`write_eval_fixtures`)."""
    return write_eval_fixtures(tmp_path_factory.mktemp("eval_data"))


@pytest.fixture(scope="session")
def scripted_model_dir(tmp_path_factory, scripted_llama, eval_tokenizer) -> Path:
    """The scripted model and its tokenizer saved as a model folder."""
    out = tmp_path_factory.mktemp("scripted_model")
    scripted_llama.save_pretrained(out)
    eval_tokenizer.save_pretrained(out)
    return out
