"""A tiny randomly initialised LLaMA with a real tokenizer, for the smoke pipeline and tests.

The smoke configuration (``config/smoke.yaml``, ``model.source: tiny-random``) trains and evaluates
every method end to end in seconds per job. The model has SmolLM2's tokenizer and chat template (so
data rendering and label masking are the real ones) but only 2 layers of width 64.
"""
from __future__ import annotations

import os
from pathlib import Path

from spielbench.fsio import atomic_dir


def build_tiny_random(tokenizer_dir: str | os.PathLike, out_dir: str | os.PathLike, seed: int = 0,
                      hidden_size: int = 64, num_layers: int = 2) -> Path:
    """Write a random tiny ``LlamaForCausalLM`` (fp32 safetensors) plus the tokenizer of ``tokenizer_dir``.

    Args:
        tokenizer_dir: a folder holding a transformers tokenizer (e.g. the converted SmolLM2 folder).
        out_dir: destination folder; written atomically (a temp folder renamed into place).
        seed: torch seed of the initialisation.
        hidden_size: width; intermediate size is 2x, 4 heads, 2 key/value heads.
        num_layers: number of decoder blocks.

    Returns:
        The output folder.

    Raises:
        FileNotFoundError: ``tokenizer_dir`` holds no tokenizer.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok_dir = Path(tokenizer_dir)
    if not (tok_dir / "tokenizer_config.json").exists():
        raise FileNotFoundError(f"{tok_dir}: no tokenizer_config.json (expected a tokenizer folder)")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m spielbench.tiny TOKENIZER_DIR OUT_DIR [--seed N]``."""
    import argparse

    ap = argparse.ArgumentParser(description=build_tiny_random.__doc__.splitlines()[0])
    ap.add_argument("tokenizer_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    build_tiny_random(args.tokenizer_dir, args.out_dir, seed=args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
