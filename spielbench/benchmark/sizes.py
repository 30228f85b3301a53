"""The benchmark's model sizes: LLaMA-architecture shapes built with random weights (weights do not change
step time or memory), from the tests' ``tiny`` to the paper's Llama-2-7B/13B."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSize:
    """A LLaMA-architecture shape (``transformers.LlamaConfig`` fields) benchmarked with random weights.

    Attributes: ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``,
    ``intermediate_size`` (MLP width), ``vocab_size``, ``tie_word_embeddings`` (``lm_head`` shares the
    input embedding), ``rope_theta``, ``max_position_embeddings``, ``description``.
    """

    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    description: str = ""

    @property
    def head_dim(self) -> int:
        """``hidden_size // num_attention_heads``."""
        return self.hidden_size // self.num_attention_heads

    def llama_config(self):
        """The ``transformers.LlamaConfig`` of this size (``use_cache=False``, no biases)."""
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, rope_theta=self.rope_theta, rms_norm_eps=1e-5,
            use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )

    def linear_shapes(self) -> list[tuple[str, int, int]]:
        """The seven projections of one block as ``(name, in_features, out_features)``."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        f = self.intermediate_size
        return [("q_proj", h, h), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", h, h),
                ("gate_proj", h, f), ("up_proj", h, f), ("down_proj", f, h)]

    def num_linear_parameters(self) -> int:
        """Weights of all targeted projections (the matrices SpIEL/LoRA adapt)."""
        return self.num_hidden_layers * sum(i * o for _, i, o in self.linear_shapes())

    def num_parameters(self) -> int:
        """All parameters: embeddings, projections, norms, ``lm_head`` (once if tied)."""
        embed = self.vocab_size * self.hidden_size
        norms = (2 * self.num_hidden_layers + 1) * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return embed + head + norms + self.num_linear_parameters()

    def lora_parameters(self, rank: int) -> int:
        """LoRA's trainable count at ``rank`` over the seven projections: ``rank * Σ(in + out)``."""
        return rank * self.num_hidden_layers * sum(i + o for _, i, o in self.linear_shapes())


def _size(name, h, layers, heads, kv, ffn, vocab, tied, theta, desc, max_pos=4096) -> ModelSize:
    return ModelSize(name, h, layers, heads, kv, ffn, vocab, tied, theta, max_pos, desc)


#: The benchmark sizes by name.
SIZES: dict[str, ModelSize] = {s.name: s for s in (
    _size("tiny", 64, 2, 4, 2, 128, 256, False, 10000.0, "tests only: 2 blocks of width 64", 512),
    _size("smollm2-135m", 576, 30, 9, 3, 1536, 49152, True, 100000.0, "SmolLM2-135M shape (134.5M parameters)", 8192),
    _size("smollm2-360m", 960, 32, 15, 5, 2560, 49152, True, 100000.0, "SmolLM2-360M shape (361.8M parameters)", 8192),
    _size("smollm2-1.7b", 2048, 24, 32, 32, 8192, 49152, True, 130000.0, "SmolLM2-1.7B shape (1.71B parameters)", 8192),
    _size("llama2-7b", 4096, 32, 32, 32, 11008, 32000, False, 10000.0, "Llama-2-7B shape (6.74B parameters)"),
    _size("llama2-13b", 5120, 40, 40, 40, 13824, 32000, False, 10000.0, "Llama-2-13B shape (13.0B parameters)"),
)}
