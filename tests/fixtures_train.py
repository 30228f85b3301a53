"""Fixtures for the training harness tests: a byte-level chat tokenizer and tiny model folders.

The tokenizer is a real ``PreTrainedTokenizerFast`` (byte-level BPE without merges: one token per
byte, plus ChatML special tokens) with a ChatML chat template, so rendering, offsets and label masking
run exactly as with SmolLM2's tokenizer, without needing the real model.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
#: Size of the byte-level chat tokenizer's vocabulary (3 special tokens + 256 bytes).
CHAT_VOCAB_SIZE = 259


def make_chat_tokenizer():
    """A byte-level ChatML tokenizer: ids 0 ``<pad>``, 1 ``<|im_start|>``, 2 ``<|im_end|>`` (eos), 3.. bytes."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for i, ch in enumerate(sorted(ByteLevel.alphabet())):
        vocab[ch] = 3 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML_TEMPLATE
    return fast


def write_tiny_model_dir(path: Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny random LLaMA (vocab = the chat tokenizer's) plus the chat tokenizer into ``path``."""
    from conftest import make_tiny_llama

    kwargs = dict(vocab_size=CHAT_VOCAB_SIZE, pad_token_id=0, bos_token_id=None, eos_token_id=2)
    kwargs.update(overrides)
    model = make_tiny_llama(seed=seed, **kwargs)
    model.save_pretrained(path)
    make_chat_tokenizer().save_pretrained(path)
    return path


def write_flan_jsonl(path: Path, n: int, seed: int = 0) -> Path:
    """A Flan-format file of ``n`` learnable examples: the answer is the reversed input (4-18 characters)."""
    import random

    rng = random.Random(seed)
    words = ["apple", "sea", "stone", "cloudy", "to", "green", "lightning", "sound", "mu", "paper"]
    with open(path, "w") as fh:
        for _ in range(n):
            w = rng.choice(words) + rng.choice(words)
            fh.write(json.dumps({"inputs": f"Reverse: {w}", "targets": w[::-1]}) + "\n")
    return path


@pytest.fixture(scope="session")
def chat_tokenizer():
    """The byte-level ChatML tokenizer (shared; do not mutate)."""
    return make_chat_tokenizer()


@pytest.fixture(scope="session")
def tiny_run_files(tmp_path_factory):
    """A tiny model folder and train/held-out Flan files, built once per session.

    Returns:
        dict with ``model`` (folder), ``train`` and ``heldout`` (files), as strings.
    """
    root = tmp_path_factory.mktemp("tiny_run")
    # width 64 so that every layer's in_features is a multiple of the NF4 block size (4-bit methods on CPU)
    model_dir = write_tiny_model_dir(root / "model", hidden_size=64, intermediate_size=128)
    train = write_flan_jsonl(root / "train.jsonl", 64, seed=1)
    heldout = write_flan_jsonl(root / "heldout.jsonl", 16, seed=2)
    return {"model": str(model_dir), "train": str(train), "heldout": str(heldout)}


#: Learning rates that move a tiny random model visibly within a few steps.
TINY_LR = {"full": 1e-3, "ia3": 3e-2, "spiel-ma": 2e-2, "qspiel-ma": 2e-2}


def tiny_run_config(files: dict, method: str, **overrides):
    """A short run config on the tiny model: 8 steps of 4 x 2 examples, 48 tokens, checkpoints every 4."""
    from spielbench.methods import METHODS
    from spielbench.runconfig import RunConfig

    spec = METHODS[method]
    kw = dict(method=method, model=files["model"], train_data=files["train"], heldout_data=files["heldout"],
              rank=2 if spec.takes_rank else None, max_steps=8, per_device_train_batch_size=4,
              gradient_accumulation_steps=2, save_steps=4, max_seq_length=48, warmup_ratio=0.0,
              learning_rate=TINY_LR.get(method, 1e-2), heldout_examples=16, seed=3,
              spiel={"reselection_steps": 4, "selection_accumulation_steps": 2} if spec.family == "spiel" else {})
    kw.update(overrides)
    return RunConfig(**kw)


@pytest.fixture
def torch_single_thread():
    """Run a test with one intra-op thread, then restore the previous count.

    The tiny models' matmuls take microseconds; with two threads on a shared, loaded machine the
    OpenMP workers spend far longer waiting for each other than computing (a tiny run measured 22 s
    with two threads and 1.9 s with one under a load average of 7).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
