"""Shared fixtures. The whole suite runs in one process; heavy objects are session-scoped.

Area-specific fixtures live in ``tests/fixtures_<area>.py`` and are registered in ``pytest_plugins``.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RESOURCES = REPO / "resources"
REAL_MODEL_DIR = RESOURCES / "models" / "smollm2-135m-instruct"

pytest_plugins: list[str] = ["fixtures_train", "fixtures_eval"]

# One thread: tiny-model tests are dominated by dispatch, and a second thread only waits on a busy machine.
torch.set_num_threads(1)


def tiny_llama_config(**overrides):
    """A LLaMA config small enough for CPU unit tests (a few hundred k parameters)."""
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def make_tiny_llama(seed: int = 0, **overrides):
    """A randomly initialised tiny ``LlamaForCausalLM`` (fp32, eval mode off), deterministic in ``seed``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides))


@pytest.fixture
def tiny_llama():
    """A fresh tiny LLaMA per test (tests mutate models)."""
    return make_tiny_llama()


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The converted SmolLM2-135M-Instruct folder built by the asset rules (``./test.sh`` builds it)."""
    if not (REAL_MODEL_DIR / "config.json").exists():
        if os.environ.get("CI"):
            pytest.fail(f"{REAL_MODEL_DIR} is missing: the asset rules should have built it (see test.sh)")
        pytest.skip(f"{REAL_MODEL_DIR} not built; run `.venv/bin/snakemake --cores all assets`")
    return REAL_MODEL_DIR


@pytest.fixture(scope="session")
def real_model(real_model_dir):
    """The real SmolLM2-135M-Instruct in fp32, loaded once per session. Do not mutate it in place."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="session")
def real_tokenizer(real_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_model_dir)
