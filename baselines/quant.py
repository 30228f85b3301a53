"""NF4 (4-bit NormalFloat) loading of a base model through bitsandbytes, shared by qLoRA and qSpIEL.

The reference loads the base model with ``BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=bfloat16)``
(docs/METHOD.md §6, "4-bit (qSpIEL)"). Here the compute dtype follows the device: bfloat16 on CUDA as
in the reference, float32 on CPU (bitsandbytes' CPU backend runs NF4 matmuls in either dtype; float32
keeps CPU runs comparable with the unquantized float32 runs).
"""
from __future__ import annotations

from pathlib import Path

import torch

def nf4_compute_dtype(device: str) -> torch.dtype:
    """The NF4 compute dtype for ``device`` ("cpu" or "cuda[:i]"): bfloat16 on CUDA, float32 on CPU."""
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def nf4_config(device: str):
    """``transformers.BitsAndBytesConfig`` for NF4 with double quantization (docs/METHOD.md §6).

    Modules that stay unquantized: ``lm_head`` (transformers' default skip list keeps the output
    layer in full precision); embeddings and norms are not ``nn.Linear`` and are never quantized.
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=nf4_compute_dtype(device),
    )


def load_nf4_model(model_path: str | Path, device: str = "cpu"):
    """Load a causal LM from a local folder with its linear layers quantized to NF4.

    Args:
        model_path: a ``save_pretrained`` folder (config.json + safetensors).
        device: "cpu" or "cuda[:i]"; the whole model is placed there (``device_map={"": device}``).

    Returns:
        ``PreTrainedModel`` whose ``nn.Linear`` layers (except ``lm_head``) are
        ``bitsandbytes.nn.Linear4bit`` holding packed ``Params4bit`` (uint8, two 4-bit codes per byte);
        non-quantized parameters are in the compute dtype (float32 on CPU, bfloat16 on CUDA).

    Raises:
        ImportError: bitsandbytes is not installed.
    """
    from transformers import AutoModelForCausalLM

    dtype = nf4_compute_dtype(device)
    model = AutoModelForCausalLM.from_pretrained(
        str(model_path),
        quantization_config=nf4_config(device),
        dtype=dtype,
        device_map={"": str(device)},
    )
    keep_training_layout(model)
    return model


def keep_training_layout(model) -> int:
    """Stop bitsandbytes from repacking NF4 weights for its CPU inference kernel; returns the layers changed.

    On a CPU with AVX512-BF16, ``Linear4bit.forward`` in eval mode without gradients converts its weight,
    in place and for good, to a packed layout whose block scales (absmax) are rounded to bfloat16, and
    later forwards (training ones too) go through ``gemv_4bit``, which has no autograd kernel: gradients
    to earlier layers become silently wrong (torch warns "an autograd kernel was not registered"), and a
    held-out evaluation before training changes the numbers of the training run. Clearing the layer's
    ``support_avx512bf16_for_cpu`` flag keeps the standard dequantize-then-matmul path in every mode.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed

